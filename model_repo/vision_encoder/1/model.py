"""Triton Python-backend model: an ONNX model run with ONNX Runtime on CPU.

One file serves every ONNX model of the repository (`vision_vit/1/model.py` is a link to
this one): inputs and outputs are read from the model's config. Triton's dynamic batcher
hands `execute` several requests at once; their inputs are concatenated into one ORT run
(that is the point of batching) and the outputs are split back per request.

Tensors cross the backend boundary through DLPack, not `as_numpy()` / `Tensor(name,
ndarray)`: the backend stub shipped with tritonserver 2.51 (nvidia-pytriton) was built
against NumPy 1, and with NumPy 2 those calls read a zero item size (inputs come back as
zeros, outputs as zero bytes). DLPack carries dtype and shape in a plain C struct.
"""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name.restype = ctypes.c_int
# A module constant: the capsule keeps a pointer to the name for its whole life.
_USED_DLTENSOR = b"used_dltensor"


class _DLPackCapsule:
    """Lets np.from_dlpack consume a bare capsule (it wants a __dlpack__ object)."""

    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU, device 0


def _to_numpy(tensor: Any) -> np.ndarray:
    """A zero-copy view of a request's input tensor."""
    return np.from_dlpack(_DLPackCapsule(tensor.to_dlpack()))


def _to_triton(name: str, array: np.ndarray) -> Any:
    array = np.ascontiguousarray(array)
    capsule = array.__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    # The stub marks the consumed capsule "used_dlpack", a name NumPy's capsule
    # destructor does not know, so it would print an error for every output. The stub
    # owns the DLPack tensor now; give the capsule the standard "consumed" name.
    _capsule_set_name(capsule, _USED_DLTENSOR)
    return tensor


def _param(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return str(value) if value else default


class TritonPythonModel:
    """Runs `onnx_file` with ONNX Runtime for the inputs and outputs of the model's config.

    Parameters (config.pbtxt): `onnx_file`, `intra_op_threads`, `allow_spinning`.
    Requests of one batch are grouped by the shapes of their inputs after the batch axis
    (inputs with `allow_ragged_batch` differ from request to request, e.g. the ViT's number
    of patches to recompute); each group is one ONNX Runtime run.
    """

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, _param(config, "onnx_file", "model.onnx"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(_param(config, "intra_op_threads", "2"))
        # One request batch at a time per instance: inter-op threads would only contend.
        opts.inter_op_num_threads = 1
        # No busy-waiting between runs: the spinning threads would take the CPU from the
        # server and, on small machines, from the encoder beside it.
        opts.add_session_config_entry("session.intra_op.allow_spinning", _param(config, "allow_spinning", "0"))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            onnx_path, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        ort_types = {i.name: i.type for i in self.session.get_inputs()}
        self.inputs = [i["name"] for i in config["input"]]
        self.input_dtypes = {name: _ORT_NUMPY[ort_types[name]] for name in self.inputs}
        self.outputs = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }
        self.max_batch = int(config.get("max_batch_size", 16)) or 16

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            arrays = [
                {
                    name: np.asarray(
                        _to_numpy(pb_utils.get_input_tensor_by_name(request, name)),
                        dtype=self.input_dtypes[name],
                    )
                    for name in self.inputs
                }
                for request in requests
            ]
            groups: dict[tuple, list[int]] = {}
            for i, a in enumerate(arrays):
                groups.setdefault(tuple(a[n].shape[1:] for n in self.inputs), []).append(i)
            results: list[dict[str, np.ndarray]] = [{} for _ in requests]
            for members in groups.values():
                self._run_group([arrays[i] for i in members], [results[i] for i in members])
        except Exception as exc:  # one bad batch must not take the model down
            error = pb_utils.TritonError(f"{type(self).__module__} failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        # Only the outputs a request asked for cross back (e.g. tokens without the ViT's
        # cache rows when the encoder will not need them).
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    _to_triton(name, result[name])
                    for name in (request.requested_output_names() or self.outputs)
                    if name in result
                ]
            )
            for request, result in zip(requests, results, strict=True)
        ]

    def _run_group(self, arrays: list[dict[str, np.ndarray]], into: list[dict[str, np.ndarray]]) -> None:
        feeds = {
            name: arrays[0][name] if len(arrays) == 1 else np.concatenate([a[name] for a in arrays], axis=0)
            for name in self.inputs
        }
        outputs = self._run(feeds)
        start = 0
        for a, result in zip(arrays, into, strict=True):
            n = a[self.inputs[0]].shape[0]
            for name, value in outputs.items():
                result[name] = value[start : start + n]
            start += n

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Triton caps each request at max_batch_size, but the batcher may hand over
        # several requests totalling more; run in chunks to keep memory bounded.
        total = next(iter(feeds.values())).shape[0]
        chunks = [
            self.session.run(self.outputs, {k: v[i : i + self.max_batch] for k, v in feeds.items()})
            for i in range(0, total, self.max_batch)
        ]
        return {
            name: np.concatenate([c[j] for c in chunks], axis=0).astype(self.output_dtypes[name], copy=False)
            if len(chunks) > 1
            else chunks[0][j].astype(self.output_dtypes[name], copy=False)
            for j, name in enumerate(self.outputs)
        }

    def finalize(self) -> None:
        self.session = None


_ORT_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
}

"""Triton Python-backend model: the vision encoder ONNX run with ONNX Runtime on CPU.

Triton's dynamic batcher hands `execute` several requests at once; their inputs are
concatenated into one ORT run (that is the point of batching) and the output is split
back per request.

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
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, _param(config, "onnx_file", "model.onnx"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(_param(config, "intra_op_threads", "2"))
        # One request batch at a time per instance: inter-op threads would only contend.
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            onnx_path, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        out_cfg = pb_utils.get_output_config_by_name(config, "tokens")
        self.out_dtype = pb_utils.triton_string_to_numpy(out_cfg["data_type"])
        self.max_batch = int(config.get("max_batch_size", 16)) or 16

    def execute(self, requests: list[Any]) -> list[Any]:
        inputs: list[np.ndarray] = []
        for request in requests:
            x = _to_numpy(pb_utils.get_input_tensor_by_name(request, "pixels"))
            inputs.append(np.asarray(x, dtype=np.float32))
        sizes = [x.shape[0] for x in inputs]
        try:
            batch = np.concatenate(inputs, axis=0) if len(inputs) > 1 else inputs[0]
            tokens = self._run(batch)
        except Exception as exc:  # one bad batch must not take the model down
            error = pb_utils.TritonError(f"vision_encoder failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        start = 0
        for n in sizes:
            out = _to_triton("tokens", tokens[start : start + n])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += n
        return responses

    def _run(self, batch: np.ndarray) -> np.ndarray:
        # Triton caps each request at max_batch_size, but the batcher may hand over
        # several requests totalling more; run in chunks to keep memory bounded.
        chunks = [
            self.session.run(["tokens"], {"pixels": batch[i : i + self.max_batch]})[0]
            for i in range(0, batch.shape[0], self.max_batch)
        ]
        out = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)
        return out.astype(self.out_dtype, copy=False)

    def finalize(self) -> None:
        self.session = None

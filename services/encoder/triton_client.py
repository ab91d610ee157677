"""The vision model as Triton serves it.

Two kinds, told apart by the model's metadata:
- stateless (vision_encoder): pixels [N,3,S,S] fp32 -> tokens [N,T,H] fp16;
- a ViT with partial recompute (vision_vit): pixels, `index` [1,K] of patches to recompute
  and the stream's cache (keys, values [1,L,T,D]) -> the recomputed rows (tokens, keys,
  values), which the client writes into its copy of the cache.
  The cache stays with the encoder replica that owns the stream. Its config may name a
  plain twin (`plain_model`, the same weights without a cache) for whole frames whose
  cache no later frame needs.

The client knows the served model's token grid (`grid`, from its metadata); the tokens
records take it from there.

One client is shared by the encoder's worker threads (gRPC channels are thread-safe).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from typing import NamedTuple

import numpy as np
import tritonclient.grpc as grpcclient

from services.encoder.feature_cache import ViTState
from services.encoder.grid import UNKNOWN, Grid

STATE_INPUTS = ("keys_others", "values_others")
CLASS_PROBS = "class_probs"


class Encoded(NamedTuple):
    """What one request for whole frames returns."""

    tokens: np.ndarray  # [B, T, H]
    states: list[ViTState] | None  # a cached ViT's cache after each frame, when asked for
    class_probs: np.ndarray | None  # [B, classes], where the model has a classifier output


class VisionModelClient:
    def __init__(self, url: str, model_name: str) -> None:
        self.url = url
        self.model_name = model_name
        self.client = grpcclient.InferenceServerClient(url=url)
        self.partial = False  # set from the metadata by wait_ready()
        self.grid: Grid = UNKNOWN  # set from the metadata by wait_ready()
        self.cache_shape: tuple[int, int, int] = (0, 0, 0)  # a cached ViT's [layers, patches, width]
        self.plain: VisionModelClient | None = None  # a cached ViT's twin without a cache
        self.classifies = False  # the model also returns class_probs (the frames' tags)
        # An imported model's preprocessing (its config's "preprocessing" parameter, JSON:
        # size, mean, std, resample); None: the built-in model's.
        self.preprocessing: dict | None = None  # type: ignore[type-arg]

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client.is_model_ready(self.model_name):
                    break
            except Exception:  # noqa: BLE001 - server still starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Triton at {self.url} has no ready model {self.model_name!r}")
            time.sleep(0.5)
        self._read_metadata()

    def _read_metadata(self) -> None:
        meta = self.client.get_model_metadata(self.model_name, as_json=True)
        inputs = {i["name"]: [int(d) for d in i["shape"]] for i in meta["inputs"]}
        outputs = {o["name"]: [int(d) for d in o["shape"]] for o in meta["outputs"]}
        if "pixels" not in inputs:
            raise RuntimeError(f"Triton model {self.model_name!r} has no pixels input")
        params = self.client.get_model_config(self.model_name, as_json=True)["config"].get("parameters", {})
        prep = params.get("preprocessing", {}).get("string_value")
        if prep:
            try:
                self.preprocessing = json.loads(prep)
            except ValueError as exc:
                raise RuntimeError(f"Triton model {self.model_name!r}: its preprocessing parameter is not JSON "
                                   f"({exc})") from exc
        self.partial = "index" in inputs and all(name in inputs for name in STATE_INPUTS)
        tokens = outputs.get("tokens_new" if self.partial else "tokens")
        if tokens is None:
            raise RuntimeError(f"Triton model {self.model_name!r} has no tokens output")
        if self.partial:  # the cache's shape [layers, patches, width]; patches from the config
            patches = int(params.get("num_patches", {}).get("string_value") or 0)
            if patches <= 0:
                raise RuntimeError(f"Triton model {self.model_name!r}: a cached ViT's config needs the "
                                   "parameter num_patches")
            layers, _, width = inputs["keys_others"][1:]
            self.cache_shape = (layers, patches, width)
            plain = params.get("plain_model", {}).get("string_value")
            if plain and self.plain is None:
                self.plain = VisionModelClient(self.url, plain)
                self.plain.wait_ready()
        else:
            patches = tokens[-2]
            self.classifies = CLASS_PROBS in outputs
        self.grid = Grid.of(patches)

    def grid_of(self, tokens: np.ndarray) -> Grid:
        """The grid of a frame's tokens [T, H]: the served model's (worked out from T where
        its metadata did not say)."""
        return self.grid if self.grid.known else Grid.of(tokens.shape[0])

    def encode(self, pixels: np.ndarray, with_cache: bool = True) -> Encoded:
        """Frames [B,3,S,S] whole, in one request: tokens [B, T, H]; for a cached ViT with
        `with_cache` the cache each frame leaves (else None: the cache rows, 2 MB a frame,
        do not travel back); the class probabilities where the model has them."""
        if self.plain is not None and not with_cache:
            return self.plain.encode(pixels)
        if not self.partial:
            names = ["tokens", CLASS_PROBS] if self.classifies else ["tokens"]
            result = self.client.infer(self.model_name, _inputs(("pixels", pixels, "FP32")),
                                       outputs=[grpcclient.InferRequestedOutput(n) for n in names])
            tokens = result.as_numpy("tokens")
            if tokens is None:
                raise RuntimeError(f"Triton model {self.model_name!r} returned no 'tokens' output")
            return Encoded(tokens, None, result.as_numpy(CLASS_PROBS) if self.classifies else None)
        b, (layers, patches, width) = pixels.shape[0], self.cache_shape
        none = np.zeros((b, layers, 0, width), np.float16)  # every patch is recomputed
        inputs, outputs = self._partial_request(pixels, np.tile(np.arange(patches), (b, 1)), none, none, with_cache)
        tokens, keys, values = self._partial_result(self.client.infer(self.model_name, inputs, outputs=outputs),
                                                    with_cache)
        if keys is None or values is None:
            return Encoded(tokens, None, None)
        return Encoded(tokens, [ViTState(k.transpose(1, 0, 2).copy(), v.transpose(1, 0, 2).copy(), t.copy())
                                for t, k, v in zip(tokens, keys, values, strict=True)], None)

    def encode_partial(self, frames: list[tuple[np.ndarray, np.ndarray]],
                       state: ViTState) -> tuple[list[np.ndarray], ViTState]:
        """Frames [3,S,S], each with the patches to recompute on top of the same cache
        `state`: independent requests, all in flight at once (Triton batches them). Returns
        each frame's tokens [T, H] (the other patches' are the cached ones) and the cache
        the last frame leaves; only the last request asks for its cache rows back."""
        patches = np.arange(state.tokens.shape[0])
        pending = []
        for n, (pixels, index) in enumerate(frames):
            others = np.setdiff1d(patches, index)
            inputs, outputs = self._partial_request(pixels[None], index[None], state.keys[None][:, :, others],
                                                    state.values[None][:, :, others], n == len(frames) - 1)
            pending.append(self._submit(inputs, outputs))
        results = [self._partial_result(future.result(), n == len(frames) - 1) for n, future in enumerate(pending)]
        tokens = []
        for (_, index), (rows, _, _) in zip(frames, results, strict=True):
            out = state.tokens.copy()
            out[index] = rows[0]
            tokens.append(out)
        (_, index), (rows, keys, values) = frames[-1], results[-1]
        assert keys is not None and values is not None
        return tokens, state.updated(index, rows[0], keys[0], values[0])

    def _submit(self, inputs: list, outputs: list) -> Future:  # type: ignore[type-arg]
        future: Future = Future()  # type: ignore[type-arg]

        def done(result, error) -> None:  # type: ignore[no-untyped-def]
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.client.async_infer(self.model_name, inputs, callback=done, outputs=outputs)
        return future

    def _partial_request(self, pixels: np.ndarray, index: np.ndarray, keys_others: np.ndarray,
                         values_others: np.ndarray, with_cache: bool) -> tuple[list, list]:  # type: ignore[type-arg]
        inputs = _inputs(("pixels", pixels, "FP32"), ("index", index, "INT64"),
                         ("keys_others", keys_others, "FP16"), ("values_others", values_others, "FP16"))
        names = ("tokens_new", "keys_new", "values_new") if with_cache else ("tokens_new",)
        return inputs, [grpcclient.InferRequestedOutput(n) for n in names]

    def _partial_result(self, result, with_cache: bool  # type: ignore[no-untyped-def]
                        ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        tokens, keys, values = (result.as_numpy(n) for n in ("tokens_new", "keys_new", "values_new"))
        if tokens is None or (with_cache and (keys is None or values is None)):
            raise RuntimeError(f"Triton model {self.model_name!r} returned no tokens or cache")
        return tokens, keys, values

    def close(self) -> None:
        if self.plain is not None:
            self.plain.close()
        self.client.close()


_NUMPY = {"FP32": np.float32, "INT64": np.int64, "FP16": np.float16}


def _inputs(*tensors: tuple[str, np.ndarray, str]) -> list[grpcclient.InferInput]:
    """Triton request inputs from (name, array, Triton dtype)."""
    inputs = []
    for name, array, dtype in tensors:
        inp = grpcclient.InferInput(name, list(array.shape), dtype)
        inp.set_data_from_numpy(np.ascontiguousarray(array, dtype=_NUMPY[dtype]))
        inputs.append(inp)
    return inputs

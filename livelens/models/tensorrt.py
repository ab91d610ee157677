"""Build the TensorRT engine of a Triton model from its ONNX, on a GPU node.

    python -m livelens.models.tensorrt model_repo/vision_encoder          # -> 1/model.plan

The optimization profile comes from the model's GPU configuration (configs/gpu.pbtxt):
batch 1 (min) .. max_batch_size (max), optimized for the largest preferred batch size of
its dynamic batcher (the batches Triton actually forms); the other dimensions are the
configured input dims. The build runs NVIDIA's `trtexec` (shipped in the Triton NGC
image at /usr/src/tensorrt/bin/trtexec). It cannot run on a machine without a GPU and
TensorRT: it then exits with status 2 and says why. `--dry-run` prints the command.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TRTEXEC_PATHS = ("trtexec", "/usr/src/tensorrt/bin/trtexec")


@dataclass(frozen=True)
class Profile:
    input_name: str
    dims: tuple[int, ...]  # without the batch axis
    min_batch: int
    opt_batch: int
    max_batch: int

    def shape(self, batch: int) -> str:
        return "x".join(str(d) for d in (batch, *self.dims))


def read_config(path: Path):  # -> model_config_pb2.ModelConfig
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def profile_for(config) -> Profile:  # config: model_config_pb2.ModelConfig
    """The optimization profile for a batched model's configuration."""
    if config.max_batch_size < 1:
        raise ValueError(f"model {config.name}: max_batch_size must be >= 1 to build a batched engine")
    if len(config.input) != 1:
        raise ValueError(f"model {config.name}: expected one input, found {len(config.input)}")
    preferred = [b for b in config.dynamic_batching.preferred_batch_size if b <= config.max_batch_size]
    opt = max(preferred) if preferred else config.max_batch_size
    return Profile(config.input[0].name, tuple(int(d) for d in config.input[0].dims), 1, opt, config.max_batch_size)


def trtexec_command(trtexec: str, onnx: Path, plan: Path, profile: Profile, fp16: bool = True) -> list[str]:
    p = profile
    cmd = [trtexec, f"--onnx={onnx}", f"--saveEngine={plan}",
           f"--minShapes={p.input_name}:{p.shape(p.min_batch)}",
           f"--optShapes={p.input_name}:{p.shape(p.opt_batch)}",
           f"--maxShapes={p.input_name}:{p.shape(p.max_batch)}"]
    return cmd + (["--fp16"] if fp16 else [])


def find_trtexec() -> str | None:
    for name in TRTEXEC_PATHS:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m livelens.models.tensorrt", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path, help="a Triton model directory (with 1/model.onnx, configs/gpu.pbtxt)")
    ap.add_argument("--version", default="1")
    ap.add_argument("--fp32", action="store_true", help="no fp16 kernels")
    ap.add_argument("--force", action="store_true", help="rebuild even if the plan exists")
    ap.add_argument("--dry-run", action="store_true", help="print the trtexec command and exit")
    args = ap.parse_args(argv)
    config_path = args.model_dir / "configs" / "gpu.pbtxt"
    onnx = args.model_dir / args.version / "model.onnx"
    for path in (config_path, onnx):
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    config = read_config(config_path)
    if config.platform != "tensorrt_plan":
        print(f"error: {config_path} is not a tensorrt_plan configuration", file=sys.stderr)
        return 2
    plan = args.model_dir / args.version / (config.default_model_filename or "model.plan")
    trtexec = find_trtexec() or "trtexec"
    cmd = trtexec_command(trtexec, onnx, plan, profile_for(config), fp16=not args.fp32)
    print(" ".join(cmd))
    if args.dry_run:
        return 0
    if plan.is_file() and not args.force:
        print(f"{plan} exists; --force rebuilds it")
        return 0
    if find_trtexec() is None:
        print("error: trtexec not found: build the engine on a GPU node with TensorRT "
              "(the Triton NGC image has /usr/src/tensorrt/bin/trtexec)", file=sys.stderr)
        return 2
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())

"""Build the TensorRT engine of a Triton model from its ONNX, on a GPU node.

    python -m devtools.models.tensorrt model_repo/vision_encoder          # -> 1/model.plan

The optimization profile comes from the model's GPU configuration (configs/gpu.pbtxt):
batch 1 (min) .. max_batch_size (max), optimized for the largest preferred batch size of
its dynamic batcher (the batches Triton actually forms); the other dimensions are the
configured input dims. A variable dim (-1, e.g. the ViT's number of patches to recompute)
takes min:opt:max from the config's parameter `tensorrt_profile`
("index:1:49:196;keys_others:0:147:195"). The build runs NVIDIA's `trtexec` (shipped in the Triton NGC
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
class InputProfile:
    name: str
    min: tuple[int, ...]  # with the batch axis
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    inputs: tuple[InputProfile, ...]

    def shapes(self, which: str) -> str:
        """trtexec's form: "name:1x3x224x224,index:1x49"."""
        return ",".join(f"{i.name}:{'x'.join(str(d) for d in getattr(i, which))}" for i in self.inputs)


def read_config(path: Path):  # -> model_config_pb2.ModelConfig
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _variable_dims(config) -> dict[str, tuple[int, int, int]]:  # config: model_config_pb2.ModelConfig
    spec = config.parameters["tensorrt_profile"].string_value if "tensorrt_profile" in config.parameters else ""
    out = {}
    for part in filter(None, spec.split(";")):
        try:
            name, lo, opt, hi = part.split(":")
            out[name.strip()] = (int(lo), int(opt), int(hi))
        except ValueError:
            raise ValueError(f"model {config.name}: tensorrt_profile entry {part!r} is not "
                             "name:min:opt:max") from None
    return out


def profile_for(config) -> Profile:  # config: model_config_pb2.ModelConfig
    """The optimization profile for a batched model's configuration."""
    if config.max_batch_size < 1:
        raise ValueError(f"model {config.name}: max_batch_size must be >= 1 to build a batched engine")
    preferred = [b for b in config.dynamic_batching.preferred_batch_size if b <= config.max_batch_size]
    opt_batch = max(preferred) if preferred else config.max_batch_size
    variable = _variable_dims(config)
    inputs = []
    for inp in config.input:
        dims = [int(d) for d in inp.dims]
        lo, opt, hi = [1], [opt_batch], [config.max_batch_size]
        for d in dims:
            if d >= 0:
                values: tuple[int, int, int] = (d, d, d)
            elif inp.name in variable:
                values = variable[inp.name]
            else:
                raise ValueError(f"model {config.name}: input {inp.name} has a variable dim; give its "
                                 "min:opt:max in the parameter tensorrt_profile")
            for shape, value in zip((lo, opt, hi), values, strict=True):
                shape.append(value)
        inputs.append(InputProfile(inp.name, tuple(lo), tuple(opt), tuple(hi)))
    return Profile(tuple(inputs))


def trtexec_command(trtexec: str, onnx: Path, plan: Path, profile: Profile, fp16: bool = True) -> list[str]:
    cmd = [trtexec, f"--onnx={onnx}", f"--saveEngine={plan}", f"--minShapes={profile.shapes('min')}",
           f"--optShapes={profile.shapes('opt')}", f"--maxShapes={profile.shapes('max')}"]
    return cmd + (["--fp16"] if fp16 else [])


def find_trtexec() -> str | None:
    for name in TRTEXEC_PATHS:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.models.tensorrt", description=__doc__.split("\n")[0])
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
    try:
        profile = profile_for(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cmd = trtexec_command(trtexec, onnx, plan, profile, fp16=not args.fp32)
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

"""The commands the server package adds to `livelens` (entry points `livelens.commands`,
pyproject.toml): up, bench, train, models. Each loads the configuration as a service does
(`load_service_config`: the model config applied, the context checked)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from livelens.cli import SERVER_COMMANDS, Command, default_token, fail, run_watch, watch_arguments
from livelens.local_stack import UP_POINTER
from services.common.settings import load_service_config

DEMO_CUT_IN = "skimage:chelsea.png"


def _up_arguments(p: argparse.ArgumentParser) -> None:
    watch_arguments(p)
    p.add_argument("--video", help="demo video: a file or a sample video's name (default: opencv-doc's vtest.avi)")
    p.add_argument("--no-demo", action="store_true", help="start the stack only")
    p.add_argument("--exit-after-demo", action="store_true", help="stop once the demo is done")
    p.add_argument("--run-dir", help="where logs and the effective config go (default: a temp dir)")
    p.add_argument("--replicas", type=int, default=1,
                   help="replicas of each service (gateway, encoder, LLM), sharing the consumer groups (default 1)")


def _up(args: argparse.Namespace) -> int:
    from devtools.infra.process import ProcessFailed
    from devtools.stack import Stack
    from devtools.train.data import image_path
    from livelens.video import VideoError, sample_video
    from services.common.ports import PortInUseError
    from services.llm.budget import check_context_fits

    cfg = load_service_config(args.config)
    check_context_fits(cfg)  # the LLM service would refuse it starting: before anything starts

    if args.replicas < 1:
        return fail(f"--replicas must be at least 1, got {args.replicas}")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="livelens-up-"))
    stack = Stack(cfg, run_dir)

    try:
        stack.start(progress=lambda msg: print(f"==> {msg}", flush=True))
        gateways = [stack.gateway_target]
        for service in ("llm", "encoder", "gateway"):
            for _ in range(args.replicas - 1):
                print(f"==> starting another {service} replica", flush=True)
                _, replica_cfg = stack.add_replica(service)
                if service == "gateway":
                    gateways.append(f"{replica_cfg.gateway.host}:{replica_cfg.gateway.port}")
        UP_POINTER.parent.mkdir(parents=True, exist_ok=True)
        UP_POINTER.write_text(json.dumps({"pid": os.getpid(), "status": str(stack.status_path)}))
        if not args.no_demo:
            try:
                video = args.video or str(sample_video())
            except VideoError as exc:
                return fail(str(exc))
            if not args.ask:
                args.ask = ["8:What do you see in the video?", "20:What are the people doing?"]
                if not args.cut_in:  # a cat cut in at 12 s; asked about after it left the recent window
                    args.cut_in = f"{image_path(DEMO_CUT_IN)}@12"
                    args.ask += ["24:Did a cat appear in the video?", "26:When did a cat appear?"]
            args.max_seconds = args.max_seconds or 30.0
            print(f"==> demo: streaming {video} at {args.fps:g} fps", flush=True)
            code = asyncio.run(run_watch(cfg, stack.gateway_target, default_token(cfg), video, args))
            if code:
                return code
        if args.exit_after_demo:
            return 0
        print(f"==> livelens is up: gateway {', '.join(gateways)}. Ctrl-C stops everything.",
              flush=True)
        while True:  # the supervisor restarts whatever crashes
            time.sleep(1)
    except PortInUseError as exc:
        return fail(str(exc))
    except (ProcessFailed, FileNotFoundError, TimeoutError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print("\n==> stopping", flush=True)
        return 0
    finally:
        stack.stop()


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from devtools.bench.cli import add_arguments

    add_arguments(p)


def _bench(args: argparse.Namespace) -> int:
    from devtools.bench.cli import run

    return run(load_service_config(args.config), args)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["projector"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the training run (see --help after it)")


def _train(args: argparse.Namespace) -> int:
    from devtools.train.projector import main as train_projector

    return train_projector(args.rest)


def _models_arguments(p: argparse.ArgumentParser) -> None:
    msub = p.add_subparsers(dest="models_command", required=True)
    imp = msub.add_parser("import", help="split a local LLaVA-OneVision / LongVA checkpoint for Triton + vLLM")
    imp.add_argument("checkpoint", help="the checkpoint's directory (config.json, *.safetensors, tokenizer)")
    imp.add_argument("--name", default=None, help="model name (default: the directory's name)")
    imp.add_argument("--model-repo", default=None, help="Triton model repository (default: triton.model_repository)")
    imp.add_argument("--models-dir", default=None, help="where the LM and model config go (default: build/models)")
    imp.add_argument("--tokens-dtype", choices=["float32", "float16"], default="float32",
                     help="the visual tokens' dtype on the wire (default float32)")


def _models(args: argparse.Namespace) -> int:
    cfg = load_service_config(args.config)
    from devtools.models.checkpoint import CheckpointError
    from devtools.models.importer import import_checkpoint

    repo = Path(args.model_repo or cfg.triton.model_repository)
    models_dir = Path(args.models_dir) if args.models_dir else Path(cfg.llm.engine.model_path).parent
    try:
        spec = import_checkpoint(args.checkpoint, args.name, repo, models_dir, tokens_dtype=args.tokens_dtype)
    except CheckpointError as exc:
        return fail(str(exc), 2)
    from devtools.models.tensorrt import profile_for, read_config

    profile = profile_for(read_config(repo / spec.vision_model / "configs" / "gpu.pbtxt"))
    print(f"imported {spec.name}: {spec.family}, {spec.tokens_per_frame} tokens a frame "
          f"({spec.grid[0]}x{spec.grid[1]}), hidden {spec.hidden_size}; Triton model {repo / spec.vision_model}, "
          f"model config {models_dir / spec.name / 'livelens_model.json'}\n"
          f"serve it: model.spec: {models_dir / spec.name}\n"
          f"Helm: --set model.name={spec.name} --set triton.models={{{spec.name}}} " + " ".join(
              f"--set triton.tensorrt.profiles.{spec.name}.{k}Shapes={profile.shapes(k)}"
              for k in ("min", "opt", "max")))
    return 0


UP = Command(SERVER_COMMANDS["up"][1], _up_arguments, _up)
BENCH = Command(SERVER_COMMANDS["bench"][1], _bench_arguments, _bench)
TRAIN = Command(SERVER_COMMANDS["train"][1], _train_arguments, _train)
MODELS = Command(SERVER_COMMANDS["models"][1], _models_arguments, _models)

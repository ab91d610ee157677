"""`livelens bench SUITE`: one subcommand per benchmark suite, each with its own flags
(`livelens bench SUITE --help`). Every suite writes its figures to --out (default
bench/results/SUITE.json) and prints them."""

from __future__ import annotations

import argparse
from pathlib import Path

from livelens.cli import fail
from livelens.config import MATERIALIZERS, LivelensConfig, with_settings

MINUTES = [1.0, 10.0, 30.0, 60.0]


def _out(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--out", default=f"bench/results/{suite}.json",
                   help=f"result file (default bench/results/{suite}.json)")


def _lengths(p: argparse.ArgumentParser, depths: bool = False) -> None:
    """The stream lengths of the suites that grow a stream (and where their needle goes)."""
    p.add_argument("--minutes", type=float, nargs="+", default=MINUTES, help="stream lengths (default 1 10 30 60)")
    if depths:
        p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                       help="where the needle goes (0 = start, 1 = end)")


def add_arguments(bench: argparse.ArgumentParser) -> None:
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")

    p = suites.add_parser("e2e", help="frame-to-context and time-to-first-token through the stack")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of video (default 60)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second (default 2)")
    p.add_argument("--video", default=None, help="video (default: vtest.avi)")
    _out(p, "e2e")
    p.set_defaults(suite_run=_e2e)

    p = suites.add_parser("context", help="the context methods side by side: compute, memory and answers by length")
    _lengths(p)
    p.add_argument("--methods", nargs="+", default=None,
                   choices=["full_context", "window_recompute", "recompute", "streaming_kv", "engine_cache"],
                   help="which context methods (default: all)")
    _out(p, "context")
    p.set_defaults(suite_run=_context)

    p = suites.add_parser("needle", help="retrieval: a needle frame found back at each depth and top-k")
    _lengths(p, depths=True)
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16], help="top-k values (default 4 8 16)")
    _out(p, "needle")
    p.set_defaults(suite_run=_needle)

    p = suites.add_parser("encoder", help="the frame encoder's throughput and what its caching saves")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of video (default 60)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second (default 2)")
    p.add_argument("--videos", nargs="+", default=None,
                   help="sample videos (default: vtest.avi tree.avi Megamind.avi bikes.mp4)")
    p.add_argument("--streams", type=int, nargs="+", default=None, help="concurrent stream counts (default 1 2 4 8)")
    p.add_argument("--backbone", choices=["vit", "mobilenet"], default="vit",
                   help="vit (vision_vit with partial recompute vs vision_vit_full) or mobilenet "
                        "(vision_encoder; levels 1, 2, 4)")
    _out(p, "encoder")
    p.set_defaults(suite_run=_encoder)

    p = suites.add_parser("quality", help="answer quality: needles of several kinds in several haystacks, grounding")
    _lengths(p, depths=True)
    p.add_argument("--haystack", nargs="+", default=None,
                   help="haystack videos (files or sample names), each needle in one in turn "
                        "(default: vtest.avi bikes.mp4 Megamind_bugy.avi)")
    p.add_argument("--needles", default=None,
                   help="a needles file (JSON: needles [{image, label, kind, words}], absent [...]; "
                        "default: devtools/bench/needles.json)")
    p.add_argument("--needle", default=None, help="one needle image instead of a needles file")
    p.add_argument("--label", default=None, help="what the needle image shows (with --needle)")
    p.add_argument("--kind", default="thing", help="the needle's kind, in 'Which KIND appeared?'")
    p.add_argument("--haystack-fps", type=float, default=0.05,
                   help="frames per second of the needle haystacks (default 0.05)")
    p.add_argument("--grounding-samples", type=int, default=10, help="samples per held-out video (default 10)")
    p.add_argument("--materializers", nargs="+", default=None, choices=list(MATERIALIZERS),
                   help="a pipeline answering with each (default: llm.context.materializer)")
    p.add_argument("--skip", nargs="*", default=[], choices=["grounding", "needle"], help="parts to skip")
    _out(p, "quality")
    p.set_defaults(suite_run=_quality)

    p = suites.add_parser("soak", help="a long run with a kill -9 of a service at intervals: nothing lost")
    p.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    p.add_argument("--streams", type=int, default=4, help="streams (default 4)")
    p.add_argument("--fps", type=float, default=0.5, help="frames per second of each stream (default 0.5)")
    p.add_argument("--kill-every-s", type=float, default=300.0,
                   help="seconds between two kill -9s (in turn: llm, encoder, gateway; default 300)")
    p.add_argument("--replicas", type=int, default=1,
                   help="replicas of each service (kills take them in turn; default 1)")
    _out(p, "soak")
    p.set_defaults(suite_run=_soak)

    p = suites.add_parser("timing", help="when the system speaks up: the deciders against labelled events")
    p.add_argument("--scorer", choices=["auto", "verify", "tags"], default=None,
                   help="how the decider scores its checks (default: llm.instructions.scorer)")
    p.add_argument("--video", default=None, help="one video of your own, with --events")
    p.add_argument("--events", default=None,
                   help="events of --video (JSON [{onset, end, label}] or CSV onset,end,label)")
    p.add_argument("--videos", nargs="+", default=None, help="held-out sample videos (default: vtest.avi bikes.mp4)")
    p.add_argument("--minutes", type=float, default=5.0, help="minutes of each video (default 5)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second (default 2)")
    p.add_argument("--methods", nargs="+", default=None, choices=["decider", "novelty", "commentary", "poll"],
                   help="which deciders (default: all four)")
    _out(p, "timing")
    p.set_defaults(suite_run=_timing)

    p = suites.add_parser("streams", help="concurrent streams: lag, answers and throughput by stream count")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="stream counts (default 1 2 4 8 16)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of video (default 60)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second of each stream (default 2)")
    p.add_argument("--materializers", nargs="+", default=list(MATERIALIZERS), choices=list(MATERIALIZERS),
                   help="the stream counts again on a stack running each of these (default: all three; the "
                        "configured llm.context.materializer's runs come first)")
    p.add_argument("--skip", nargs="*", default=[], choices=["batching-off", "replicas"], help="parts to skip")
    _out(p, "streams")
    p.set_defaults(suite_run=_streams)

    p = suites.add_parser("broker", help="the broker's latency with its log in memory and on disk (no stack)")
    _out(p, "broker")
    p.set_defaults(suite_run=_broker)


def run(cfg: LivelensConfig, args: argparse.Namespace) -> int:
    return int(args.suite_run(cfg, args, Path(args.out)))


def _e2e(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.e2e import run_e2e

    return run_e2e(cfg, seconds=args.seconds, fps=args.fps, video=args.video, out=out)


def _context(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.context import run_context

    return run_context(cfg, out, args.minutes, methods=args.methods)


def _needle(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.needle import run_needle

    try:
        return run_needle(cfg, out, args.minutes, args.depths, args.k)
    except FileNotFoundError as exc:
        return fail(str(exc))


def _encoder(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.encoder import run_encoder

    return run_encoder(cfg, out, seconds=args.seconds, videos=args.videos, streams=args.streams, fps=args.fps,
                       backbone=args.backbone)


def _quality(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.quality import run_quality

    if args.needle and not args.label:
        return fail("--needle needs --label (what the needle image shows) and --kind", 2)
    try:
        return run_quality(cfg, out, args.minutes, args.depths, haystacks=args.haystack,
                           needles_file=Path(args.needles) if args.needles else None,
                           needle=(args.needle, args.label, args.kind) if args.needle else None,
                           haystack_fps=args.haystack_fps, grounding_per_video=args.grounding_samples,
                           skip=tuple(args.skip), materializers=args.materializers or [cfg.llm.context.materializer])
    except (FileNotFoundError, ValueError) as exc:
        return fail(str(exc))


def _soak(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.soak import run_soak

    if args.replicas < 1:
        return fail(f"--replicas must be at least 1, got {args.replicas}", 2)
    return run_soak(cfg, out, minutes=args.minutes, streams=args.streams, fps=args.fps,
                    kill_every_s=args.kill_every_s, replicas=args.replicas)


def _timing(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.timing import METHODS, run_timing

    if args.events and not args.video:
        return fail("--events needs --video (the footage the events describe)", 2)
    if args.video and not args.events:
        return fail("--video needs --events FILE (onset,end,label per event) to be scored", 2)
    videos = [args.video] if args.video else (args.videos or ["vtest.avi", "bikes.mp4"])
    if args.scorer:
        cfg = with_settings(cfg, {"llm.instructions.scorer": args.scorer})
    try:
        return run_timing(cfg, out, videos, minutes=args.minutes, fps=args.fps, events_file=args.events,
                          methods=tuple(args.methods or METHODS))
    except (FileNotFoundError, ValueError) as exc:
        return fail(str(exc))


def _streams(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.streams import run_streams

    return run_streams(cfg, out, counts=args.streams, seconds=args.seconds, fps=args.fps,
                       batching_off="batching-off" not in args.skip, replicas="replicas" not in args.skip,
                       materializers=tuple(args.materializers))


def _broker(cfg: LivelensConfig, args: argparse.Namespace, out: Path) -> int:
    from devtools.bench.broker import run_broker_bench

    return run_broker_bench(out)

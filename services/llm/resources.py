"""What the LLM service's streams share, built in one place: the engine, the embedder,
the segment store and the materializers, as `llm.context.materializer` says. The service, the
benchmarks and the tests all build their streams' resources here (`build_resources`, or
`frames_only_resources` where no engine is needed), so what they measure or assert is
what the service runs."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from livelens.config import LivelensConfig
from services.common.model_spec import served_chat
from services.llm.embedder import ContextEmbedder
from services.llm.engine import VllmEngine
from services.llm.engine_cache import EngineCacheMaterializer
from services.llm.materializer import Materializer, RecomputeMaterializer, StreamingKVMaterializer
from services.llm.question_retrieval import QuestionQueries
from services.llm.segments import TieredSegmentStore
from services.llm.stream import StreamResources

log = logging.getLogger("livelens.llm")


def remove_stale_dirs(root: Path) -> None:
    """The per-process store directories (`llm-<pid>`) of LLM services that died without
    cleaning up (killed): their KV and segments belong to no one now."""
    for d in root.glob("llm-*"):
        try:
            os.kill(int(d.name.removeprefix("llm-")), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            log.info("removing %s: left by a process that is gone", d)
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def segment_store(cfg: LivelensConfig) -> TieredSegmentStore:
    c = cfg.llm
    return TieredSegmentStore(
        ram_budget_bytes=int(c.store.segments_ram_mb * 2**20),
        disk_dir=Path(c.store.segments_disk_dir) / f"llm-{os.getpid()}" if c.store.segments_disk_dir else None,
        disk_budget_bytes=int(c.store.segments_disk_mb * 2**20), retention_segments=c.store.retention_segments)


def build_resources(cfg: LivelensConfig, kv_dir: Path | None) -> tuple[VllmEngine, StreamResources]:
    """The engine and what every stream shares, as `llm.context.materializer` says (the service,
    the benchmarks and the tests all build them here)."""
    c = cfg.llm
    chat, after_frames = served_chat(cfg.model.spec)
    embedder = ContextEmbedder(c.engine.model_path)
    store = segment_store(cfg)
    materializer: Materializer
    if c.context.materializer == "streaming_kv":
        if kv_dir is None:
            raise ValueError("llm.context.materializer streaming_kv needs a KV store directory")
        engine = VllmEngine(c, kv_dir)
        materializer = StreamingKVMaterializer(engine, embedder, c, chat)
        recompute = RecomputeMaterializer(engine, embedder, cache_salt="recompute")
        queries: QuestionQueries | None = QuestionQueries(c.engine.model_path, c.retrieval.layers)
    elif c.context.materializer == "engine_cache":
        # Recompute requests share its cache: both compute every block with its own positions.
        engine = VllmEngine(c)
        materializer = EngineCacheMaterializer(engine, embedder, c, chat)
        recompute = RecomputeMaterializer(engine, embedder)
        queries = None
    else:
        engine = VllmEngine(c)
        materializer = recompute = RecomputeMaterializer(engine, embedder)
        queries = None
    return engine, StreamResources(c, embedder, store, materializer, recompute, queries, chat, after_frames)


def frames_only_resources(cfg: LivelensConfig, embedder: ContextEmbedder | None = None) -> StreamResources:
    """Streams without an engine (benchmarks of retrieval and memory, tests): frames go in,
    contexts are composed, nothing is answered (a recompute materializer with no engine)."""
    recompute = RecomputeMaterializer(None, embedder or ContextEmbedder(cfg.llm.engine.model_path))
    chat, after_frames = served_chat(cfg.model.spec)
    return StreamResources(cfg.llm, recompute.embedder, segment_store(cfg), recompute, recompute,
                           chat=chat, after_frames=after_frames)

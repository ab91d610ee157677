"""A new owner of a stream rebuilds the same context from the stream's checkpoint and a
replay of its tokens records (`services.llm.rebuild`), through the service's own
handlers; here the tokens log is a list (the Kafka side is in test_resilience.py)."""

from pathlib import Path

import numpy as np

from livelens.config import LivelensConfig, load_config, with_settings
from livelens.records import set_tokens
from livelens.v1 import messages_pb2 as pb
from services.llm.core import LLMCore
from services.llm.rebuild import RebuildEnd, RebuildStart, Replayed
from services.llm.resources import frames_only_resources
from services.llm.stream import Stream

KEY = "acme/cam"


def frame(seq: int, rng: np.random.Generator, session: str = "s1") -> pb.TokensRecord:
    rec = pb.TokensRecord(stream_id="cam", tenant="acme", session_id=session, seq=seq, pts_s=seq * 0.5,
                          grid_h=7, grid_w=7, tags=[f"tag{seq % 5}"], tag_scores=[0.5])
    set_tokens(rec, rng.standard_normal((49, 576)).astype(np.float16))
    return rec


def service(cfg: LivelensConfig, store_dir: Path) -> LLMCore:
    cfg = with_settings(cfg, {"llm.store.segments_disk_dir": str(store_dir)})
    return LLMCore(cfg, frames_only_resources(cfg))


def state(s: Stream) -> dict:
    ctx = s.context
    store = s.res.store
    indices, _ = store.keys(s.stream_id)
    segments = {}
    for i in sorted(indices):
        segment = store.get(s.stream_id, i)
        assert segment is not None
        segments[i] = [(f.seq, f.tags, f.tokens.tobytes()) for f in segment.frames]
    return {"sink": [f.seq for f in ctx.sink], "window": [f.seq for f in ctx.window],
            "evicted": [f.seq for f in ctx.evicted], "chunks": ctx.chunks_evicted, "last": ctx.last_seq,
            "seen": ctx.frames_seen, "held": s.held_frames(),
            "turns": [(t.question, t.answer) for t in ctx.dialogue], "segments": segments,
            "session": s.session_id}


def test_replay_from_a_checkpoint_rebuilds_the_same_context(tmp_path):
    # the replay starts well after the sink
    cfg = with_settings(load_config(env={}), {"llm.store.retention_segments": 6, "llm.store.chunk_frames": 2})
    rng = np.random.default_rng(0)
    log = [frame(seq, rng) for seq in range(41)]
    owner = service(cfg, tmp_path / "a")
    for offset, rec in enumerate(log):
        owner.on_tokens(rec, offset=offset, partition=3)
    stream = owner.streams[KEY]
    stream.add_turn("What is there?", "A cat.")
    checkpoint = stream.checkpoint()
    assert list(checkpoint.sink_offsets) == [0, 1]
    assert checkpoint.replay_from > 10 and checkpoint.last_seq == 40

    heir = service(cfg, tmp_path / "b")
    started = RebuildStart(KEY, checkpoint, partition=3)
    heir.on_rebuild(started)
    for offset in [*checkpoint.sink_offsets, *range(checkpoint.replay_from, len(log))]:
        heir.on_rebuild(Replayed(KEY, log[offset], offset))
    heir.on_rebuild(RebuildEnd(KEY, started.started, 0))

    rebuilt = heir.streams[KEY]
    assert state(rebuilt) == state(stream)
    assert not rebuilt.replaying and rebuilt.partition == 3 and heir.stats.rebuilds == 1
    # both go on alike, and the heir's own checkpoint says the same
    for offset, rec in enumerate([frame(seq, rng) for seq in range(41, 47)], start=len(log)):
        owner.on_tokens(rec, offset=offset)
        heir.on_tokens(rec, offset=offset)
    assert state(heir.streams[KEY]) == state(owner.streams[KEY])
    assert heir.streams[KEY].checkpoint().replay_from == owner.streams[KEY].checkpoint().replay_from
    for svc in (owner, heir):
        assert svc.res is not None
        svc.res.store.close()


def test_a_new_session_of_a_stream_id_starts_afresh(tmp_path):
    cfg = load_config(env={})
    svc = service(cfg, tmp_path)
    rng = np.random.default_rng(1)
    for seq in range(12):
        svc.on_tokens(frame(seq, rng), offset=seq)
    assert svc.streams[KEY].context.last_seq == 11
    # the same stream id opened anew (another Watch, no resume): its first frame is seq 0
    svc.on_tokens(frame(0, rng, session="s2"), offset=12)
    fresh = svc.streams[KEY]
    assert fresh.session_id == "s2" and [f.seq for f in fresh.context.sink] == [0]
    assert svc.res is not None and not svc.res.store.keys(KEY)[0]  # the old session's segments are gone
    # another tenant's stream of the same id is another stream
    other = frame(5, rng)
    other.tenant = "beta"
    svc.on_tokens(other, offset=13)
    assert svc.streams["beta/cam"].context.last_seq == 5 and svc.streams[KEY].context.last_seq == 0


def test_frames_still_in_flight_when_a_stream_closes_do_not_open_it_again(tmp_path):
    cfg = load_config(env={})
    svc = service(cfg, tmp_path)
    rng = np.random.default_rng(2)
    for seq in range(3):
        svc.on_tokens(frame(seq, rng), offset=seq)
    close = pb.CommandRecord(stream_id="cam", tenant="acme", session_id="s1", close=pb.CloseStream())
    svc.on_command(close)
    assert KEY not in svc.streams
    svc.on_tokens(frame(3, rng), offset=3)  # encoded after the close
    assert KEY not in svc.streams and svc.stats.after_close == 1
    svc.on_tokens(frame(0, rng, session="s2"), offset=4)  # the stream id opened anew
    assert svc.streams[KEY].session_id == "s2"


def test_a_rebuild_counts_each_frame_a_folded_record_stands_for(tmp_path):
    """Frames before and after the checkpoint came in records the encoder folded (outages):
    the heir counts each of them as seen, and as folded, once, as the owner did."""
    cfg = load_config(env={})
    rng = np.random.default_rng(1)
    early = frame(8, rng)  # stands for frames 6-8, before the checkpoint
    early.folded.CopyFrom(pb.FoldNotice(from_seq=6, to_seq=8, from_pts_s=3.0, to_pts_s=4.0, frames=3,
                                        encoded=2, reason="encoder_behind"))
    log = [frame(seq, rng) for seq in range(6)] + [early] + [frame(seq, rng) for seq in range(9, 20)]
    folded = frame(27, rng)  # stands for frames 20-27
    folded.folded.CopyFrom(pb.FoldNotice(from_seq=20, to_seq=27, from_pts_s=10.0, to_pts_s=13.5, frames=8,
                                         encoded=4, reason="encoder_behind"))
    owner = service(cfg, tmp_path / "a")
    for offset, rec in enumerate(log[:12]):
        owner.on_tokens(rec, offset=offset, partition=3)
    checkpoint = owner.streams[KEY].checkpoint()
    assert checkpoint.frames_folded == 2
    for offset, rec in enumerate([*log[12:], folded], start=12):
        owner.on_tokens(rec, offset=offset, partition=3)
    assert owner.streams[KEY].context.frames_seen == 28 and owner.streams[KEY].frames_folded == 9

    heir = service(cfg, tmp_path / "b")
    started = RebuildStart(KEY, checkpoint, partition=3)
    heir.on_rebuild(started)
    everything = [*log, folded]
    for offset in [*checkpoint.sink_offsets, *range(checkpoint.replay_from, len(everything))]:
        heir.on_rebuild(Replayed(KEY, everything[offset], offset))
    heir.on_rebuild(RebuildEnd(KEY, started.started, 0))
    assert checkpoint.replay_from <= 6, "the replay goes over the early fold again"
    assert heir.streams[KEY].context.frames_seen == 28 and heir.streams[KEY].frames_folded == 9
    for svc in (owner, heir):
        assert svc.res is not None
        svc.res.store.close()


def test_a_stream_that_moves_finishes_the_answers_it_had_begun(tmp_path):
    """Its questions' offsets were committed when they were taken: the new owner will not
    read them again, so the replica that loses the stream answers them before it lets go
    (and writes no checkpoint of it any more). A closed stream's answers stop."""
    import asyncio

    cfg = load_config(env={})
    rng = np.random.default_rng(3)

    async def until(event: asyncio.Event) -> None:
        await event.wait()

    async def run() -> tuple[bool, bool, bool, bool]:
        svc = service(cfg, tmp_path)
        for seq in range(3):
            svc.on_tokens(frame(seq, rng), offset=seq, partition=3)
        stream = svc.streams[KEY]
        release = asyncio.Event()
        answer = asyncio.create_task(until(release))  # an answer still generating
        stream.answering["q1"] = answer
        dropped: list[str] = []
        svc.res.store.drop_stream = dropped.append  # type: ignore[method-assign, assignment]
        svc.forget_partitions({3})
        gone_at_once = KEY not in svc.streams
        await asyncio.sleep(0.05)
        kept_answering, kept_stores = not answer.cancelled(), dropped == []
        release.set()
        await asyncio.sleep(0.05)
        return gone_at_once, kept_answering and kept_stores, answer.done() and not answer.cancelled(), \
            dropped == [KEY]

    assert asyncio.run(run()) == (True, True, True, True)

    async def closed() -> bool:
        svc = service(cfg, tmp_path / "closed")
        svc.on_tokens(frame(0, rng), offset=0, partition=3)
        answer = asyncio.create_task(until(asyncio.Event()))
        svc.streams[KEY].answering["q1"] = answer
        svc.drop(KEY, tombstone=True)
        await asyncio.sleep(0.05)
        return answer.cancelled()

    assert asyncio.run(closed())

from dataclasses import replace

import numpy as np
import pytest

from livelens.config import LivelensConfig, LLMConfig, with_settings
from services.llm.context import FrameSegment, StreamContext, TextPart, VisualPart
from services.llm.resources import frames_only_resources
from services.llm.segments import TieredSegmentStore
from services.llm.stream import Added, ContextError, ContextMethod, Stream


def frames_only_stream(cfg: LLMConfig, store: TieredSegmentStore) -> Stream:
    """A `Stream` as the service builds it, without an engine, on the given segment store."""
    try:
        res = frames_only_resources(LivelensConfig(llm=cfg))
    except FileNotFoundError:
        pytest.skip("LLM not built (make models)")
    return Stream("s", replace(res, store=store))


def seg(seq, tokens=4, hidden=8):
    return FrameSegment(seq, seq * 0.5, np.full((tokens, hidden), seq, np.float16),
                        np.ones(tokens, bool))


def test_sink_window_and_dedupe():
    ctx = StreamContext("s", sink_frames=2, window_frames=3, dialogue_turns=2)
    for i in range(10):
        assert ctx.add_frame(seg(i))
    assert not ctx.add_frame(seg(5)), "a redelivered frame is not counted twice"
    assert [f.seq for f in ctx.sink] == [0, 1]
    assert [f.seq for f in ctx.window] == [7, 8, 9]
    assert ctx.frames_seen == 10


def test_the_window_slides_in_steps_and_retrieved_frames_can_follow_it():
    evicted: list[int] = []
    ctx = StreamContext("s", sink_frames=1, window_frames=4, dialogue_turns=1, window_slide=3,
                        on_evict=lambda stream, index, frames: evicted.extend(f.seq for f in frames))
    sizes = []
    for i in range(12):
        ctx.add_frame(seg(i))
        sizes.append(len(ctx.window))
    # a full window (4) takes one more frame and drops its oldest 3: its front stays put in between
    assert sizes == [0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2]
    assert evicted == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [f.seq for f in ctx.window] == [10, 11]
    after = ctx.compose("SYS", "q", retrieved=[seg(3)], retrieved_after_window=True)
    assert [f.seq for f in after.frames] == [0, 10, 11, 3]
    before = ctx.compose("SYS", "q", retrieved=[seg(3)])
    assert [f.seq for f in before.frames] == [0, 3, 10, 11]


def test_composition_order_and_window_limit():
    ctx = StreamContext("s", sink_frames=1, window_frames=3, dialogue_turns=1)
    for i in range(5):
        ctx.add_frame(seg(i))
    ctx.add_turn("q1", "a1")
    ctx.add_turn("q2", "a2")
    composed = ctx.compose("SYS", "what now?")
    seqs = [p.segment.seq for p in composed.parts if isinstance(p, VisualPart)]
    assert seqs == [0, 2, 3, 4]
    text = "".join(p.text for p in composed.parts if isinstance(p, TextPart))
    assert text.index("SYS") < text.index("q2") < text.index("what now?")
    assert "q1" not in text, "dialogue is bounded"
    assert composed.newest_pts_s == 2.0
    trimmed = ctx.compose("SYS", "what now?", window_limit=1)
    assert [f.seq for f in trimmed.frames] == [0, 4]


def test_evicted_frames_go_out_in_chunks_and_come_back_between_sink_and_window():
    evicted = []
    ctx = StreamContext("s", sink_frames=1, window_frames=2, dialogue_turns=1, chunk_frames=2,
                        on_evict=lambda stream, index, frames: evicted.append((index, [f.seq for f in frames])))
    for i in range(8):
        ctx.add_frame(seg(i))
    assert evicted == [(0, [1, 2]), (1, [3, 4])]
    assert [f.seq for f in ctx.evicted] == [5]  # a chunk still filling
    composed = ctx.compose("SYS", "q", retrieved=[seg(3), seg(4)])
    assert [f.seq for f in composed.frames] == [0, 3, 4, 6, 7]
    # One block per frame between the head and the tail: the streaming-KV path stores and
    # loads exactly these; each frame block carries its own time label.
    assert [b.frame.seq if b.frame else None for b in composed.blocks] == [None, 0, 3, 4, 6, 7, None]
    assert composed.blocks[2].parts[0] == TextPart("<frame t=1.5s>")
    assert [f.seq for f in ctx.preceding()] == [0, 6]  # what frame 7 attended to on arrival


def direction(i: int, tokens: int = 4, hidden: int = 8) -> np.ndarray:
    """Tokens pointing along axis i: frames with different i are orthogonal for retrieval."""
    t = np.zeros((tokens, hidden), np.float16)
    t[:, i] = 1
    return t


def test_stream_composes_sink_best_retrieved_within_budget_and_window(tmp_path):
    """What the service composes for a question (`Stream.compose`), per context method."""
    cfg = with_settings(LivelensConfig(), {
        "llm.context.sink_frames": 1,
        "llm.context.window_frames": 2,
        "llm.context.dialogue_turns": 1,
        "llm.store.chunk_frames": 1,
        "llm.retrieval.top_k": 3,
        "llm.retrieval.token_budget": 8,
    }).llm  # two 4-token frames
    store = TieredSegmentStore(2**20, None, 0, cfg.store.retention_segments)
    stream = frames_only_stream(cfg, store)
    kept = np.ones(4, bool)
    for i in range(8):
        assert stream.add(i, i * 0.5, direction(i), kept) is Added.FRAME
    assert stream.add(5, 2.5, direction(5), kept) is Added.DUPLICATE
    assert [f.seq for f in stream.stored_frames()] == [1, 2, 3, 4, 5]
    # the example looks most like frame 5, then 2, then 3: top-3 best first is [5, 2, 3],
    # the 8-token budget keeps the best two, composed in time order
    stream.add_example("q1", np.float16(3) * direction(5) + np.float16(2) * direction(2) + direction(3))
    composed = stream.compose("When?", 8, ContextMethod.DEFAULT, "q1")
    assert [f.seq for f in composed.retrieved] == [2, 5]
    assert [f.seq for f in composed.context.frames] == [0, 2, 5, 6, 7]
    res = stream.res
    assert composed.materializer is res.recompute and composed.tokens == res.embedder.count(composed.context)
    assert "q1" not in stream.examples, "an example image serves one question"
    # without an example (and no question-text retrieval): sink + window
    assert [f.seq for f in stream.compose("When?", 8).context.frames] == [0, 6, 7]
    assert [f.seq for f in stream.compose("When?", 8, ContextMethod.WINDOW).context.frames] == [0, 6, 7]
    full = stream.compose("When?", 8, ContextMethod.FULL)
    assert [f.seq for f in full.context.frames] == list(range(8))
    # longer than the engine takes: a full context is refused, the others leave out the
    # oldest window frames
    with pytest.raises(ContextError, match="exceeds llm.engine.max_model_len"):
        stream.compose("When?", cfg.engine.max_model_len - full.tokens + 1, ContextMethod.FULL)
    assert stream.compose("When?", cfg.engine.max_model_len - full.tokens, ContextMethod.FULL).tokens == full.tokens
    window = stream.compose("When?", 8, ContextMethod.WINDOW)
    squeezed = stream.compose("When?", cfg.engine.max_model_len - window.tokens + 1, ContextMethod.WINDOW)
    assert [f.seq for f in squeezed.context.frames] == [0, 7], "the oldest window frame left out"
    with pytest.raises(ContextError, match="streaming_kv"):
        stream.compose("When?", 8, ContextMethod.STREAMING_KV)
    stream.close()
    assert not len(store)


def test_frames_carry_their_tags_into_the_label_and_retrieval(tmp_path):
    """A frame's tags are written into its label, survive the segment store (RAM and disk),
    and bring back the segment a question names, before any scored one."""
    cfg = with_settings(LivelensConfig(), {
        "llm.context.sink_frames": 1,
        "llm.context.window_frames": 2,
        "llm.context.dialogue_turns": 1,
        "llm.store.chunk_frames": 1,
        "llm.retrieval.top_k": 1,
        "llm.retrieval.token_budget": 8,
    }).llm
    # all to disk
    stream = frames_only_stream(cfg, TieredSegmentStore(1, tmp_path, 2**20, cfg.store.retention_segments))
    kept = np.ones(4, bool)
    tags = {2: ("tabby cat", "tiger cat"), 4: ("beagle",)}
    scores = {2: (0.6, 0.2), 4: (0.15,)}
    for i in range(8):
        assert stream.add(i, i * 0.5, direction(i), kept, tags=tags.get(i, ()),
                          tag_scores=scores.get(i, ())) is Added.FRAME
    assert [f.tags for f in stream.stored_frames()] == [(), tags[2], (), tags[4], ()]
    assert [f.tag_scores for f in stream.stored_frames()][1] == pytest.approx(scores[2])
    # both are animals: the likelier tag first (the cat), though the beagle is newer
    assert [f.seq for f in stream.compose("Which animal appeared?", 8).retrieved] == [2]
    assert [f.seq for f in stream.compose("Did a cat appear?", 8).retrieved] == [2]
    assert [f.seq for f in stream.compose("Did you see a beagle?", 8).retrieved] == [4]
    assert [f.seq for f in stream.compose("Was there a dog?", 8).retrieved] == [4], "the class's everyday word"
    assert stream.compose("Did a car appear?", 8).retrieved == [], "nothing named, no example: no retrieval"
    composed = stream.compose("Did a cat appear?", 8)
    labels = [p.text for b in composed.context.blocks if b.frame is not None for p in b.parts
              if isinstance(p, TextPart)]
    assert '<frame t=1.0s seen="tabby cat, tiger cat">' in labels and "<frame t=3.0s>" in labels
    stream.close()


def test_the_question_turn_opens_with_what_the_named_frames_showed(tmp_path):
    """The note before the question: the frames whose tags the question names (retrieved or
    in the window, newest first up to llm.context.recall_notes), by the word of the question that
    names them, with their times; what the question names that no frame was tagged with;
    the newest frame only when the question names nothing."""
    cfg = with_settings(LivelensConfig(), {
        "llm.context.sink_frames": 1,
        "llm.context.window_frames": 2,
        "llm.store.chunk_frames": 1,
        "llm.retrieval.top_k": 2,
        "llm.retrieval.token_budget": 8,
        "llm.context.recall_notes": 1,
    }).llm
    stream = frames_only_stream(cfg, TieredSegmentStore(2**20, None, 0, 100))
    tags = {1: ("tabby cat",), 2: ("Egyptian cat",), 5: ("street sign", "prison")}
    for i in range(6):
        stream.add(i, i * 0.5, direction(i), np.ones(4, bool), tags=tags.get(i, ()))

    def question_turn(question: str, c: LLMConfig = cfg) -> str:
        stream.res.cfg = c
        tail = stream.compose(question, 8).context.blocks[-1]
        return "".join(p.text for p in tail.parts if isinstance(p, TextPart)).rsplit("<|im_start|>user\n", 1)[1]

    assert question_turn("Did a cat appear?") == (
        "Seen at 1.0s: a cat (Egyptian cat). An Egyptian cat appeared: it was first seen at 1.0s.\n"
        "Did a cat appear?<|im_end|>\n"
        "<|im_start|>assistant\n"), "the newest named frame only (recall_notes 1)"
    assert question_turn("Which animal appeared?").startswith(
        "Seen at 1.0s: an animal (Egyptian cat). An Egyptian cat appeared: it was first seen at 1.0s.\n"), \
        "a kind names it"
    assert question_turn("Did a car or a dog appear?").startswith(
        "No car or dog was seen so far: it has not appeared.\nDid a car"), "named, never tagged"
    assert question_turn("What happened?").startswith("Seen at 2.5s: street sign, prison.\nWhat"), "the newest"
    assert "No " not in question_turn("Did a tabby cat appear?")
    two = replace(cfg, context=replace(cfg.context, recall_notes=2))
    assert question_turn("When did a cat appear?", two).startswith(
        "Seen at 0.5s and 1.0s: a cat (tabby cat, Egyptian cat). A tabby cat appeared: it was first seen at 0.5s.\n")
    off = replace(cfg, context=replace(cfg.context, recall_notes=0))
    assert question_turn("Did a cat appear?", off).startswith("Did a cat appear?")
    stream.close()

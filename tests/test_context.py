import numpy as np

from services.llm.context import FrameSegment, StreamContext, TextPart, VisualPart


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

"""Align the MobileNetV2 encoder's projector with SmolLM2 (LLaVA stage 1, on a CPU).

    python -m devtools.train.projector [--steps N] [--out PATH] ...   (or `livelens train projector`)

Only the projector (LLaVA-1.5's `mlp2x_gelu`) trains; MobileNetV2 and the LLM stay
frozen. The teacher is MobileNetV2's own ImageNet classifier, so no caption data set is
needed: each training frame's answer names the classes the classifier sees in it.

1. Features: MobileNetV2 feature grids of the training images (SPLIT in
   devtools.train.data: package-shipped videos and stills, augmented) are computed once
   and cached under build/train/.
2. Warm start (cheap, no LLM): each of a grid's 49 tokens regresses onto the LLM's own
   word embedding of what the classifier sees at that position (the class names' input
   embeddings weighted by the classifier's probabilities there), cosine loss.
3. Alignment (the LLaVA stage-1 objective): next-token loss on answer tokens only, the
   LLM frozen, contexts composed exactly as the LLM service composes them (head_block,
   frame_block, tail_block; ContextEmbedder's text embeddings): 1-8 frames of one video
   or image, sometimes with frames of another inserted (a needle), and the questions
   the product is asked ("What objects do you see?", "Did a cat appear in the video?",
   "Which animal appeared in the video?", ...).
4. Evaluation on held-out videos: greedy answers to "What objects do you see?" about
   1 s clips, scored by whether they name the teacher's top-1 / one of its top-3 labels;
   the seeded projector is scored the same way (chance).

Writes the weights (float16 safetensors, shipped in the package), the loss curve
(docs/projector-loss.png) and a run summary (bench/results/projector-train.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from devtools.models.vision import TRAINED_PROJECTOR, MLPProjector, rms_rescale, seeded_projector
from devtools.train.data import (  # noqa: F401 - re-exported for the benchmark
    SPLIT,
    FeatureSet,
    HeldOut,
    eval_features,
    held_out,
    mobilenet,
    needle_frames,
    teacher_labels,
    teacher_probs,
    training_features,
)
from livelens.config import REPO_ROOT, LLMConfig
from services.common.labels import category, imagenet_names, is_animal, listing, names_label, with_article

DESCRIBE = ("What objects do you see?", "What do you see?", "Describe the video.")
GROUNDING_QUESTION = DESCRIBE[0]


@dataclass
class Options:
    seed: int = 0
    views: int = 24  # per training still: the image and views-1 augmented views
    warm_epochs: int = 3
    warm_lr: float = 2e-3
    frame_share: float = 0.0  # warm-start targets: the frame's classes vs the grid cell's
    name_embedding: str = "mean"  # a class name's target embedding: "mean" of its tokens, or "first"
    steps: int = 160
    batch: int = 4
    lr: float = 2e-3
    anchor: float = 0.0  # weight of the warm-start loss during alignment
    eval_per_video: int = 15
    max_answer_tokens: int = 24
    cache_dir: Path = REPO_ROOT / "build" / "train"
    out: Path = TRAINED_PROJECTOR
    loss_png: Path = REPO_ROOT / "docs" / "projector-loss.png"
    summary: Path = REPO_ROOT / "bench" / "results" / "projector-train.json"
    llm_dir: Path = Path(LLMConfig().engine.model_path)
    progress: bool = True


# ---------------------------------------------------------------- the frozen LLM


class FrozenLLM:
    """SmolLM2 (float32, frozen) with the service's own text embedding and composition."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        from services.llm.embedder import ContextEmbedder

        self.embedder = ContextEmbedder(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.hidden = self.embedder.hidden_size
        self.target_rms = float(self.embedder.table.float().pow(2).mean(1).sqrt().mean())
        self.system_prompt = LLMConfig().context.system_prompt
        self.im_end = self.embedder.text_ids("<|im_end|>")
        self._head: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def head_cache(self, batch: int) -> Any:
        """The KV of the (text-only, constant) head block for `batch` rows: computed once."""
        from transformers import DynamicCache

        from services.llm.context import TextPart, head_block

        if self._head is None:
            emb = torch.cat([self.embedder.embed_text(p.text) for p in head_block(self.system_prompt).parts
                             if isinstance(p, TextPart)])
            with torch.no_grad():
                out = self.model(inputs_embeds=emb[None].float(), use_cache=True)
            cache = out.past_key_values
            self._head = [(layer.keys, layer.values) for layer in cache.layers]
        return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                            for k, v in self._head], config=self.model.config)

    def class_embeddings(self, names: Sequence[str], how: str = "first") -> torch.Tensor:
        """Unit-norm input embedding of each name: of its first token (" tabby" of
        " tabby cat": a real word embedding, which the LLM copies more readily than a
        blend) or the mean of its tokens (how="mean")."""
        emb = [self.embedder.embed_text(" " + n).float() for n in names]
        rows = [e[0] if how == "first" else e.mean(0) for e in emb]
        return nn.functional.normalize(torch.stack(rows), dim=-1)


@dataclass
class Sample:
    """A context after the head: frame rows (into a FeatureSet), the question, the answer."""

    frames: list[int]
    question: str
    answer: str


def compose(sample: Sample, system_prompt: str, hidden: int) -> Any:
    from services.llm.context import ComposedContext, FrameSegment, frame_block, head_block, tail_block

    blank = np.zeros((49, hidden), np.float16)
    frames = [FrameSegment(seq=k, pts_s=0.5 * k, tokens=blank, kept=np.ones(49, bool))
              for k in range(len(sample.frames))]
    return ComposedContext([head_block(system_prompt), *map(frame_block, frames), tail_block([], sample.question)])


def embed_after_head(llm: FrozenLLM, sample: Sample, tokens: torch.Tensor) -> torch.Tensor:
    """The embeddings of the context after its head block, `tokens` [n_frames,49,H] in
    place of the frames' visual parts (as ContextEmbedder.embed, but differentiable)."""
    from services.llm.context import TextPart

    ctx = compose(sample, llm.system_prompt, llm.hidden)
    pieces = []
    for block in ctx.blocks[1:]:
        for part in block.parts:
            if isinstance(part, TextPart):
                pieces.append(llm.embedder.embed_text(part.text).float())
            else:
                pieces.append(tokens[part.segment.seq])
    return torch.cat(pieces)


# ---------------------------------------------------------------- answers (the teacher's words)


def top_labels(probs: torch.Tensor, k: int = 3) -> list[int]:
    """The top class, and the next ones while they are at least a quarter as likely (and 5%)."""
    p, idx = probs.topk(k)
    keep = [int(idx[0])]
    for j in range(1, k):
        if float(p[j]) >= max(0.05, 0.25 * float(p[0])):
            keep.append(int(idx[j]))
    return keep


def describe_answer(question: str, classes: list[int]) -> str:
    things = listing([imagenet_names()[c] for c in classes])
    if question.startswith("Describe"):
        return f"The video shows {things}."
    return f"I see {things}."


class SampleMaker:
    """Draws training contexts from a FeatureSet, with answers from the teacher."""

    def __init__(self, fs: FeatureSet, probs: torch.Tensor, rng: np.random.Generator) -> None:
        self.fs, self.probs, self.rng = fs, probs, rng
        self.names = list(fs.groups)
        self.top5 = probs.topk(5).indices
        # Frames the teacher is fairly sure show an animal: needles for "Which animal appeared?".
        self.animal_rows = [i for i in range(len(probs)) if is_animal(int(probs[i].argmax())) and probs[i].max() > 0.3]

    def _clip(self, n: int, exclude: str | None = None) -> tuple[str, list[int]]:
        group = self.names[int(self.rng.integers(len(self.names)))]
        while group == exclude:
            group = self.names[int(self.rng.integers(len(self.names)))]
        rows = self.fs.groups[group]
        if group.startswith("video"):
            n = min(n, (len(rows) + 1) // 2)
            start = int(self.rng.integers(0, len(rows) - 2 * (n - 1)))
            return group, rows[start:start + 2 * n - 1:2]  # 2 fps, as the service samples
        return group, [rows[int(i)] for i in self.rng.choice(len(rows), size=min(n, len(rows)), replace=False)]

    def _n_frames(self, choices: Sequence[int], p: Sequence[float]) -> int:
        return int(self.rng.choice(choices, p=p))

    def _insert_needle(self, frames: list[int], needle: list[int]) -> list[int]:
        at = int(self.rng.integers(1, len(frames))) if len(frames) > 1 else int(self.rng.integers(0, 2))
        return frames[:at] + needle + frames[at:]

    def _word(self, c: int) -> str:
        """Class c's name, or half the time its everyday word where it has one."""
        everyday = category(c)
        return everyday if everyday and self.rng.random() < 0.5 else imagenet_names()[c]

    def describe(self) -> Sample:
        # Mostly one frame: most of the signal for the least compute (a frame is 62 tokens).
        _, frames = self._clip(self._n_frames([1, 2, 3, 4, 8], [0.5, 0.15, 0.25, 0.05, 0.05]))
        q = DESCRIBE[int(self.rng.choice(3, p=[0.6, 0.2, 0.2]))]
        return Sample(frames, q, describe_answer(q, top_labels(self.probs[frames].mean(0))))

    def did_appear(self) -> Sample:
        group, frames = self._clip(self._n_frames([1, 2, 3, 4, 6], [0.35, 0.3, 0.2, 0.1, 0.05]))
        if self.rng.random() < 0.6:
            _, needle = self._clip(int(self.rng.integers(1, 3)), exclude=group)
            frames = self._insert_needle(frames, needle)
            target = needle
        else:
            target = frames
        seen = set(self.top5[frames].flatten().tolist())
        names = imagenet_names()
        if self.rng.random() < 0.5:  # present: the target frames' top class
            c = int(self.probs[target].mean(0).argmax())
            word = self._word(c)
            return Sample(frames, f"Did {with_article(word)} appear in the video?",
                          f"Yes, I saw {with_article(names[c])}.")
        seen_words = {category(s) for s in seen} | {names[s] for s in seen}
        while True:  # absent: a class (or an everyday word) nothing in the context resembles
            c = int(self.rng.integers(1000))
            word = self._word(c)
            if c not in seen and word not in seen_words:
                break
        return Sample(frames, f"Did {with_article(word)} appear in the video?",
                      f"No, I did not see {with_article(word)}.")

    def which_animal(self) -> Sample:
        needle_row = self.animal_rows[int(self.rng.integers(len(self.animal_rows)))]
        group = self.fs.group[needle_row]
        for _ in range(20):
            _, frames = self._clip(self._n_frames([1, 2, 3, 5], [0.35, 0.35, 0.2, 0.1]), exclude=group)
            if not any(is_animal(c) for c in self.top5[frames, :3].flatten().tolist()):
                break
        frames = self._insert_needle(frames, [needle_row])
        c = int(self.probs[needle_row].argmax())
        return Sample(frames, "Which animal appeared in the video?", f"I saw {with_article(imagenet_names()[c])}.")

    def __call__(self) -> Sample:
        r = self.rng.random()
        if r < 0.6:
            return self.describe()
        if r < 0.9 or not self.animal_rows:
            return self.did_appear()
        return self.which_animal()


# ---------------------------------------------------------------- training


def token_targets(fs: FeatureSet, class_emb: torch.Tensor, frame_share: float) -> torch.Tensor:
    """Unit targets [N,49,H] for the warm start: per token, the word embeddings of the
    teacher's top 5 classes weighted by probability, a blend of the frame's classes
    (weight frame_share: what the answers name) and those of the token's grid cell."""
    cls = mobilenet().classifier[1]
    out = torch.empty(*fs.feats.shape[:2], class_emb.shape[1])

    def mix(logits: torch.Tensor) -> torch.Tensor:
        p, idx = logits.softmax(-1).topk(5)
        return nn.functional.normalize(torch.einsum("...k,...kh->...h", p / p.sum(-1, keepdim=True), class_emb[idx]),
                                       dim=-1)

    with torch.no_grad():
        for i in range(0, len(fs.feats), 128):
            f = fs.feats[i:i + 128].float()
            local, frame = mix(cls(f)), mix(cls(f.mean(1)))[:, None]
            out[i:i + 128] = nn.functional.normalize((1 - frame_share) * local + frame_share * frame, dim=-1)
    return out


def warm_start(proj: MLPProjector, fs: FeatureSet, targets: torch.Tensor, opts: Options,
               log: list[float]) -> None:
    """Regress every token onto its target word embedding (cosine loss; the encoder
    normalizes the scale)."""
    x = fs.feats.reshape(-1, fs.feats.shape[-1])
    targets = targets.reshape(-1, targets.shape[-1])
    gen = torch.Generator().manual_seed(opts.seed)
    opt = torch.optim.AdamW(proj.parameters(), lr=opts.warm_lr, weight_decay=0.0)
    bs = 1024
    steps = opts.warm_epochs * math.ceil(x.shape[0] / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opts.warm_lr, total_steps=max(1, steps), pct_start=0.1)
    bar = _bar(steps, "warm start", opts.progress)
    for _ in range(opts.warm_epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], bs):
            b = order[i:i + bs]
            loss = 1 - nn.functional.cosine_similarity(proj(x[b].float()), targets[b], dim=-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            log.append(loss.item())
            bar(f"loss {log[-1]:.4f}")


def batch_loss(llm: FrozenLLM, proj: nn.Module, fs: FeatureSet, samples: list[Sample]) -> torch.Tensor:
    """Mean next-token loss over the answer tokens (and the closing <|im_end|>) of a batch.
    Samples run in groups of equal frame count, so padding stays a few text tokens."""
    rows = sorted({r for s in samples for r in s.frames})
    where = {r: i for i, r in enumerate(rows)}
    tokens = rms_rescale(proj(fs.feats[rows].float()), llm.target_rms)  # [n,49,H]
    by_frames: dict[int, list[Sample]] = {}
    for s in samples:
        by_frames.setdefault(len(s.frames), []).append(s)
    total = torch.zeros(())
    count = 0
    for group in by_frames.values():
        seqs, targets = [], []
        for s in group:
            ctx = embed_after_head(llm, s, tokens[[where[r] for r in s.frames]])
            answer = llm.embedder.text_ids(s.answer) + llm.im_end
            seqs.append(torch.cat([ctx, llm.embedder.table[torch.tensor(answer[:-1])].float()]))
            targets.append((len(ctx) - 1, answer))
        width = max(len(x) for x in seqs)
        x = torch.zeros(len(seqs), width, llm.hidden)
        for i, seq in enumerate(seqs):
            x[i, :len(seq)] = seq  # right padding: under the causal mask no real position sees it
        h = llm.model.model(inputs_embeds=x, past_key_values=llm.head_cache(len(seqs)), use_cache=True)
        h = h.last_hidden_state.reshape(-1, llm.hidden)
        pos = torch.cat([torch.arange(start, start + len(ans)) + i * width for i, (start, ans) in enumerate(targets)])
        labels = torch.tensor([t for _, ans in targets for t in ans])
        total = total + nn.functional.cross_entropy(llm.model.lm_head(h[pos]), labels, reduction="sum")
        count += len(labels)
    return total / count


def align(llm: FrozenLLM, proj: MLPProjector, fs: FeatureSet, probs: torch.Tensor, opts: Options,
          log: list[float], targets: torch.Tensor | None = None) -> None:
    """LLaVA stage 1 on the sampled contexts; with `targets`, plus opts.anchor times the
    warm start's cosine loss on the batch's frames (keeps the tokens word-like)."""
    maker = SampleMaker(fs, probs, np.random.default_rng(opts.seed + 1))
    opt = torch.optim.AdamW(proj.parameters(), lr=opts.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opts.lr, total_steps=max(1, opts.steps), pct_start=0.05)
    bar = _bar(opts.steps, "align", opts.progress)
    for _ in range(opts.steps):
        samples = [maker() for _ in range(opts.batch)]
        loss = batch_loss(llm, proj, fs, samples)
        if targets is not None and opts.anchor > 0:
            rows = sorted({r for s in samples for r in s.frames})
            cos = nn.functional.cosine_similarity(proj(fs.feats[rows].float()), targets[rows], dim=-1).mean()
            loss = loss + opts.anchor * (1 - cos)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append(loss.item())
        bar(f"loss {log[-1]:.3f} (mean of last 20: {np.mean(log[-20:]):.3f})")


# ---------------------------------------------------------------- evaluation


def generate(llm: FrozenLLM, proj: nn.Module, fs: FeatureSet, samples: list[Sample], max_tokens: int,
             batch: int = 10) -> list[str]:
    """Greedy answers; samples of one batch must compose to the same length (same frame count)."""
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            ctx = []
            for s in chunk:
                tokens = rms_rescale(proj(fs.feats[s.frames].float()), llm.target_rms).half().float()
                ctx.append(torch.cat([torch.cat([llm.embedder.embed_text(p.text).float()
                                                 for p in compose(s, llm.system_prompt, llm.hidden).blocks[0].parts]),
                                      embed_after_head(llm, s, tokens)]))
            ids = llm.model.generate(inputs_embeds=torch.stack(ctx), attention_mask=torch.ones(len(ctx), len(ctx[0]),
                                     dtype=torch.long), max_new_tokens=max_tokens, do_sample=False,
                                     eos_token_id=llm.im_end[0], pad_token_id=llm.im_end[0])
            out += [str(llm.embedder.tokenizer.decode(row, skip_special_tokens=True)).strip() for row in ids]
    return out


def evaluate(llm: FrozenLLM, proj: nn.Module, ev: FeatureSet, max_tokens: int) -> dict[str, Any]:
    """"What objects do you see?" about each held-out 1 s clip; scored against the
    teacher's labels of its last frame."""
    names = imagenet_names()
    samples, labels = [], []
    for rows in ev.groups.values():
        samples.append(Sample(rows, GROUNDING_QUESTION, ""))
        labels.append([names[int(c)] for c in teacher_probs(ev.feats[rows[-1:]])[0].topk(3).indices])
    answers = generate(llm, proj, ev, samples, max_tokens)
    top1 = [names_label(a, lb[0]) for a, lb in zip(answers, labels, strict=True)]
    top3 = [any(names_label(a, x) for x in lb) for a, lb in zip(answers, labels, strict=True)]
    return {"samples": len(samples), "top1": float(np.mean(top1)), "top3": float(np.mean(top3)),
            "examples": [{"clip": g, "teacher": lb, "answer": a}
                         for g, lb, a in zip(ev.groups, labels, answers, strict=True)]}


# ---------------------------------------------------------------- outputs


def save_projector(proj: MLPProjector, path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().half().contiguous() for k, v in proj.state_dict().items()}, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)


def plot_losses(warm: list[float], align_log: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v: list[float], k: int) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        return np.convolve(a, np.ones(k) / k, mode="valid") if len(a) >= k else a

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, v, k, name, ylabel in ((axes[0], warm, 20, "1. warm start (no LLM)", "1 - cosine to word embeddings"),
                                   (axes[1], align_log, 10, "2. alignment (frozen SmolLM2)", "answer-token loss")):
        ax.plot(v, alpha=0.3, color="tab:blue", label="per step")
        s = smooth(v, k)
        ax.plot(np.arange(len(s)) + (len(v) - len(s)), s, color="tab:blue", label=f"mean of {k}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_encoder_onnx(path: str | Path, projector: str, seed: int = 0) -> Path:
    """The encoder with the given projector ("trained": the shipped weights; "seeded": the
    chance baseline) as ONNX: the served interface, sized and scaled for the built LLM."""
    from devtools.models import llm as llm_build
    from devtools.models.vision import build_vision_encoder, export_onnx

    hidden, target_rms = llm_build.embedding_rms(LLMConfig().engine.model_path)
    return export_onnx(build_vision_encoder(None, hidden, target_rms, seed, projector=projector), path)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, mininterval=2.0)

    def step(postfix: str) -> None:
        bar.set_postfix_str(postfix, refresh=False)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return step


def train(opts: Options) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    names = imagenet_names()
    fs = training_features(opts.cache_dir, opts.views, opts.seed)
    ev = eval_features(opts.cache_dir, opts.eval_per_video)
    t_features = time.perf_counter() - t0
    probs = teacher_probs(fs.feats)
    llm = FrozenLLM(opts.llm_dir)
    proj = MLPProjector(llm.hidden)
    warm_log: list[float] = []
    align_log: list[float] = []
    targets = token_targets(fs, llm.class_embeddings(names, opts.name_embedding), opts.frame_share)
    warm_start(proj, fs, targets, opts, warm_log)
    after_warm = evaluate(llm, proj, ev, opts.max_answer_tokens)
    t_warm = time.perf_counter() - t0
    align(llm, proj, fs, probs, opts, align_log, targets)
    t_align = time.perf_counter() - t0
    proj.eval()
    trained = evaluate(llm, proj, ev, opts.max_answer_tokens)
    seeded = evaluate(llm, seeded_projector(llm.hidden, opts.seed), ev, opts.max_answer_tokens)
    wall = time.perf_counter() - t0
    meta = {"format": "livelens projector 1", "arch": "mlp2x_gelu", "backbone": "mobilenet_v2-imagenet",
            "llm": opts.llm_dir.name, "hidden_size": str(llm.hidden), "seed": str(opts.seed),
            "steps": str(opts.steps)}
    save_projector(proj, opts.out, meta)
    final = float(np.mean(align_log[-20:])) if align_log else float("nan")
    plot_losses(warm_log, align_log, opts.loss_png,
                f"projector training: held-out top-1 {trained['top1']:.2f}, top-3 {trained['top3']:.2f} "
                f"(seeded {seeded['top1']:.2f} / {seeded['top3']:.2f})")
    groups = sorted(fs.groups)
    summary = {
        "command": "python -m devtools.train.projector " + " ".join(_argv_of(opts)),
        "seed": opts.seed, "views_per_image": opts.views, "warm_epochs": opts.warm_epochs,
        "frame_share": opts.frame_share, "name_embedding": opts.name_embedding, "anchor": opts.anchor,
        "warm_steps": len(warm_log), "align_steps": opts.steps, "batch": opts.batch, "lr": opts.lr,
        "align_examples": opts.steps * opts.batch, "train_frames": int(fs.feats.shape[0]),
        "train_groups": len(groups), "torch_threads": torch.get_num_threads(),
        "seconds": {"features": round(t_features, 1), "warm_start": round(t_warm - t_features, 1),
                    "align": round(t_align - t_warm, 1), "evaluation": round(wall - t_align, 1),
                    "total": round(wall, 1)},
        "final_loss": {"warm_start": float(np.mean(warm_log[-20:])), "align": final},
        "split": {"train_images": list(SPLIT["train_images"]), "train_videos": list(SPLIT["train_videos"]),
                  "held_out_videos": list(SPLIT["held_out_videos"]),
                  "needle_images": [n for n, _ in SPLIT["needle_images"]]},
        "held_out": {"trained": {k: v for k, v in trained.items() if k != "examples"},
                     "warm_start_only": {k: v for k, v in after_warm.items() if k != "examples"},
                     "seeded": {k: v for k, v in seeded.items() if k != "examples"}},
        "examples": {"trained": trained["examples"], "warm_start_only": after_warm["examples"][::3],
                     "seeded": seeded["examples"][:5]},
        "weights": str(opts.out.relative_to(REPO_ROOT)) if opts.out.is_relative_to(REPO_ROOT) else opts.out.name,
    }
    opts.summary.parent.mkdir(parents=True, exist_ok=True)
    opts.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _argv_of(opts: Options) -> list[str]:
    d = Options()
    keys = ("seed", "views", "warm_epochs", "frame_share", "name_embedding", "anchor", "steps", "batch", "lr")
    return [f"--{k.replace('_', '-')}={getattr(opts, k)}" for k in keys if getattr(opts, k) != getattr(d, k)]


def main(argv: list[str] | None = None) -> int:
    d = Options()
    parser = argparse.ArgumentParser(prog="livelens train projector", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--views", type=int, default=d.views, help="views per training still (1 + augmented)")
    parser.add_argument("--warm-epochs", type=int, default=d.warm_epochs, help="warm-start epochs over all tokens")
    parser.add_argument("--frame-share", type=float, default=d.frame_share,
                        help="warm-start targets: weight of the frame's classes (vs the grid cell's)")
    parser.add_argument("--name-embedding", choices=["first", "mean"], default=d.name_embedding,
                        help="a class name's warm-start target: its first token's embedding or all tokens' mean")
    parser.add_argument("--anchor", type=float, default=d.anchor, help="warm-start loss weight during alignment")
    parser.add_argument("--steps", type=int, default=d.steps, help="alignment steps (through the LLM)")
    parser.add_argument("--batch", type=int, default=d.batch, help="contexts per alignment step")
    parser.add_argument("--lr", type=float, default=d.lr, help="alignment peak learning rate")
    parser.add_argument("--eval-per-video", type=int, default=d.eval_per_video, help="held-out clips per video")
    parser.add_argument("--out", type=Path, default=d.out, help="weights (float16 safetensors)")
    parser.add_argument("--loss-png", type=Path, default=d.loss_png)
    parser.add_argument("--summary", type=Path, default=d.summary, help="run summary (JSON)")
    parser.add_argument("--cache-dir", type=Path, default=d.cache_dir, help="feature cache")
    parser.add_argument("--llm-dir", type=Path, default=d.llm_dir)
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    opts = Options(seed=a.seed, views=a.views, warm_epochs=a.warm_epochs, frame_share=a.frame_share,
                   name_embedding=a.name_embedding, anchor=a.anchor, steps=a.steps, batch=a.batch, lr=a.lr,
                   eval_per_video=a.eval_per_video, out=a.out, loss_png=a.loss_png, summary=a.summary,
                   cache_dir=a.cache_dir, llm_dir=a.llm_dir, progress=not a.no_progress)
    if not (opts.llm_dir / "config.json").is_file():
        print(f"livelens: error: {opts.llm_dir} has no LLM; run `make models` first", file=sys.stderr)
        return 2
    s = train(opts)
    t, sd = s["held_out"]["trained"], s["held_out"]["seeded"]
    print(f"done in {s['seconds']['total']:.0f} s; final loss {s['final_loss']['align']:.3f}; held-out "
          f"top-1 {t['top1']:.2f} top-3 {t['top3']:.2f} (seeded {sd['top1']:.2f} / {sd['top3']:.2f})")
    print(f"weights: {opts.out}\nloss curve: {opts.loss_png}\nsummary: {opts.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trained vision projector: its module and ONNX interface, the shipped weights, the
answer-matching rule, and the training loop (on a tiny random LLM)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.models.vision import (
    FEATURE_DIM,
    TRAINED_PROJECTOR,
    MLPProjector,
    MobileNetV2,
    VisionEncoder,
    build_projector,
    export_onnx,
    load_trained_projector,
    seeded_projector,
)
from devtools.train.data import FeatureSet
from livelens.config import LLMConfig
from services.common.labels import imagenet_names, listing, names_label

LLM_DIR = Path(LLMConfig().engine.model_path)


def test_encoder_interface_and_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    backbone = MobileNetV2().eval()
    enc = VisionEncoder(backbone, MLPProjector(64), hidden_size=64, target_rms=0.13).eval()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, probs = enc(pixels)
    assert probs.shape == (2, 1000)
    assert want.shape == (2, 49, 64) and want.dtype == torch.float16
    rms = want.float().pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.13), rtol=5e-3, atol=0)
    path = export_onnx(enc, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixels"]
    assert [o.name for o in sess.get_outputs()] == ["tokens", "class_probs"]
    assert sess.get_outputs()[0].shape[1:] == [49, 64]
    got = sess.run(["tokens"], {"pixels": pixels.numpy()})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.float().numpy(), atol=2e-3)


def test_shipped_weights_load_and_are_not_the_seeded_projector() -> None:
    assert TRAINED_PROJECTOR.is_file(), "the trained projector ships in the package"
    assert TRAINED_PROJECTOR.stat().st_size < 8e6
    proj = load_trained_projector()
    assert isinstance(proj, MLPProjector) and proj.in_features == FEATURE_DIM
    hidden = proj.hidden_size
    seeded = build_projector("seeded", hidden, seed=0)
    assert isinstance(seeded, torch.nn.Linear)
    x = torch.rand(10, FEATURE_DIM) * 3  # non-negative, as ReLU6 features are
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(proj(x), seeded(x), dim=-1)
    assert cos.abs().max() < 0.5
    # The seeded projector depends on its seed alone; unknown kinds are refused.
    torch.testing.assert_close(seeded_projector(hidden, 0).weight, seeded.weight)
    assert not torch.equal(seeded_projector(hidden, 1).weight, seeded.weight)
    with pytest.raises(ValueError, match="PROJECTOR"):
        build_projector("random", hidden)


def test_names_label() -> None:
    assert names_label("I see a tabby cat and a dog.", "tabby cat")
    assert names_label("I SEE TWO STREET SIGNS.", "street sign")  # case, plural
    assert names_label("Yes, I saw a T-shirt.", "T-shirt") and names_label("a t shirt", "T-shirt")
    assert names_label("boxes", "box")
    assert not names_label("I see a cat.", "tabby cat")  # all of the label's words
    assert not names_label("a catalog of things", "cat")  # whole words only
    assert not names_label("a tabby", "tabby cat") and not names_label("anything", "")
    assert names_label("An Egyptian cat.", "cat")


def test_imagenet_names_and_answers() -> None:
    names = imagenet_names()
    assert len(names) == 1000 and names[281] == "tabby cat" and names[285] == "Egyptian cat"
    assert all(n and "(" not in n and " / " not in n for n in names)
    assert listing(["cat"]) == "a cat"
    assert listing(["apple", "dog", "owl"]) == "an apple, a dog and an owl"


# ---------------------------------------------------------------- training on a tiny random LLM


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Llama with SmolLM2's tokenizer (the real LLM is too slow for a unit test)."""
    if not (LLM_DIR / "tokenizer.json").is_file():
        pytest.skip("the LLM is not built (make models)")
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLM_DIR / name, d / name)
    torch.manual_seed(0)
    # Wide initial weights: logits that can move (at 0.02 they stay near uniform over 49k tokens).
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _tiny_features(n_groups: int = 3, per_group: int = 4) -> tuple[FeatureSet, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = (torch.rand(n_groups * per_group, 49, FEATURE_DIM, generator=g) * 2).half()
    groups = [f"image{i // per_group}" for i in range(len(feats))]
    probs = torch.rand(len(feats), 1000, generator=g).pow(8).softmax(-1)
    return FeatureSet(feats, groups, [i % per_group for i in range(len(feats))]), probs


def test_head_cache_gives_the_full_forward_loss(tiny_llm: Path) -> None:
    """The training loss with the head block's KV cached equals a plain forward pass over
    the whole composition (text embedded as the LLM service embeds it)."""
    from devtools.train.projector import FrozenLLM, Sample, batch_loss, compose
    from services.llm.context import TextPart

    llm = FrozenLLM(tiny_llm)
    fs, _ = _tiny_features()
    proj = MLPProjector(llm.hidden)
    samples = [Sample([0, 1], "What objects do you see?", "I see a cat."),
               Sample([5], "Did a dog appear in the video?", "No, I did not see a dog.")]
    with torch.no_grad():
        got = batch_loss(llm, proj, fs, samples)
        from devtools.models.vision import rms_rescale

        losses, counts = [], []
        for s in samples:
            tokens = rms_rescale(proj(fs.feats[s.frames].float()), llm.target_rms)
            pieces = [llm.embedder.embed_text(p.text).float() if isinstance(p, TextPart) else tokens[p.segment.seq]
                      for p in compose(s, llm.system_prompt, llm.hidden).parts]
            answer = llm.embedder.text_ids(s.answer) + llm.im_end
            ctx = torch.cat(pieces)
            x = torch.cat([ctx, llm.embedder.table[torch.tensor(answer[:-1])].float()])
            logits = llm.model(inputs_embeds=x[None]).logits[0, len(ctx) - 1:]
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
            counts.append(len(answer))
        want = torch.stack(losses).sum() / sum(counts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_training_steps_lower_the_loss(tiny_llm: Path, tmp_path: Path) -> None:
    from devtools.train.projector import (
        FrozenLLM,
        Options,
        SampleMaker,
        align,
        batch_loss,
        token_targets,
        warm_start,
    )

    llm = FrozenLLM(tiny_llm)
    fs, probs = _tiny_features()
    torch.manual_seed(0)
    proj = MLPProjector(llm.hidden)
    opts = Options(warm_epochs=3, warm_lr=1e-2, steps=4, batch=2, lr=3e-2, progress=False)

    targets = token_targets(fs, llm.class_embeddings(imagenet_names()), frame_share=0.8)
    assert targets.shape == (12, 49, llm.hidden)
    torch.testing.assert_close(targets.norm(dim=-1), torch.ones(12, 49))
    warm: list[float] = []
    warm_start(proj, fs, targets, opts, warm)
    assert len(warm) == 3 and warm[-1] < warm[0]

    maker = SampleMaker(fs, probs, np.random.default_rng(0))
    fixed = [maker() for _ in range(4)]
    assert all(s.answer.endswith(".") and s.frames for s in fixed)
    with torch.no_grad():
        before = float(batch_loss(llm, proj, fs, fixed))
    log: list[float] = []
    align(llm, proj, fs, probs, opts, log, targets)
    assert len(log) == 4 and all(np.isfinite(log))
    # Fit the fixed batch a few more steps: the answer-token loss must go down.
    opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
    for _ in range(10):
        loss = batch_loss(llm, proj, fs, fixed)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(batch_loss(llm, proj, fs, fixed))
    assert after < before - 0.1, (before, after)

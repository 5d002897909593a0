"""The frozen chat LLM and its tokenizer (paper §3: Vicuna, frozen).

Full scale: any HF-format LLaMA-family chat model (Vicuna v0 7B/13B, Llama-2-7b-chat).
Tiny scale: a transformers `LlamaForCausalLM` of ~2M parameters with a byte-level BPE
tokenizer trained by `tokenizers` on the ShapesWorld corpus (see `pretrain.py`).
Both are loaded the same way, by `load_llm(folder)`, and frozen in one place.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that, like LLaMA's, prepends BOS when asked to.

    Words keep the whitespace that FOLLOWS them ("Assistant: " -> "Assistant:", then ": "
    style pieces), so a prompt ending in a space - MiniGPT-4's `###Assistant: ` - is
    tokenized exactly as it was inside the training text. (With GPT-2's leading-space
    pieces that final space would be an orphan token the model never saw before a word.)
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s*\S+\s*|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(SPECIAL["bos_token"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.padding_side = "right"
    return fast


def tiny_llm_config(vocab_size: int, tok: PreTrainedTokenizerFast, spec: dict) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, num_key_value_heads=spec["num_attention_heads"],
                       rms_norm_eps=1e-5, **spec)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Freeze a module for good: no gradients, eval mode (no dropout)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if tok.pad_token is None:  # LLaMA ships without one; MiniGPT-4 pads with EOS... or unk
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


BNB_MIN, ACCELERATE_MIN = "0.46.1", "1.1.0"     # transformers' own minimums for 8-bit loading


def require_8bit() -> None:
    """The official demo's `low_resource` mode needs a CUDA GPU, bitsandbytes and accelerate
    (transformers' 8-bit loading and `device_map`). One error naming only what is missing."""
    from transformers.utils import import_utils as iu
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False on this machine; "
                       "bitsandbytes' 8-bit matmuls run on CUDA only)")
    pkgs = [f"bitsandbytes >= {BNB_MIN}"] if not iu.is_bitsandbytes_available() else []
    pkgs += [f"accelerate >= {ACCELERATE_MIN}"] if not iu.is_accelerate_available() else []
    if pkgs:
        missing.append(" and ".join(pkgs) + " (the optional GPU extra: pip install -e '.[gpu]')")
    if missing:
        raise RuntimeError("low_resource=True (the LLM in 8-bit, the ViT on the CPU) needs "
                           + "; and ".join(missing))


def from_pretrained_kwargs(dtype: str = "float32", low_resource: bool = False, device: int = 0) -> dict:
    """What `LlamaForCausalLM.from_pretrained` is given: the dtype, and in low_resource mode
    (the demo's `load_in_8bit=True, device_map={'': device_8bit}`) transformers'
    `BitsAndBytesConfig(load_in_8bit=True)` with the whole model on GPU `device`."""
    kw = {"dtype": getattr(torch, dtype)}
    if low_resource:
        from transformers import BitsAndBytesConfig
        kw.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device})
    return kw


def load_llm(path: str | Path, dtype: str = "float32", low_resource: bool = False,
             device: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load an HF-format LLaMA chat model + tokenizer from `path`, frozen, in eval mode
    (with `low_resource`: in 8-bit on GPU `device`, checked before any weight is read)."""
    path = Path(path)
    if low_resource:
        require_8bit()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no HF-format LLM at {path} (expected config.json, weights and tokenizer files). "
            "For the tiny scale run `python -m minigpt4_min.pretrain`; for the full scale pass "
            "the folder of a Vicuna / Llama-2-chat checkpoint.")
    model = LlamaForCausalLM.from_pretrained(str(path), **from_pretrained_kwargs(dtype, low_resource, device))
    return freeze(model), load_tokenizer(path)

"""How big each part of MiniGPT-4 is, counted without a single weight (paper §3, Fig. 1).

MiniGPT-4 = frozen EVA ViT-g + frozen Q-Former (+ 32 query tokens) + ONE trainable linear
layer `llama_proj` + frozen Vicuna. This module builds every part on PyTorch's `meta`
device (shapes only, no memory, no download), from the very configs the rest of the
library uses, and counts parameters:

    >>> row = parameter_table(["vicuna7b"])[0]
    >>> row["llama_proj"], row["trainable_fraction"] < 1e-3
    (3149824, True)

What is counted, part by part
-----------------------------
* `vit`: transformers' `Blip2VisionModel` for EVA ViT-g/14 (39 blocks, width 1408): patch
  and position embeddings, the CLS token, 39 transformer blocks and `post_layernorm`,
  which is LAVIS's `ln_vision` (1408 x 2 params). One small difference from LAVIS's
  `eva_vit_g.pth`: EVA has q and v biases but no k bias; the port stores one full qkv
  bias whose k third is zero, so it counts 39 x 1408 = 54,912 parameters more.
* `qformer`: transformers' `Blip2QFormerModel` + the learned query tokens (1 x 32 x 768).
  This port holds only the *query path* of BLIP-2's BERT-base Q-Former: a LayerNorm on
  the query embeddings (`layernorm`, BERT's embedding LayerNorm), 12 self-attention
  blocks, cross-attention to the image in every 2nd block and the query FFNs
  (`intermediate_query` / `output_query`). BERT's word/position embeddings and the text
  FFNs are NOT in it, which is exactly what MiniGPT-4 keeps (it drops them too). So the
  count (~105M) is below BLIP-2's quoted 188M, which includes the text side.
  The Llama-2 variant has no Q-Former: 0.
* `llm`: `LlamaForCausalLM` (embeddings, decoder, final norm, untied `lm_head`).
* `llama_proj`: `Linear(proj_in, d_llm)` = proj_in * d_llm + d_llm, the only trainable part.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import DATA_DIR, ModelConfig, get_config

DEFAULT_TINY_VOCAB = 1024   # the size `llm.train_tokenizer` asks for when no tokenizer ships
VARIANTS = ("tiny", "vicuna7b", "vicuna13b", "llama2-7b")
PARTS = ("vit", "qformer", "llm", "llama_proj")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_vocab_size(default: int = DEFAULT_TINY_VOCAB) -> int:
    """The shipped tiny tokenizer's vocab size (`data/tiny/llm/config.json`), else `default`."""
    f = Path(DATA_DIR) / "tiny" / "llm" / "config.json"
    if f.exists():
        return int(json.loads(f.read_text())["vocab_size"])
    return default


def llm_kwargs(cfg: ModelConfig, tiny_vocab: int | None = None) -> dict:
    """`cfg.llm` completed with a vocab size (the tiny preset leaves it to its tokenizer)."""
    kw = dict(cfg.llm)
    if "vocab_size" not in kw:
        kw["vocab_size"] = tiny_vocab if tiny_vocab is not None else tiny_vocab_size()
    kw.setdefault("tie_word_embeddings", False)  # as `llm.tiny_llm_config` and LLaMA/Vicuna
    return kw


def count_parts(cfg: ModelConfig, tiny_vocab: int | None = None) -> dict[str, int]:
    """Parameter count of each part of the variant `cfg`, built on the meta device."""
    from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig,
                              Blip2VisionModel, LlamaConfig, LlamaForCausalLM)
    d_llm = cfg.llm["hidden_size"]
    with torch.device("meta"):                       # shapes only: no memory, no weights
        vit = n_params(Blip2VisionModel(Blip2VisionConfig(**cfg.vision)))
        qformer = 0
        if cfg.qformer is not None:
            qformer = n_params(Blip2QFormerModel(Blip2QFormerConfig(**cfg.qformer)))
            qformer += cfg.num_query_tokens * cfg.qformer["hidden_size"]   # (1, Q, Hq)
        llm = n_params(LlamaForCausalLM(LlamaConfig(**llm_kwargs(cfg, tiny_vocab))))
        proj = n_params(nn.Linear(cfg.proj_in, d_llm))
    assert proj == cfg.proj_in * d_llm + d_llm
    return {"vit": vit, "qformer": qformer, "llm": llm, "llama_proj": proj}


def parameter_table(names=VARIANTS, tiny_vocab: int | None = None) -> list[dict]:
    """One row per variant: per-part counts, total, trainable (= llama_proj) and its fraction.

    `tiny_vocab`: vocab size for the tiny LLM; None reads it from the shipped tokenizer
    (`data/tiny/llm/config.json`) or falls back to DEFAULT_TINY_VOCAB (1024).
    """
    rows = []
    for name in names:
        cfg = get_config(name)
        parts = count_parts(cfg, tiny_vocab)
        total = sum(parts.values())
        rows.append({"name": name, **parts, "total": total,
                     "trainable": parts["llama_proj"],
                     "trainable_fraction": parts["llama_proj"] / total,
                     "proj_in": cfg.proj_in, "d_llm": cfg.llm["hidden_size"],
                     "num_image_tokens": cfg.num_image_tokens})
    return rows


def human(n: float) -> str:
    """13015864320 -> '13.0B', 3149824 -> '3.15M', 985952256 -> '986M', 24768 -> '24.8K'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.2f}{unit}" if v < 10 else f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(int(n))


def markdown_table(table: list[dict]) -> str:
    """The table as GitHub markdown (pandas-free), with exact counts for the trainable part."""
    lines = ["| variant | ViT | Q-Former | LLM | llama_proj (trainable) | total | trainable % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['name']} | {human(r['vit'])} | {human(r['qformer']) if r['qformer'] else '—'} "
                     f"| {human(r['llm'])} | {r['llama_proj']:,} ({r['proj_in']}→{r['d_llm']}) "
                     f"| {human(r['total'])} | {100 * r['trainable_fraction']:.3f}% |")
    return "\n".join(lines)


FACT_ROWS = ("image", "ViT layers x width", "queries x Q-Former width", "LLM layers x width",
             "llama_proj", "parameters")


def config_facts(cfg: ModelConfig) -> list[str]:
    """One column of the scale-comparison table: the `FACT_ROWS` values of a preset."""
    v, q = cfg.vision, cfg.qformer
    return [f"{cfg.image_size} px", f"{v['num_hidden_layers']} x {v['hidden_size']}",
            f"{cfg.num_query_tokens} x {q['hidden_size']}" if q else "none",
            f"{cfg.llm['num_hidden_layers']} x {cfg.llm['hidden_size']}",
            f"Linear({cfg.proj_in}, {cfg.llm['hidden_size']})",
            f"{parameter_table([cfg.name])[0]['total']:,}"]

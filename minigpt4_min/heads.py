"""Which attention heads bind a colour to its shape: a look inside the miniature LLM.

MiniGPT-4 (arXiv 2304.10592 §3) relies on the frozen LLM to answer questions about what
the projection feeds it. Our miniature reads a scene as the record `sw.notes`
("left large red circle top none none none ..."). To answer "What color is the circle?"
a causal model cannot look ahead: the colour comes BEFORE the shape it belongs to, so some
head must first copy each colour forward into its shape's position, attending one token
back (the "previous-token" half of an induction circuit: Elhage et al. 2021, Olsson et
al. 2022). Only a head in a layer before the last can be used that way: a later layer
then matches the asked shape and reads the colour stored there.

`slot_attention` measures it: for every object of the record, how much each head attends
from the object's shape word to its colour word (or any other slot of the same object).
Measured on 40 validation scenes (numbers in `pretrain_llm`'s docstring): the first
miniature LLM (commit 467dec4), which binds colours (0.92), has such a head in layer 2 of 4
(0.95); the LLM shipped before this one, a one-phase run on today's corpus that does not
bind (0.51), had none before its last layer (at most 0.12 in layers 0-2, 0.77 in layer 3);
the shipped LLM, the first one continued on today's corpus, keeps its head (0.96) and binds
0.89. No LLM has one in layer 0, whose inputs are the frozen random embeddings alone.
"""
from __future__ import annotations

import torch

from . import shapesworld as sw


def _word_tokens(offsets: list[tuple[int, int]], start: int, words: list[str]) -> list[int]:
    """The index of the token where each word of the text from character `start` begins
    (words joined by single spaces), from the tokenizer's character offsets."""
    firsts, at = [], start
    for w in words:
        hit = next((i for i, (a, b) in enumerate(offsets) if a <= at < b), None)
        if hit is None:
            raise ValueError(f"no token covers character {at} ({w!r}) of the re-description prompt")
        firsts.append(hit)
        at += len(w) + 1
    return firsts


@torch.no_grad()
def slot_attention(model, tok, scenes: list[sw.Scene], src: str = "shape", dst: str = "colour") -> torch.Tensor:
    """Mean attention (layers, heads) from each object's `src` word in the record to its
    `dst` word (slots of `sw.NOTE_SLOT`), in the corpus's re-description prompt."""
    from .pretrain_llm import redescribe_prompt  # pretrain_llm records this metric
    i_src, i_dst = sw.NOTE_SLOT.index(src), sw.NOTE_SLOT.index(dst)
    cfg = model.config
    total, n = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads), 0
    for s in scenes:
        notes = sw.notes(s)
        prompt = redescribe_prompt(s)
        words = notes.split()
        enc = tok(prompt, return_offsets_mapping=True)                # one pass: ids and offsets
        first = _word_tokens(enc["offset_mapping"], prompt.index(notes), words)
        ids = torch.tensor([enc["input_ids"]], device=model.device)
        att = model(input_ids=ids, output_attentions=True).attentions   # layers x (1, H, T, T)
        for k in range(0, len(sw.POSITIONS) * len(sw.NOTE_SLOT), len(sw.NOTE_SLOT)):
            if words[k + i_src] == sw.NONE_WORD:
                continue
            q, key = first[k + i_src], first[k + i_dst]
            total += torch.stack([a[0, :, q, key].float().cpu() for a in att])
            n += 1
    return total / max(n, 1)


def binding_heads(model, tok, scenes: list[sw.Scene]) -> dict:
    """The strongest shape -> colour head of each layer (a summary of `slot_attention`, for
    the manifest), and whether one stronger than 0.5 sits before the last layer."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")                 # sdpa returns no attention weights
    try:
        a = slot_attention(model, tok, scenes)             # (L, H)
    finally:
        model.set_attn_implementation(impl)
    best = a.max(dim=1)
    return {"per_layer": [round(float(v), 3) for v in best.values],
            "head": [int(h) for h in best.indices],
            "before_last_layer": bool((best.values[:-1] > 0.5).any())}

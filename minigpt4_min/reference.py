"""The best linear projection, fitted to the answer key (tiny scale; a diagnostic, not MiniGPT-4).

Stages 1 and 2 (paper §3.1-3.2) train `llama_proj` from text about images: captions, then
curated descriptions. How good could that one linear layer be at all? ShapesWorld can say.
The miniature encoder was pretrained so that query k predicts word k of the scene's 22-word
notes record (`pretrain.py`), and the frozen LLM reads notes perfectly. So a linear map
exists that turns every image into (nearly) its notes as the LLM sees them: send each
query's output to the LLM's input embedding of its word. Least squares over a few thousand
images finds it:

    feats (N, Q, Hq) --queries 0..21--> X (N * 22, Hq + 1)      (+1: the bias)
    notes words      --input embeddings--> Y (N * 22, D)
    [W; b] = argmin |X [W; b] - Y|^2

It uses the scenes' ground truth, which MiniGPT-4 never has; it is a yardstick. A trained
projection that scores far below it was not found by the training; a target above it is out
of reach of one linear layer on these frozen parts.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from . import shapesworld as sw
from . import stage1


def notes_token_ids(tok, scene: sw.Scene) -> list[int]:
    """The 22 token ids of the scene's notes, one per word, as the LLM reads `notes + " "`."""
    text = sw.notes(scene) + " "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != sw.NOTES_LEN:
        raise ValueError(f"the tokenizer splits the notes {text!r} into {len(ids)} tokens, "
                         f"expected one per word ({sw.NOTES_LEN}): not the tiny scale's tokenizer?")
    return ids


@torch.no_grad()
def fit_notes_projection(model, fs) -> dict[str, torch.Tensor]:
    """Least-squares `llama_proj` weights mapping query k of each image of `fs` (a
    `stage1.FeatureSet` with scenes) onto the LLM input embedding of notes word k.

    Returns {"weight": (D, Hq), "bias": (D,)}, ready for `model.llama_proj.load_state_dict`.
    """
    if any(s is None for s in fs.scenes):
        raise ValueError("fit_notes_projection needs the scenes of all images (ShapesWorld)")
    if fs.feats.shape[1] < sw.NOTES_LEN:
        raise ValueError(f"features have {fs.feats.shape[1]} queries, fewer than the "
                         f"{sw.NOTES_LEN} notes words")
    emb = model.llm.get_input_embeddings().weight.detach().double().cpu()            # (V, D)
    ids = torch.tensor([notes_token_ids(model.tokenizer, s) for s in fs.scenes])      # (N, 22)
    x = fs.feats[:, : sw.NOTES_LEN].double().cpu().flatten(0, 1)                      # (N*22, Hq)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)                       # (N*22, Hq+1)
    y = emb[ids.flatten()]                                                            # (N*22, D)
    sol = torch.linalg.lstsq(x, y, driver="gelsd").solution                           # (Hq+1, D)
    dtype = model.llama_proj.weight.dtype
    return {"weight": sol[:-1].T.contiguous().to(dtype), "bias": sol[-1].contiguous().to(dtype)}


@contextmanager
def best_linear_map(model, n_images: int = 2000, split: str = "train"):
    """Within the block, `model` projects with the map `fit_notes_projection` fits on the first
    `n_images` scenes of `split`; afterwards (error or not) its own projection is back. For
    asking a question of the yardstick, e.g. whether a chat failure is one linear layer's or
    the LLM's (notebook 05's yes / no probe)."""
    own = {k: v.clone() for k, v in model.llama_proj.state_dict().items()}
    fs = stage1.scene_features(model, sw.split(split, n_images), prefix="ref")
    try:
        model.llama_proj.load_state_dict(fit_notes_projection(model, fs))
        yield model
    finally:
        model.llama_proj.load_state_dict(own)


@torch.no_grad()
def nearest_words(model, feats: torch.Tensor) -> list[list[str]]:
    """Read image tokens back as words: the vocabulary entry whose input embedding is
    nearest (cosine) to each projected query, for the first `NOTES_LEN` queries."""
    img = model.project(feats[:, : sw.NOTES_LEN]).float()                             # (B, 22, D)
    emb = model.llm.get_input_embeddings().weight.float().to(img.device)              # (V, D)
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    return [[model.tokenizer.decode([i]).strip() for i in row] for row in sim.argmax(-1).tolist()]

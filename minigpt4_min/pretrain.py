"""Making the miniature frozen parts of the `tiny` scale (tiny scale only).

MiniGPT-4 starts from parts pretrained by others: BLIP-2's encoder and Vicuna. Neither
can be downloaded or run on a 2-core CPU, so the tiny scale pretrains its own, once,
then freezes them and ships them in `data/tiny/`:

* encoder: transformers `Blip2VisionModel` + `Blip2QFormerModel` + 24 query tokens,
  trained on ShapesWorld IMAGES ONLY: query k predicts word k of the scene's 22-word
  notes record (a per-query "slot" objective: each place of the image has its queries)
  and the mean of the queries predicts the bag of words (a pooled objective; DESIGN.md
  §5 found the two together best);
* LLM: transformers `LlamaForCausalLM` + byte-level BPE, trained on TEXT ONLY, in the
  four phases of `curriculum.py` (each a resumable run of `pretrain_llm.py`).

The shipped LLM was re-made (issue 12: a chat model that understands questions in a
learner's own words and binds each colour to its shape, with a 512-position context); the
shipped encoder was kept as it was made before by this same command (its manifest entry is
kept). `data/tiny/manifest.json` records each part's recipe, time and measured quality.

Re-make the shipped parts (the LLM's recipe, not its weights: a run from scratch drifts from
the one that made them, see curriculum.py). `make pretrain` runs the LLM's four phases
(2,283 + 978 + 1,358 + 2,511 s when they were made, about 2 h on 2 cores; `--device cuda`
trains it on a GPU) and keeps the shipped encoder; `make pretrain-encoder` re-makes the
encoder, about 55 minutes on an otherwise idle 2-core CPU, in two phases, from scratch and
then continued with a fresh warmup + cosine at a lower learning rate. Started again after
an interruption, the command skips the phases it has finished and resumes the cut one from
its checkpoint:

    python -m minigpt4_min.pretrain --out data/tiny --part llm       # make pretrain
    python -m minigpt4_min.pretrain --out data/tiny --part encoder   # make pretrain-encoder
    python -m minigpt4_min.pretrain --out data/tiny                  # both
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import shapesworld as sw
from .config import DATA_DIR, TrainConfig, get_config
from .data import ImageProcessor
from .encoder import VisualEncoder
from . import curriculum
from .pretrain_llm import phases_history
from .train import build_optimizer, lr_at

ENCODER_TRAIN = TrainConfig(lr=1e-3, min_lr=5e-5, warmup_lr=1e-5, warmup_steps=200,
                            max_steps=1500, batch_size=64, weight_decay=0.05, seed=0)


# =============================================================== encoder
class NotesHead(nn.Module):
    """Pretraining head (not part of MiniGPT-4): query outputs -> notes words."""

    def __init__(self, hidden: int, vocab: list[str], vit_hidden: int | None = None):
        super().__init__()
        self.vocab = vocab
        self.slot = nn.Linear(hidden, len(vocab))   # query k -> word k of the notes
        self.bag = nn.Linear(hidden, len(vocab))    # mean of queries -> words present
        # ViT patch token -> the shape under it: a dense, local signal for the ViT (measured:
        # 0.65 / 0.73 attribute accuracy at 300 / 600 steps, against 0.60 / 0.71 without)
        self.patch = nn.Linear(vit_hidden or hidden, len(sw.SHAPES) + 1)

    def forward(self, feats: torch.Tensor):         # feats (B, Q, H)
        return self.slot(feats[:, : sw.NOTES_LEN]), self.bag(feats.mean(1))  # (B, 22, V), (B, V)



def sincos_position_embeddings(enc: VisualEncoder) -> None:
    """Start the ViT's learned position embeddings from a 2-D sine-cosine pattern (as MAE
    does), at the scale of the patch embeddings. transformers initialises them at
    std 0.02, an order of magnitude below the patch contents: the queries then cannot
    tell *where* an object is, and the per-place objective stalls (measured here, 1 thread:
    attribute accuracy 0.02 / 0.03 after 300 / 600 steps from transformers' init, 0.60 /
    0.71 with this start)."""
    emb = enc.vision.embeddings
    n = int(round((emb.position_embedding.shape[1] - 1) ** 0.5))             # patches per side
    d = emb.position_embedding.shape[-1]
    q = d // 4
    freq = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float32) / q))       # (d/4,)
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32),
                            indexing="ij")
    ang_y, ang_x = ys.reshape(-1, 1) * freq, xs.reshape(-1, 1) * freq       # (P, d/4)
    pe = torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)  # (P, d)
    with torch.no_grad():
        emb.position_embedding[0, 1:] = pe
        emb.position_embedding[0, 0] = 0.0


def notes_targets(scenes: list[sw.Scene], vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    idx = {w: i for i, w in enumerate(vocab)}
    slots = torch.tensor([[idx[w] for w in sw.notes(s).split()] for s in scenes])     # (B, 22)
    bag = torch.zeros(len(scenes), len(vocab))
    bag.scatter_(1, slots, 1.0)                                                        # (B, V)
    return slots, bag


def encoder_attribute_accuracy(enc: VisualEncoder, head: NotesHead, scenes: list[sw.Scene],
                               batch: int = 250) -> float:
    """Share of the present objects' attributes (size, colour, shape) predicted right at
    their place (the place itself is the query's: a wrong place shows as wrong words)."""
    proc = ImageProcessor(enc.cfg)
    width = len(sw.NOTE_SLOT)
    right = total = 0
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            chunk = scenes[i:i + batch]
            pred, _ = head(enc(proc.batch(sw.render(s, enc.cfg.image_size) for s in chunk)))
            pred = pred.argmax(-1)                                                   # (B, 22)
            gold, _ = notes_targets(chunk, head.vocab)
            for b, s in enumerate(chunk):
                for o in s.objects:
                    k = sw.POSITIONS.index(o.position) * width
                    right += int((pred[b, k + 1:k + width] == gold[b, k + 1:k + width]).sum())
                    total += width - 1
    return right / total


def pretrain_encoder(out: Path, steps: int, seed: int = 0, n_eval: int = 1000,
                     init: Path | None = None) -> dict:
    """Pretrain the miniature encoder from scratch, or (`init`) continue a saved one
    (encoder + notes head) with a fresh warmup + cosine. The scenes depend on `seed` and
    the step only, so a continued phase replays the first phase's stream of scenes."""
    torch.manual_seed(seed)
    cfg = get_config("tiny")
    tc = ENCODER_TRAIN.replace(max_steps=steps, warmup_steps=min(200, steps // 5), seed=seed)
    if init is None:
        enc = VisualEncoder(cfg)
        head = NotesHead(cfg.qformer["hidden_size"], sw.notes_vocab(), cfg.vision_width)
        sincos_position_embeddings(enc)
    else:
        tc = tc.replace(seed=seed + 1, warmup_steps=min(50, steps // 5))
        enc = VisualEncoder.load(cfg, init)
        head = load_notes_head(init, cfg.qformer["hidden_size"], cfg.vision_width)
        for p in list(enc.parameters()) + list(head.parameters()):
            p.requires_grad_(True)
    enc.train()
    head.train()
    patch = cfg.vision["patch_size"]
    proc = ImageProcessor(cfg)
    params = [(n, p) for n, p in list(enc.named_parameters()) + list(head.named_parameters())]
    opt = build_optimizer(params, tc)
    t0 = time.time()
    bar = tqdm(range(steps), desc="pretrain encoder")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        rng = random.Random(seed * 1_000_003 + step)
        scenes = [sw.sample_scene(rng, seed=rng.randrange(2**31)) for _ in range(tc.batch_size)]
        drawn = [sw.render_with_shapes(s, cfg.image_size) for s in scenes]          # drawn once
        x = proc.batch(img for img, _ in drawn)                                      # (B, 3, 64, 64)
        slots, bag = notes_targets(scenes, head.vocab)
        patch_gold = torch.from_numpy(np.stack([sw.patch_shapes(m, patch) for _, m in drawn])).long()  # (B, P)
        img = enc.vit(x)                                                             # (B, 1+P, W)
        slot_logits, bag_logits = head(enc.read_out(img))
        loss = (nn.functional.cross_entropy(slot_logits.flatten(0, 1), slots.flatten())
                + nn.functional.binary_cross_entropy_with_logits(bag_logits, bag)
                + nn.functional.cross_entropy(head.patch(img[:, 1:]).flatten(0, 1), patch_gold.flatten()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 150 == 0:
            enc.eval()
            bar.write(f"step {step + 1}: val attribute accuracy "
                      f"{encoder_attribute_accuracy(enc, head, sw.split('val', 200)):.3f}")
            enc.train()
    enc.eval()
    acc = encoder_attribute_accuracy(enc, head, sw.split("val", n_eval))
    metrics = {"attribute_accuracy_val": acc, "steps": steps, "seconds": round(time.time() - t0, 1),
               "params": sum(p.numel() for p in enc.parameters()), "train": asdict(tc),
               "init": str(init) if init else None}
    before = json.loads((Path(init) / "config.json").read_text()).get("pretraining") if init else None
    metrics["phases"] = phases_history(before, metrics)
    enc.save(out / "encoder", extra={"pretraining": metrics})
    save_file({k: v.contiguous() for k, v in head.state_dict().items()},
              str(out / "encoder" / "notes_head.safetensors"))
    return metrics


def load_notes_head(folder: str | Path, hidden: int, vit_hidden: int) -> NotesHead:
    head = NotesHead(hidden, sw.notes_vocab(), vit_hidden)
    head.load_state_dict(load_file(str(Path(folder) / "notes_head.safetensors")))
    return head.eval()


def write_manifest(out: Path, parts: dict, seed: int) -> dict:
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    manifest = {"command": "python -m minigpt4_min.pretrain --out data/tiny", "seed": seed,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "threads": torch.get_num_threads(),
                "parts": {**old.get("parts", {}), **parts}, "files_bytes": files,
                "total_bytes": sum(files.values())}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR / "tiny")
    ap.add_argument("--part", choices=("all", "encoder", "llm"), default="all")
    ap.add_argument("--encoder-steps", type=int, default=ENCODER_TRAIN.max_steps)
    ap.add_argument("--llm-recipe", choices=tuple(curriculum.RECIPES), default="curriculum",
                    help="the LLM's phases (curriculum.py): the shipped curriculum, the one-phase recipe before it, "
                         "or the curriculum + yes / no drills (measured, not shipped)")
    ap.add_argument("--llm-steps", type=int, nargs="+", default=None,
                    help="steps of each of the recipe's phases (default: the recipe's; 0 skips a later phase)")
    ap.add_argument("--encoder-continue-steps", type=int, default=ENCODER_TRAIN.max_steps,
                    help="phase 2: continue the encoder on new scenes (0 = skip)")
    ap.add_argument("--encoder-init", type=Path, default=None,
                    help="skip phase 1 and continue this saved encoder folder")
    ap.add_argument("--llm-init", type=Path, default=None,
                    help="this saved LLM folder stands for phase 1: the later phases continue it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llm-loss", choices=("all", "answers"), default="all",
                    help="LLM loss on every token, or on answers and captions only (corpus.answer_spans)")
    ap.add_argument("--llm-doc-mask", action="store_true",
                    help="each packed document attends to itself only (position ids restart per document)")
    ap.add_argument("--device", default="cpu", help="where the LLM trains (cpu, cuda); the encoder trains on the CPU")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    parts = {}
    if a.part in ("all", "encoder"):
        init = a.encoder_init
        if init is None:
            parts["encoder"] = pretrain_encoder(a.out, a.encoder_steps, a.seed)
            print("encoder phase 1:", json.dumps(parts["encoder"]))
            init = a.out / "encoder"      # phase 2 reads it, then overwrites it
        if a.encoder_continue_steps:
            parts["encoder"] = pretrain_encoder(a.out, a.encoder_continue_steps, a.seed, init=init)
            print("encoder phase 2:", json.dumps(parts["encoder"]))
    if a.part in ("all", "llm"):
        phases = curriculum.with_steps(curriculum.RECIPES[a.llm_recipe], a.llm_steps)
        parts["llm"] = curriculum.run(a.out, phases, a.seed, init=a.llm_init, device=a.device,
                                      answers_only=a.llm_loss == "answers", doc_mask=a.llm_doc_mask)
        print("llm:", json.dumps({k: v for k, v in parts["llm"].items() if k != "phases"}))
    return write_manifest(a.out, parts, a.seed)


if __name__ == "__main__":
    main()

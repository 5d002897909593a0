"""Making the miniature frozen parts of the `tiny` scale (tiny scale only).

MiniGPT-4 starts from parts pretrained by others: BLIP-2's encoder and Vicuna. Neither
can be downloaded or run on a 2-core CPU, so the tiny scale pretrains its own, once,
then freezes them and ships them in `data/tiny/`:

* encoder: transformers `Blip2VisionModel` + `Blip2QFormerModel` + 24 query tokens,
  trained on ShapesWorld IMAGES ONLY: query k predicts word k of the scene's 22-word
  notes record (a per-query "slot" objective: each place of the image has its queries)
  and the mean of the queries predicts the bag of words (a pooled objective; DESIGN.md
  §5 found the two together best);
* LLM: transformers `LlamaForCausalLM` + byte-level BPE, trained on TEXT ONLY (corpus.py),
  with its input embeddings frozen at random N(0, 0.3) against embedding collapse. It
  copies a record into a description long before it binds each colour to its shape (a
  caption after the notes names the right colour for the shape it names): at 1,100 + 500
  steps its captions from exact notes reached 0.81 attribute accuracy, at 4,400 + 2,000
  steps 0.998 (`caption_accuracy`), so it trains that long. `--llm-loss answers` (loss
  on answers and captions only, as Vicuna was trained) binds sooner, but an LLM made so
  read stage 1's image tokens so well that stage 1 hardly failed (notebook 03: 1.5% of raw
  descriptions), leaving stage 2 nothing to fix; the shipped LLM is trained on every token.

Reproduce the shipped files (about two hours on 2 cores, each part about 55 minutes; each
part in two phases, from scratch and then continued with a fresh warmup + cosine at a
lower learning rate; `--device cuda` trains the LLM on a GPU in minutes, with other bits):

    python -m minigpt4_min.pretrain --out data/tiny
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

from . import corpus
from . import shapesworld as sw
from .config import DATA_DIR, TrainConfig, get_config
from .data import ImageProcessor
from .encoder import VisualEncoder
from .evaluate import caption_metrics, exact_scene, vqa_accuracy, vqa_questions
from .llm import load_tokenizer, tiny_llm_config, train_tokenizer
from .train import build_optimizer, lr_at

ENCODER_TRAIN = TrainConfig(lr=1e-3, min_lr=5e-5, warmup_lr=1e-5, warmup_steps=200,
                            max_steps=1500, batch_size=64, weight_decay=0.05, seed=0)
LLM_TRAIN = TrainConfig(lr=2e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=200,
                        max_steps=4400, batch_size=16, weight_decay=0.1, seed=0)


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


def _phases(before: dict | None, metrics: dict) -> list[dict]:
    """The history of a part: the phases of the run it continued (`before`), then this one."""
    earlier = [] if not before else before.get("phases", [before])
    return earlier + [{k: v for k, v in metrics.items() if k != "phases"}]


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
    metrics["phases"] = _phases(before, metrics)
    enc.save(out / "encoder", extra={"pretraining": metrics})
    save_file({k: v.contiguous() for k, v in head.state_dict().items()},
              str(out / "encoder" / "notes_head.safetensors"))
    return metrics


def load_notes_head(folder: str | Path, hidden: int, vit_hidden: int) -> NotesHead:
    head = NotesHead(hidden, sw.notes_vocab(), vit_hidden)
    head.load_state_dict(load_file(str(Path(folder) / "notes_head.safetensors")))
    return head.eval()


# =============================================================== LLM
def redescribe_prompt(scene: sw.Scene) -> str:
    """A scene given in words, asking for a description: the LLM's copy test."""
    return f"###Human: Scene: {sw.notes(scene)}. Describe the scene. ###Assistant: "


@torch.no_grad()
def generate_text(model, tok, prompts: list[str], max_new_tokens: int = 80, batch: int = 50) -> list[str]:
    """Greedy continuation of text prompts, cut at the first `###`."""
    tok.padding_side = "left"
    outs = []
    try:
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 stop_strings=["###"], tokenizer=tok, pad_token_id=tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                outs.append(tok.decode(row, skip_special_tokens=True).split("###")[0].strip())
    finally:
        tok.padding_side = "right"
    return outs


def redescribe_exact(model, tok, scenes: list[sw.Scene]) -> float:
    texts = generate_text(model, tok, [redescribe_prompt(s) for s in scenes])
    return sum(exact_scene(t, s) for t, s in zip(texts, scenes)) / len(scenes)


IMG_FRAME = "<Img>{} </Img>"      # the notes where MiniGPT-4's prompt puts the image tokens
WORDS_FRAME = "Scene: {}."         # the notes as the pretraining corpus gives them


def answer_accuracy(model, tok, scenes: list[sw.Scene], frame: str = IMG_FRAME) -> float:
    """VQA accuracy (`evaluate.vqa_questions`) with the scene given in words, by default
    framed as MiniGPT-4 frames an image (`<Img>notes </Img> question`): the ceiling of what
    the LLM can answer about an image whose tokens said exactly what its notes say."""
    qs = [(s, q) for s in scenes for q in vqa_questions(s)]
    prompts = [f"###Human: {frame.format(sw.notes(s))} {q.text} ###Assistant: " for s, q in qs]
    answers = generate_text(model, tok, prompts, max_new_tokens=20, batch=100)
    return vqa_accuracy(answers, [q for _, q in qs])["vqa_accuracy"]


def caption_accuracy(model, tok, scenes: list[sw.Scene]) -> float:
    """Attribute accuracy of the captions the LLM writes after each scene's exact notes, in
    the corpus's catalogue format (`notes caption`): whether it binds each colour to the
    right shape. Stage 1 asks the same of image tokens, so this is its captions' ceiling."""
    texts = generate_text(model, tok, [f"{sw.notes(s)} " for s in scenes], max_new_tokens=20, batch=100)
    return caption_metrics([t.split("\n")[0] for t in texts], scenes)["attribute_accuracy"]


LLM_CONTINUE = TrainConfig(lr=5e-4, min_lr=5e-5, warmup_lr=1e-5, warmup_steps=50,
                           max_steps=2000, batch_size=16, weight_decay=0.1, seed=1)
LLM_BLOCK = 256


def pack_documents(tok, rng: random.Random, rows: int, block: int,
                   answers_only: bool = False) -> dict[str, torch.Tensor]:
    """Fill `rows` rows of `block` tokens with WHOLE documents (BOS-separated), pad the rest.

    Packing avoids wasting half of every batch on padding; keeping documents whole means
    no row ever starts mid-conversation, without the scene it talks about. `labels` are the
    ids, -100 on padding; with `answers_only`, also -100 on everything but the answers and
    captions (`corpus.answer_spans`; a token counts when it starts inside one).
    """
    ids = torch.full((rows, block), tok.pad_token_id)
    mask = torch.zeros(rows, block, dtype=torch.long)
    labels = torch.full((rows, block), -100)
    for r in range(rows):
        used = 0
        while True:
            doc = corpus.sample_doc(rng)
            enc = tok(doc, return_offsets_mapping=answers_only)
            doc_ids = enc["input_ids"][:block]                          # starts with BOS
            if used + len(doc_ids) > block:
                break
            t = torch.tensor(doc_ids)
            if answers_only:
                spans = corpus.answer_spans(doc)
                target = torch.tensor([end > start and any(a <= start < b for a, b in spans)
                                       for start, end in enc["offset_mapping"][:block]])
                t_lab = t.masked_fill(~target, -100)
            else:
                t_lab = t
            ids[r, used:used + len(t)] = t
            mask[r, used:used + len(t)] = 1
            labels[r, used:used + len(t)] = t_lab
            used += len(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain_llm(out: Path, steps: int, seed: int = 0, n_eval: int = 300,
                 init: Path | None = None, device: str = "cpu", answers_only: bool = False) -> dict:
    """Pretrain the miniature LLM from scratch, or (`init`) continue training a saved one
    with a fresh warmup + cosine at `LLM_CONTINUE`'s lower learning rate."""
    torch.manual_seed(seed)
    cfg = get_config("tiny")
    if init is None:
        tc = LLM_TRAIN.replace(max_steps=steps, warmup_steps=min(200, steps // 5), seed=seed)
        tok = train_tokenizer(corpus.documents(20000, seed=seed + 10_000))
        model = transformers.LlamaForCausalLM(tiny_llm_config(len(tok), tok, cfg.llm))
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            emb.normal_(0.0, 0.3)  # frozen random input embeddings (DESIGN.md §5)
    else:
        # tc.seed (seed + 1) picks the documents, so a continued phase reads new ones
        tc = LLM_CONTINUE.replace(max_steps=steps, warmup_steps=min(50, steps // 5), seed=seed + 1)
        model, tok = transformers.LlamaForCausalLM.from_pretrained(str(init)), load_tokenizer(init)
        emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)
    model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(params, tc)
    model.train()
    t0, n_tok = time.time(), 0
    bar = tqdm(range(steps), desc="pretrain LLM")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        rng = random.Random(tc.seed * 1_000_003 + step)
        batch = pack_documents(tok, rng, tc.batch_size, LLM_BLOCK, answers_only)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        n_tok += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{n_tok / (time.time() - t0):.0f}")
        if (step + 1) % 250 == 0:
            model.eval()
            bar.write(f"step {step + 1}: re-describes exactly "
                      f"{redescribe_exact(model, tok, sw.split('val', 100)):.2f}")
            model.train()
    model.eval()
    seconds = time.time() - t0
    exact = redescribe_exact(model, tok, sw.split("val", n_eval))
    answers = answer_accuracy(model, tok, sw.split("val", n_eval))
    captions = caption_accuracy(model, tok, sw.split("val", n_eval))
    metrics = {"redescribe_exact_val": exact, "answers_val": answers, "captions_attr_val": captions,
               "steps": steps, "seconds": round(seconds, 1),
               "init": str(init) if init else None,
               "tokens_seen": n_tok, "params": sum(p.numel() for p in model.parameters()),
               "vocab_size": len(tok), "answers_only": answers_only, "train": asdict(tc),
               "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"}
    model.cpu().save_pretrained(str(out / "llm"))
    tok.save_pretrained(str(out / "llm"))
    record = Path(init) / "pretraining.json" if init else None
    before = json.loads(record.read_text()) if record and record.exists() else None
    metrics["phases"] = _phases(before, metrics)
    (out / "llm" / "pretraining.json").write_text(json.dumps(metrics, indent=2))
    return metrics


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
    ap.add_argument("--llm-steps", type=int, default=LLM_TRAIN.max_steps)
    ap.add_argument("--encoder-continue-steps", type=int, default=ENCODER_TRAIN.max_steps,
                    help="phase 2: continue the encoder on new scenes (0 = skip)")
    ap.add_argument("--encoder-init", type=Path, default=None,
                    help="skip phase 1 and continue this saved encoder folder")
    ap.add_argument("--llm-continue-steps", type=int, default=LLM_CONTINUE.max_steps,
                    help="phase 2: continue the LLM at a lower learning rate (0 = skip)")
    ap.add_argument("--llm-init", type=Path, default=None,
                    help="skip phase 1 and continue this saved LLM folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llm-loss", choices=("all", "answers"), default="all",
                    help="LLM loss on every token, or on answers and captions only (corpus.answer_spans)")
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
        init = a.llm_init
        if init is None:
            parts["llm"] = pretrain_llm(a.out, a.llm_steps, a.seed, device=a.device,
                                        answers_only=a.llm_loss == "answers")
            print("llm phase 1:", json.dumps(parts["llm"]))
            init = a.out / "llm"
        if a.llm_continue_steps:
            parts["llm"] = pretrain_llm(a.out, a.llm_continue_steps, a.seed, init=init, device=a.device,
                                        answers_only=a.llm_loss == "answers")
            print("llm phase 2:", json.dumps(parts["llm"]))
    return write_manifest(a.out, parts, a.seed)


if __name__ == "__main__":
    main()

"""Making the miniature frozen LLM of the `tiny` scale: a "Vicuna" of ShapesWorld.

MiniGPT-4 (arXiv 2304.10592 §3) freezes Vicuna, an LLM that learned language from text
alone. Our miniature is a transformers `LlamaForCausalLM` (4 layers, width 192, 512
positions: a 5-turn chat with an image fits) + a byte-level BPE tokenizer, trained on TEXT
ONLY (scenes in words, chats about them: `corpus.py`, `corpus_first.py`), with its input
embeddings frozen at random N(0, 0.3) against embedding collapse (DESIGN.md §5). Documents
are packed whole into rows of 512 tokens (256 in the first phases); the loss is on every
token (`--llm-loss answers`: answers and captions only, as Vicuna was trained).

The shipped LLM is a curriculum (`curriculum.py`), each phase one call of `pretrain_llm`:
phases 1-2 on the FIRST corpus (`corpus_first.py`: one wording per question kind, 256-token
rows, its own 974-token tokenizer), where the first LLM learnt to bind colours to shapes (0.92),
then phases 3-4 on today's corpus, whose questions phase 4 also words by `grammar.py`. After
phase 3 it answered held-out wordings 0.73 (colour 0.84, size 0.66, position 0.68, what is at a
place 0.58, yes / no 0.72, absent 0.66; the corpus's 0.97): read per wording (150 scenes), it failed
where a question put its words in another order ("The blue circle is where?" 0.00, "The
background is what colour?" 0.37), used a possessive ("the triangle's colour" 0.54), a
passive ("Can a square be seen ...?" 0.14) or a fragment ("Anything on the left?" 0.24).
The grammar asks the corpus's questions in those ways, with other words; after phase 4, on
300 validation scenes: held-out wordings 0.95 (yes / no 0.89, what is at a place 0.90, size
0.92, the rest 0.94-1.0), `<Img>` framing 0.96, the second held-out set `wordings.LATE` 0.94
(absent 0.82, background 0.87), the corpus's 0.99, binding 0.96 (another object's colour
0.04), captions after notes 0.99, colour collapse 0.38. Phases 1-2 were first run at commit
467dec4. This code starts exactly as that run did (the same weights to the last bit after 6 +
4 steps, 2 threads), yet a whole run from scratch (2026-12-02, same documents, tokenizer and
frozen embeddings) ended phases 1-2 with weights up to 0.49 apart from it, captions after
notes 0.93 (first run 0.998) and binding 0.52 (0.92), a shape-to-colour head formed in layer 1
(0.98) but not yet read. Its phase 3 (before the grammar) then learnt to read it: that LLM
binds 0.98 (the shipped one's phase 3: 0.89), held-out wordings 0.73 (0.73), `<Img>` framing
0.73 (0.77), the corpus's wordings 0.95 (0.97), captions after notes 0.95 (0.99), colour
collapse 0.41 (0.40). It is not shipped: the notebooks' numbers are the shipped LLM's.

One phase, as shipped before (`curriculum.ONE_PHASE`, `--llm-recipe one-phase`): 4,000
steps from scratch on today's corpus (`LLM_TRAIN`), then 1,500 more at a lower learning
rate on new documents (`LLM_CONTINUE`). The first phase learns to copy a
record (re-description 0.35 at step 2,000, 0.97 at 3,000, measured on 40 validation scenes)
long before it binds each colour to its shape (colour questions 0.64 in the corpus's own
wordings after 4,000 steps, on 300): the second phase is for that.

Binding is what that LLM lacks. It answers "What color is the circle?" right
in 48 % of two- and three-object validation scenes (its size in 70 %): it knows which colours
a scene has, not whose, and names one of them at random. Measured and not kept: 500 more
steps on attribute questions (loss on answers only) left its held-out colour score at 0.53
(40 scenes); 250 steps on a mix of half quizzes (one attribute of every object in turn) at
0.50; a whole 4,000-step phase from scratch with 35 % quizzes ended at 0.46 (held-out
wordings 0.74 in all). And a 4,000-step phase 1 from scratch (76 min) with two changes
that each should help: `doc_mask` (a packed document attends to itself only: no "circle" of
another scene in its 512-token row answers) and GPT-2-style tokens (a word the same token
before a space and before "?" or ".": the tokenizer below gives "circle " in the notes but
"circle" in "the circle?", "orange " but "orang" + "e" in "is orange."). On 300 validation
scenes it beat that LLM's two phases on held-out wordings (0.82 vs 0.78; `<Img>`
framing 0.83 vs 0.74), absent objects and yes / no, but not on binding (colour 48 %, size
68 % in the scenes above), and it lost position (0.59 vs 0.91 in the corpus's wordings);
through notebook 02 its stage-1 captions were worse (attribute accuracy 0.77 vs 0.79) and
its stage-1 model answered the long description prompt too briefly 65 % of the time (2 %).
The LLM shipped before issue 12 (width 192, 256-token rows, one wording per question kind,
a third of its documents full descriptions) did bind colours (0.92): it is phases 1-2 of
the shipped curriculum (above). (`ONE_PHASE` now builds width 192 too, the shipped LLM's
`TINY_LLM`; the numbers in this paragraph are from width 256.)

`binding` measures it on every uniquely-shaped object of 300 validation scenes with two or
more objects (371 questions): that LLM names the object's own colour in 0.51 and
ANOTHER object's colour in 0.49. Also measured and not kept:
a record with the shape FIRST ("center circle red large", the encoder's queries permuted to
match, so that the lookup is the forward one an induction head makes), width 192, the head
tied to the frozen input embeddings, doc_mask and 30 % of the documents full descriptions
right after the notes; 4,000 steps from scratch (50 min). Binding 0.50 / 0.50, held-out
wordings 0.71 (what is at a place 0.61, from 0.98). At step 1,750 no head attended from
the answer to the asked shape in the record, first-layer heads attended to the colour words
by kind, and in two-object scenes it mostly named the other object's colour. A model trained
on nothing but such questions (width 192, tied head, 700 steps of 16 x 256 tokens) reached
0.47 in either order. So neither the record's order nor those differences from the first
LLM is the cause.

`heads.binding_heads` shows where the skill lives. A causal model reads "red" before
"circle", so some head must copy each colour into its shape's position, in a layer before
the last, for a later one to find the asked shape there. The first LLM has one in layer 2
of 4 (attention 0.95 from each shape to its colour, 40 validation scenes); the one-phase
LLM has none before its last layer (at most 0.12; 0.77 in layer 3, too late to be read);
the shipped LLM keeps the first one's (0.96); no LLM has one in layer 0, whose inputs are
the frozen random embeddings alone. The first LLM's own recipe re-run for 2,000 steps (its
code at commit 467dec4, a cosine over the 2,000) binds 0.49 (154 questions) with no such
head yet: the head forms late in training, hence the curriculum.

The run saves itself every 250 steps (`llm_checkpoint/`: weights, tokenizer, AdamW
moments, step) and, started again with the same arguments, resumes exactly there.
Quality is measured on validation scenes: re-description, questions per kind in the
corpus's and in HELD-OUT wordings (`wordings.HELDOUT`), in the corpus's framing and in
MiniGPT-4's `<Img>` framing that the corpus never contains, captions after notes, and the
embedding-collapse check. `python -m minigpt4_min.pretrain --part llm` runs the curriculum.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import corpus, corpus_first, heads, wordings
from . import shapesworld as sw
from .config import VICUNA_TEMPLATE, TrainConfig, get_config
from .evaluate import accuracy_by_kind, caption_metrics, exact_scene, pope_by_setting, vqa_accuracy, vqa_questions
from .llm import load_tokenizer, tiny_llm_config, train_tokenizer
from .train import build_optimizer, lr_at

LLM_TRAIN = TrainConfig(lr=2e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=200,
                        max_steps=4000, batch_size=8, weight_decay=0.1, seed=0)
LLM_VOCAB = 1536
# corpus.py; corpus.py with yes / no drills; corpus_first.py (curriculum.py)
CORPORA = {"chats": corpus, "chats+yes/no": corpus.Drilled, "first": corpus_first}


def phases_history(before: dict | None, metrics: dict) -> list[dict]:
    """The history of a part: the phases of the run it continued (`before`), then this one."""
    earlier = [] if not before else before.get("phases", [before])
    return earlier + [{k: v for k, v in metrics.items() if k != "phases"}]


IMG_FRAME = "<Img>{} </Img>"      # the notes where MiniGPT-4's prompt puts the image tokens
WORDS_FRAME = "Scene: {}."         # the notes as the pretraining corpus gives them


def ask_prompt(scene: sw.Scene, question: str, frame: str = WORDS_FRAME) -> str:
    """A question about a scene given in words (its notes in `frame`), in the chat format."""
    return VICUNA_TEMPLATE.format(f"{frame.format(sw.notes(scene))} {question}")


def redescribe_prompt(scene: sw.Scene) -> str:
    """A scene given in words, asking for a description: the LLM's copy test."""
    return ask_prompt(scene, "Describe the scene.")


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


def answer_accuracy(model, tok, scenes: list[sw.Scene], frame: str = IMG_FRAME) -> float:
    """VQA accuracy (`evaluate.vqa_questions`) with the scene given in words, by default
    framed as MiniGPT-4 frames an image (`<Img>notes </Img> question`): the ceiling of what
    the LLM can answer about an image whose tokens said exactly what its notes say."""
    qs = [(s, q) for s in scenes for q in vqa_questions(s)]
    answers = generate_text(model, tok, [ask_prompt(s, q.text, frame) for s, q in qs], max_new_tokens=20, batch=100)
    return vqa_accuracy(answers, [q for _, q in qs])["vqa_accuracy"]


def caption_accuracy(model, tok, scenes: list[sw.Scene]) -> float:
    """Attribute accuracy of the captions the LLM writes after each scene's exact notes, in
    the corpus's catalogue format (`notes caption`): whether it binds each colour to the
    right shape. Stage 1 asks the same of image tokens, so this is its captions' ceiling."""
    texts = generate_text(model, tok, [f"{sw.notes(s)} " for s in scenes], max_new_tokens=20, batch=100)
    return caption_metrics([t.split("\n")[0] for t in texts], scenes)["attribute_accuracy"]


def heldout_accuracy(model, tok, scenes: list[sw.Scene], split: str = "heldout",
                     frame: str = WORDS_FRAME, seed: int = 0) -> dict[str, float]:
    """Accuracy per question kind (`wordings.KINDS`) on `split`'s wordings ('heldout': never
    in the corpus), the scene given in words in `frame`: how well the LLM understands a
    question however it is asked."""
    rng = random.Random(seed)
    qs = [(s, q) for s in scenes for q in wordings.questions(s, rng, split)]
    answers = generate_text(model, tok, [ask_prompt(s, q.text, frame) for s, q in qs], max_new_tokens=24, batch=100)
    return accuracy_by_kind(answers, [q for _, q in qs])


def pope_in_words(model, tok, scenes: list[sw.Scene], seed: int = 0, frame: str = WORDS_FRAME) -> dict[str, float]:
    """Notebook 05's POPE probe (`wordings.pope_questions`) with each scene given in words
    (in `frame`): what the LLM says to "Is there a red square?" when it knows exactly what is
    there, the ceiling of the chat's answers."""
    asked = wordings.pope_questions(scenes, seed)
    prompts = [ask_prompt(scenes[i], q.text, frame) for i, _, q in asked]
    return pope_by_setting(asked, generate_text(model, tok, prompts, max_new_tokens=4, batch=100))


def binding(model, tok, scenes: list[sw.Scene]) -> dict[str, float]:
    """Does the LLM bind each colour to its shape? "What color is the X?" for every object
    whose shape is unique in a scene of two or more, the scene in words: the share answered
    with its own colour, and the share answered with ANOTHER object's colour instead (an
    LLM that only knows which colours a scene has scores about 1 / objects on the first and
    the rest on the second)."""
    qs = [(s, o) for s in scenes if len(s.objects) > 1 for o in s.objects
          if sum(x.shape == o.shape for x in s.objects) == 1]
    prompts = [ask_prompt(s, f"What color is the {o.shape}?") for s, o in qs]
    answers = generate_text(model, tok, prompts, max_new_tokens=12, batch=100)
    said = [{c for c in sw.COLOURS if re.search(rf"\b{c}\b", a.lower())} for a in answers]
    others = [{x.colour for x in s.objects} - {o.colour} for s, o in qs]
    right = sum(w == {o.colour} for w, (_, o) in zip(said, qs))
    other = sum(o.colour not in w and bool(w & x) for w, (_, o), x in zip(said, qs, others))
    return {"right": right / max(len(qs), 1), "other_object": other / max(len(qs), 1), "n": len(qs)}


def colour_collapse(model, tok) -> float:
    """Embedding-collapse check (DESIGN.md §5): the mean pairwise cosine of the output-head
    rows of the six colour words (near 1 = interchangeable, the LLM cannot copy them)."""
    ids = [tok(f"{c} ", add_special_tokens=False)["input_ids"][0] for c in sw.COLOURS]
    w = torch.nn.functional.normalize(model.lm_head.weight[ids].detach().float(), dim=-1)   # (6, H)
    cos = w @ w.T
    n = len(ids)
    return float((cos.sum() - n) / (n * n - n))


LLM_CONTINUE = TrainConfig(lr=5e-4, min_lr=5e-5, warmup_lr=1e-5, warmup_steps=50,
                           max_steps=1500, batch_size=8, weight_decay=0.1, seed=1)
LLM_BLOCK = 512          # a 5-turn chat with an image and 120 new tokens fits (chat context 512)


def pack_documents(tok, rng: random.Random, rows: int, block: int, answers_only: bool = False,
                   doc_mask: bool = False, source=corpus) -> dict[str, torch.Tensor]:
    """Fill `rows` rows of `block` tokens with WHOLE documents of `source` (a corpus module:
    `corpus`, `corpus_first`; BOS-separated), pad the rest.

    Packing avoids wasting half of every batch on padding; keeping documents whole means
    no row ever starts mid-conversation, without the scene it talks about. `labels` are the
    ids, -100 on padding; with `answers_only`, also -100 on everything but the answers and
    captions (`corpus.answer_spans`, the same in both corpora; a token counts when it
    starts inside one).

    With `doc_mask`, also `position_ids` that restart at 0 with every document (the padding
    is a segment of its own): given them and no attention mask, transformers makes the
    causal mask block-diagonal, so a document attends to itself only, as a chat does at
    inference, and never to another scene's notes in the same row.
    """
    ids = torch.full((rows, block), tok.pad_token_id)
    mask = torch.zeros(rows, block, dtype=torch.long)
    labels = torch.full((rows, block), -100)
    pos = torch.zeros(rows, block, dtype=torch.long)
    for r in range(rows):
        used = 0
        while True:
            doc = source.sample_doc(rng)
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
            pos[r, used:used + len(t)] = torch.arange(len(t))
            used += len(t)
        pos[r, used:] = torch.arange(block - used)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {**out, "position_ids": pos} if doc_mask else out


def _save_llm_checkpoint(folder: Path, model, tok, opt, params, state: dict) -> None:
    """Everything a resumed LLM run needs, as safetensors + JSON: weights, tokenizer,
    AdamW moments, and the step / token count / elapsed time (written last: a checkpoint
    without trainer_state.json is incomplete and ignored)."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    moments = {}
    for n, p in params:
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                moments[f"{n}.{k}"] = st[k].detach().cpu().contiguous()
        if "step" in st:
            moments[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)


def _load_llm_checkpoint(folder: Path, opt, params, device: str) -> dict:
    m = load_file(str(folder / "optimizer.safetensors"))
    for n, p in params:
        if f"{n}.exp_avg" in m:
            opt.state[p] = {"step": m[f"{n}.step"].reshape(()).float(),
                            "exp_avg": m[f"{n}.exp_avg"].to(device), "exp_avg_sq": m[f"{n}.exp_avg_sq"].to(device)}
    return json.loads((folder / "trainer_state.json").read_text())


def pretrain_llm(out: Path, steps: int, seed: int = 0, n_eval: int = 300,
                 init: Path | None = None, device: str = "cpu", answers_only: bool = False,
                 ckpt_every: int = 250, doc_mask: bool = False, docs: str = "chats",
                 block: int = LLM_BLOCK, batch_size: int | None = None, vocab: int = LLM_VOCAB,
                 phase: str | None = None, lr: float | None = None) -> dict:
    """Pretrain the miniature LLM from scratch (a `vocab`-token tokenizer trained on the
    corpus first), or (`init`) continue training a saved one with a fresh warmup + cosine
    at `LLM_CONTINUE`'s lower learning rate: one phase of `curriculum.py`, on the corpus
    `CORPORA[docs]`, rows of `block` tokens, `batch_size` of them (default: the config's);
    `phase` names it in the record; `lr`, if given, is the peak learning rate (the floor a
    tenth of it).

    Every `ckpt_every` steps the run saves itself to `out/llm_checkpoint/` (weights,
    tokenizer, optimizer moments, step); started again with the same arguments it resumes
    from there, drawing the same documents (they depend on the seed and the step only).
    The finished LLM replaces `out/llm/` in one rename, its record `pretraining.json` inside."""
    if docs not in CORPORA:
        raise ValueError(f"unknown corpus {docs!r}; expected one of {list(CORPORA)}")
    source = CORPORA[docs]
    torch.manual_seed(seed)
    cfg = get_config("tiny")
    ckpt = out / "llm_checkpoint"
    if init is None:
        tc = LLM_TRAIN.replace(max_steps=steps, warmup_steps=min(200, steps // 5), seed=seed)
    else:
        # tc.seed (seed + 1) picks the documents, so a continued phase reads new ones
        tc = LLM_CONTINUE.replace(max_steps=steps, warmup_steps=min(50, steps // 5), seed=seed + 1)
    tc = tc.replace(batch_size=batch_size or tc.batch_size)
    if lr is not None:
        tc = tc.replace(lr=lr, min_lr=lr / 10)
    recipe = {"train": json.loads(json.dumps(asdict(tc))), "init": str(init) if init else None,
              "doc_mask": doc_mask, "docs": docs, "block": block}
    state = json.loads((ckpt / "trainer_state.json").read_text()) if (ckpt / "trainer_state.json").exists() else None
    if state is not None and any(state.get(k) != v for k, v in recipe.items()):
        print(f"{ckpt} belongs to another run (its recipe differs): starting afresh")
        state = None
    if state is not None:
        model, tok = transformers.LlamaForCausalLM.from_pretrained(str(ckpt)), load_tokenizer(ckpt)
    elif init is None:
        tok = train_tokenizer(source.documents(20000, seed=seed + 10_000), vocab_size=vocab)
        model = transformers.LlamaForCausalLM(tiny_llm_config(len(tok), tok, cfg.llm))
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.3)  # frozen random input embeddings (DESIGN.md §5)
    else:
        model, tok = transformers.LlamaForCausalLM.from_pretrained(str(init)), load_tokenizer(init)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(params, tc)
    start, n_tok, spent = 0, 0, 0.0
    if state is not None:
        _load_llm_checkpoint(ckpt, opt, params, device)
        start, n_tok, spent = state["step"], state["tokens_seen"], state["seconds"]
        print(f"resuming the LLM from {ckpt} at step {start}")
    model.train()
    t0 = time.time() - spent
    bar = tqdm(range(start, steps), desc="pretrain LLM", initial=start, total=steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        rng = random.Random(tc.seed * 1_000_003 + step)
        batch = pack_documents(tok, rng, tc.batch_size, block, answers_only, doc_mask, source)
        batch = {k: v.to(device) for k, v in batch.items()}
        # with doc_mask: position_ids, no attention mask and no cache -> a block-diagonal causal mask
        loss = model(**{k: v for k, v in batch.items() if not (doc_mask and k == "attention_mask")},
                     use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        n_tok += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{n_tok / (time.time() - t0):.0f}")
        if (step + 1) % 500 == 0:
            model.eval()
            v40 = sw.split("val", 40)
            acc = heldout_accuracy(model, tok, v40)
            bar.write(f"step {step + 1}: loss {loss.item():.3f}, re-describes exactly "
                      f"{redescribe_exact(model, tok, v40):.2f}, held-out wordings "
                      + " ".join(f"{k} {v:.2f}" for k, v in acc.items()) + ", POPE adversarial "
                      f"{pope_in_words(model, tok, v40)['adversarial/accuracy']:.2f}")
            model.train()
        if ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            _save_llm_checkpoint(ckpt, model, tok, opt, params, {
                "step": step + 1, "tokens_seen": n_tok, "seconds": time.time() - t0, **recipe})
    model.eval()
    seconds = time.time() - t0
    val = sw.split("val", n_eval)
    metrics = {"redescribe_exact_val": redescribe_exact(model, tok, val),
               "answers_val": answer_accuracy(model, tok, val),
               "captions_attr_val": caption_accuracy(model, tok, val),
               "heldout_words_val": heldout_accuracy(model, tok, val),
               "heldout_img_frame_val": heldout_accuracy(model, tok, val, frame=IMG_FRAME),
               "late_words_val": heldout_accuracy(model, tok, val, split="late"),
               "corpus_words_val": heldout_accuracy(model, tok, val, split="corpus"),
               "binding_val": binding(model, tok, val),
               "pope_words_val": pope_in_words(model, tok, val),
               "binding_heads_val": heads.binding_heads(model, tok, val[:40]),
               "colour_collapse": colour_collapse(model, tok),
               "steps": steps, "seconds": round(seconds, 1),
               "phase": phase, "init": str(init) if init else None, "docs": docs, "block": block,
               "tokens_seen": n_tok, "params": sum(p.numel() for p in model.parameters()),
               "vocab_size": len(tok), "answers_only": answers_only, "doc_mask": doc_mask, "train": asdict(tc),
               "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"}
    record = Path(init) / "pretraining.json" if init else None
    before = json.loads(record.read_text()) if record and record.exists() else None
    metrics["phases"] = phases_history(before, metrics)
    tmp = out / "llm.tmp"                # written whole, then renamed: never half a phase in out/llm
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "pretraining.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(out / "llm", ignore_errors=True)
    tmp.rename(out / "llm")
    if ckpt.exists():                    # finished: the checkpoint has served
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    return metrics

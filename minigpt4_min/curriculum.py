"""The miniature LLM's curriculum: the four phases that make the shipped frozen LLM, each resumable.

MiniGPT-4 (arXiv 2304.10592 §3) freezes Vicuna, made in stages by others: LLaMA pretrained
on text, then finetuned on chats. Our miniature "Vicuna of ShapesWorld" is made in four
phases (`CURRICULUM`), each a run of `pretrain_llm.pretrain_llm` on text only:

1. 4,400 steps from scratch on the FIRST corpus (`corpus_first.py`: one wording per
   question kind, a third of the documents full descriptions), 16 rows of 256 tokens,
   its own 974-token tokenizer (1,024 asked for; the BPE runs out of merges);
2. 2,000 more steps on new documents of it at a lower learning rate (`LLM_CONTINUE`);
3. 2,000 steps on today's corpus (`corpus.py`: chats in many wordings, yes / no, absent
   objects, follow-ups, 5-turn documents), 8 rows of 512 tokens;
4. 3,000 more steps on it, now that its questions are also worded by `grammar.py` (word
   orders, possessives, hedges, passives).

Why: phases 1-2 are the project's first miniature LLM (commit 467dec4), the only one
that learnt to bind each colour to its shape (0.92; `pretrain_llm.binding`); it grew a
head in layer 2 of 4 that copies each colour into its shape's position (0.95,
`heads.binding_heads`), late in its 6,400 steps. Every LLM trained on today's corpus
alone answered with a colour of the scene, not the asked shape's (0.51). Phase 3 kept the
head (0.96) and taught the corpus's many wordings, but not questions worded otherwise:
held-out wordings 0.73 against the corpus's 0.97. Phase 4 (the grammar) lifts them: on 300
validation scenes the shipped LLM answers held-out wordings 0.95 (worst kind yes / no 0.89),
0.96 in the `<Img>` framing (worst what is at a place 0.88), the second held-out set
(`wordings.LATE`, written before the grammar) 0.94 (worst absent objects 0.82), the corpus's
0.99; it binds 0.96 and writes captions after notes at 0.99. On 2 cores: 2,283 + 978 + 1,358
+ 2,511 s (1 h 59 min).

The shipped LLM's phases 1-3 were run on the corpora of their time (phase 3 before
`grammar.py` existed, commit 76a0fb2); run again, the curriculum's phase 3 reads today's
corpus, grammar included, so it does not give that LLM back. Nor did phases 1-3 before:
a whole run from scratch starts exactly as the first run did (the same documents,
tokenizer and frozen embeddings; the same weights to the last bit after 6 + 4 steps), yet
after phases 1-2 its weights were up to 0.49 apart from the first run's and it bound
colours 0.52 of the time, its shape-to-colour head formed (0.98, layer 1) but not yet
read; after phase 3 it bound 0.98 (the phase-3 LLM 0.89), with held-out wordings 0.73
(0.73) and captions after notes 0.95 (0.99).

Measured and not shipped (2026-12-03): yes / no drills (`WITH_DRILLS`, `--llm-recipe
curriculum+drills`; with `--llm-init data/tiny/llm --llm-steps 1 0 0 0 1500` it continues the
shipped LLM). The corpus says "no" only to absent shapes, so "Is there a red square?" with a
blue square there gets "Yes, there is a red square." (`pretrain_llm.pope_in_words`, notebook
05's POPE probe with the scene in words, 300 validation scenes: adversarial 0.50, "yes" to 0.998
of them). The drills phase (`corpus.Drilled`: 30 % of the documents drills, most "no"s of that
kind; twice phase 4's learning rate, loss on answers only; 1,500 steps, 700 s) makes it 0.905
(yes share 0.535), held-out wordings 0.946 -> 0.961 (what is at a place 0.90 -> 0.98, size 0.92
-> 0.98, position 0.94 -> 0.89), `wordings.LATE` 0.944 -> 0.937 (background 0.87 -> 0.70),
binding 0.96 -> 0.96. Through the series it mends what the LLM reads well and breaks what the
trained layer conveys: with notebook 04's best linear map in place of the layer notebook 05's
probe scores 0.94 (before 0.74, yes share 0.525), and with the trained layer 0.72 (0.615) but
with a yes share of 0.26 (goal 0.4-0.6): the chat now says "There is no circle." whenever the
image tokens leave it in doubt, also to "Is the circle small or large?" with a circle there
(chat answers in the corpus's wordings 0.76 -> 0.69, position 0.61 -> 0.34, size 0.69 -> 0.50;
stage-2 VQA 0.70 -> 0.62; absent shapes called absent 0.84 -> 0.98; turn 5 - turn 1 -0.067 ->
-0.033). So it is not shipped: the image side must say more before the LLM may doubt more. Also
measured: the same drills at phase 4's learning rate and loss on every token, half their "no"s
of that kind ("yes" to 0.99 of them after 1,500 steps); 40 % drills, 75 % of their "no"s of that
kind: adversarial 0.935 but held-out position 0.81 ("Where's the red star?" answered with its size).

`ONE_PHASE` is the recipe shipped before it (today's corpus only, 4,000 + 1,500 steps;
binding 0.51), kept to compare: `--llm-recipe one-phase`.

`run` skips a phase whose result is already in `out/llm/` (its record lists the same
phases, in order), and a phase cut off resumes from its own checkpoint, so
`python -m minigpt4_min.pretrain --part llm` started again after an interruption picks up
where it stopped. An LLM whose record names no such phases (the shipped one, whose
phases were run before they had names) is re-made from phase 1.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .pretrain_llm import LLM_BLOCK, LLM_VOCAB, pretrain_llm


@dataclass(frozen=True)
class Phase:
    """One run of `pretrain_llm`: from scratch when it is the first, else continuing the last."""
    name: str
    docs: str                 # pretrain_llm.CORPORA: "first" (corpus_first.py) or "chats" (corpus.py)
    steps: int
    batch_size: int           # rows per step
    block: int                # tokens per row
    vocab: int = LLM_VOCAB    # the tokenizer's size asked for (first phase only)
    lr: float | None = None   # peak learning rate (None: pretrain_llm's default for the phase)
    loss: str = "all"         # "answers": the loss on answers and captions only


CURRICULUM = (Phase("first corpus", "first", 4400, 16, 256, vocab=1024),
              Phase("first corpus, continued", "first", 2000, 16, 256),
              Phase("chats", "chats", 2000, 8, LLM_BLOCK),
              Phase("chats, grammar wordings", "chats", 3000, 8, LLM_BLOCK))
ONE_PHASE = (Phase("chats", "chats", 4000, 8, LLM_BLOCK),
             Phase("chats, continued", "chats", 1500, 8, LLM_BLOCK))
# measured, not shipped (see above): the curriculum + 1,500 steps with yes / no drills
WITH_DRILLS = CURRICULUM + (Phase("yes / no drills", "chats+yes/no", 1500, 8, LLM_BLOCK, lr=1e-3, loss="answers"),)
RECIPES = {"curriculum": CURRICULUM, "one-phase": ONE_PHASE, "curriculum+drills": WITH_DRILLS}


def with_steps(phases: tuple[Phase, ...], steps: list[int] | None) -> tuple[Phase, ...]:
    """The phases with other step counts (one per phase; 0 drops a continued phase)."""
    if steps is None:
        return phases
    if len(steps) != len(phases):
        raise ValueError(f"--llm-steps: {len(steps)} numbers for {len(phases)} phases "
                         f"({', '.join(p.name for p in phases)})")
    if steps[0] < 1:
        raise ValueError(f"--llm-steps: the first phase needs at least 1 step, got {steps[0]}")
    return tuple(replace(p, steps=n) for p, n in zip(phases, steps) if n > 0)


def _matches(done: dict, phase: Phase) -> bool:
    return (done.get("phase"), done.get("steps"), done.get("docs"), done.get("block"),
            done.get("train", {}).get("batch_size")) == (phase.name, phase.steps, phase.docs,
                                                         phase.block, phase.batch_size)


def phases_done(out: Path, phases: tuple[Phase, ...], init: Path | None = None) -> int:
    """How many of `phases`, in order, the LLM in `out/llm/` is the result of (with `init`,
    phase 1 is that LLM: it counts as done, and its own record is not compared)."""
    record = Path(out) / "llm" / "pretraining.json"
    history = json.loads(record.read_text()).get("phases", []) if record.exists() else []
    start = n = 1 if init else 0
    for done, phase in zip(history[start:], phases[start:]):
        if not _matches(done, phase):
            break
        n += 1
    return n if n == len(history) else start      # out/llm is something else: start over


def run(out: Path, phases: tuple[Phase, ...], seed: int = 0, init: Path | None = None,
        **kw) -> dict:
    """Run `phases` into `out/llm/` (`init`: start from that LLM instead of phase 1), each
    phase continuing the one before; phases already done are skipped. `kw` goes to
    `pretrain_llm` (device, answers_only: for every phase, doc_mask, n_eval). Returns the last
    phase's record."""
    out = Path(out)
    skip = phases_done(out, phases, init)
    every_answers_only = kw.pop("answers_only", False)     # a phase's own loss may ask for it too
    for k, phase in enumerate(phases):
        if k < skip:
            print(f"llm phase {k + 1} of {len(phases)} ({phase.name}): "
                  + (f"given: {init}" if k == 0 and init else f"already done, in {out / 'llm'}"))
            continue
        start = None if k == 0 else init if (init and k == 1) else out / "llm"
        print(f"llm phase {k + 1} of {len(phases)} ({phase.name}): {phase.steps} steps on "
              f"{phase.docs!r}, {phase.batch_size} x {phase.block} tokens, "
              + (f"from {start}" if start else "from scratch"), flush=True)
        pretrain_llm(out, phase.steps, seed, init=start, docs=phase.docs, block=phase.block,
                     batch_size=phase.batch_size, vocab=phase.vocab, phase=phase.name, lr=phase.lr,
                     answers_only=every_answers_only or phase.loss == "answers", **kw)
    return json.loads((out / "llm" / "pretraining.json").read_text())

"""The script that makes the shipped miniature parts runs, writes loadable parts and a manifest."""
import json
from pathlib import Path

import pytest
import torch

from minigpt4_min import curriculum, pretrain, pretrain_llm
from minigpt4_min.config import get_config
from minigpt4_min.model import MiniGPT4


_ACC, _EXACT, _ANSWERS = pretrain.encoder_attribute_accuracy, pretrain_llm.redescribe_exact, pretrain_llm.answer_accuracy
_HELD, _CAPS, _DOCS = pretrain_llm.heldout_accuracy, pretrain_llm.caption_accuracy, pretrain_llm.corpus.documents
_BIND, _FIRST, _POPE = pretrain_llm.binding, pretrain_llm.corpus_first.documents, pretrain_llm.pope_in_words


def _quick_evals(monkeypatch):
    """Evaluate on a handful of scenes, tokenizer from a few documents: these tests prove
    the script works, not its quality."""
    monkeypatch.setattr(pretrain_llm, "redescribe_exact", lambda model, tok, scenes: _EXACT(model, tok, scenes[:4]))
    monkeypatch.setattr(pretrain_llm, "answer_accuracy", lambda model, tok, scenes, **kw: _ANSWERS(model, tok, scenes[:4], **kw))
    monkeypatch.setattr(pretrain_llm, "heldout_accuracy", lambda model, tok, scenes, *a, **kw: _HELD(model, tok, scenes[:3], *a, **kw))
    monkeypatch.setattr(pretrain_llm, "caption_accuracy", lambda model, tok, scenes: _CAPS(model, tok, scenes[:4]))
    monkeypatch.setattr(pretrain_llm, "binding", lambda model, tok, scenes: _BIND(model, tok, scenes[:6]))
    monkeypatch.setattr(pretrain_llm, "pope_in_words", lambda model, tok, scenes: _POPE(model, tok, scenes[:3]))
    monkeypatch.setattr(pretrain_llm.corpus, "documents", lambda n, seed: _DOCS(min(n, 400), seed))
    monkeypatch.setattr(pretrain_llm.corpus_first, "documents", lambda n, seed: _FIRST(min(n, 400), seed))


def test_pretrain_script_few_steps(tmp_path, monkeypatch):
    # evaluate on a handful of scenes only: this test proves the script works, not its quality
    monkeypatch.setattr(pretrain, "encoder_attribute_accuracy",
                        lambda enc, head, scenes, batch=250: _ACC(enc, head, scenes[:20]))
    _quick_evals(monkeypatch)
    args = ["--out", str(tmp_path), "--encoder-steps", "3", "--llm-steps", "3", "2", "2", "2",
            "--encoder-continue-steps", "2", "--threads", "1"]
    manifest = pretrain.main(args)
    assert set(manifest["parts"]) == {"encoder", "llm"}
    phases = manifest["parts"]["encoder"]["phases"]    # phase 1 from scratch, phase 2 continued from it
    assert [p["steps"] for p in phases] == [3, 2]
    assert phases[0]["init"] is None and phases[1]["init"] == str(tmp_path / "encoder")
    phases = manifest["parts"]["llm"]["phases"]        # the curriculum: 4 phases, each continuing the last
    assert [(p["phase"], p["steps"], p["docs"], p["block"], p["train"]["batch_size"]) for p in phases] == [
        (ph.name, n, ph.docs, ph.block, ph.batch_size) for ph, n in zip(curriculum.CURRICULUM, (3, 2, 2, 2))]
    assert [p["init"] for p in phases] == [None] + [str(tmp_path / "llm")] * 3
    assert len({p["vocab_size"] for p in phases}) == 1       # one tokenizer, made in phase 1
    assert 0.0 <= manifest["parts"]["encoder"]["attribute_accuracy_val"] <= 1.0
    assert 0.0 <= manifest["parts"]["llm"]["answers_val"] <= 1.0
    llm = manifest["parts"]["llm"]
    assert set(llm["heldout_img_frame_val"]) >= {"all", "colour", "count", "yesno", "absent"}
    assert set(llm["late_words_val"]) >= {"all", "colour", "count", "yesno", "absent"}
    assert -1.0 <= llm["colour_collapse"] <= 1.0 and llm["block"] == pretrain_llm.LLM_BLOCK
    assert len(llm["binding_heads_val"]["per_layer"]) == get_config("tiny").llm["num_hidden_layers"]
    assert 0.0 <= llm["pope_words_val"]["adversarial/yes_share"] <= 1.0
    assert llm["binding_val"]["n"] > 0 and llm["binding_val"]["right"] + llm["binding_val"]["other_object"] <= 1.0
    assert not (tmp_path / "llm_checkpoint").exists() and not (tmp_path / "llm.tmp").exists()
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["files_bytes"]["encoder/model.safetensors"] > 0
    cfg = get_config("tiny", encoder_path=str(tmp_path / "encoder"), llm_path=str(tmp_path / "llm"))
    model = MiniGPT4.from_config(cfg)
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert model.llama_proj.in_features == cfg.proj_in
    with torch.no_grad():
        feats = model.image_features(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, cfg.num_query_tokens, cfg.proj_in)
    # the frozen input embeddings kept their random N(0, 0.3) init
    std = model.llm.get_input_embeddings().weight.std().item()
    assert 0.25 < std < 0.35
    # started again, the LLM's finished phases are skipped and its files left as they were
    before = (tmp_path / "llm" / "model.safetensors").read_bytes()
    monkeypatch.setattr(curriculum, "pretrain_llm", lambda *a, **kw: pytest.fail("a finished phase re-ran"))
    again = pretrain.main(args[:2] + ["--part", "llm"] + args[2:])
    assert again["parts"]["llm"]["phases"] == phases
    assert (tmp_path / "llm" / "model.safetensors").read_bytes() == before


def test_curriculum_runs_only_the_phases_not_done(tmp_path, monkeypatch):
    """A run cut after phase 2 re-runs phases 3-4 only, from phase 2's LLM; `--llm-init` stands
    for phase 1; a folder holding another recipe's LLM is started over."""
    ran = []

    def fake(out, steps, seed, init=None, phase=None, docs=None, block=None, batch_size=None, **kw):
        ran.append((phase, init))
        record = out / "llm" / "pretraining.json"
        before = json.loads(record.read_text())["phases"] if init and record.exists() else []
        m = {"phase": phase, "steps": steps, "docs": docs, "block": block, "train": {"batch_size": batch_size}}
        (out / "llm").mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**m, "phases": before + [m]}))
        return m

    monkeypatch.setattr(curriculum, "pretrain_llm", fake)
    phases = curriculum.CURRICULUM
    curriculum.run(tmp_path, phases[:2])
    assert ran == [(phases[0].name, None), (phases[1].name, tmp_path / "llm")]
    assert curriculum.phases_done(tmp_path, phases) == 2
    ran.clear()
    assert curriculum.run(tmp_path, phases)["phase"] == phases[-1].name
    assert ran == [(p.name, tmp_path / "llm") for p in phases[2:]]
    ran.clear()
    curriculum.run(tmp_path, curriculum.ONE_PHASE)             # another recipe's LLM: from scratch
    assert [r[0] for r in ran] == [p.name for p in curriculum.ONE_PHASE] and ran[0][1] is None
    ran.clear()
    given = tmp_path / "given"
    curriculum.run(tmp_path / "b", phases, init=given)
    assert ran == [(phases[1].name, given)] + [(p.name, tmp_path / "b" / "llm") for p in phases[2:]]
    with pytest.raises(ValueError, match="3 numbers for 2 phases"):
        curriculum.with_steps(curriculum.ONE_PHASE, [1, 2, 3])
    assert [p.steps for p in curriculum.with_steps(phases, [5, 0, 7, 0])] == [5, 7]


def test_first_corpus_is_the_one_the_shipped_llm_began_on():
    """Phase 1 trains its tokenizer on the first corpus; from `corpus_first` it comes out
    token for token the shipped LLM's, so the corpus is the one that LLM was made from."""
    from minigpt4_min.config import DATA_DIR
    from minigpt4_min.llm import load_tokenizer, train_tokenizer
    first = curriculum.CURRICULUM[0]
    tok = train_tokenizer(pretrain_llm.CORPORA[first.docs].documents(20000, seed=10_000), first.vocab)
    assert tok.get_vocab() == load_tokenizer(DATA_DIR / "tiny" / "llm").get_vocab()


def test_answer_spans_cover_answers_and_captions_only():
    from minigpt4_min import corpus
    spaced = "###Human: Scene: left small red circle. Describe it. ###Assistant: A red circle.###"
    tight = "sys###Human: Q1###Assistant: A1.######Human: Q2###Assistant: A2.###"
    assert [spaced[a:b] for a, b in corpus.answer_spans(spaced)] == ["A red circle.###"]
    assert [tight[a:b] for a, b in corpus.answer_spans(tight)] == ["A1.###", "A2.###"]
    notes = "left small red circle " + "x none none none " * 4 + "gray one"
    record = f"{notes} red circle\n{notes} one shape on gray background\n"
    assert [record[a:b] for a, b in corpus.answer_spans(record)] == ["red circle\n",
                                                                     "one shape on gray background\n"]


def test_pack_documents_labels():
    """Default: every real token is a label (the shipped recipe). answers_only: only tokens
    that start inside an answer or caption; the notes records are never labels."""
    import random

    from minigpt4_min.config import DATA_DIR
    from minigpt4_min.llm import load_tokenizer
    tok = load_tokenizer(DATA_DIR / "tiny" / "llm")
    full = pretrain_llm.pack_documents(tok, random.Random(3), 4, 256)
    assert torch.equal(full["labels"], full["input_ids"].masked_fill(full["attention_mask"] == 0, -100))
    ans = pretrain_llm.pack_documents(tok, random.Random(3), 4, 256, answers_only=True)
    assert torch.equal(ans["input_ids"], full["input_ids"])             # same documents
    on = ans["labels"] != -100
    assert 0 < on.sum() < 0.6 * full["attention_mask"].sum()
    assert torch.equal(ans["labels"][on], ans["input_ids"][on])
    assert any("none none none" in tok.decode(row) for row in full["input_ids"])   # records are there...
    labelled = [tok.decode(row[row != -100]) for row in ans["labels"]]
    assert not any("none" in t for t in labelled)                                   # ...but never labels


def test_llm_pretraining_resumes_exactly_after_an_interruption(tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint, the run started again resumes at step 2 and ends
    with the same weights as an uninterrupted run (documents depend on seed and step)."""
    from safetensors.torch import load_file
    _quick_evals(monkeypatch)
    torch.set_num_threads(1)
    whole = pretrain_llm.pretrain_llm(tmp_path / "whole", 4, n_eval=3, ckpt_every=2)
    calls, pack = [], pretrain_llm.pack_documents

    def dies_at_step_3(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return pack(*a, **kw)

    monkeypatch.setattr(pretrain_llm, "pack_documents", dies_at_step_3)
    (tmp_path / "cut").mkdir()
    with pytest.raises(KeyboardInterrupt):
        pretrain_llm.pretrain_llm(tmp_path / "cut", 4, n_eval=3, ckpt_every=2)
    state = json.loads((tmp_path / "cut" / "llm_checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    monkeypatch.setattr(pretrain_llm, "pack_documents", pack)
    resumed = pretrain_llm.pretrain_llm(tmp_path / "cut", 4, n_eval=3, ckpt_every=2)
    assert resumed["tokens_seen"] == whole["tokens_seen"]
    a = load_file(str(tmp_path / "whole" / "llm" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "llm" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_doc_mask_keeps_packed_documents_apart():
    """With doc_mask, a document packed after others gets exactly the logits it gets alone
    (it attends to itself only); packed without it, it reads the documents before it."""
    import random

    import transformers

    from minigpt4_min.config import DATA_DIR
    from minigpt4_min.llm import load_tokenizer, tiny_llm_config
    tok = load_tokenizer(DATA_DIR / "tiny" / "llm")
    torch.manual_seed(0)
    spec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(tiny_llm_config(len(tok), tok, spec)).eval()
    # the first seed whose row holds two or more documents (which seed does depends on the corpus)
    packed = next(p for p in (pretrain_llm.pack_documents(tok, random.Random(k), 1, 256, doc_mask=True)
                              for k in range(5, 50)) if int((p["position_ids"][0] == 0).sum()) >= 3)
    pos = packed["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3                         # at least two documents and the padding
    a, b = starts[1], starts[2]                     # the second document
    assert torch.equal(pos[a:b], torch.arange(b - a))
    with torch.no_grad():
        alone = model(input_ids=packed["input_ids"][:, a:b]).logits[0]
        masked = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       use_cache=False).logits[0, a:b]
        mixed = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"]).logits[0, a:b]
    assert (masked - alone).abs().max() < 1e-4
    assert (mixed - alone).abs().max() > 1e-3
    assert "position_ids" not in pretrain_llm.pack_documents(tok, random.Random(5), 1, 256)


def test_binding_tells_the_right_colour_from_another_objects(monkeypatch):
    """`binding` asks the colour of every uniquely-shaped object in scenes of 2+ objects; an
    answer with its own colour is right, one with another object's colour is 'other_object'."""
    from minigpt4_min import shapesworld as sw
    scenes = [s for s in sw.split("val", 40) if len(s.objects) > 1]
    qs = [(s, o) for s in scenes for o in s.objects if sum(x.shape == o.shape for x in s.objects) == 1]
    wrong = [next((x.colour for x in s.objects if x.colour != o.colour), None) for s, o in qs]
    for answers, right, other in (([f"The {o.shape} is {o.colour}." for _, o in qs], 1.0, 0.0),
                                  ([f"The {o.shape} is {w or o.colour}." for (_, o), w in zip(qs, wrong)],
                                   sum(w is None for w in wrong) / len(qs), sum(w is not None for w in wrong) / len(qs)),
                                  (["There is no shape." for _ in qs], 0.0, 0.0)):
        monkeypatch.setattr(pretrain_llm, "generate_text", lambda m, t, prompts, **kw: answers[:len(prompts)])
        b = pretrain_llm.binding(None, None, scenes)
        assert b["n"] == len(qs) > 10 and b["right"] == right and b["other_object"] == other


def test_pope_in_words_reads_yes_and_no_from_the_first_word(monkeypatch):
    """The LLM's POPE probe with scenes in words: true answers score 1; "yes" to everything
    scores chance with a yes share of 1; the prompts hold the scene's notes and no `<Img>`."""
    from minigpt4_min import shapesworld as sw
    from minigpt4_min import wordings as wd
    scenes = sw.split("val", 10)
    truth = [q.value for _, _, q in wd.pope_questions(scenes)]
    seen = []
    for answers, acc, yes in (([f"{t.capitalize()}, there is." for t in truth], 1.0, 0.5),
                              (["Yes."] * len(truth), 0.5, 1.0)):
        monkeypatch.setattr(pretrain_llm, "generate_text", lambda m, t, prompts, **kw: seen.extend(prompts) or answers)
        p = pretrain_llm.pope_in_words(None, None, scenes)
        assert p["adversarial/accuracy"] == p["all/accuracy"] == acc and p["all/yes_share"] == yes
    assert len(seen) == 2 * 4 * len(scenes) and sw.notes(scenes[0]) in seen[0] and not any("<Img>" in s for s in seen)


def test_make_pretrain_commands_are_the_ones_the_readme_gives():
    """`make pretrain` re-makes the LLM alone (the encoder stays as shipped), `make
    pretrain-encoder` the encoder: the README's comments name the commands make runs."""
    import re
    import subprocess
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    for target, part in (("pretrain", "llm"), ("pretrain-encoder", "encoder")):
        ran = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        cmd = next(line for line in ran.splitlines() if "minigpt4_min.pretrain" in line)
        assert cmd.endswith(f"-m minigpt4_min.pretrain --out data/tiny --part {part}"), cmd
        said = re.search(rf"^make {target} +# = (.*)$", readme, re.M)
        assert said and cmd.endswith(said.group(1).replace("python ", "", 1)), (target, said)


def test_every_recipe_reads_known_corpora_and_drills_continue_the_curriculum(tmp_path, monkeypatch):
    """`--llm-recipe curriculum+drills` is the shipped curriculum and one more phase, on the
    corpus with yes / no drills at its own learning rate, the loss on answers only (also when
    `--llm-loss all` is given); `--llm-steps 1 0 0 0 N` with `--llm-init` runs that phase alone."""
    for phases in curriculum.RECIPES.values():
        assert all(p.docs in pretrain_llm.CORPORA and p.loss in ("all", "answers") for p in phases)
    drills = curriculum.WITH_DRILLS
    assert drills[:-1] == curriculum.CURRICULUM and pretrain_llm.CORPORA[drills[-1].docs] is pretrain_llm.corpus.Drilled
    assert all(p.loss == "all" and p.lr is None for p in curriculum.CURRICULUM)
    alone = curriculum.with_steps(drills, [1, 0, 0, 0, 7])
    assert [(p.name, p.steps) for p in alone] == [(drills[0].name, 1), (drills[-1].name, 7)]
    calls = []
    monkeypatch.setattr(curriculum, "pretrain_llm", lambda out, steps, seed, **kw: calls.append(kw))
    monkeypatch.setattr(curriculum, "phases_done", lambda out, phases, init=None: 1)
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "pretraining.json").write_text("{}")
    curriculum.run(tmp_path, alone, init=tmp_path / "given", answers_only=False, device="cpu")
    assert [(kw["lr"], kw["answers_only"], kw["device"]) for kw in calls] == [(1e-3, True, "cpu")]

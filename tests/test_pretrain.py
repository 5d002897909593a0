"""The script that makes the shipped miniature parts runs, writes loadable parts and a manifest."""
import json

import pytest
import torch

from minigpt4_min import pretrain, pretrain_llm
from minigpt4_min.config import get_config
from minigpt4_min.model import MiniGPT4


_ACC, _EXACT, _ANSWERS = pretrain.encoder_attribute_accuracy, pretrain_llm.redescribe_exact, pretrain_llm.answer_accuracy
_HELD, _CAPS, _DOCS = pretrain_llm.heldout_accuracy, pretrain_llm.caption_accuracy, pretrain_llm.corpus.documents
_BIND = pretrain_llm.binding


def _quick_evals(monkeypatch):
    """Evaluate on a handful of scenes, tokenizer from a few documents: these tests prove
    the script works, not its quality."""
    monkeypatch.setattr(pretrain_llm, "redescribe_exact", lambda model, tok, scenes: _EXACT(model, tok, scenes[:4]))
    monkeypatch.setattr(pretrain_llm, "answer_accuracy", lambda model, tok, scenes, **kw: _ANSWERS(model, tok, scenes[:4], **kw))
    monkeypatch.setattr(pretrain_llm, "heldout_accuracy", lambda model, tok, scenes, *a, **kw: _HELD(model, tok, scenes[:3], *a, **kw))
    monkeypatch.setattr(pretrain_llm, "caption_accuracy", lambda model, tok, scenes: _CAPS(model, tok, scenes[:4]))
    monkeypatch.setattr(pretrain_llm, "binding", lambda model, tok, scenes: _BIND(model, tok, scenes[:6]))
    monkeypatch.setattr(pretrain_llm.corpus, "documents", lambda n, seed: _DOCS(min(n, 400), seed))


def test_pretrain_script_few_steps(tmp_path, monkeypatch):
    # evaluate on a handful of scenes only: this test proves the script works, not its quality
    monkeypatch.setattr(pretrain, "encoder_attribute_accuracy",
                        lambda enc, head, scenes, batch=250: _ACC(enc, head, scenes[:20]))
    _quick_evals(monkeypatch)
    manifest = pretrain.main(["--out", str(tmp_path), "--encoder-steps", "3", "--llm-steps", "3",
                              "--encoder-continue-steps", "2", "--llm-continue-steps", "2", "--threads", "1"])
    assert set(manifest["parts"]) == {"encoder", "llm"}
    for part in ("encoder", "llm"):   # phase 1 from scratch, phase 2 continued from it
        phases = manifest["parts"][part]["phases"]
        assert [p["steps"] for p in phases] == [3, 2]
        assert phases[0]["init"] is None and phases[1]["init"] == str(tmp_path / part)
    assert 0.0 <= manifest["parts"]["encoder"]["attribute_accuracy_val"] <= 1.0
    assert 0.0 <= manifest["parts"]["llm"]["answers_val"] <= 1.0
    llm = manifest["parts"]["llm"]
    assert set(llm["heldout_img_frame_val"]) >= {"all", "colour", "count", "yesno", "absent"}
    assert -1.0 <= llm["colour_collapse"] <= 1.0 and llm["block"] == pretrain_llm.LLM_BLOCK
    assert len(llm["binding_heads_val"]["per_layer"]) == get_config("tiny").llm["num_hidden_layers"]
    assert llm["binding_val"]["n"] > 0 and llm["binding_val"]["right"] + llm["binding_val"]["other_object"] <= 1.0
    assert not (tmp_path / "llm_checkpoint").exists()          # a finished run leaves no checkpoint
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
    packed = pretrain_llm.pack_documents(tok, random.Random(5), 1, 256, doc_mask=True)
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

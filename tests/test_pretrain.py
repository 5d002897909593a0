"""The script that makes the shipped miniature parts runs, writes loadable parts and a manifest."""
import json

import torch

from minigpt4_min import pretrain
from minigpt4_min.config import get_config
from minigpt4_min.model import MiniGPT4


_ACC, _EXACT, _ANSWERS = pretrain.encoder_attribute_accuracy, pretrain.redescribe_exact, pretrain.answer_accuracy


def test_pretrain_script_few_steps(tmp_path, monkeypatch):
    # evaluate on a handful of scenes only: this test proves the script works, not its quality
    monkeypatch.setattr(pretrain, "encoder_attribute_accuracy",
                        lambda enc, head, scenes, batch=250: _ACC(enc, head, scenes[:20]))
    monkeypatch.setattr(pretrain, "redescribe_exact", lambda model, tok, scenes: _EXACT(model, tok, scenes[:4]))
    monkeypatch.setattr(pretrain, "answer_accuracy", lambda model, tok, scenes, **kw: _ANSWERS(model, tok, scenes[:4], **kw))
    manifest = pretrain.main(["--out", str(tmp_path), "--encoder-steps", "3", "--llm-steps", "3",
                              "--encoder-continue-steps", "2", "--llm-continue-steps", "2", "--threads", "1"])
    assert set(manifest["parts"]) == {"encoder", "llm"}
    for part in ("encoder", "llm"):   # phase 1 from scratch, phase 2 continued from it
        phases = manifest["parts"][part]["phases"]
        assert [p["steps"] for p in phases] == [3, 2]
        assert phases[0]["init"] is None and phases[1]["init"] == str(tmp_path / part)
    assert 0.0 <= manifest["parts"]["encoder"]["attribute_accuracy_val"] <= 1.0
    assert 0.0 <= manifest["parts"]["llm"]["answers_val"] <= 1.0
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
    full = pretrain.pack_documents(tok, random.Random(3), 4, 256)
    assert torch.equal(full["labels"], full["input_ids"].masked_fill(full["attention_mask"] == 0, -100))
    ans = pretrain.pack_documents(tok, random.Random(3), 4, 256, answers_only=True)
    assert torch.equal(ans["input_ids"], full["input_ids"])             # same documents
    on = ans["labels"] != -100
    assert 0 < on.sum() < 0.6 * full["attention_mask"].sum()
    assert torch.equal(ans["labels"][on], ans["input_ids"][on])
    assert any("none none none" in tok.decode(row) for row in full["input_ids"])   # records are there...
    labelled = [tok.decode(row[row != -100]) for row in ans["labels"]]
    assert not any("none" in t for t in labelled)                                   # ...but never labels

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

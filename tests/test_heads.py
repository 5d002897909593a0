"""`heads.slot_attention` reads the attention from each object's shape word to its other
words in the record; `binding_heads` summarises it per layer for the manifest."""
from types import SimpleNamespace

import torch
import transformers

from minigpt4_min import heads
from minigpt4_min import shapesworld as sw
from minigpt4_min.config import DATA_DIR
from minigpt4_min.llm import load_tokenizer, tiny_llm_config


class _Shifted:
    """A stand-in model whose head h attends exactly h + 1 tokens back (2 layers)."""
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=3)
    device = torch.device("cpu")

    def __call__(self, input_ids, output_attentions):
        t = input_ids.shape[1]
        att = torch.stack([torch.diag(torch.ones(t - h - 1), -(h + 1)) for h in range(3)])[None]
        return SimpleNamespace(attentions=[att, att])


def test_slot_attention_finds_the_head_that_looks_one_word_back():
    tok = load_tokenizer(DATA_DIR / "tiny" / "llm")
    scenes = sw.split("val", 12)
    to_colour = heads.slot_attention(_Shifted(), tok, scenes)                 # shape -> colour: 1 back
    to_size = heads.slot_attention(_Shifted(), tok, scenes, dst="size")       # shape -> size: 2 back
    assert torch.equal(to_colour, torch.tensor([[1.0, 0.0, 0.0]] * 2))
    assert torch.equal(to_size, torch.tensor([[0.0, 1.0, 0.0]] * 2))


def test_binding_heads_summarises_each_layer_and_restores_attention():
    tok = load_tokenizer(DATA_DIR / "tiny" / "llm")
    spec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llm_config(len(tok), tok, spec)).eval()
    model.set_attn_implementation("sdpa")
    b = heads.binding_heads(model, tok, sw.split("val", 4))
    assert len(b["per_layer"]) == 2 and all(0.0 < v < 0.5 for v in b["per_layer"])   # untrained: diffuse
    assert b["before_last_layer"] is False and all(h in (0, 1) for h in b["head"])
    assert model.config._attn_implementation == "sdpa"


def test_the_manifest_records_the_shipped_llms_binding_heads():
    """The shipped LLM's entry is what `binding_heads` measures on it (its first 40
    validation scenes): its shape -> colour head sits before its last layer, where binding can use it."""
    import json
    path = DATA_DIR / "tiny" / "llm"
    entry = json.loads((DATA_DIR / "tiny" / "manifest.json").read_text())["parts"]["llm"]["binding_heads_val"]
    model = transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()
    measured = heads.binding_heads(model, load_tokenizer(path), sw.split("val", 40))
    assert measured == {k: v for k, v in entry.items() if k != "note"}
    assert measured["before_last_layer"] is True

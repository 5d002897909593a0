"""Checkpoint formats (minigpt4_min/checkpoints.py): LAVIS's files against LAVIS itself, the
HF BLIP-2 folder against the LAVIS files, and released projections both ways.

The LAVIS fixture (tests/fixtures/lavis) was written by LAVIS's own EVA-ViT, ln_vision and
Q-Former at a reduced size in the side venv (`make lavis-fixture`, tools/lavis_fixture.py);
`make lavis-fixture-check` rebuilds it there and compares it with the committed one.
"""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
)

from minigpt4_min import checkpoints
from minigpt4_min.checkpoints import (
    BLIP2_DROPPED,
    blip2_keys,
    EVA_DROPPED,
    eva_keys,
    read_lavis,
)
from minigpt4_min.config import get_config
from minigpt4_min.encoder import VisualEncoder

FIXTURE = Path(__file__).parent / "fixtures" / "lavis"
FIX = json.loads((FIXTURE / "config.json").read_text())
OUT = load_file(str(FIXTURE / "outputs.safetensors"))
EVA, BLIP2 = checkpoints.LAVIS_FILES


def fixture_config(name="vicuna7b", **kw):
    """Our ModelConfig for the fixture's reduced LAVIS sizes (the ViT as create_eva_vit_g builds it)."""
    v, q = FIX["vit"], FIX["qformer"]
    vision = dict(hidden_size=v["embed_dim"], intermediate_size=int(v["embed_dim"] * v["mlp_ratio"]),
                  num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                  image_size=FIX["image_size"], patch_size=FIX["patch_size"], qkv_bias=True, layer_norm_eps=1e-6)
    qformer = dict(hidden_size=q["hidden_size"], num_hidden_layers=q["num_hidden_layers"],
                   num_attention_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
                   cross_attention_frequency=q["cross_attention_freq"], encoder_hidden_size=v["embed_dim"],
                   vocab_size=2)
    if name == "llama2-7b":
        return get_config(name, image_size=FIX["image_size"], vision=vision, vit_dtype="float32", **kw)
    return get_config(name, image_size=FIX["image_size"], vision=vision, qformer=qformer,
                      num_query_tokens=FIX["num_query_token"], vit_dtype="float32", **kw)


def lavis_sds():
    return load_file(str(FIXTURE / "eva_vit_g.safetensors")), load_file(str(FIXTURE / "blip2.safetensors"))


@pytest.fixture
def lavis_folder(tmp_path):
    """The fixture as the real files are laid out: eva_vit_g.pth a flat state dict,
    blip2_pretrained_flant5xxl.pth {"model": {...}} beside other entries."""
    eva, blip2 = lavis_sds()
    torch.save(eva, tmp_path / EVA)
    torch.save({"model": blip2, "epoch": 9, "config": {"arch": "blip2_t5"}}, tmp_path / BLIP2)
    return tmp_path


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_lavis_parity_at_every_boundary(lavis_folder):
    cfg = fixture_config()
    enc = VisualEncoder.load(cfg, lavis_folder)          # a folder with the two LAVIS files
    assert enc.vision.post_layernorm.eps == 1e-5         # LAVIS's ln_vision is nn.LayerNorm's default
    with torch.no_grad():
        vit = enc.vit_tokens(OUT["images"])              # (3, 17, 32) before ln_vision
        ln = enc.ln_vision(vit)                          # (3, 17, 32)
        q = enc(OUT["images"])                           # (3, 8, 16)
    diffs = {"vit": _max_diff(vit, OUT["vit"]), "ln_vision": _max_diff(ln, OUT["ln_vision"]),
             "qformer": _max_diff(q, OUT["qformer"])}
    print("max abs diff vs LAVIS:", diffs)
    assert q.shape == OUT["qformer"].shape and vit.shape == OUT["vit"].shape
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    # the three boundaries are different tensors: each comparison checks something of its own
    assert _max_diff(OUT["vit"], OUT["ln_vision"]) > 0.1


def test_every_key_read_or_listed_as_dropped():
    eva, blip2 = lavis_sds()
    cfg = fixture_config()
    depth, layers = cfg.vision["num_hidden_layers"], cfg.qformer["num_hidden_layers"]
    read_eva = set(eva_keys(depth)) | {f"blocks.{i}.attn.{b}_bias" for i in range(depth) for b in "qv"}
    dropped_eva = {k for k in eva if k not in read_eva}
    assert read_eva <= set(eva)
    assert dropped_eva == {k for k in eva if k.startswith(f"blocks.{depth}.")}    # the extra block only
    read_b = set(blip2_keys(layers, 2))
    dropped_b = set(blip2) - read_b
    assert read_b <= set(blip2)
    assert all(any(re.fullmatch(p, k) for p in BLIP2_DROPPED) for k in dropped_b), dropped_b
    assert {"t5_proj.weight", "Qformer.cls.predictions.decoder.weight",
            "Qformer.bert.embeddings.word_embeddings.weight",
            "Qformer.bert.encoder.layer.0.intermediate.dense.weight"} <= dropped_b
    assert all(any(re.fullmatch(p, k) for p in EVA_DROPPED) for k in dropped_eva)
    # cross-attention is read in layers 0, 2 only, and every tensor of the encoder is filled
    assert {int(k.split(".")[4]) for k in read_b if "crossattention" in k} == {0, 2}
    enc = VisualEncoder(cfg)
    assert set(read_lavis(enc, FIXTURE / "eva_vit_g.safetensors", FIXTURE / "blip2.safetensors")) \
        == set(enc.state_dict())


def test_qv_biases_become_one_qkv_bias_with_zero_k(lavis_folder):
    enc = VisualEncoder.load(fixture_config(), lavis_folder)
    eva, _ = lavis_sds()
    w = enc.cfg.vision_width
    for i in range(enc.cfg.vision["num_hidden_layers"]):
        bias = enc.vision.encoder.layers[i].self_attn.qkv.bias                 # (3W,)
        assert torch.equal(bias[:w], eva[f"blocks.{i}.attn.q_bias"])
        assert torch.equal(bias[w:2 * w], torch.zeros(w))
        assert torch.equal(bias[2 * w:], eva[f"blocks.{i}.attn.v_bias"])


def test_missing_left_over_and_misshapen_tensors_name_file_key_and_shapes(tmp_path):
    cfg = fixture_config()
    eva, blip2 = lavis_sds()

    def load(e, b):
        torch.save(e, tmp_path / EVA)
        torch.save({"model": b}, tmp_path / BLIP2)
        return VisualEncoder.from_lavis(cfg, tmp_path / EVA, tmp_path / BLIP2)

    with pytest.raises(ValueError, match=r"eva_vit_g\.pth.*blocks\.0\.gamma_1 \(32,\)"):
        load({**eva, "blocks.0.gamma_1": torch.ones(32)}, blip2)             # a LayerScale EVA: not ours
    no_key = {k: v for k, v in blip2.items() if k != "Qformer.bert.encoder.layer.2.crossattention.self.key.weight"}
    with pytest.raises(ValueError, match=r"flant5xxl\.pth: missing tensor .*layer\.2\.crossattention"
                                         r"\.self\.key\.weight.*\(16, 32\)"):
        load(eva, no_key)
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 10, 32\).*needs \(1, 17, 32\)"):
        load({**eva, "pos_embed": torch.zeros(1, 10, 32)}, blip2)
    with pytest.raises(ValueError, match=r"flant5xxl\.pth: 1 tensors neither read.*Qformer\.extra \(2,\)"):
        load(eva, {**blip2, "Qformer.extra": torch.zeros(2)})
    torch.save(blip2, tmp_path / BLIP2)                                       # not wrapped in "model"
    with pytest.raises(ValueError, match=r"flant5xxl\.pth: expected a \{'model'"):
        VisualEncoder.from_lavis(cfg, tmp_path / EVA, tmp_path / BLIP2)


def test_llama2_variant_reads_only_the_vit_like_minigpt4(lavis_folder):
    """MiniGPT-4's Llama-2 model has no Q-Former and never loads the BLIP-2 file: its ln_vision
    keeps weight 1 / bias 0. The 4-patch grouping then reads that LayerNorm of LAVIS's ViT."""
    (lavis_folder / BLIP2).unlink()                                           # not needed
    enc = VisualEncoder.load(fixture_config("llama2-7b"), lavis_folder)
    assert torch.equal(enc.vision.post_layernorm.weight, torch.ones(32))
    with torch.no_grad():
        out = enc(OUT["images"])                                              # (3, 16 / 4, 4 * 32)
    ref = torch.nn.functional.layer_norm(OUT["vit"], (32,), eps=1e-5)[:, 1:].reshape(3, 4, 128)
    assert out.shape == (3, 4, 128) and _max_diff(out, ref) <= 1e-5


def test_hf_folder_and_lavis_files_give_the_same_encoder(lavis_folder, tmp_path):
    cfg = fixture_config()
    lavis = VisualEncoder.load(cfg, lavis_folder)
    # transformers' own BLIP-2 model holding the same weights, saved as on the hub (sharded)
    hf_cfg = Blip2Config(vision_config=Blip2VisionConfig(**cfg.vision).to_dict(),
                         qformer_config=Blip2QFormerConfig(**cfg.qformer).to_dict(),
                         text_config=OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                               num_attention_heads=2, word_embed_proj_dim=16).to_dict(),
                         num_query_tokens=cfg.num_query_tokens)
    hf = Blip2ForConditionalGeneration(hf_cfg)
    own = lavis.state_dict()
    with torch.no_grad():
        hf.vision_model.load_state_dict({k[len("vision."):]: v for k, v in own.items() if k.startswith("vision.")})
        hf.qformer.load_state_dict({k[len("qformer."):]: v for k, v in own.items() if k.startswith("qformer.")})
        hf.query_tokens.copy_(own["query_tokens"])
    folder = tmp_path / "hf"
    hf.save_pretrained(folder, max_shard_size="100KB")
    from_hf = VisualEncoder.load(cfg, folder)
    assert from_hf.state_dict().keys() == own.keys()
    assert all(torch.equal(from_hf.state_dict()[k], own[k]) for k in own)
    with torch.no_grad():
        assert torch.equal(from_hf(OUT["images"]), lavis(OUT["images"]))


def test_fixture_was_made_with_the_pinned_side_environment():
    """The committed fixture records the versions that made it; they must be the Makefile's pins,
    so `make lavis-fixture-check` rebuilds it with the same packages."""
    make = (Path(__file__).parents[1] / "Makefile").read_text()
    recipe = make[make.index("$(LAVIS_VENV)/.installed:"):make.index("lavis-fixture:")]
    pins = dict(re.findall(r"([a-z-]+)==([\d.]+)", recipe))
    assert pins == FIX["made_with"], (pins, FIX["made_with"])
    size = sum(f.stat().st_size for f in FIXTURE.iterdir())
    assert size < 512 * 1024, f"fixture is {size} bytes"


# ------------------------------------------------------------------ released projections
def test_projection_export_is_the_official_layout_and_round_trips_bit_identical(random_model, tmp_path):
    from conftest import _build_random_model
    m = random_model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                           # "trained": values no fresh init would have
        m.llama_proj.weight.copy_(torch.randn(m.llama_proj.weight.shape, generator=g))
        m.llama_proj.bias.copy_(torch.randn(m.llama_proj.bias.shape, generator=g))
    path = m.export_projection(tmp_path / "minigpt4_here.pth")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert set(obj) == {"model"} and set(obj["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    # the official demo: torch.load(ckpt)["model"] into a model whose attribute is llama_proj,
    # with strict=False -- a misnamed tensor would be silently ignored there, so check none is
    official = torch.nn.Module()
    official.llama_proj = torch.nn.Linear(*reversed(m.llama_proj.weight.shape))
    official.ln_vision = torch.nn.LayerNorm(4)      # frozen parts the checkpoint does not hold
    res = official.load_state_dict(obj["model"], strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) == {"ln_vision.weight", "ln_vision.bias"}
    other = _build_random_model(seed=5)
    assert not torch.equal(other.llama_proj.weight, m.llama_proj.weight)
    other.load_projection(path)
    assert torch.equal(other.llama_proj.weight, m.llama_proj.weight)
    assert torch.equal(other.llama_proj.bias, m.llama_proj.bias)
    assert other.projection_source == str(path)


def test_wrong_size_projection_names_both_sizes(random_model, tmp_path):
    m = random_model
    d_llm, d_in = m.llama_proj.weight.shape
    checkpoints.write_projection(tmp_path / "other.pth", torch.zeros(40, 12), torch.zeros(40))
    with pytest.raises(ValueError, match=rf"other\.pth: llama_proj is \(40, 12\).*needs \({d_llm}, {d_in}\)"):
        m.load_projection(tmp_path / "other.pth")
    torch.save({"model": {"query_tokens": torch.zeros(1)}}, tmp_path / "no_proj.pth")
    with pytest.raises(ValueError, match=r"no_proj\.pth holds no llama_proj"):
        m.load_projection(tmp_path / "no_proj.pth")


def test_fixture_check_tolerates_rounding_but_not_a_changed_weight(tmp_path, capsys):
    """`make lavis-fixture-check`'s comparison: a rebuild that differs in the last float32 bits
    (another CPU's kernels) passes; a weight moved as little as 1e-3, or a missing key, fails."""
    import importlib.util
    import shutil

    from safetensors.torch import save_file
    spec = importlib.util.spec_from_file_location("lavis_fixture", FIXTURE.parents[2] / "tools" / "lavis_fixture.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def rebuilt(change):
        new = tmp_path / f"new{len(list(tmp_path.iterdir()))}"
        shutil.copytree(FIXTURE, new)
        sd = load_file(str(new / "eva_vit_g.safetensors"))
        change(sd)
        save_file(sd, str(new / "eva_vit_g.safetensors"))
        return new

    key = "blocks.0.mlp.fc1.weight"
    ulp = rebuilt(lambda sd: sd.__setitem__(key, torch.nextafter(sd[key], torch.full_like(sd[key], 1.0))))
    assert tool.compare(ulp, FIXTURE) == 0
    assert tool.compare(ulp, FIXTURE, atol=0.0, rtol=0.0) == 1           # not bit-equal
    moved = rebuilt(lambda sd: sd[key].__setitem__((0, 0), sd[key][0, 0] + 1e-3))
    assert tool.compare(moved, FIXTURE) == 1
    assert f"eva_vit_g/{key}: max abs diff 0.001" in capsys.readouterr().out
    dropped = rebuilt(lambda sd: sd.pop(key))
    assert tool.compare(dropped, FIXTURE) == 1

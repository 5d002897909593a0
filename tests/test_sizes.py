"""Parameter counts of the full MiniGPT-4 variants (built on the meta device) and the
architecture figure. Reference values: paper §3 / DESIGN.md §2."""
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text

from minigpt4_min.config import PRESETS, get_config
from minigpt4_min.plots import architecture_figure, parameter_bar_chart, pipeline_shapes
from minigpt4_min.sizes import markdown_table, parameter_table

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def table():
    return {r["name"]: r for r in parameter_table(tiny_vocab=1024)}


def test_llama_proj_exact(table):
    assert table["vicuna7b"]["llama_proj"] == 768 * 4096 + 4096 == 3_149_824
    assert table["vicuna13b"]["llama_proj"] == 768 * 5120 + 5120 == 3_937_280
    assert table["llama2-7b"]["llama_proj"] == 5632 * 4096 + 4096 == 23_072_768
    d = get_config("tiny").llm["hidden_size"]               # the shipped LLM's width
    assert table["tiny"]["llama_proj"] == 128 * d + d


def test_totals_and_fractions(table):
    for r in table.values():
        assert r["total"] == r["vit"] + r["qformer"] + r["llm"] + r["llama_proj"]
        assert r["trainable"] == r["llama_proj"] == r["proj_in"] * r["d_llm"] + r["d_llm"]
        assert r["trainable_fraction"] == pytest.approx(r["trainable"] / r["total"])
    for name in ("vicuna7b", "vicuna13b"):
        assert table[name]["trainable_fraction"] < 1e-3      # < 0.1% of the model learns
    assert table["llama2-7b"]["trainable_fraction"] < 5e-3   # bigger projection, still < 0.5%


def test_eva_vit_g_39_blocks_width_1408(table):
    cfg = get_config("vicuna7b")
    assert cfg.vision["num_hidden_layers"] == 39 and cfg.vision["hidden_size"] == 1408
    w, m, p, L = 1408, 6144, 14, 39
    block = (2 * w            # layer norm 1
             + 3 * w * w + 3 * w   # qkv; the port stores a k bias too (zeros; EVA has none)
             + w * w + w      # attention output projection
             + 2 * w          # layer norm 2
             + w * m + m + m * w + w)  # MLP
    embed = 3 * p * p * w + w + w + 257 * w   # patch conv, CLS, positions (256 + CLS)
    ln_vision = 2 * w
    assert table["vicuna7b"]["vit"] == embed + L * block + ln_vision
    assert 0.95e9 < table["vicuna7b"]["vit"] < 1.02e9                 # ~1B, "ViT-g"
    assert table["vicuna7b"]["vit"] == table["vicuna13b"]["vit"] == table["llama2-7b"]["vit"]


def test_qformer_and_llm_ranges(table):
    for name in ("vicuna7b", "vicuna13b"):
        q = table[name]["qformer"]
        assert 100e6 < q < 110e6            # BERT-base query path (no text embeddings / FFNs)
        assert (q - 32 * 768) > 0           # query tokens (1, 32, 768) are included
    assert 6.6e9 < table["vicuna7b"]["llm"] < 6.8e9
    assert 12.9e9 < table["vicuna13b"]["llm"] < 13.1e9
    assert table["llama2-7b"]["llm"] == table["vicuna7b"]["llm"]   # same shapes, RoPE


def test_llama2_variant_has_no_qformer(table):
    r = table["llama2-7b"]
    assert r["qformer"] == 0
    assert r["proj_in"] == 5632 == 4 * 1408
    assert r["num_image_tokens"] == 64


def test_tiny_vocab_argument():
    a, = parameter_table(["tiny"], tiny_vocab=1024)
    b, = parameter_table(["tiny"], tiny_vocab=1124)
    assert b["llm"] - a["llm"] == 2 * 100 * get_config("tiny").llm["hidden_size"]     # embedding + untied lm_head


def test_markdown_table(table):
    md = markdown_table(list(table.values()))
    assert "3,149,824 (768→4096)" in md and "23,072,768 (5632→4096)" in md


def _texts(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_architecture_figure_shapes(name, table):
    cfg = get_config(name)
    fig = architecture_figure(cfg, table[name])
    assert isinstance(fig, Figure)
    text = _texts(fig)
    for shape in pipeline_shapes(cfg):
        assert shape in text
    assert f"Linear({cfg.proj_in}, {cfg.llm['hidden_size']})" in text
    assert ("Q-Former" in text) == (cfg.qformer is not None)


def test_architecture_figure_known_shapes():
    t13 = _texts(architecture_figure(get_config("vicuna13b")))
    for s in ("(B, 3, 224, 224)", "(B, 257, 1408)", "(B, 32, 768)", "(B, 32, 5120)"):
        assert s in t13
    t2 = _texts(architecture_figure(get_config("llama2-7b")))
    assert "(B, 64, 5632)" in t2 and "(B, 64, 4096)" in t2 and "group 4 tokens" in t2
    assert "(B, 32, 4096)" in _texts(architecture_figure(get_config("vicuna7b")))


def test_parameter_bar_chart(table):
    fig = parameter_bar_chart(list(table.values()))
    assert isinstance(fig, Figure)
    assert "(no Q-Former)" in _texts(fig)

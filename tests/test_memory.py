"""The GPU-memory estimate (memory.py, issue 14 part 5): its per-layer term is exactly what
autograd saves, and it lies within 15 % of every peak measured on an H200."""
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4_min import memory
from minigpt4_min.config import get_config

ROOT = Path(__file__).resolve().parents[1]
H200 = json.loads((ROOT / "benchmarks" / "results" / "full_scale_h200.json").read_text())
FULL = ("vicuna7b", "vicuna13b", "llama2-7b")

# The sequence lengths of the recorded run, for results that predate the benchmark recording
# them: its batches (benchmarks/full_scale_gpu.py: shapesworld captions, descriptions x 3)
# tokenized by the tiny tokenizer of that commit (961a405), longest row of any step:
# stage 1 captions + "\n" <= 10 tokens; stage 2 prompt 6 + 13 tokens around the image,
# answers + "###" 125 tokens (Vicuna) / + "</s>" 127 (Llama-2's end symbol).
RECORDED_LENGTHS = {("vicuna7b", 1): (0, 10), ("vicuna13b", 1): (0, 10), ("llama2-7b", 1): (0, 10),
                    ("vicuna7b", 2): (19, 125), ("vicuna13b", 2): (19, 125), ("llama2-7b", 2): (19, 127)}


def _saved_bytes(layers, dtype, B=2, T=24, d=64, f=160, H=4, V=96):
    """Bytes of the distinct tensors autograd saves in one loss of a small frozen LLaMA whose
    input embeddings require grad (as llama_proj's output does), padding mask included."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=H, num_key_value_heads=H, max_position_embeddings=128)
    m = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    emb = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -5:] = 0
    labels = torch.randint(0, V, (B, T))
    labels[:, :3] = -100
    weights = {p.data_ptr() for p in m.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in weights:                 # a frozen weight costs nothing extra
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False).loss
    return sum(seen.values())


@pytest.mark.parametrize("dtype,s", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("T", [24, 40])
def test_layer_term_is_what_autograd_saves(dtype, s, T):
    """One more decoder layer saves exactly `layer_bytes_per_token` per token; one more
    sequence adds that + the final norm + the saved fp32 log-softmax (4 V) + the labels."""
    d, f, H, V, B = 64, 160, 4, 96, 2
    per_layer = (_saved_bytes(2, dtype, T=T) - _saved_bytes(1, dtype, T=T)) / (B * T)
    assert per_layer == memory.layer_bytes_per_token(d, f, H, T, s)
    per_token = (_saved_bytes(1, dtype, B=4, T=T) - _saved_bytes(1, dtype, B=2, T=T)) / (2 * T)
    assert per_token == memory.layer_bytes_per_token(d, f, H, T, s) + (4 * d + 4) + 4 * V + 8


def test_within_15_percent_of_every_h200_peak():
    """Every training peak of benchmarks/results/full_scale_h200.json (and the generation
    peaks where a run recorded them), at the batches and sequence lengths that run had."""
    rows = []
    for name in FULL:
        r = H200[name]
        w = memory.estimate(name, 1, 1).parts["weights"]
        rows.append((name, "weights", w, r["gib_weights"]))
        for stage in (1, 2):
            m = r[f"stage{stage}"]
            prompt, text = (m["prompt_tokens"], m["text_tokens"]) if "text_tokens" in m else RECORDED_LENGTHS[name, stage]
            est = memory.estimate(name, stage, m["batch"], prompt_tokens=prompt, text_tokens=text)
            rows.append((name, f"stage {stage} batch {m['batch']}", est.peak_gib, m["peak_gib"]))
        for beams in (1, 5):
            g = r[f"generate_beams{beams}"]
            if g.get("peak_gib") is None:
                continue
            est = memory.estimate(name, "chat", beams=beams, context_tokens=g["context_tokens"],
                                  new_tokens=g["new_tokens"])
            rows.append((name, f"generate {beams} beams", est.peak_gib, g["peak_gib"]))
    for name, what, est, measured in rows:
        print(f"{name:10s} {what:20s} estimate {est:6.2f} GiB  measured {measured:6.2f}  {est / measured - 1:+.1%}")
    off = [(n, w, e, m) for n, w, e, m in rows if abs(e / m - 1) > 0.15]
    assert not off, off
    assert len(rows) >= 9                                # 3 presets x (weights + 2 stages)


def test_generation_estimate_below_the_recorded_overall_peak():
    """The recorded run has no generation peak of its own, but its peak since stage 2
    (`peak_gib_all`) bounds it: one image, 300 new tokens, 5 beams fit under it."""
    for name in FULL:
        r = H200[name]
        prompt = 1 + 19 + get_config(name).num_image_tokens
        est = memory.estimate(name, "chat", beams=5, context_tokens=prompt + 300)
        assert est.parts["weights"] < est.peak_gib <= r["peak_gib_all"] * 1.15


def test_savers_cut_the_right_parts():
    plain = memory.estimate("vicuna13b", 2, 12)
    ckpt = memory.estimate("vicuna13b", 2, 12, grad_checkpointing=True)
    assert ckpt.parts["activations"] < 0.1 * plain.parts["activations"]
    assert ckpt.peak_gib < 0.7 * plain.peak_gib and ckpt.parts["weights"] == plain.parts["weights"]
    fp32 = memory.estimate("vicuna7b", "chat", llm_dtype="float32", vit_dtype="float32")
    fp16 = memory.estimate("vicuna7b", "chat")
    assert fp32.parts["weights"] == pytest.approx(2 * fp16.parts["weights"], rel=0.05)
    assert fp32.parts["kv_cache"] == pytest.approx(2 * fp16.parts["kv_cache"], rel=1e-3)   # parts: 3 decimals
    # low_resource (the demo): 8-bit LLM, ViT on the CPU; the maintainers report the 13B demo
    # under 24 GB and the 7B one at about 11.5 GB
    for name, gb in (("vicuna13b", 24), ("vicuna7b", 11.5)):
        lr = memory.estimate(get_config(name, low_resource=True), "chat")
        full = memory.estimate(name, "chat")
        assert lr.parts["weights"] < 0.55 * full.parts["weights"] and lr.parts["encoder"] == 0
        assert lr.device_gib * 2**30 < gb * 1e9
    # 8-bit keeps each int8 layer's fp16 input for backward: stage-2 activations grow
    eight = memory.estimate("vicuna7b", 2, 12, llm_8bit=True)
    assert eight.parts["activations"] > memory.estimate("vicuna7b", 2, 12).parts["activations"]


def test_describe_is_one_line_and_errors_name_the_value():
    line = memory.describe(get_config("vicuna7b"), stage=2, batch=12)
    assert "\n" not in line and line.startswith("vicuna7b stage 2, batch 12 x 223 tokens") and "GiB" in line
    assert "beam" in memory.describe("vicuna13b", "chat", beams=5)
    assert memory.estimate("tiny", 1, 64).peak_gib < 1
    with pytest.raises(ValueError, match="'3'"):
        memory.estimate("vicuna7b", 3)
    with pytest.raises(ValueError, match="'int4'"):
        memory.estimate("vicuna7b", 1, llm_dtype="int4")


def test_largest_batch_is_the_edge_of_the_card():
    b = memory.largest_batch("vicuna13b", 2, 40)
    assert 1 <= b and memory.estimate("vicuna13b", 2, b).device_gib <= 40 < memory.estimate("vicuna13b", 2, b + 1).device_gib
    assert memory.largest_batch("vicuna13b", 2, 24) == 0                  # fp16 weights alone: 26.5 GiB
    assert memory.largest_batch("vicuna13b", 2, 40, grad_checkpointing=True) > 4 * b


def readme_memory_rows() -> list[str]:
    """The README's table of estimated peaks (section "Memory: what fits ..."), as memory.py gives it."""
    rows = []
    for name in ("vicuna7b", "vicuna13b"):
        lr = get_config(name, low_resource=True)
        g = [memory.estimate(c, 2, 12, grad_checkpointing=ck).peak_gib for c in (name, lr) for ck in (False, True)]
        chat = [memory.estimate(c, "chat").peak_gib for c in (name, lr)]
        rows.append(f"| {name} | {g[0]:.1f} GiB | {g[1]:.1f} GiB | {g[2]:.1f} GiB | {g[3]:.1f} GiB "
                    f"| {chat[0]:.1f} / {chat[1]:.1f} GiB |")
    return rows


def test_readme_table_is_what_memory_gives():
    readme = (ROOT / "README.md").read_text()
    for row in readme_memory_rows():
        assert row in readme, row
    assert "memory.describe(\"vicuna13b\", stage=2, batch=12))     # 160-token answers: ~" + \
        f"{memory.estimate('vicuna13b', 2, 12).peak_gib:.1f} GiB" in readme

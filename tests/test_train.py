"""The trainer's memory savers (issue 14, part 6): gradient accumulation gives the update
of one big batch; gradient checkpointing of the frozen LLM gives the same gradients."""
import copy

import pytest
import torch

from minigpt4_min.config import TrainConfig, train_config
from minigpt4_min.train import Trainer, accumulated, batch_generator, concat_batches

# answers of very different lengths: micro-batches then hold different numbers of answer
# tokens, which is exactly when "mean of micro-batch means" and "one big batch" differ
WORDS = ["red", "a small blue square", "green star on gray and a large yellow circle at the top left",
         "two shapes", "an orange triangle below a purple square, both small, on a white background"]


def _batches(model, bs, dtype=torch.float32):
    def get_batch(step, g):
        feats = torch.randn(bs, model.cfg.num_query_tokens, model.cfg.proj_in, generator=g, dtype=dtype)
        idx = torch.randint(0, len(WORDS), (bs,), generator=g).tolist()
        return {"feats": feats, "answers": [WORDS[i] for i in idx], "max_txt_len": 32, "end_sym": "\n"}
    return get_batch


def _cfg(**kw):
    base = dict(lr=1e-2, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=1, max_steps=3, batch_size=2)
    return TrainConfig(**{**base, **kw})


def _proj(m):
    return torch.cat([m.llama_proj.weight.detach().flatten(), m.llama_proj.bias.detach()])


def test_global_batch_is_micro_batch_times_accum_steps():
    assert _cfg(batch_size=8, accum_steps=4).global_batch == 32          # the 8 x 4
    assert train_config(2, "vicuna7b", batch_size=4, accum_steps=3).global_batch == 12  # paper stage 2
    for bad in (dict(accum_steps=0), dict(batch_size=0), dict(accum_steps=2.5), dict(accum_steps=True)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            _cfg(**bad)


def test_micro_batch_seeds_are_distinct_and_step_seed_unchanged():
    cfg = _cfg(accum_steps=3)
    # micro-batch 0 keeps the seed every step had before accumulation existed (old runs replay)
    assert torch.equal(torch.randint(0, 10**9, (4,), generator=batch_generator(cfg, 7)),
                       torch.randint(0, 10**9, (4,), generator=torch.Generator().manual_seed(42 * 1_000_003 + 7)))
    draws = {(s, k): tuple(torch.randint(0, 10**9, (4,), generator=batch_generator(cfg, s, k)).tolist())
             for s in range(5) for k in range(3)}
    assert len(set(draws.values())) == len(draws)


def test_concat_batches_joins_rows_and_rejects_disagreeing_fields():
    a = {"feats": torch.zeros(2, 3), "answers": ["x", "y"], "max_txt_len": 32}
    b = {"feats": torch.ones(1, 3), "answers": ["z"], "max_txt_len": 32}
    out = concat_batches([a, b])
    assert out["feats"].shape == (3, 3) and out["answers"] == ["x", "y", "z"] and out["max_txt_len"] == 32
    with pytest.raises(ValueError, match="max_txt_len"):
        concat_batches([a, {**b, "max_txt_len": 160}])


def test_accumulation_8x4_gives_the_update_of_one_batch_of_32(random_model):
    """3 AdamW steps of 4 micro-batches x 8 == 3 steps of the same 32 samples as one batch
    (the issue's 8 x 4 = 32).

    float64: the two orders of summation differ by rounding only (~1e-16 relative), and
    Adam's first steps are ~lr * sign(grad), so in fp32 a gradient entry near zero could
    flip sign by rounding and move a weight by 2 lr; in float64 that cannot happen at the
    1e-6 tolerance of the issue. (Measured in fp32 as well: see the gradient test below.)"""
    m = random_model.double()
    ref = copy.deepcopy(m)
    cfg4 = _cfg(batch_size=8, accum_steps=4)
    get8 = _batches(m, 8, torch.float64)
    micro = [get8(0, batch_generator(cfg4, 0, k)) for k in range(4)]
    counts = [m.num_targets(b) for b in micro]
    assert len(set(counts)) > 1, f"the micro-batches should hold different token counts: {counts}"
    for b, n in zip(micro, counts):                        # num_targets = what the loss counts
        img = m.project(b["feats"])
        assert (m.build_inputs(img, b["answers"], max_txt_len=32)["labels"] != -100).sum() == n

    start = _proj(m).clone()
    h4 = Trainer(m, cfg4, get8).train(progress=False)
    h1 = Trainer(ref, cfg4.replace(batch_size=32, accum_steps=1), accumulated(get8, cfg4)).train(progress=False)
    diff = (_proj(m) - _proj(ref)).abs().max().item()
    print(f"accumulation 8 x 4 vs batch 32, 3 AdamW steps (float64): max |diff| = {diff:.2e}")
    assert diff <= 1e-6, diff
    assert (_proj(m) - start).abs().max().item() > 1e-3, "the projection did not move"
    # the LLM's loss upcasts logits with .float(), i.e. fp32 even here: equal to fp32 rounding
    assert [h["loss"] for h in h4] == pytest.approx([h["loss"] for h in h1], rel=1e-6)


def test_accumulated_gradient_is_the_big_batch_gradient_and_not_the_mean_of_means(random_model):
    """fp32, one step: the accumulated gradient equals the big batch's; dividing each
    micro-batch's mean by accum_steps (LAVIS's rule) does not, when token counts differ."""
    m = random_model
    cfg4 = _cfg(batch_size=2, accum_steps=4)
    get2 = _batches(m, 2)

    def grad(fn):
        m.zero_grad(set_to_none=True)
        fn()
        return torch.cat([m.llama_proj.weight.grad.flatten(), m.llama_proj.bias.grad])

    t = Trainer(m, cfg4, get2)
    g_acc = grad(t.accumulate_gradients)
    g_big = grad(lambda: m.loss(accumulated(get2, cfg4)(0)).backward())
    g_lavis = grad(lambda: [(m.loss(b) / 4).backward() for b in t.micro_batches(0)])
    scale = g_big.abs().max().item()
    assert (g_acc - g_big).abs().max().item() <= 1e-5 * scale
    assert (g_lavis - g_big).abs().max().item() > 1e-3 * scale


def test_resume_with_accumulation_is_exact(random_model, tmp_path):
    m = random_model
    cfg = _cfg(batch_size=2, accum_steps=3, max_steps=4)
    ref = copy.deepcopy(m)
    Trainer(ref, cfg, _batches(ref, 2)).train(progress=False)
    t = Trainer(m, cfg, _batches(m, 2))
    t.train(max_steps=2, progress=False)
    t.save(tmp_path / "ck")
    t2 = Trainer(m, cfg, _batches(m, 2))
    t2.resume(tmp_path / "ck")
    t2.train(progress=False)
    assert torch.equal(_proj(m), _proj(ref))


def _layer_calls(m):
    """Count calls of the first decoder layer's MLP (recomputation calls it twice). A PRE-hook:
    torch stops a recomputation as soon as the last saved tensor is back, inside the MLP,
    so a hook that runs when the MLP returns would miss it."""
    calls = []
    m.llm.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_gradient_checkpointing_same_gradient_frozen_llm(random_model):
    m = random_model
    batch = _batches(m, 4)(0, torch.Generator().manual_seed(0))
    frozen = {k: v.clone() for k, v in m.llm.state_dict().items()}
    calls = _layer_calls(m)

    def grad():
        m.zero_grad(set_to_none=True)
        m.train_mode()
        m.loss(batch).backward()
        return m.llama_proj.weight.grad.clone(), m.llama_proj.bias.grad.clone()

    g_plain, n_plain = grad(), len(calls)
    m.set_gradient_checkpointing(True)
    # only the decoder-layer containers carry the flag that switches checkpointing on
    layers = set(m._llm_layers())
    assert len(layers) == m.llm.config.num_hidden_layers
    assert all(mod.training == (mod in layers) for mod in m.llm.modules())
    g_ckpt = grad()
    assert len(calls) - n_plain == 2 * n_plain, "checkpointing did not recompute the layer"
    for a, b in zip(g_plain, g_ckpt):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert all(not p.requires_grad and p.grad is None for p in m.llm.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in m.llm.state_dict().items())
    m.set_gradient_checkpointing(False)
    m.train_mode()
    assert not any(mod.training for mod in m.llm.modules())


def test_trainer_with_checkpointing_matches_without(random_model):
    m = random_model
    ref = copy.deepcopy(m)
    cfg = _cfg(batch_size=3, max_steps=2)
    Trainer(ref, cfg, _batches(ref, 3)).train(progress=False)
    calls = _layer_calls(m)
    Trainer(m, cfg.replace(grad_checkpointing=True), _batches(m, 3)).train(progress=False)
    assert len(calls) == 2 * 2                              # 2 steps, each forward + recompute
    torch.testing.assert_close(_proj(m), _proj(ref), rtol=1e-6, atol=1e-7)
    assert not m._checkpointing and not any(mod.training for mod in m.llm.modules())

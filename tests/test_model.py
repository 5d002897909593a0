"""The model's contract: one trainable layer, exact splicing and masking, stopping, resuming."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from minigpt4_min.config import TrainConfig
from minigpt4_min.train import Trainer, build_optimizer, lr_at


def _feats(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, model.cfg.num_query_tokens, model.cfg.proj_in, generator=g)


def test_only_llama_proj_is_trainable(random_model):
    m = random_model
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    d_in, d_out = m.cfg.proj_in, m.llm.config.hidden_size
    assert [n for n, _ in trainable] == ["llama_proj.weight", "llama_proj.bias"]
    assert sum(p.numel() for _, p in trainable) == d_in * d_out + d_out
    m.train_mode()
    assert m.llama_proj.training and not m.encoder.training and not m.llm.training
    assert not any(mod.training for mod in m.llm.modules())


def _batches(model, bs=4):
    def get_batch(step, g):
        feats = torch.randn(bs, model.cfg.num_query_tokens, model.cfg.proj_in, generator=g)
        words = ["red circle", "a small blue square", "green star on gray", "two shapes"]
        idx = torch.randint(0, len(words), (bs,), generator=g).tolist()
        return {"feats": feats, "answers": [words[i] for i in idx], "max_txt_len": 32, "end_sym": "\n"}
    return get_batch


def test_frozen_weights_bit_identical_after_training(random_model):
    m = random_model
    before = {k: v.clone() for k, v in list(m.encoder.state_dict().items()) + list(m.llm.state_dict().items())}
    proj_before = m.llama_proj.weight.clone()
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=2, max_steps=4, batch_size=4)
    Trainer(m, cfg, _batches(m)).train(progress=False)
    after = {**m.encoder.state_dict(), **m.llm.state_dict()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert not torch.equal(proj_before, m.llama_proj.weight), "the projection did not learn"


def test_label_mask_and_image_position(random_model):
    m = random_model
    feats = _feats(m, b=2)
    img = m.project(feats)                                                   # (2, Q, D)
    prompts = ["###Human: <Img><ImageHere></Img> Describe it. ###Assistant: ", "<ImageHere>"]
    answers = ["A red circle.", "blue square"]
    out = m.build_inputs(img, answers, prompts, max_txt_len=160, end_sym="###")
    Q = m.cfg.num_query_tokens
    emb = m.llm.get_input_embeddings().weight
    for b in range(2):
        before, after = m.prompt_segments(prompts[b])
        ans = m.tokenize(answers[b] + "###")
        start = 1 + len(before)
        # the image tokens sit exactly where <ImageHere> was
        assert torch.equal(out["inputs_embeds"][b, start:start + Q], img[b])
        # BOS and the prompt text are the LLM's own embeddings
        ids = [m.tokenizer.bos_token_id] + before
        assert torch.equal(out["inputs_embeds"][b, :start], emb[ids])
        n = start + Q + len(after) + len(ans)
        # the text after the image and the answer too; padding is zeros
        assert torch.equal(out["inputs_embeds"][b, start + Q:n], emb[after + ans])
        assert not out["inputs_embeds"][b, n:].any()
        expected = [-100] * (start + Q + len(after)) + ans + [-100] * (out["labels"].shape[1] - n)
        assert out["labels"][b].tolist() == expected
        assert out["attention_mask"][b].tolist() == [1] * n + [0] * (out["labels"].shape[1] - n)


def test_image_slots_carry_the_gradient_to_llama_proj(random_model):
    m = random_model
    m.llama_proj.zero_grad()
    out = m.build_inputs(m.project(_feats(m, b=3)), ["red circle", "a blue square on gray", "x"], None)
    (out["inputs_embeds"] ** 2).sum().backward()
    assert m.llama_proj.weight.grad is not None and m.llama_proj.weight.grad.abs().sum() > 0
    m.llama_proj.zero_grad()


def test_tokenize_is_memoised_without_sharing_lists(random_model):
    m = random_model
    first = m.tokenize("a red circle")
    first.append(-1)                          # a caller changing its list ...
    assert m.tokenize("a red circle") == m.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert m.tokenize("") == []


def test_stage1_sequence_is_bos_image_caption_newline(random_model):
    m = random_model
    img = m.project(_feats(m, b=1))
    out = m.build_inputs(img, ["red circle"], None, max_txt_len=32, end_sym="\n")
    ans = m.tokenize("red circle\n")
    Q = m.cfg.num_query_tokens
    assert out["labels"][0].tolist() == [-100] * (1 + Q) + ans
    assert m.tokenizer.decode(ans).strip() == "red circle"


def test_max_txt_len_truncates_answer(random_model):
    m = random_model
    img = m.project(_feats(m, b=1))
    out = m.build_inputs(img, ["red circle " * 40], None, max_txt_len=7)
    assert int((out["labels"][0] != -100).sum()) == 7


def test_prompt_needs_one_placeholder(random_model):
    with pytest.raises(ValueError, match="exactly one <ImageHere>"):
        random_model.prompt_segments("no image here")


class Script(LogitsProcessor):
    """Forces the model to emit a fixed token sequence; counts decoding steps."""

    def __init__(self, ids):
        self.ids, self.calls = ids, 0

    def __call__(self, input_ids, scores):
        step = self.calls
        self.calls += 1
        forced = torch.full_like(scores, -1e9)
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0
        return forced


@pytest.mark.parametrize("text, split_hashes, expected", [
    ("red ###", False, "red"),          # "###" as the tokenizer writes it after a space
    ("red ###", True, "red"),           # ... and spelled "#", "#", "#"
    ("red.###", False, "red."),         # glued to the full stop: yet another tokenization
])
def test_generation_stops_at_hashes_in_any_tokenization(random_model, text, split_hashes, expected):
    m = random_model
    pieces = m.tokenizer.tokenize(text)
    if split_hashes:
        pieces = m.tokenizer.tokenize("red ") + ["#", "#", "#"]
    vocab = m.tokenizer.get_vocab()
    ids = [vocab[p] for p in pieces] + m.tokenizer(" blue blue blue", add_special_tokens=False)["input_ids"] * 7
    script = Script(ids)
    out = m.generate(["<ImageHere>"], feats=_feats(m, 1), logits_processor=LogitsProcessorList([script]))
    assert script.calls == len(pieces), "generation ran past the ### stop"
    assert out == [expected]


def test_the_two_stop_tokenizations_differ(random_model):
    tok = random_model.tokenizer
    assert tok.tokenize("red ###")[-1] != tok.tokenize("red.###")[-1]


def test_batched_generation_equals_one_by_one(random_model):
    m = random_model
    feats = _feats(m, b=3)
    prompts = ["<ImageHere> describe", "###Human: <Img><ImageHere></Img> What is it? ###Assistant: ",
               "<ImageHere>"]
    from minigpt4_min.model import GenerationSettings
    s = GenerationSettings(max_new_tokens=8)
    batched = m.generate(prompts, feats=feats, settings=s)
    single = [m.generate([p], feats=feats[i:i + 1], settings=s)[0] for i, p in enumerate(prompts)]
    assert batched == single


def test_kv_cache_gives_same_text(random_model):
    from minigpt4_min.model import GenerationSettings
    m = random_model
    s = GenerationSettings(max_new_tokens=10)
    feats = _feats(m, 1)
    with_cache = m.generate(["<ImageHere>"], feats=feats, settings=s)
    # transformers ignores use_cache=False with inputs_embeds, so the reference is a plain
    # greedy loop that recomputes the whole sequence for every new token
    emb, mask = m.build_generation_inputs(m.project(feats), ["<ImageHere>"])
    ids = []
    with torch.no_grad():
        for _ in range(s.max_new_tokens):
            nxt = int(m.llm(inputs_embeds=emb, attention_mask=mask).logits[0, -1].argmax())
            if nxt == m.tokenizer.eos_token_id:
                break
            ids.append(nxt)
            emb = torch.cat([emb, m.embed_ids([nxt])[None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
    assert with_cache == [m.clean_output(m.tokenizer.decode(ids, skip_special_tokens=True))]


def test_resume_continues_exactly(random_model, tmp_path):
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=2, max_steps=6, batch_size=4)
    m = random_model
    init = {k: v.clone() for k, v in m.llama_proj.state_dict().items()}
    Trainer(m, cfg, _batches(m)).train(progress=False)
    straight = m.llama_proj.weight.clone()

    m.llama_proj.load_state_dict(init)
    t = Trainer(m, cfg, _batches(m))
    t.train(max_steps=3, progress=False)
    t.save(tmp_path / "ck")
    m.llama_proj.weight.data.zero_()                          # the resumed run must not need memory
    t2 = Trainer(m, cfg, _batches(m))
    t2.resume(tmp_path / "ck")
    assert t2.step == 3
    t2.train(progress=False)
    assert torch.equal(straight, m.llama_proj.weight)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=100, max_steps=1100, batch_size=1)
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(50, cfg) == pytest.approx((1e-6 + 1e-4) / 2)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert lr_at(600, cfg) == pytest.approx(9e-5)
    assert lr_at(1100, cfg) == pytest.approx(8e-5)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(100, 1100))


def test_weight_decay_only_on_matrices(random_model):
    opt = build_optimizer(random_model.trainable_parameters(), TrainConfig(1, 1, 1, 1, 1, 1, weight_decay=0.05))
    wd = {p.ndim: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd == {2: 0.05, 1: 0.0}


def test_projection_checkpoints_round_trip_and_released_format(random_model, tmp_path):
    m = random_model
    m.save_projection(tmp_path / "proj.safetensors")
    w = m.llama_proj.weight.clone()
    # a released-style pickle: {"model": {...}} with other keys that must be ignored
    torch.save({"model": {"llama_proj.weight": w * 2, "llama_proj.bias": m.llama_proj.bias * 2,
                          "query_tokens": torch.zeros(1)}}, tmp_path / "pretrained_minigpt4.pth")
    m.load_projection(tmp_path / "pretrained_minigpt4.pth")
    assert torch.equal(m.llama_proj.weight, w * 2)
    m.load_projection(tmp_path / "proj.safetensors")
    assert torch.equal(m.llama_proj.weight, w)
    torch.save({"model": {"llama_proj.weight": torch.zeros(3, 3), "llama_proj.bias": torch.zeros(3)}},
               tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        m.load_projection(tmp_path / "wrong.pth")
    with pytest.raises(FileNotFoundError, match="nothere"):
        m.load_projection(tmp_path / "nothere.pth")


def test_same_seed_same_numbers():
    from conftest import _build_random_model
    from minigpt4_min.model import GenerationSettings
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=1, max_steps=3, batch_size=4, log_every=1)
    runs = []
    for _ in range(2):
        m = _build_random_model(seed=7)
        hist = Trainer(m, cfg, _batches(m)).train(progress=False)
        text = m.generate(["<ImageHere>"], feats=_feats(m, 1), settings=GenerationSettings(max_new_tokens=6))
        runs.append(([h["loss"] for h in hist], text, m.llama_proj.weight.clone()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])


def test_half_precision_llm_gets_image_tokens_in_its_dtype(random_model):
    m = random_model
    m.llm.to(torch.bfloat16)
    img = m.project(_feats(m, 1))
    assert img.dtype == torch.bfloat16 and m.llama_proj.weight.dtype == torch.float32
    out = m.build_inputs(img, ["red circle"], None)
    assert out["inputs_embeds"].dtype == torch.bfloat16
    assert torch.isfinite(m.llm(**out).loss)


def test_sampling_is_reproducible_with_a_seed_and_beams_run(random_model):
    from minigpt4_min.model import GenerationSettings
    m = random_model
    s = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95)
    a = m.generate(["<ImageHere>"], feats=_feats(m, 1), settings=s, generator_seed=3)
    b = m.generate(["<ImageHere>"], feats=_feats(m, 1), settings=s, generator_seed=3)
    others = {m.generate(["<ImageHere>"], feats=_feats(m, 1), settings=s, generator_seed=k)[0] for k in range(4, 9)}
    assert a == b and len(others | set(a)) > 1
    beam = GenerationSettings(max_new_tokens=8, num_beams=3)
    one = GenerationSettings(max_new_tokens=8, num_beams=1)
    assert m.generate(["<ImageHere>"], feats=_feats(m, 1), settings=one) == \
        m.generate(["<ImageHere>"], feats=_feats(m, 1), settings=GenerationSettings(max_new_tokens=8))
    assert isinstance(m.generate(["<ImageHere>"], feats=_feats(m, 1), settings=beam)[0], str)


def test_loss_on_answer_positions_only_equals_the_llms_own(random_model):
    """`loss` runs lm_head only where an answer token is predicted; it is the mean
    cross-entropy the LLM computes over all logits, and its gradient reaches llama_proj
    the same way (stage 1 and a prompted stage-2 batch)."""
    m = random_model
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, m.cfg.num_query_tokens, m.cfg.proj_in, generator=g)
    for batch in ({"feats": feats, "answers": ["a red circle", "two shapes", "a small blue star on the left"]},
                  {"feats": feats, "answers": ["The circle is red.###"] * 3, "end_sym": "###",
                   "prompts": ["###Human: <Img><ImageHere></Img> What color? ###Assistant: "] * 3}):
        ours = m.loss(batch)
        (g_ours,) = torch.autograd.grad(ours, m.llama_proj.weight)
        inputs = m.build_inputs(m.embed_images(feats=batch["feats"]), batch["answers"], batch.get("prompts"),
                                m.cfg.max_txt_len_stage1, batch.get("end_sym", "\n"))
        theirs = m.llm(**inputs).loss
        (g_theirs,) = torch.autograd.grad(theirs, m.llama_proj.weight)
        assert abs(ours.item() - theirs.item()) < 1e-5
        assert (g_ours - g_theirs).abs().max() < 1e-6
        assert g_ours.abs().max() > 0

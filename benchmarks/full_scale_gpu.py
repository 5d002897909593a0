"""Full-scale MiniGPT-4 on one GPU with RANDOM weights: memory and speed of the stage-1 and
stage-2 training steps and of generation, for each full preset (arXiv 2304.10592 §3-4).

    python benchmarks/full_scale_gpu.py --out full_scale.json vicuna7b vicuna13b llama2-7b

Real weights cannot be downloaded everywhere, but memory and time do not depend on the
values of the weights. So each preset is built at its real size straight on the GPU
(EVA ViT-g in fp16 + Q-Former, `llama_proj`, Vicuna/Llama-2 in fp16, the project's own
classes), then:
- stage 1: `Trainer` steps at the paper's batch (64 images of 224 px, short captions);
- stage 2: `Trainer` steps at the stage-2 batch (12 images, the `###Human: <Img>...`
  template, long answers cut to 160 tokens, end symbol `###`);
- generation: 300 new tokens for one image, greedy and 5 beams, with the KV cache
  (EOS suppressed by `min_new_tokens`, so every run does the same work).
It records the peak GPU memory (beside `memory.estimate`'s for the same sizes and the
sequence lengths the batches had), seconds per training step (steps 3 onwards: the first two
include CUDA's warm-up), new tokens/s, and checks that the frozen weights did not change
and that only `llama_proj` got gradients. The LLaMA tokenizer is stood in for by the
tiny scale's (its ids fit any 32,000-word vocabulary); the loss values mean nothing.
The first preset of a run also pays CUDA's one-off start-up in its generation timings.

`--cpu-smoke` runs the same code on the CPU with each preset shrunk to one layer in fp32
(the test suite does this).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch
import transformers

from minigpt4_min import memory
from minigpt4_min import shapesworld as sw
from minigpt4_min.config import DATA_DIR, STAGE1, STAGE2, ModelConfig, get_config
from minigpt4_min.encoder import VisualEncoder
from minigpt4_min.llm import freeze, load_tokenizer
from minigpt4_min.model import GenerationSettings, MiniGPT4
from minigpt4_min.sizes import llm_kwargs
from minigpt4_min.train import Trainer

PROMPT = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "


def shrink(cfg: ModelConfig) -> ModelConfig:
    """The same preset with one ViT layer, two Q-Former layers, a one-layer LLM, in fp32."""
    return dataclasses.replace(
        cfg, vit_dtype="float32", llm_dtype="float32",
        vision={**cfg.vision, "num_hidden_layers": 1},
        llm={**cfg.llm, "num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512,
             "num_attention_heads": 4},
        qformer=cfg.qformer and {**cfg.qformer, "num_hidden_layers": 2})


def build(cfg: ModelConfig, device: str) -> MiniGPT4:
    """MiniGPT-4 of `cfg`'s sizes with random weights, made directly on `device`."""
    with torch.device(device):
        enc = VisualEncoder(cfg).to_config_dtypes()
    tok = load_tokenizer(DATA_DIR / "tiny" / "llm")
    lc = transformers.LlamaConfig(**llm_kwargs(cfg), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        llm = transformers.LlamaForCausalLM._from_config(lc, dtype=getattr(torch, cfg.llm_dtype))
    model = MiniGPT4(cfg, freeze(enc), freeze(llm), tok)
    model.llama_proj.to(device)
    return model


def measure(cfg: ModelConfig, device: str = "cuda", steps: int = 8, batch1: int | None = None,
            batch2: int | None = None, new_tokens: int = 300) -> dict:
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_gib():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    model = build(cfg, device)
    sync()
    enc, llm = model.encoder, model.llm
    r = {"build_s": round(time.time() - t, 1),
         "params_total": sum(p.numel() for p in model.parameters()),
         "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
         "gib_weights": peak_gib()}
    watched = [next(enc.vision.parameters()), llm.model.layers[-1].mlp.down_proj.weight]
    before = [p.detach().flatten()[:1000].clone() for p in watched]
    S = cfg.image_size
    rng = random.Random(0)
    caps = [sw.caption(sw.sample_scene(rng), rng) for _ in range(512)]
    descs = [sw.describe(sw.sample_scene(rng)) * 3 for _ in range(512)]   # > 160 tokens: cut

    def timed(train_cfg, batch_fn):
        tr = Trainer(model, train_cfg.replace(max_steps=steps, log_every=1, warmup_steps=1), batch_fn)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.time()
        hist = tr.train(progress=False)
        sync()
        per = (hist[-1]["seconds"] - hist[1]["seconds"]) / (len(hist) - 2)
        return {"steps": steps, "s_per_step": round(per, 3), "loss_first": round(hist[0]["loss"], 3),
                "loss_last": round(hist[-1]["loss"], 3), "peak_gib": peak_gib(),
                "wall_s": round(time.time() - t0, 1)}

    b1 = batch1 or STAGE1["full"].batch_size
    b2 = batch2 or STAGE2["full"].batch_size

    def stage1_batch(step, g):
        return {"images": torch.randn(b1, 3, S, S, generator=g), "answers": caps[step * b1 % 448:][:b1]}

    def stage2_batch(step, g):
        return {"images": torch.randn(b2, 3, S, S, generator=g), "answers": descs[step * b2 % 448:][:b2],
                "prompts": [PROMPT] * b2, "max_txt_len": cfg.max_txt_len_stage2, "end_sym": cfg.end_sym}

    def lengths(answers, max_len, end_sym, prompt=None):
        """prompt_tokens, text_tokens (the longest answer of any step's batch) for memory.py"""
        before, after = model.prompt_segments(prompt)
        return {"prompt_tokens": len(before) + len(after),
                "text_tokens": max(len(model.answer_ids(a, max_len, end_sym)) for a in answers)}

    def seen(pool, b):
        return [a for step in range(steps) for a in pool[step * b % 448:][:b]]

    for stage, tc, fn, b, L in (
            (1, STAGE1["full"], stage1_batch, b1, lengths(seen(caps, b1), cfg.max_txt_len_stage1, "\n")),
            (2, STAGE2["full"], stage2_batch, b2, lengths(seen(descs, b2), cfg.max_txt_len_stage2, cfg.end_sym,
                                                          PROMPT))):
        est = memory.estimate(cfg, stage, b, **L).peak_gib
        r[f"stage{stage}"] = dict(timed(tc, fn), batch=b, **L, estimate_gib=est)
    r["frozen_unchanged"] = all(torch.equal(v, p.detach().flatten()[:1000]) for v, p in zip(before, watched))
    r["proj_grad_only"] = all(p.grad is None for n, p in model.named_parameters()
                              if not n.startswith("llama_proj"))
    model.eval()
    img = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    for beams in (1, 5):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        with torch.no_grad():
            emb, mask = model.build_generation_inputs(model.embed_images(img), [PROMPT])
            out = llm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, num_beams=beams, do_sample=False,
                               use_cache=True, pad_token_id=model.tokenizer.pad_token_id)
        sync()
        s = time.time() - t0
        ctx = emb.shape[1] + out.shape[1]
        r[f"generate_beams{beams}"] = {"new_tokens": out.shape[1], "s": round(s, 2),
                                       "tok_per_s": round(out.shape[1] / s, 1), "peak_gib": peak_gib(),
                                       "context_tokens": ctx, "estimate_gib": memory.estimate(
                                           cfg, "chat", beams=beams, context_tokens=ctx,
                                           new_tokens=out.shape[1]).peak_gib}
    r["generate_api_chars"] = len(model.generate([PROMPT], images=img,
                                                 settings=GenerationSettings(max_new_tokens=40))[0])
    peaks = [r["stage1"]["peak_gib"], r["stage2"]["peak_gib"], r["generate_beams1"]["peak_gib"],
             r["generate_beams5"]["peak_gib"], peak_gib()]
    r["peak_gib_all"] = max(peaks) if cuda else None
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("presets", nargs="+", help="vicuna7b, vicuna13b, llama2-7b")
    ap.add_argument("--out", help="write the results here (JSON)")
    ap.add_argument("--cpu-smoke", action="store_true", help="shrunken presets on the CPU")
    a = ap.parse_args(argv)
    device = "cpu" if a.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (or --cpu-smoke)")
    res = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    for name in a.presets:
        cfg = get_config(name)
        r = (measure(shrink(cfg), "cpu", steps=3, batch1=2, batch2=2, new_tokens=5) if a.cpu_smoke
             else measure(cfg, device))
        res[name] = r
        print(name, json.dumps(r), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()

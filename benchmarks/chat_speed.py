"""Chat speed at tiny scale on a CPU: time to first token and new tokens/s, with and
without the KV cache (the demo of MiniGPT-4, arXiv 2304.10592 §4, answers with the cache).

    python benchmarks/chat_speed.py [--checkpoint PROJ] [--tokens 100] [--repeats 5] [--out speed.json]

Each run starts a fresh conversation (image + "Describe this image in detail.") and
generates exactly `--tokens` new tokens greedily (EOS suppressed, no stop strings), so
both settings do the same work:
- use_cache=True: `Chat.answer`, i.e. transformers' `generate` with its KV cache;
- use_cache=False: a plain greedy loop that re-runs the whole sequence (prompt embeddings
  + the tokens so far) for every new token. transformers' `generate(inputs_embeds=...)`
  ignores `use_cache=False` (it forces the cache for decoder-only models fed embeddings),
  so this path cannot go through `generate`.
A streamer timestamps every new token: time to first token (TTFT) includes the prompt's
forward pass; tokens/s counts all new tokens over the whole answer; decode tokens/s the
tokens after the first over the time after the first. Medians over the repeats (after
one warm-up run).

Run it on an otherwise idle machine: with 2 threads on 2 cores, any other busy process
makes every OpenMP barrier wait (a forward pass measured 9 ms with 1 thread and 580 ms
with 2 while one core was busy). The load average is printed and saved for that reason.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from minigpt4_min import shapesworld as sw
from minigpt4_min.config import get_config
from minigpt4_min.conversation import Chat
from minigpt4_min.model import GenerationSettings, MiniGPT4

QUESTION = "Describe this image in detail."


class TokenClock(BaseStreamer):
    """Records each new token and the time it arrived."""

    def __init__(self):
        self.times: list[float] = []
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel():                   # the (empty) prompt ids come first with inputs_embeds
            self.times.append(time.perf_counter())
            self.ids += value.flatten().tolist()

    def end(self) -> None:
        pass


@torch.no_grad()
def greedy_without_cache(chat: Chat, tokens: int, clock: TokenClock) -> None:
    """Greedy decoding that recomputes the whole sequence at every step (no KV cache)."""
    model = chat.model
    chat.conv.append_message(chat.conv.roles[1], None)                # "...###Assistant: "
    emb, _ = chat.context(tokens)                                     # (1, T, D)
    eos = model.tokenizer.eos_token_id
    for _ in range(tokens):
        logits = model.llm(inputs_embeds=emb, use_cache=False).logits[0, -1]   # (V,)
        logits[eos] = float("-inf")                                   # as min_new_tokens does
        nxt = int(logits.argmax())
        clock.put(torch.tensor([nxt]))
        emb = torch.cat([emb, model.embed_ids([nxt])[None]], dim=1)   # (1, T+1, D)


def one_run(chat: Chat, image, tokens: int, use_cache: bool) -> tuple[dict, list[int]]:
    chat.reset()
    chat.upload_img(image)
    chat.ask(QUESTION)
    clock = TokenClock()
    t0 = time.perf_counter()
    if use_cache:
        chat.answer(GenerationSettings(max_new_tokens=tokens), streamer=clock,
                    min_new_tokens=tokens, min_length=None, stop_strings=None)
    else:
        greedy_without_cache(chat, tokens, clock)
    t1 = time.perf_counter()
    n = len(clock.times)
    return {"new_tokens": n, "ttft_s": clock.times[0] - t0, "total_s": t1 - t0,
            "tokens_per_s": n / (t1 - t0),
            "decode_tokens_per_s": (n - 1) / (clock.times[-1] - clock.times[0]) if n > 1 else float("nan"),
            }, clock.ids


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="trained projection (default: random projection)")
    ap.add_argument("--tokens", type=int, default=100, help="new tokens per answer")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = MiniGPT4.from_config(get_config("tiny"), projection=a.checkpoint)
    chat = Chat(model)
    image = sw.render(sw.split("test", 1)[0])
    chat.upload_img(image)
    chat.ask(QUESTION)
    chat.conv.append_message(chat.conv.roles[1], None)
    prompt_len = chat.context(a.tokens)[0].shape[1]

    results, answers = {}, {}
    for use_cache in (True, False):
        one_run(chat, image, a.tokens, use_cache)                          # warm-up
        runs = []
        for _ in range(a.repeats):
            r, answers[use_cache] = one_run(chat, image, a.tokens, use_cache)
            runs.append(r)
        assert all(r["new_tokens"] == a.tokens for r in runs), [r["new_tokens"] for r in runs]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "new_tokens"}
        results[f"use_cache={use_cache}"] = {"new_tokens": a.tokens, **med, "runs": runs}
    same = answers[True] == answers[False]

    load = os.getloadavg()[0]
    print(f"tiny MiniGPT-4, CPU, {a.threads} threads (load average {load:.1f} on {os.cpu_count()} "
          f"cores), prompt {prompt_len} positions, {a.tokens} new tokens, median of {a.repeats}")
    print(f"{'':16} {'TTFT ms':>9} {'total s':>8} {'tok/s':>7} {'decode tok/s':>13}")
    for name, r in results.items():
        print(f"{name:16} {1000 * r['ttft_s']:9.1f} {r['total_s']:8.2f} {r['tokens_per_s']:7.1f} "
              f"{r['decode_tokens_per_s']:13.1f}")
    speedup = results["use_cache=True"]["tokens_per_s"] / results["use_cache=False"]["tokens_per_s"]
    print(f"KV cache speed-up: {speedup:.2f}x; same tokens with and without the cache: {same}")
    report = {"scale": "tiny", "device": "cpu", "threads": a.threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_1min": load, "checkpoint": a.checkpoint,
              "prompt_positions": prompt_len, "repeats": a.repeats, "results": results,
              "cache_speedup": speedup, "same_tokens": same}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""Command line:

    python -m minigpt4_min series [--out DIR] [--ci] [--only 00 01]
    python -m minigpt4_min series --gpu [--out runs/gpu] [--plumbing [--plumbing-dir DIR]] [--preflight]
    python -m minigpt4_min images [--out DIR] [--n N] [--size PX]
    python -m minigpt4_min shards --out DIR [--n N] [--shard-size K] [--split train]
    [torchrun --standalone --nproc_per_node N -m] minigpt4_min train --stage 1|2 --out DIR
        (--shards PATTERN... | --features DIR | --align-dir DIR) [--steps N] [--batch B]
        [--accum-steps K] [--lr LR] [--projection CKPT] [--resume CKPT] [--dry-run]
    python -m minigpt4_min chat --image PATH [--checkpoint PROJ] [--scale tiny]
        [--max-new-tokens N] [--temperature T] [--num-beams B] [--low-resource]

`chat` is the paper's demo in a terminal: one question per line on stdin, answers
streamed to stdout, notes on stderr (before the first question if the projection is
random, before an answer if the history had to be cut). `train` runs the notebooks'
trainer (stage1 / stage2 / train modules) on one process or, under torchrun, on every
rank with DistributedDataParallel (`distributed.py`). Chat commands:

    /image PATH   add another image to the conversation
    /history      show the conversation so far
    /reset        start over (with the last image)
    /quit         exit (so does the end of input)
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="python -m minigpt4_min", description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("series", help="run the notebook series end-to-end with papermill")
    s.add_argument("--out", help="output folder (notebooks, metrics); default runs/series, with --gpu runs/gpu")
    s.add_argument("--ci", action="store_true", help="use the small parameters of notebooks/ci_params")
    from .gpu_profile import add_arguments
    add_arguments(s)                              # --gpu, --plumbing, --plumbing-dir, --preflight
    s.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 00 01")
    s.add_argument("--kernel", default="python3")
    i = sub.add_parser("images", help="write held-out ShapesWorld test images (PNG) to chat about")
    i.add_argument("--out", default="runs/images", help="folder for test_000.png, ... and their truth")
    i.add_argument("--n", type=int, default=4, help="how many images")
    i.add_argument("--size", type=int, default=64, help="pixels per side (the tiny encoder reads 64)")
    c = sub.add_parser("chat", help="chat about an image in the terminal (the paper's demo)",
                       description=__doc__, formatter_class=raw)
    c.add_argument("--image", required=True, help="image file to talk about")
    c.add_argument("--checkpoint", help="trained projection (.safetensors, trainer folder or .pth)")
    c.add_argument("--scale", default="tiny", help="model preset: tiny, vicuna7b, vicuna13b, llama2-7b")
    c.add_argument("--template", help="conversation template (default: llama2 at llama2-*, else vicuna0)")
    c.add_argument("--max-new-tokens", type=int, help="default: 120 at tiny scale, else 300")
    c.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature with top-p 0.9 (the demo's default 1.0); 0 = greedy")
    c.add_argument("--num-beams", type=int, default=1)
    c.add_argument("--max-length", type=int, help="context length (default: min(2000, the scale's))")
    c.add_argument("--seed", type=int, help="seed for sampling")
    c.add_argument("--low-resource", action="store_true", help="the official demo's low_resource mode: "
                   "the LLM in 8-bit (bitsandbytes, CUDA only: pip install -e '.[gpu]'), the ViT on the CPU")
    h = sub.add_parser("shards", help="write ShapesWorld image-caption webdataset shards (img2dataset's layout)")
    h.add_argument("--out", required=True, help="folder for SPLIT-000000.tar, ...")
    h.add_argument("--n", type=int, default=512, help="how many image-caption pairs")
    h.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    h.add_argument("--split", default="train", help="ShapesWorld split: train, val or test")
    h.add_argument("--size", type=int, default=64, help="pixels per side (the tiny encoder reads 64)")
    _train_parser(sub, raw)
    a = ap.parse_args(argv)
    if a.cmd == "series":
        from . import gpu_profile
        from .series import run_series
        try:
            if a.gpu or a.plumbing or a.preflight or a.plumbing_dir:
                gpu_profile.run_args(a)
            else:
                run_series(a.out or "runs/series", ci=a.ci, only=a.only, kernel=a.kernel)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            return _error(e)
    elif a.cmd == "images":
        return images(a.out, a.n, a.size)
    elif a.cmd == "chat":
        return chat(a)
    elif a.cmd == "shards":
        return shards(a.out, a.n, a.shard_size, a.split, a.size)
    elif a.cmd == "train":
        return train(a)
    return 0


def images(out: str, n: int, size: int) -> int:
    """Write held-out test scenes 0..n-1 as PNGs, with what is in each (truth.txt)."""
    from . import shapesworld as sw

    if n < 1 or size < 8:
        return _error(f"--n must be >= 1 and --size >= 8, got {n} and {size}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n):
        path = folder / f"test_{k:03d}.png"
        sw.test_image(k, size).save(path)
        lines.append(f"{path.name}: {sw.describe(sw.scene_at('test', k))}")
    (folder / "truth.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {n} images and truth.txt to {folder}")
    return 0


def shards(out: str, n: int, shard_size: int, split: str, size: int) -> int:
    """Render `n` ShapesWorld scenes with noisy captions as webdataset shards (`stage1`)."""
    from . import shapesworld as sw
    from .stage1 import write_shapesworld_shards

    if n < 1 or shard_size < 1 or size < 8 or split not in sw.SPLIT_SEEDS:
        return _error(f"--n and --shard-size must be >= 1, --size >= 8 and --split one of "
                      f"{list(sw.SPLIT_SEEDS)}; got {n}, {shard_size}, {size}, {split!r}")
    paths = write_shapesworld_shards(out, split, n, size, shard_size)
    print(f"wrote {n} samples in {len(paths)} shards: {Path(out) / split}-{{000000..{len(paths) - 1:06d}}}.tar")
    return 0


# ------------------------------------------------------------------ train
def _train_parser(sub, raw) -> None:
    t = sub.add_parser("train", formatter_class=raw,
                       help="train llama_proj (stage 1 or 2); under torchrun with DistributedDataParallel",
                       description="Train llama_proj with the notebooks' trainer. Under `torchrun "
                       "--nproc_per_node N` every rank holds the frozen model, only llama_proj's "
                       "gradients are all-reduced, global batch = --batch x N x --accum-steps, rank 0 writes "
                       "OUT/step_*/ and OUT/last/. Defaults: the stage's preset of --scale (config.py).")
    t.add_argument("--stage", type=int, choices=(1, 2), required=True)
    t.add_argument("--out", required=True, help="checkpoint folder (rank 0 writes OUT/step_*/, OUT/last/)")
    t.add_argument("--scale", default="tiny", help="model preset: tiny, vicuna7b, vicuna13b, llama2-7b")
    t.add_argument("--encoder-path", help="frozen encoder folder (default: the preset's)")
    t.add_argument("--llm-path", help="HF-format LLM folder (default: the preset's)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", help="stage 1: webdataset shards streamed through the "
                     "frozen encoder, split across ranks and loader workers: brace patterns, files, folders")
    src.add_argument("--features", help="stage 1: a feature cache folder of stage1.encode_shards "
                     "(RUN_DIR/cache/features-...); each rank takes its rows of the seeded global batch")
    src.add_argument("--align-dir", help="stage 2: a cc_sbu_align folder (filter_cap.json + image/)")
    t.add_argument("--projection", help="start llama_proj from this checkpoint (stage 2: stage 1's)")
    t.add_argument("--resume", help="a checkpoint folder of this trainer (OUT/step_*/ or OUT/last/) to continue")
    t.add_argument("--steps", type=int, help="total optimizer steps (default: the preset's)")
    t.add_argument("--batch", type=int, help="(micro-)batch per rank (default: the preset's; paper stage 1: 64)")
    t.add_argument("--accum-steps", type=int, help="micro-batches accumulated per step (default 1): "
                   "global batch = --batch x ranks x --accum-steps")
    t.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the frozen LLM's activations in backward (less memory, ~1/3 more compute)")
    t.add_argument("--lr", type=float, help="peak learning rate (min lr keeps the preset's ratio)")
    t.add_argument("--min-lr", type=float)
    t.add_argument("--warmup-steps", type=int, help="default: the preset's, scaled with --steps")
    t.add_argument("--ckpt-every", type=int, help="also write OUT/step_NNNNNN/ every K steps")
    t.add_argument("--log-every", type=int)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (--shards)")
    t.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo")
    t.add_argument("--dry-run", action="store_true", help="print the plan (schedule, global batch) as JSON and exit")


def _train_config(a):
    """The stage's preset for --scale with the command line's overrides; ValueError if inconsistent."""
    from .config import train_config

    base = train_config(a.stage, a.scale)
    kw = {"seed": a.seed}
    if a.steps is not None:
        kw["max_steps"] = a.steps
        kw["warmup_steps"] = max(1, round(base.warmup_steps * a.steps / base.max_steps))
    if a.warmup_steps is not None:
        kw["warmup_steps"] = a.warmup_steps
    if a.batch is not None:
        kw["batch_size"] = a.batch
    if a.accum_steps is not None:
        kw["accum_steps"] = a.accum_steps
    if a.grad_checkpointing:
        kw["grad_checkpointing"] = True
    if a.lr is not None:
        kw.update(lr=a.lr, min_lr=a.lr * base.min_lr / base.lr, warmup_lr=min(base.warmup_lr, a.lr))
    if a.min_lr is not None:
        kw["min_lr"] = a.min_lr
    for k in ("ckpt_every", "log_every"):
        if getattr(a, k) is not None:
            kw[k] = getattr(a, k)
    tc = base.replace(**kw)
    if tc.max_steps < 1 or tc.batch_size < 1 or tc.warmup_steps < 0:
        raise ValueError(f"--steps and --batch must be >= 1 and --warmup-steps >= 0; got "
                         f"{tc.max_steps}, {tc.batch_size}, {tc.warmup_steps}")
    if not 0 < tc.min_lr <= tc.lr:
        raise ValueError(f"expected 0 < min lr <= lr, got min lr {tc.min_lr:g} and lr {tc.lr:g}")
    return tc


def train(a: argparse.Namespace) -> int:
    """`train`: check the arguments, then train on this process (and its torchrun peers)."""
    import json
    import os

    if (a.stage == 2) != (a.align_dir is not None):
        return _error(f"stage {a.stage} trains on " + ("--align-dir (a cc_sbu_align folder)" if a.stage == 2
                                                       else "--shards or --features, not --align-dir"))
    for flag, path, inner in (("--features", a.features, ""), ("--align-dir", a.align_dir, ""),
                              ("--resume", a.resume, "model.safetensors")):
        if path and not a.dry_run and not (Path(path) / inner).exists():
            return _error(f"{flag} {path}: no such {'checkpoint folder (no model.safetensors)' if inner else 'folder'}")
    try:
        tc = _train_config(a)
    except ValueError as e:
        return _error(e)
    world, accum = int(os.environ.get("WORLD_SIZE", "1")), tc.accum_steps
    if a.dry_run:
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps({"stage": a.stage, "scale": a.scale, "world_size": world,
                              "batch_per_rank": tc.batch_size, "accum_steps": accum,
                              "global_batch": tc.batch_size * world * accum, "steps": tc.max_steps,
                              "warmup_steps": tc.warmup_steps, "lr": tc.lr, "min_lr": tc.min_lr,
                              "warmup_lr": tc.warmup_lr, "weight_decay": tc.weight_decay,
                              "grad_checkpointing": tc.grad_checkpointing,
                              "ckpt_every": tc.ckpt_every, "shards": a.shards, "features": a.features,
                              "align_dir": a.align_dir, "out": a.out}, indent=1))
        return 0
    from . import distributed

    try:
        with distributed.process_group(a.backend) as d:
            run_training(a, tc, d)
    except (FileNotFoundError, ValueError) as e:
        return _error(e)
    return 0


def run_training(a: argparse.Namespace, tc, d):
    """Build the model and the batches of --stage on this rank, train, return the trainer."""
    import torch

    from . import distributed as D
    from . import stage1, stage2
    from .config import get_config
    from .data import shard_urls
    from .model import MiniGPT4

    torch.manual_seed(a.seed)
    paths = {k: v for k, v in (("encoder_path", a.encoder_path), ("llm_path", a.llm_path)) if v}
    cfg = get_config(a.scale, **paths)
    B, W = tc.batch_size, d.world_size
    if d.is_main and cfg.name != "tiny":        # before gigabytes load: will it fit? (memory.py)
        from .memory import describe
        print("estimated memory per GPU: " + describe(cfg, a.stage, B, grad_checkpointing=tc.grad_checkpointing,
                                                      encoder_in_step=bool(a.shards)), flush=True)
    urls = [u for p in a.shards for u in shard_urls(p)] if a.shards else []
    if a.shards and len(urls) < W * max(a.workers, 1):
        raise ValueError(f"{len(urls)} shard(s) cannot feed {W} rank(s) x {max(a.workers, 1)} loader "
                         f"worker(s): expected at least {W * max(a.workers, 1)} shards")
    model = MiniGPT4.from_config(cfg, projection=a.projection).to(d.device)
    if a.stage == 2:
        fs = stage2.load_align_set(model, a.align_dir)
        get_batch = D.rank_slice(stage2.instruction_batches(
            fs, B * W, cfg.max_txt_len_stage2, cfg.prompt_template, cfg.end_sym), d, B)
        source = f"{len(fs)} pairs of {a.align_dir}"
    elif a.features:
        fs = stage1.load_features(a.features)
        get_batch = D.rank_slice(stage1.caption_batches(fs, B * W, cfg.max_txt_len_stage1), d, B)
        source = f"{len(fs)} cached features of {a.features}"
    else:
        get_batch, _ = stage1.shard_batches(model, urls, B, cfg.max_txt_len_stage1, seed=a.seed, workers=a.workers)
        source = f"{len(urls)} shards streamed through the frozen encoder"
    net = D.DistributedProjection(model, d) if d.grouped else model
    trainer = D.DistributedTrainer(net, tc, get_batch, a.out, d)
    if a.resume:
        trainer.resume(a.resume)
    accum = tc.accum_steps
    if d.is_main:
        print(f"stage {a.stage} on {W} {d.device.type} rank{'s' if W > 1 else ''}: global batch "
              f"{B} per rank x {W}{f' x {accum} micro-batches' if accum > 1 else ''} = {B * W * accum}; "
              f"steps {trainer.step} -> {tc.max_steps}; data: {source}", flush=True)
    history = trainer.train(progress=d.is_main)
    if d.is_main and history:
        print(f"loss {history[0]['loss']:.4f} (step {history[0]['step']}) -> {history[-1]['loss']:.4f} "
              f"(step {history[-1]['step']}); checkpoint: {Path(a.out) / 'last'}", flush=True)
    return trainer


def _error(msg: object) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def chat(a: argparse.Namespace) -> int:
    """The terminal chat loop; returns the exit code (2 for a missing / bad image or model)."""
    if not Path(a.image).is_file():             # before the slow imports
        return _error(f"{a.image}: no such image file")
    import torch
    import transformers

    from .config import get_config
    from .conversation import Chat, default_settings, start_notices
    from .data import BadImageError, load_image
    from .model import MiniGPT4

    try:
        load_image(a.image)                     # fail fast, before loading the model
    except BadImageError as e:
        return _error(e)
    transformers.utils.logging.disable_progress_bar()
    try:
        cfg = get_config(a.scale, low_resource=a.low_resource)
        if cfg.name != "tiny":                  # before gigabytes load: will it fit? (memory.py)
            from .memory import describe
            _note(["estimated memory: " + describe(cfg, "chat", beams=a.num_beams, context_tokens=a.max_length,
                                                   new_tokens=a.max_new_tokens or 300)])
        model = MiniGPT4.from_config(cfg, projection=a.checkpoint)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return _error(e)
    s = default_settings(model)
    s.max_new_tokens = a.max_new_tokens or s.max_new_tokens
    s.num_beams, s.do_sample = a.num_beams, a.temperature > 0
    s.temperature = a.temperature if a.temperature > 0 else s.temperature
    template = a.template or ("llama2" if a.scale.startswith("llama2") else "vicuna0")
    try:
        bot = Chat(model, template=template, settings=s, max_length=a.max_length)
        bot.upload_img(a.image)
    except (BadImageError, FileNotFoundError, ValueError) as e:
        return _error(e)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    _note(start_notices(model))
    with warnings.catch_warnings():                 # a warning is one plain line
        warnings.showwarning = lambda msg, *_, **__: print(f"warning: {msg}", file=sys.stderr)
        return _loop(bot, a.image)


def _note(notes: list[str]) -> None:
    for n in notes:
        print(f"note: {n}", file=sys.stderr, flush=True)


def _loop(bot, image: str) -> int:
    """Read questions and commands from stdin until /quit or end of input."""
    tty, images = sys.stdin.isatty(), [image]     # `image`: the last one; `images`: the chat's, in order
    while True:
        if tty:
            print("Human: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":                      # EOF or /quit
            return 0
        line = line.strip()
        if line == "/reset":                                         # start over, same image
            bot.reset()
            images = [image] if _upload(bot, image, "conversation reset") else []
        elif line == "/history":
            _history(bot, images)
        elif line.startswith("/image"):                              # add another image
            path = line[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=sys.stderr, flush=True)
            elif _upload(bot, path, "image added"):
                image = path
                images.append(path)
        elif line:
            bot.ask(line)
            _answer(bot)


def _answer(bot) -> None:
    """Stream one answer to stdout. Warnings never land inside it: those raised while the
    prompt is built (e.g. the history cut) go to stderr before "Assistant: ", any raised
    while generating after the answer's line; each once."""
    from .conversation import Notices

    with Notices() as notes:
        pieces = bot.stream_answer()                                 # builds (and cuts) the prompt
        _note(notes.take())
        print("Assistant: ", end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print(flush=True)
        _note(notes.take())


def _history(bot, images: list[str]) -> None:
    """Print the conversation so far, each image as <image: PATH>."""
    from .conversation import render_messages

    rows = render_messages(bot.conv, lambda k: f"<image: {images[k]}>")
    for who, body in rows:
        print(f"{who}: {body}", flush=True)
    if not rows:
        print("(no messages yet)", flush=True)


def _upload(bot, path: str, done: str) -> bool:
    from .data import BadImageError

    try:
        bot.upload_img(path)
    except (BadImageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return False
    print(f"({done}: {path})", flush=True)
    return True

if __name__ == "__main__":
    sys.exit(main())

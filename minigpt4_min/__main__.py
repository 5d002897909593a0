"""Command line:

    python -m minigpt4_min series [--out DIR] [--ci] [--only 00 01]
    python -m minigpt4_min images [--out DIR] [--n N] [--size PX]
    python -m minigpt4_min chat --image PATH [--checkpoint PROJ] [--scale tiny]
        [--max-new-tokens N] [--temperature T] [--num-beams B]

`chat` is the paper's demo in a terminal: one question per line on stdin, answers
streamed to stdout, notes on stderr (before the first question if the projection is
random, before an answer if the history had to be cut). Commands:

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
    s.add_argument("--out", default="runs/series", help="output folder (notebooks, metrics)")
    s.add_argument("--ci", action="store_true", help="use the small parameters of notebooks/ci_params")
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
    a = ap.parse_args(argv)
    if a.cmd == "series":
        from .series import run_series
        try:
            run_series(a.out, ci=a.ci, only=a.only, kernel=a.kernel)
        except RuntimeError as e:
            return _error(e)
    elif a.cmd == "images":
        return images(a.out, a.n, a.size)
    elif a.cmd == "chat":
        return chat(a)
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
        model = MiniGPT4.from_config(get_config(a.scale), projection=a.checkpoint)
    except (FileNotFoundError, ValueError) as e:
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

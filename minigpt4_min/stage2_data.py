"""Stage-2 data: the stage-1 model describes images in detail, continuing short answers (paper §3.2).

The paper builds its small, clean instruction set in four steps; this module does the
first two and ties the rest together:

1. describe: the stage-1 model answers `stage1.DETAIL_PROMPT` for each image (greedy);
2. continue: if the answer has <= `min_tokens` tokens (80 in the paper), the prompt, the
   answer and `###Human: Continue ###Assistant: ` are fed back and the continuation is
   appended — longer, but often repetitive, which is what refinement then fixes;
3. refine (`refine.py`): a chat model, or offline rules, fix each paragraph;
4. review (`review.py`): a human (or, at tiny scale, ground truth) keeps the good pairs;
   `export` writes them as a `cc_sbu_align` folder (`data.write_cc_sbu_align`).

Generation is resumable: every finished batch is appended to a JSONL file keyed by the
projection weights, the prompt and the settings, so re-running skips what is done.

Real images (notebook 03's `image_dir`): `folder_features` reads a folder of .jpg / .png
(sorted by name; unreadable files skipped, warned about and named) through the eval
transform and the frozen encoder; with no ground truth, `review.auto_review_text` and
`text_stats` judge the text alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import IMAGE_EXTS, BadImageError, BadSampleWarning, load_image, write_cc_sbu_align
from .evaluate import failure_rates, repetition
from .model import GenerationSettings, MiniGPT4
from .refine import read_cache
from .stage1 import DETAIL_PROMPT, FeatureSet, encode_images

CONTINUE_PROMPT = "###Human: Continue ###Assistant: "


def generation_key(model: MiniGPT4, prompt: str, min_tokens: int, settings: GenerationSettings) -> str:
    """What decides a generation: the trained projection, the prompt, the rule and settings."""
    h = hashlib.sha256()
    for _, p in model.trainable_parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps([prompt, CONTINUE_PROMPT, min_tokens, vars(settings)], sort_keys=True).encode())
    return h.hexdigest()[:16]


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append records and force them to disk, so a crash loses nothing already written."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def describe_with_continuation(model: MiniGPT4, fs: FeatureSet, cache_path: str | Path,
                               min_tokens: int = 80, max_new_tokens: int = 120,
                               prompt: str = DETAIL_PROMPT, batch_size: int = 100,
                               progress: bool = True) -> list[dict]:
    """One record per image of `fs`, in order: {image_id, first, continuation, text, continued,
    first_tokens}. Answers of <= `min_tokens` tokens get one continuation (paper: 80)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    key = generation_key(model, prompt, min_tokens, settings)
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    item_key = [f"{key}-{k}" for k in fs.keys]
    done = read_cache(cache_path, fields=("key", "image_id", "text"))
    todo = [i for i, k in enumerate(item_key) if k not in done]
    for start in tqdm(range(0, len(todo), batch_size), desc="describe + continue", disable=not progress):
        idx = todo[start:start + batch_size]
        feats = fs.feats[idx]                                           # (b, Q, Hq)
        img = model.project(feats)                                      # (b, Q, D)
        first = model.generate([prompt] * len(idx), img_embeds=img, settings=settings)
        n_tok = [len(model.tokenize(t)) for t in first]
        short = [j for j, n in enumerate(n_tok) if n <= min_tokens]
        cont = [""] * len(idx)
        if short:
            prompts = [prompt + first[j] + CONTINUE_PROMPT for j in short]
            for j, c in zip(short, model.generate(prompts, img_embeds=img[short], settings=settings)):
                cont[j] = c
        recs = [{"key": item_key[i], "image_id": fs.keys[i], "first": first[j], "continuation": cont[j],
                 "text": (first[j] + " " + cont[j]).strip(), "continued": j in short,
                 "first_tokens": n_tok[j]} for j, i in enumerate(idx)]
        append_jsonl(cache_path, recs)
        done.update({r["key"]: r for r in recs})
    return [done[k] for k in item_key]


def export(folder: str | Path, kept: list[tuple[str, str]],
           load_image: Callable[[str], Image.Image]) -> Path:
    """Write the kept (image_id, caption) pairs in MiniGPT-4's stage-2 format:
    `filter_cap.json` = {"annotations": [{"image_id", "caption"}]} + `image/{image_id}.jpg`."""
    return write_cc_sbu_align(folder, ((i, load_image(i), c) for i, c in kept))


# ------------------------------------------------------------------ real images, no ground truth
def image_files(folder: str | Path) -> dict[str, Path]:
    """{image_id (the file's stem): path} of the image files (data.IMAGE_EXTS: .jpg, .jpeg, .png,
    .webp) directly in `folder`, sorted by name. Errors name the folder (missing, no images) or
    the two files of one id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image_dir {folder}: no such folder (expected a folder of .jpg / .png images)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTS:
            if path.stem in files:
                raise ValueError(f"image_dir {folder}: {files[path.stem].name} and {path.name} would both be "
                                 f"image_id {path.stem!r} in cc_sbu_align; rename one")
            files[path.stem] = path
    if not files:
        raise FileNotFoundError(f"image_dir {folder}: no {' / '.join('.' + e for e in IMAGE_EXTS)} files in it "
                                "(sub-folders are not searched: point image_dir at the folder of the images)")
    return files


def folder_features(model: MiniGPT4, folder: str | Path, n: int, batch_size: int = 100
                    ) -> tuple[FeatureSet, dict[str, Path], list[str]]:
    """The first `n` readable images of `folder` (`image_files` order) through the eval transform
    and the frozen encoder, `batch_size` at a time (never all images in memory). Returns the
    features (keys: image ids, no scenes), {image_id: path} of those images, and the reasons of
    the files skipped as unreadable (each also a `BadSampleWarning` naming the file)."""
    if n < 1:
        raise ValueError(f"n_images must be >= 1, got {n}")
    paths, skipped, parts, kept, batch = image_files(folder), [], [], {}, []

    def flush():
        if batch:
            parts.append(encode_images(model, [im for _, im in batch], [k for k, _ in batch]))
            batch.clear()

    for image_id, path in paths.items():
        if len(kept) == n:
            break
        try:
            batch.append((image_id, load_image(path)))
        except BadImageError as e:
            skipped.append(f"{e}; skipped")
            warnings.warn(skipped[-1], BadSampleWarning, stacklevel=2)
            continue
        kept[image_id] = path
        if len(batch) == batch_size:
            flush()
    flush()
    if not parts:
        raise ValueError(f"image_dir {folder}: none of its {len(paths)} image files is readable: {skipped[:3]}")
    keys = [k for f in parts for k in f.keys]
    return FeatureSet(torch.cat([f.feats for f in parts]), [""] * len(keys), [None] * len(keys), keys), kept, skipped


def text_stats(texts: list[str]) -> dict[str, float]:
    """What can be measured of descriptions without ground truth: repetition (word 3-grams,
    sentences), the failure rate (evaluate.failure_modes) and the mean word count."""
    words = [len(re.findall(r"[a-z]+", t.lower())) for t in texts]       # as evaluate.caption_metrics counts
    return {**repetition(texts), "failure_rate": failure_rates(texts)["any"] if texts else 0.0,
            "mean_words": sum(words) / max(len(words), 1)}

"""Stage 1: align the image tokens with the LLM on image-caption pairs (paper §3.1).

The sequence is `[BOS][image][caption + "\\n"]` with no instruction; only `llama_proj`
learns. At full scale the pairs stream from LAION / CC / SBU webdataset shards; at the
tiny scale from ShapesWorld shards written in the same format and read by the same
reader. Because the encoder is frozen and the tiny eval transform is deterministic, its
outputs are computed once and cached (`FeatureSet`): stage 1 then costs only the LLM.
Real shards (notebook 02's `train_shards`, `shard_batches`) are streamed instead, each
image through the config's train transform (RandomResizedCrop at full scale) and the
encoder inside the training step, nothing cached: the command line's path
(`distributed.ShardStream`) on one process.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import random
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import shapesworld as sw
from .data import ImageProcessor, ShardStats, clean_caption, read_shards, shard_urls, write_shards
from .model import GenerationSettings, MiniGPT4

# Stage-1 generation: just the image, then the caption up to the newline.
CAPTION_PROMPT = "<ImageHere>"
# The paper's stage-2 data-generation prompt (§3.2), asked of the stage-1 model.
DETAIL_INSTRUCTION = ("<Img><ImageHere></Img> Describe this image in detail. Give as many "
                      "details as possible. Say everything you see.")
DETAIL_PROMPT = f"###Human: {DETAIL_INSTRUCTION} ###Assistant: "     # = VICUNA_TEMPLATE.format(...)


def _write_shapesworld_shard(split: str, start: int, stop: int, image_size: int, folder: str) -> Path:
    """Scenes start..stop-1 of `split` as ONE shard in `folder` (a worker of the function below)."""
    def samples():
        for i in range(start, stop):
            s = sw.scene_at(split, i)
            rng = random.Random(s.seed)
            yield f"{split}{i:07d}", sw.render(s, image_size), {"caption": sw.caption(s, rng),
                                                                 "scene": s.to_dict()}

    return write_shards(samples(), folder, prefix=split, shard_size=stop - start, overwrite=True)[0]


def write_shapesworld_shards(out_dir: str | Path, split: str, n: int, image_size: int = 64,
                             shard_size: int = 2000, workers: int = 2) -> list[Path]:
    """Render `n` scenes of `split` with one noisy caption each as webdataset shards
    `{split}-000000.tar`, ... of `shard_size` samples.

    Each sample is `KEY.jpg` + `KEY.json` = {"caption": ..., "scene": {...}}. `workers`
    processes render and write shards side by side (each into a folder of its own, then
    moved into place). Existing complete shards are reused (the files are a pure function
    of split, n and size).
    """
    out_dir = Path(out_dir)
    done = out_dir / f"{split}-{n}-{image_size}.done"
    if done.exists():
        return [out_dir / f for f in json.loads(done.read_text())]
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{split}-*.tar"):    # left by an interrupted run
        stale.unlink()
    starts = list(range(0, n, shard_size))
    jobs = [(split, a, min(a + shard_size, n), image_size, str(out_dir / f".{split}-part{k:06d}"))
            for k, a in enumerate(starts)]
    if workers > 1 and len(jobs) > 1:
        # fork: workers only render and write (no torch), and start without re-importing
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            parts = list(pool.map(_write_shapesworld_shard, *zip(*jobs)))
    else:
        parts = [_write_shapesworld_shard(*job) for job in jobs]
    paths = []
    for k, part in enumerate(parts):
        final = out_dir / f"{split}-{k:06d}.tar"
        part.replace(final)
        part.parent.rmdir()
        paths.append(final)
    done.write_text(json.dumps([p.name for p in paths]))
    return paths


@dataclass
class FeatureSet:
    """Frozen-encoder outputs of a set of images with their captions (and scenes, if known)."""
    feats: torch.Tensor           # (N, Q, Hq)
    captions: list[str]
    scenes: list[sw.Scene | None]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, idx) -> "FeatureSet":
        idx = list(idx)
        return FeatureSet(self.feats[idx], [self.captions[i] for i in idx],
                          [self.scenes[i] for i in idx], [self.keys[i] for i in idx])


def _fingerprint(model: MiniGPT4, urls: list[Path]) -> str:
    h = hashlib.sha256(model.cfg.vit_dtype.encode())              # bf16 and fp32 features differ
    for p in list(model.encoder.state_dict().values())[:4]:
        h.update(p.float().flatten()[:64].numpy().tobytes())
    for u in urls:
        h.update(f"{Path(u).name}:{Path(u).stat().st_size}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_shards(model: MiniGPT4, urls: list[Path], cache_dir: str | Path | None = None,
                  batch_size: int = 250, stats: ShardStats | None = None) -> FeatureSet:
    """Read shards (bad samples skipped and counted in `stats`), run the frozen encoder once.

    With `cache_dir`, the result is saved as safetensors keyed by the encoder and shards,
    so a second call (or a restarted kernel) loads it instead of recomputing.
    """
    urls = [Path(u) for u in urls]
    cache = Path(cache_dir) / f"features-{_fingerprint(model, urls)}" if cache_dir else None
    if cache and (cache / "meta.json").exists():
        return load_features(cache)
    proc = ImageProcessor(model.cfg, train=False)
    stats = stats if stats is not None else ShardStats()
    feats, caps, scenes, keys, buf = [], [], [], [], []

    def flush():
        if buf:
            feats.append(model.image_features(proc.batch(buf)).float().cpu())
            buf.clear()

    for smp in tqdm(read_shards(urls, stats), desc="encode images (frozen)", unit="img"):
        buf.append(smp.image)
        caps.append(smp.meta["caption"])
        scenes.append(sw.Scene.from_dict(smp.meta["scene"]) if "scene" in smp.meta else None)
        keys.append(smp.key)
        if len(buf) == batch_size:
            flush()
    flush()
    fs = FeatureSet(torch.cat(feats), caps, scenes, keys)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        save_file({"feats": fs.feats.contiguous()}, str(cache / "feats.safetensors"))
        tmp = cache / "meta.json.tmp"
        tmp.write_text(json.dumps({"captions": caps, "keys": keys,
                                   "scenes": [s.to_dict() if s else None for s in scenes]}))
        tmp.replace(cache / "meta.json")
    return fs


def load_features(folder: str | Path) -> FeatureSet:
    """A feature cache folder written by `encode_shards` (`features-<fingerprint>/`:
    feats.safetensors (N, Q, Hq) + meta.json), e.g. to train on it from the command line."""
    folder = Path(folder)
    missing = [f for f in ("feats.safetensors", "meta.json") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a feature cache of encode_shards (no {' / '.join(missing)}); "
                                "expected a features-<fingerprint> folder, e.g. RUN_DIR/cache/features-...")
    meta = json.loads((folder / "meta.json").read_text())
    return FeatureSet(load_file(str(folder / "feats.safetensors"))["feats"], meta["captions"],
                      [sw.Scene.from_dict(s) if s else None for s in meta["scenes"]], meta["keys"])


@torch.no_grad()
def encode_images(model: MiniGPT4, images: list, keys: list[str], scenes: list | None = None,
                  captions: list[str] | None = None, batch_size: int = 250) -> FeatureSet:
    """Frozen-encoder features of in-memory images (eval transform), e.g. rendered scenes."""
    proc = ImageProcessor(model.cfg, train=False)
    feats = [model.image_features(proc.batch(images[i:i + batch_size])).float().cpu()
             for i in range(0, len(images), batch_size)]
    n = len(images)
    return FeatureSet(torch.cat(feats), captions or [""] * n, scenes or [None] * n, list(keys))


def scene_features(model: MiniGPT4, scenes: list[sw.Scene], prefix: str = "img") -> FeatureSet:
    """Render ShapesWorld scenes and encode them; keys are `{prefix}{index:05d}`."""
    keys = [f"{prefix}{i:05d}" for i in range(len(scenes))]
    return encode_images(model, [sw.render(s, model.cfg.image_size) for s in scenes], keys, scenes)


SHARD_LIST_SEP = re.compile(r",(?![^{]*\})")     # a comma outside braces separates shard patterns


def shard_list(spec) -> list[str]:
    """Notebook 02's `train_shards` -> shard urls: a brace pattern as img2dataset names its
    shards ("/data/laion/{00000..00099}.tar"), a folder (its *.tar) or a file, or a
    comma-separated list of them (a comma inside braces is the pattern's); also a list.
    Missing local shards raise FileNotFoundError naming them."""
    parts = SHARD_LIST_SEP.split(str(spec)) if isinstance(spec, (str, Path)) else [str(p) for p in spec]
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise ValueError(f"train_shards={spec!r}: expected webdataset shards: a brace pattern such as "
                         "'/data/laion/{00000..00099}.tar', a folder of *.tar, or a comma-separated list")
    urls = []
    for part in parts:
        try:
            urls += shard_urls(part)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"train_shards {part!r}: {e}") from None
    return urls


def shard_batches(model: MiniGPT4, spec, batch_size: int, max_txt_len: int = 32, seed: int = 0,
                  workers: int = 2):
    """`get_batch(step, g)` for the trainer over real webdataset shards, the encoder in the loop:
    `distributed.ShardStream` + `stream_batches` (what `python -m minigpt4_min train --stage 1
    --shards` runs) on this one process. Each epoch reads the shards in a seeded shuffled order,
    split over `workers` DataLoader processes (at most one per shard); each image goes through
    the config's train transform (RandomResizedCrop(S, scale=(0.5, 1)) at full scale), each
    caption through `clean_caption`; the batch holds images, not features, and nothing is
    cached. Returns (get_batch, the shard urls)."""
    from .distributed import ShardStream, stream_batches

    urls = shard_list(spec)
    stream = ShardStream(urls, ImageProcessor(model.cfg, train=True), seed=seed)
    return stream_batches(stream, batch_size, min(workers, len(urls)), max_txt_len), urls


@torch.no_grad()
def peek_shards(model: MiniGPT4, urls, n: int = 6, seed: int = 0, stats: ShardStats | None = None) -> FeatureSet:
    """The first `n` samples of the shards (in file order) through the train transform and the
    frozen encoder, to look at: captions as the shards hold them. Nothing is cached."""
    proc, g = ImageProcessor(model.cfg, train=True), torch.Generator().manual_seed(seed)
    urls = shard_urls(urls)
    it = read_shards(urls, stats)
    samples = list(itertools.islice(it, n))
    it.close()
    if not samples:
        raise ValueError(f"{len(urls)} shard(s) from {urls[0]}: no readable sample (expected KEY.jpg "
                         "with KEY.txt or a KEY.json 'caption', as img2dataset writes them)")
    x = torch.stack([proc(s.image, g) for s in samples])                 # (n, 3, S, S)
    return FeatureSet(model.image_features(x).float().cpu(), [s.caption for s in samples],
                      [None] * len(samples), [s.key for s in samples])


def caption_batches(fs: FeatureSet, batch_size: int, max_txt_len: int = 32):
    """`get_batch(step, generator)` for the trainer: random captioned feature batches."""
    def get_batch(step: int, g: torch.Generator) -> dict:
        idx = torch.randint(0, len(fs), (batch_size,), generator=g)
        return {"feats": fs.feats[idx], "answers": [clean_caption(fs.captions[i]) for i in idx.tolist()],
                "max_txt_len": max_txt_len, "end_sym": "\n"}
    return get_batch


def generate_over(model: MiniGPT4, fs: FeatureSet, prompt: str, settings: GenerationSettings,
                  stop: tuple[str, ...] = ("###",), batch_size: int = 100, desc: str = "generate") -> list[str]:
    """Generate one answer per image of `fs` to the same prompt, in batches."""
    out: list[str] = []
    for i in tqdm(range(0, len(fs), batch_size), desc=desc, leave=False):
        f = fs.feats[i:i + batch_size]
        out += model.generate([prompt] * len(f), feats=f, settings=settings, stop=stop)
    return out


def caption(model: MiniGPT4, fs: FeatureSet, max_new_tokens: int = 20, batch_size: int = 100) -> list[str]:
    """Short captions: `[BOS][image]` continued greedily up to the newline."""
    return generate_over(model, fs, CAPTION_PROMPT, GenerationSettings(max_new_tokens=max_new_tokens),
                         stop=("\n", "###"), batch_size=batch_size, desc="caption")


def describe_in_detail(model: MiniGPT4, fs: FeatureSet, max_new_tokens: int = 120,
                       batch_size: int = 100) -> list[str]:
    """Answers to the paper's detailed-description prompt (greedy)."""
    return generate_over(model, fs, DETAIL_PROMPT, GenerationSettings(max_new_tokens=max_new_tokens),
                         batch_size=batch_size, desc="describe")

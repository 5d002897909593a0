"""Images in, tensors out: preprocessing, webdataset shards, `cc_sbu_align` folders.

Paper §3 / DESIGN.md §2: stage-1 images are `RandomResizedCrop(224, scale=(0.5, 1.0),
bicubic)` for training and a plain resize for evaluation, normalized with the CLIP
mean / std. Stage-1 data are webdataset shards as img2dataset writes them (`KEY.jpg` +
`KEY.txt`, the caption, and / or `KEY.json` with a "caption"); the same reader reads
ShapesWorld shards and real LAION / CC / SBU shards. Bad samples are skipped and
*counted*, never silently, and so are empty shards; every shard file is closed as soon as
it has been read.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import ModelConfig

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs with a clear error


class BadImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16 ...) -> RGB; transparency onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = (255 * (arr - arr.min()) / max(arr.max() - arr.min(), 1e-9)).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB")


def load_image(src, name: str | None = None) -> Image.Image:
    """Open a path, bytes, PIL image or HxWxC uint8 array as an RGB PIL image.

    Raises `BadImageError` naming the file for anything corrupt, truncated, huge or not
    an image.
    """
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, np.ndarray):
        if src.ndim not in (2, 3) or src.dtype != np.uint8:
            raise BadImageError(f"{name or 'array'}: expected an HxW or HxWxC uint8 array, "
                                f"got shape {src.shape} dtype {src.dtype}")
        return to_rgb(Image.fromarray(src))
    label = name or (str(src) if isinstance(src, (str, Path)) else "<bytes>")
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise BadImageError(f"{label}: no such image file")
    data = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise BadImageError(f"{label}: image of {img.width}x{img.height} px is larger "
                                    f"than the {MAX_IMAGE_PIXELS:,} px this loader accepts")
            img.load()
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{label}: not a readable image ({type(e).__name__}: {e})") from None
    return to_rgb(img)


class ImageProcessor:
    """PIL image -> normalized (3, S, S) float tensor, as in the paper's processors."""

    def __init__(self, cfg: ModelConfig, train: bool = False):
        self.size = cfg.image_size
        self.random_crop = train and cfg.train_transform == "random_resized_crop"
        self.mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.image_std).view(3, 1, 1)

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        img = load_image(img)
        if self.random_crop:
            img = self._random_resized_crop(img, generator)
        elif img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std                                   # (3, S, S)

    def _random_resized_crop(self, img: Image.Image, g: torch.Generator | None) -> Image.Image:
        """RandomResizedCrop(S, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic)."""
        w, h = img.size
        area = w * h
        for _ in range(10):
            u = torch.rand(3, generator=g).tolist()
            target = area * (0.5 + 0.5 * u[0])
            ratio = float(np.exp(np.log(3 / 4) + u[1] * (np.log(4 / 3) - np.log(3 / 4))))
            cw, ch = int(round((target * ratio) ** 0.5)), int(round((target / ratio) ** 0.5))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                y0 = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                return img.resize((self.size, self.size), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        return img.resize((self.size, self.size), Image.BICUBIC)

    def batch(self, images: Iterable) -> torch.Tensor:
        """Many images -> (B, 3, S, S). The eval transform of images already S x S is done on
        the whole stack at once (the same numbers as one by one, several times faster)."""
        images = [load_image(i) for i in images]
        if self.random_crop or any(i.size != (self.size, self.size) for i in images):
            return torch.stack([self(i) for i in images])
        x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images]) / 255.0)
        return (x.permute(0, 3, 1, 2) - self.mean) / self.std               # (B, 3, S, S)


_PUNCT = re.compile(r'[.!"()*#:;~]')


def clean_caption(text: str, max_words: int = 50) -> str:
    """Stage-1 caption cleaning (as the paper's text processor): lower case, `.!"()*#:;~`
    to spaces, whitespace collapsed, at most `max_words` words."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(text.split()[:max_words])


# =============================================================== webdataset shards
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")   # accepted image entries, in order of preference


class BadSampleWarning(UserWarning):
    """Emitted once per shard sample that `read_shards` skips."""


class EmptyShardWarning(UserWarning):
    """Emitted once per shard that `read_shards` finds without a single sample."""


@dataclass
class Sample:
    """One decoded shard sample: its key, an RGB image, the json metadata and the shard url."""
    key: str
    image: Image.Image
    meta: dict
    url: str

    @property
    def caption(self) -> str:
        return self.meta["caption"]


@dataclass
class ShardStats:
    """What `read_shards` did: samples yielded, samples skipped and why (url, key, problem),
    and the urls of shards that held no sample at all."""
    ok: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    empty_shards: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        """Count one skipped sample and warn about it (never skip silently)."""
        self.skipped += 1
        self.reasons.append(reason)
        warnings.warn(reason, BadSampleWarning, stacklevel=3)

    def empty(self, url: str) -> None:
        """Count one shard without samples and warn about it, naming the file."""
        self.empty_shards.append(url)
        warnings.warn(f"{url}: empty shard, no samples", EmptyShardWarning, stacklevel=3)

    def __str__(self) -> str:
        empty = f", {len(self.empty_shards)} empty shard(s)" if self.empty_shards else ""
        return f"{self.ok} samples read, {self.skipped} skipped{empty}"


def _check_key(key: str) -> str:
    """Shard keys must survive webdataset's split at the first dot of the file name."""
    if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
        raise ValueError(f"bad sample key {key!r}: must be a non-empty string without '.'")
    return key


def _encode_sample(key: str, image, meta: dict, quality: int) -> dict:
    """(key, image, meta) -> the raw `{"__key__", "jpg", "json"}` entry of a shard."""
    if not isinstance(meta, dict) or not isinstance(meta.get("caption"), str):
        raise ValueError(f"sample {key!r}: meta must be a dict with a string 'caption', got {meta!r}")
    buf = io.BytesIO()
    load_image(image, name=key).save(buf, format="JPEG", quality=quality)
    return {"__key__": key, "jpg": buf.getvalue(),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


class _AtomicShard:
    """A webdataset TarWriter on `path + '.tmp'`, renamed to `path` only by `commit()`."""

    def __init__(self, path: Path):
        import webdataset as wds

        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.file, encoder=False)
        self.count = 0

    def write(self, entry: dict) -> None:
        self.writer.write(entry)
        self.count += 1

    def commit(self) -> Path:
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.writer.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_shards(samples: Iterable[tuple[str, Image.Image, dict]], out_dir: str | Path,
                 prefix: str = "shard", shard_size: int = 1000, quality: int = 95,
                 overwrite: bool = False) -> list[Path]:
    """Write `(key, image, meta)` samples as webdataset shards `{prefix}-000000.tar`, ...

    Each sample becomes `KEY.jpg` (JPEG, `quality`) + `KEY.json` (`meta`, which must hold a
    string "caption"), as img2dataset writes them. Each shard is written under a `.tmp`
    name and renamed when complete, so an interrupted run never leaves a half shard under
    a final name. Existing `{prefix}-*.tar` shards raise `FileExistsError` unless
    `overwrite`, which replaces them and removes any stale ones left over. Returns the
    shard paths.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir}: {len(existing)} shards named {prefix}-*.tar already "
                              f"exist (e.g. {existing[0].name}); pass overwrite=True to replace them")
    written: list[Path] = []
    seen: set[str] = set()
    shard: _AtomicShard | None = None
    try:
        for key, image, meta in samples:
            if _check_key(key) in seen:
                raise ValueError(f"duplicate sample key {key!r}")
            seen.add(key)
            entry = _encode_sample(key, image, meta, quality)
            if shard is None:
                shard = _AtomicShard(out_dir / f"{prefix}-{len(written):06d}.tar")
            shard.write(entry)
            if shard.count == shard_size:
                written.append(shard.commit())
                shard = None
        if shard is not None:
            written.append(shard.commit())
            shard = None
    finally:
        if shard is not None:
            shard.abort()
    for stale in set(existing) - set(written):
        stale.unlink()
    return written


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def shard_urls(urls) -> list[str]:
    """A directory (all its `*.tar`, sorted), a brace pattern string, or a list of paths ->
    the list of shard urls. Local shards that do not exist raise `FileNotFoundError`."""
    from webdataset.shardlists import expand_urls

    if isinstance(urls, (str, Path)) and Path(urls).is_dir():
        found = [str(p) for p in sorted(Path(urls).glob("*.tar"))]
        if not found:
            raise FileNotFoundError(f"{urls}: directory holds no *.tar shards")
        return found
    if isinstance(urls, Path):
        found = [str(urls)]
    elif isinstance(urls, str):
        found = expand_urls(urls)
    else:
        found = [str(u) for u in urls]
    if not found:
        raise ValueError("no shard urls given")
    missing = [u for u in found if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {', '.join(missing[:5])}")
    return found


def _decode_sample(raw: dict) -> Sample:
    """A raw webdataset sample (bytes per extension) -> `Sample`; ValueError says what is wrong."""
    key, url = raw["__key__"], raw.get("__url__", "?")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        found = sorted(k for k in raw if not k.startswith("__"))
        raise ValueError(f"no image ({'/'.join(IMAGE_EXTS)}) entry, only {found}")
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"invalid json ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"json is a {type(meta).__name__}, expected an object with a 'caption'")
    if not isinstance(meta.get("caption"), str) and "txt" in raw:     # img2dataset: KEY.txt = the caption
        try:
            meta = {**meta, "caption": raw["txt"].decode("utf-8").strip()}
        except UnicodeDecodeError as e:
            raise ValueError(f"txt caption is not UTF-8 text ({e})") from None
    if not isinstance(meta.get("caption"), str):
        raise ValueError("no caption: no txt entry and " + ("json has no string 'caption'" if "json" in raw
                                                             else "no json entry"))
    image = load_image(raw[ext], name=f"{key}.{ext}")
    return Sample(key=key, image=image, meta=meta, url=url)


def read_shards(urls, stats: ShardStats | None = None, *,
                split_by_node: bool = False, split_by_worker: bool = False) -> Iterator[Sample]:
    """Iterate the samples of webdataset shards, in order, as decoded `Sample`s.

    `urls`: a directory (its `*.tar`, sorted), a brace pattern (`data/s-{000..009}.tar`) or
    a list of paths; missing local shards raise `FileNotFoundError` here, before iterating.
    The caption is the json's "caption", else the `KEY.txt` entry (img2dataset writes both;
    `Sample.meta` then holds the json's fields and that caption). A bad sample (unreadable
    image, no image, invalid json, no caption in either) is skipped, counted in `stats` with
    its url and key, and warned about (`BadSampleWarning`); a shard without samples (an
    empty file, or a tar with none) is counted in `stats.empty_shards` and warned about
    (`EmptyShardWarning`). Each shard's file is closed when it has been read, or when the
    caller stops early (`close()`, or the iterator is collected). With `split_by_node`, each
    distributed rank reads its own subset of the shards (webdataset's `split_by_node`: shards
    rank, rank + world, ...); with `split_by_worker` too, each DataLoader worker of a rank
    reads its own subset of the rank's (`split_by_worker`), so no shard is read twice by
    ranks x workers.
    """
    found = shard_urls(urls)
    return _iter_samples(found, stats if stats is not None else ShardStats(), split_by_node,
                         split_by_worker)


def _raw_samples(url: str) -> Iterator[dict]:
    """The raw samples (bytes per extension, `__key__`, `__url__`) of one shard, read with
    webdataset's tar reader from a stream this function opens and always closes (webdataset's
    own pipeline leaves it to the garbage collector: ResourceWarning "unclosed file")."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    if not _is_remote(url) and Path(url).stat().st_size == 0:
        return                                 # tarfile refuses an empty stream; no samples
    with wds.gopen(url, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], eof_value=None))


def _iter_samples(urls: list[str], stats: ShardStats, split_by_node: bool,
                  split_by_worker: bool = False) -> Iterator[Sample]:
    import webdataset as wds

    nodesplitter = wds.split_by_node if split_by_node else wds.single_node_only
    mine = nodesplitter(urls)
    for url in (wds.split_by_worker(mine) if split_by_worker else mine):
        n = 0
        for raw in _raw_samples(url):
            n += 1
            try:
                sample = _decode_sample(raw)
            except ValueError as e:            # BadImageError is a ValueError too
                stats.skip(f"{url}: sample {raw.get('__key__')!r} skipped: {e}")
                continue
            stats.ok += 1
            yield sample
        if n == 0:
            stats.empty(url)


# =============================================================== cc_sbu_align folders
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file and `os.replace`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_annotations(ann_path: Path) -> list:
    """The "annotations" list of a `filter_cap.json`; errors name the file."""
    if not ann_path.is_file():
        raise FileNotFoundError(f"{ann_path}: no such file (expected a cc_sbu_align folder)")
    try:
        data = json.loads(ann_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{ann_path}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f'{ann_path}: expected {{"annotations": [...]}} at the top level')
    return data["annotations"]


def read_cc_sbu_align(folder: str | Path) -> list[tuple[str, Path, str]]:
    """Read a MiniGPT-4 stage-2 folder: `filter_cap.json` + `image/{image_id}.jpg`.

    Returns `(image_id, image_path, caption)` per annotation, in file order. Raises
    `FileNotFoundError` / `ValueError` naming the file for a missing or malformed
    `filter_cap.json`, an incomplete annotation, or missing images (how many, which ids).
    """
    folder = Path(folder)
    ann_path = folder / "filter_cap.json"
    items: list[tuple[str, Path, str]] = []
    for i, ann in enumerate(_load_annotations(ann_path)):
        if (not isinstance(ann, dict) or not isinstance(ann.get("image_id"), (str, int))
                or not isinstance(ann.get("caption"), str)):
            raise ValueError(f"{ann_path}: annotation {i} needs a string 'image_id' and "
                             f"'caption', got {ann!r}"[:300])
        image_id = str(ann["image_id"])
        items.append((image_id, folder / "image" / f"{image_id}.jpg", ann["caption"]))
    missing = [image_id for image_id, path, _ in items if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder / 'image'}: {len(missing)} of {len(items)} images named "
                                f"in {ann_path} are missing, e.g. ids {missing[:5]}")
    return items


def write_cc_sbu_align(folder: str | Path, items: Iterable[tuple[str, Image.Image, str]],
                       quality: int = 95) -> Path:
    """Write `(image_id, image, caption)` items as a cc_sbu_align folder; returns the json path.

    Images go to `image/{image_id}.jpg`; `filter_cap.json` (indent=2) is written last and
    atomically, so a folder with a complete json has all its images.
    """
    folder = Path(folder)
    (folder / "image").mkdir(parents=True, exist_ok=True)
    annotations, seen = [], set()
    for image_id, image, caption in items:
        image_id = str(image_id)
        if not image_id or "/" in image_id or "\\" in image_id or image_id in seen:
            raise ValueError(f"bad or duplicate image_id {image_id!r}")
        if not isinstance(caption, str):
            raise ValueError(f"image {image_id!r}: caption must be a string, got {caption!r}")
        seen.add(image_id)
        buf = io.BytesIO()
        load_image(image, name=image_id).save(buf, format="JPEG", quality=quality)
        _atomic_write_bytes(folder / "image" / f"{image_id}.jpg", buf.getvalue())
        annotations.append({"image_id": image_id, "caption": caption})
    ann_path = folder / "filter_cap.json"
    text = json.dumps({"annotations": annotations}, indent=2, ensure_ascii=False)
    _atomic_write_bytes(ann_path, text.encode("utf-8"))
    return ann_path

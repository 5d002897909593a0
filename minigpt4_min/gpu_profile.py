"""The series on a GPU: the profile `notebooks/gpu_params/NN_slug.json`, a preflight check of
everything it reads, and a plumbing mode with random weights (DESIGN.md §4, "Full scale and
GPU runners"; the paper's settings of §3, cut to a CI-length run).

    python -m minigpt4_min series --gpu [--out runs/gpu] [--only 02 03]   # = make series-gpu
    python -m minigpt4_min series --gpu --preflight      # check the inputs, print the parameters
    python -m minigpt4_min series --gpu --plumbing       # = make series-gpu PLUMBING=1

A profile file holds papermill parameters like `notebooks/ci_params/`; keys starting with
"_" are notes, never passed on. Paths are written `${MINIGPT4_MODELS}/vicuna-7b`: this module
expands the environment variables (`ENV_VARS`), not the notebooks. Before any notebook starts,
`ready` checks every path parameter (`NEEDS`: what it must hold and where it comes from) and
raises ONE `PreflightError` that lists everything missing. `--plumbing` first writes, into a
scratch folder, random weights in the official formats at the profile's full size (LAVIS's
two .pth files, an HF LLaMA folder, a released projection .pth) and ShapesWorld data in the
real formats (webdataset shards as img2dataset writes them, a folder of .jpg images to
describe, a cc_sbu_align folder), points
the variables there and runs the same profile: dtypes, memory and speed, no downloads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from .config import DATA_DIR, ModelConfig, get_config
from .report import REFERENCE_DIR
from .series import NOTEBOOK_DIR, chosen_notebooks, declared_parameters, run_series

GPU_PARAMS_DIR = NOTEBOOK_DIR / "gpu_params"
REFERENCE = REFERENCE_DIR / "series_reference_gpu.json"       # absent until a GPU run is made one
ENV_VARS = {
    "MINIGPT4_MODELS": "the folder of the frozen weights and the released projection",
    "MINIGPT4_DATA": "the folder of the data (laion/ shards, cc_images/ to describe, cc_sbu_align/)",
}
_VAR = re.compile(r"\$\{(\w+)\}")


class PreflightError(RuntimeError):
    """What the GPU profile needs and does not find, all of it in one message."""


# ------------------------------------------------------------------ what a path must hold
def _encoder_missing(p: Path) -> list[str]:
    from .checkpoints import LAVIS_FILES, is_blip2_hf     # torch: only when a path is checked

    if is_blip2_hf(p):
        return [] if list(p.glob("*.safetensors")) else ["no *.safetensors weights"]
    return [f"no {f}" for f in LAVIS_FILES if not (p / f).is_file()]


def _llm_missing(p: Path) -> list[str]:
    out = [] if (p / "config.json").is_file() else ["no config.json"]
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        out.append("no *.safetensors / *.bin weights")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        out.append("no tokenizer.json / tokenizer.model")
    return out


def _align_missing(p: Path) -> list[str]:
    return [f"no {f}" for f, ok in (("filter_cap.json", (p / "filter_cap.json").is_file()),
                                    ("image/", (p / "image").is_dir())) if not ok]


def _projection_missing(p: Path) -> list[str]:
    return [] if p.is_file() or (p / "model.safetensors").is_file() else ["no such file"]


def _images_missing(p: Path) -> list[str]:
    from .data import IMAGE_EXTS

    if any(f.suffix.lower().lstrip(".") in IMAGE_EXTS for f in p.iterdir() if f.is_file()):
        return []
    return [f"no {' / '.join('.' + e for e in IMAGE_EXTS)} files (sub-folders are not searched)"]


def _shards_missing(value: str) -> list[str]:
    """What is missing of a `train_shards` value: a folder of *.tar, a brace pattern, a file, or a
    comma-separated list of them (stage1.shard_list reads it the same way)."""
    from .data import shard_urls                          # torch: only when a path is checked
    from .stage1 import SHARD_LIST_SEP

    out = []
    for part in filter(None, (x.strip() for x in SHARD_LIST_SEP.split(value))):
        if "{" not in part and not Path(part).exists():
            out.append(f"{part} does not exist")
            continue
        try:
            shard_urls(part)
        except (FileNotFoundError, ValueError) as e:
            out.append(str(e))
    return out


@dataclasses.dataclass(frozen=True)
class Need:
    what: str                                  # what the path is
    source: str                                # where it comes from
    missing: Callable[[Path], list[str]]       # what is missing at a path that exists
    shards: bool = False                       # a shard list (`_shards_missing`), not one path


_PROJECTION = Need("a MiniGPT-4 projection (llama_proj)", "the released pretrained_minigpt4_7b.pth (MiniGPT-4's "
                   "README), or a trainer folder of this project", _projection_missing)
NEEDS = {
    "encoder_path": Need("BLIP-2 encoder: LAVIS's eva_vit_g.pth + blip2_pretrained_flant5xxl.pth",
                         "LAVIS's model zoo (the links in MiniGPT-4's README), or a transformers BLIP-2 folder "
                         "such as Salesforce/blip2-flan-t5-xxl", _encoder_missing),
    "llm_path": Need("HF-format Vicuna v0 weights", "LLaMA converted to HF format with the Vicuna v0 delta applied "
                     "(MiniGPT-4's PrepareVicuna.md; see README, 'Running the series on a GPU')", _llm_missing),
    "align_dir": Need("the stage-2 set (cc_sbu_align: filter_cap.json + image/)",
                      "MiniGPT-4's cc_sbu_align download (its README, 'second finetuning stage')", _align_missing),
    "stage1_checkpoint": _PROJECTION,
    "stage2_checkpoint": _PROJECTION,
    "train_shards": Need("stage-1 image-caption webdataset shards (KEY.jpg + KEY.txt / KEY.json, as img2dataset "
                         "writes them)", "LAION / CC / SBU downloaded with img2dataset --output_format webdataset "
                         "(MiniGPT-4's dataset/README_1_STAGE.md): a folder of *.tar, a brace pattern or a list",
                         lambda p: [], shards=True),
    "image_dir": Need("images for the stage-1 model to describe (.jpg / .png)", "any folder of images, e.g. the "
                      "paper's 5,000 Conceptual Captions images (img2dataset --output_format files)", _images_missing),
}


# ------------------------------------------------------------------ the profile
def profile_parameters(nb: Path) -> dict:
    """A notebook's raw GPU parameters (notes dropped), refused if one is not declared."""
    f = GPU_PARAMS_DIR / f"{nb.stem}.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no GPU profile for {nb.name} (expected a JSON object of its parameters)")
    params = {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("_")}
    unknown = sorted(set(params) - set(declared_parameters(nb)))
    if unknown:
        raise ValueError(f"{f}: parameters {unknown} are not declared in {nb.name}'s 'parameters' cell")
    return params


def expand(value, env) -> tuple[object, set[str]]:
    """`${VAR}` in a string (or a list of strings) replaced from `env`; also the unset names."""
    if isinstance(value, list):
        parts = [expand(v, env) for v in value]
        return [v for v, _ in parts], set().union(*(u for _, u in parts))
    if not isinstance(value, str):
        return value, set()
    unset = {m for m in _VAR.findall(value) if not env.get(m)}
    return _VAR.sub(lambda m: env.get(m.group(1)) or m.group(0), value), unset


def ready(chosen: list[Path], env=None) -> dict[str, dict]:
    """{notebook stem: expanded parameters} of `chosen`, once every input the profile names is
    there; else one `PreflightError` naming each missing variable, file and folder, what it is
    and where it comes from (nothing has run)."""
    env = os.environ if env is None else env
    out, unset, users = {}, set(), {}
    for nb in chosen:
        out[nb.stem] = {}
        for k, raw in profile_parameters(nb).items():
            value, u = expand(raw, env)
            out[nb.stem][k], unset = value, unset | u
            if k in NEEDS and value:
                users.setdefault((k, value), []).append(nb.stem[:2])
    problems = [f"{v} is not set: {ENV_VARS.get(v, 'a variable the profile reads')}" for v in sorted(unset)]
    for (k, value), nbs in users.items():
        need, p = NEEDS[k], Path(value)
        if _VAR.search(value) or not (need.shards or p.exists()):
            missing = ["does not exist"]
        else:
            missing = _shards_missing(value) if need.shards else need.missing(p)
        if missing:
            problems.append(f"{p.name} ({k} of notebook {', '.join(nbs)}): {need.what}; {value}: "
                            f"{', '.join(missing)}\n      from: {need.source}")
    if problems:
        raise PreflightError(
            f"the GPU profile (notebooks/gpu_params) cannot start, {len(problems)} input(s) missing; no notebook "
            "was run:\n" + "\n".join(f"  - {p}" for p in problems) + "\nSet " + " and ".join(ENV_VARS)
            + " to the folders that hold them, or check the GPU first with random weights: make series-gpu PLUMBING=1")
    return out


# ------------------------------------------------------------------ plumbing
def profile_config(chosen: list[Path]) -> ModelConfig:
    """The full-scale preset the chosen notebooks' profiles name (one for all of them)."""
    scales = {profile_parameters(nb).get("scale", "tiny") for nb in chosen} - {"tiny"}
    if len(scales) > 1:
        raise ValueError(f"the GPU profile names several scales {sorted(scales)}; plumbing builds one")
    return get_config(scales.pop() if scales else "vicuna7b")


def write_plumbing(root: str | Path, chosen: list[Path], cfg: ModelConfig | None = None,
                   n_shards: int = 2, shard_size: int = 64, n_align: int = 64, device: str | None = None) -> dict:
    """Random weights at `cfg`'s size (default: the profile's preset, full size) and ShapesWorld
    data, at exactly the paths the chosen profiles name under `root/models` and `root/data`;
    returns the environment variables pointing there. A second call with the same sizes reuses
    what the first wrote (`root/plumbing.json`)."""
    import torch

    root = Path(root).resolve()
    cfg = cfg or profile_config(chosen)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {"MINIGPT4_MODELS": str(root / "models"), "MINIGPT4_DATA": str(root / "data")}
    paths = {}
    for nb in chosen:
        for k, raw in profile_parameters(nb).items():
            if k in NEEDS and raw:
                paths[expand(raw, env)[0]] = k
    stamp = root / "plumbing.json"
    record = {"config": dataclasses.asdict(cfg), "paths": paths, "n_shards": n_shards,
              "shard_size": shard_size, "n_align": n_align}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(record)):
        return env
    writers = {"encoder_path": _write_encoder, "llm_path": _write_llm, "align_dir": _write_align,
               "stage1_checkpoint": _write_projection, "stage2_checkpoint": _write_projection,
               "image_dir": _write_images}
    shard_dirs = {root / "data" / "laion"}                 # `train --stage 1 --shards` (README)
    for path, k in paths.items():
        print(f"plumbing: {k} -> {path}", flush=True)
        if k == "train_shards":                             # a folder: the plumbing writes shards into it
            shard_dirs.add(Path(path))
        else:
            writers[k](Path(path), cfg, device, n_align)
    from .stage1 import write_shapesworld_shards            # img2dataset's layout: KEY.jpg + KEY.json

    for folder in sorted(shard_dirs):
        write_shapesworld_shards(folder, "train", n_shards * shard_size, cfg.image_size, shard_size)
    stamp.write_text(json.dumps(record, indent=1))
    return env


def _write_encoder(path: Path, cfg: ModelConfig, device: str, _n: int) -> None:
    import torch

    from .checkpoints import write_lavis
    from .encoder import VisualEncoder

    with torch.device(device):
        enc = VisualEncoder(cfg)
    write_lavis(enc, path)


def _write_llm(path: Path, cfg: ModelConfig, device: str, _n: int) -> None:
    """An HF LLaMA folder of `cfg.llm`'s size in `cfg.llm_dtype`. The LLaMA tokenizer cannot be
    downloaded: the tiny scale's stands in (its ids fit any 32,000-word vocabulary)."""
    import torch
    import transformers

    from .llm import load_tokenizer
    from .sizes import llm_kwargs

    tok = load_tokenizer(DATA_DIR / "tiny" / "llm")
    lc = transformers.LlamaConfig(**llm_kwargs(cfg, len(tok)), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        llm = transformers.LlamaForCausalLM._from_config(lc, dtype=getattr(torch, cfg.llm_dtype))
    llm.save_pretrained(path, max_shard_size="4GB")
    tok.save_pretrained(path)


def _write_projection(path: Path, cfg: ModelConfig, _device: str, _n: int) -> None:
    import torch

    from .checkpoints import write_projection

    d = cfg.llm["hidden_size"]
    write_projection(path, torch.randn(d, cfg.proj_in) * 0.02, torch.zeros(d))      # (D_llm, D_in), (D_llm,)


def _write_images(path: Path, cfg: ModelConfig, _device: str, n: int) -> None:
    from . import shapesworld as sw

    path.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(sw.split("stage2", n)):
        sw.render(s, cfg.image_size).save(path / f"img{i:05d}.jpg", quality=95)


def _write_align(path: Path, cfg: ModelConfig, _device: str, n: int) -> None:
    from . import shapesworld as sw
    from .data import write_cc_sbu_align

    scenes = sw.split("stage2", n)
    write_cc_sbu_align(path, ((str(i), sw.render(s, cfg.image_size), sw.describe(s)) for i, s in enumerate(scenes)))


# ------------------------------------------------------------------ the command
def add_arguments(s) -> None:
    """The `series` command's GPU options (`__main__.py`)."""
    s.add_argument("--gpu", action="store_true", help="use the GPU profile of notebooks/gpu_params (gpu_profile.py)")
    s.add_argument("--plumbing", action="store_true", help="with --gpu: random weights in the official formats "
                   "at full size and ShapesWorld data, written to --plumbing-dir (default OUT/plumbing)")
    s.add_argument("--plumbing-dir", help="with --plumbing: the scratch folder for them")
    s.add_argument("--preflight", action="store_true", help="with --gpu: check the inputs, print the parameters, run nothing")


def run_args(a) -> dict:
    """`series --gpu ...` from parsed arguments; ValueError for options that do not go together."""
    if not a.gpu or a.ci:
        raise ValueError("--plumbing, --plumbing-dir and --preflight go with --gpu, and --gpu does not go with --ci")
    return run(a.out or "runs/gpu", a.only, a.kernel, a.plumbing, a.plumbing_dir, a.preflight)


def run(out: str | Path, only: list[str] | None = None, kernel: str = "python3", plumbing: bool = False,
        plumbing_dir: str | Path | None = None, preflight: bool = False) -> dict:
    """`series --gpu`: (plumbing data,) the preflight check, then the series with the profile."""
    chosen = chosen_notebooks(only)
    env = dict(os.environ)
    if plumbing:
        env.update(write_plumbing(plumbing_dir or Path(out) / "plumbing", chosen))
        os.environ.update({k: env[k] for k in ENV_VARS})        # the notebooks' kernels see them too
    params = ready(chosen, env)
    if preflight:
        print(json.dumps(params, indent=1))
        print(f"preflight: every input of {len(chosen)} notebook(s) is there")
        return params
    return run_series(out, only=only, kernel=kernel, profile=lambda nb: params[nb.stem], reference=REFERENCE)

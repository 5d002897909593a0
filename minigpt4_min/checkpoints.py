"""Checkpoint formats, all in one place: the frozen BLIP-2 parts in and the one trained layer
in and out (paper §3 and §4: MiniGPT-4 reuses BLIP-2's ViT + Q-Former and trains `llama_proj`).

Encoder weights come in two layouts; both fill the same `VisualEncoder` (same names, shapes):

- transformers' BLIP-2 folder (e.g. Salesforce/blip2-flan-t5-xxl): `vision_model.*`,
  `qformer.*`, `query_tokens` in (sharded) safetensors. `read_blip2_hf`.
- LAVIS's two files, as MiniGPT-4 reads them. `read_lavis`, key by key:
  `eva_vit_g.pth`, a flat state dict of EVA-CLIP-g's visual tower (40 blocks; BLIP-2 builds 39),
  with separate `q_bias` / `v_bias` per attention and no k bias;
  `blip2_pretrained_flant5xxl.pth`, `{"model": {...}}` holding `ln_vision.*`, `query_tokens`
  and `Qformer.bert.*` (BERT names) among other tensors of BLIP-2's T5 variant.
  Every tensor read is named in `eva_keys` / `blip2_keys`; every tensor deliberately left
  out is matched by `EVA_DROPPED` / `BLIP2_DROPPED`; anything else, missing or left over,
  is an error naming the file, the key and the shapes.

Released MiniGPT-4 projections (`pretrained_minigpt4.pth`): a torch pickle `{"model": {...}}`
whose trained tensors are `llama_proj.weight` (D_llm, 768) and `llama_proj.bias` (D_llm,);
MiniGPT-4 reads it with `load_state_dict(ckpt["model"], strict=False)`, so those two names
are all a file must hold. `read_projection` / `write_projection`. Pickles are only ever read
with `weights_only=True`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

LAVIS_FILES = ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth")


# ------------------------------------------------------------------ reading files
def read_tensors(path: str | Path, unwrap: str | None = None, required: bool = True) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors file or a torch pickle (weights_only=True);
    `unwrap="model"` takes the state dict out of a `{"model": {...}}` pickle (an error if absent,
    unless not `required`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - name the file, whatever went wrong
            raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    if unwrap is not None and isinstance(obj, dict) and unwrap in obj:
        obj = obj[unwrap]          # other top-level entries (optimizer, config, epoch, ...) are ignored
    elif unwrap is not None and required and path.suffix != ".safetensors":
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a {{'{unwrap}': {{...}}}} checkpoint, found {keys}")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return dict(obj)


def is_blip2_hf(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type", "").startswith("blip")


def read_blip2_hf(folder: Path, want_qformer: bool) -> dict[str, torch.Tensor]:
    """The encoder's tensors from a transformers BLIP-2 checkpoint folder (sharded or not)."""
    if not folder.exists():
        raise FileNotFoundError(f"encoder folder {folder} does not exist")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in folder.glob("*.safetensors")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder} (expected a BLIP-2 checkpoint)")
    rename = {"vision_model.": "vision."}
    if want_qformer:
        rename.update({"qformer.": "qformer.", "query_tokens": "query_tokens"})
    sd = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                for src, dst in rename.items():
                    if k.startswith(src):
                        sd[dst + k[len(src):]] = fh.get_tensor(k)
    return sd


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], where: Path) -> None:
    """Load every parameter, checking names and shapes; name what is missing or wrong."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or bad:
        raise ValueError(f"encoder weights in {where} do not fit the config: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                         f"shape mismatches {bad[:5]}")
    if unexpected:
        raise ValueError(f"encoder weights in {where} hold unexpected tensors {unexpected[:5]}")
    module.load_state_dict(sd, strict=True)


# ------------------------------------------------------------------ LAVIS key maps
def eva_keys(depth: int) -> dict[str, str]:
    """eva_vit_g.pth name -> our name, for the first `depth` blocks (W = width, P = patches).
    The q/v biases are not here: `read_lavis` joins them into one qkv bias."""
    keys = {"cls_token": "vision.embeddings.class_embedding",                    # (1, 1, W)
            "pos_embed": "vision.embeddings.position_embedding",                 # (1, 1 + P, W)
            "patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",  # (W, 3, p, p)
            "patch_embed.proj.bias": "vision.embeddings.patch_embedding.bias"}   # (W,)
    block = {"norm1": "layer_norm1", "attn.qkv.weight": "self_attn.qkv.weight",  # (3W, W), no bias
             "attn.proj": "self_attn.projection", "norm2": "layer_norm2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}                         # (M, W), (W, M)
    for i in range(depth):
        for src, dst in block.items():
            ends = [""] if src.endswith(".weight") else [".weight", ".bias"]
            for e in ends:
                keys[f"blocks.{i}.{src}{e}"] = f"vision.encoder.layers.{i}.{dst}{e}"
    return keys


def blip2_keys(num_layers: int, cross_every: int) -> dict[str, str]:
    """blip2_pretrained_flant5xxl.pth["model"] name -> our name (H = Q-Former width)."""
    keys = {"ln_vision.weight": "vision.post_layernorm.weight",                  # (W,)
            "ln_vision.bias": "vision.post_layernorm.bias"}
    keys["query_tokens"] = "query_tokens"                                        # (1, Q, H)
    for e in ("weight", "bias"):
        keys[f"Qformer.bert.embeddings.LayerNorm.{e}"] = f"qformer.layernorm.{e}"  # on the queries
    parts = ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "attention.output.LayerNorm",
             "intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
    cross = [p.replace("attention.", "crossattention.", 1) for p in parts[:5]]  # K, V: (H, W)
    for i in range(num_layers):
        for p in parts + (cross if i % cross_every == 0 else []):
            for e in ("weight", "bias"):
                ours = p.replace(".self.", ".attention.")      # transformers: attention.attention.*
                keys[f"Qformer.bert.encoder.layer.{i}.{p}.{e}"] = f"qformer.encoder.layer.{i}.{ours}.{e}"
    return keys


# Tensors the files hold that MiniGPT-4 does not use, each with the reason (regexes, full match).
EVA_DROPPED = {
    r"blocks\.(\d+)\..*": "blocks past the built depth: BLIP-2 builds 39 of EVA-CLIP-g's 40 "
                          "blocks and uses the penultimate features",
    r"(norm|fc_norm|head)\.(weight|bias)": "EVA-CLIP's final norm and head, which LAVIS's "
                                           "VisionTransformer never builds",
}
BLIP2_DROPPED = {
    r"Qformer\.bert\.embeddings\.(word_embeddings\.weight|position_embeddings\.weight|position_ids)":
        "Q-Former text embeddings (only the query path is used)",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)":
        "Q-Former text FFNs (the queries have their own: intermediate_query / output_query)",
    r"Qformer\.cls\..*": "Q-Former LM head (image-grounded text generation)",
    r"(vision_proj|text_proj|itm_head)\.(weight|bias)|temp": "ITC / ITM heads of BLIP-2 stage 1",
    r"t5_proj\.(weight|bias)": "BLIP-2's projection into FlanT5 (MiniGPT-4 trains llama_proj instead)",
    r"t5_model\..*": "the frozen FlanT5 LLM",
    r"visual_encoder\..*": "a copy of the frozen ViT, if saved: it was frozen from eva_vit_g.pth, "
                            "which is where the ViT is read",
}


def _dropped(key: str, table: dict[str, str], depth: int | None = None) -> bool:
    for pattern in table:
        m = re.fullmatch(pattern, key)
        if m and (depth is None or not pattern.startswith("blocks") or int(m.group(1)) >= depth):
            return True
    return False


def _take(src: dict, keymap: dict[str, str], own: dict, where: Path, out: dict) -> None:
    """Move every tensor of `keymap` from `src` into `out`, checking it exists and its shape."""
    for k, ours in keymap.items():
        if k not in src:
            raise ValueError(f"{where}: missing tensor {k!r} (for {ours}, shape {tuple(own[ours].shape)})")
        t = src.pop(k)
        if t.shape != own[ours].shape:
            raise ValueError(f"{where}: {k!r} has shape {tuple(t.shape)}, {ours} needs "
                             f"{tuple(own[ours].shape)}")
        out[ours] = t


def read_lavis(encoder: nn.Module, eva_vit: str | Path, blip2: str | Path | None) -> dict[str, torch.Tensor]:
    """`encoder`'s state dict from LAVIS's `eva_vit_g.pth` and `blip2_pretrained_flant5xxl.pth`.

    Without a Q-Former (Llama-2 variant) MiniGPT-4 never reads the BLIP-2 file: its ln_vision
    keeps LayerNorm's initial weight 1 / bias 0, and so does ours (`blip2` is not read).
    Position embeddings are not interpolated (LAVIS does, for another image size): a size
    mismatch is an error.
    """
    cfg, own = encoder.cfg, encoder.state_dict()
    depth, width = cfg.vision["num_hidden_layers"], cfg.vision_width
    eva_vit = Path(eva_vit)
    eva = read_tensors(eva_vit)
    out: dict[str, torch.Tensor] = {}
    _take(eva, eva_keys(depth), own, eva_vit, out)
    for i in range(depth):                       # q, v biases (W,) each -> one (3W,) bias, k part 0
        qv = [f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias"]
        for k in qv:
            if k not in eva:
                raise ValueError(f"{eva_vit}: missing tensor {k!r} (shape ({width},))")
            if eva[k].shape != (width,):
                raise ValueError(f"{eva_vit}: {k!r} has shape {tuple(eva[k].shape)}, expected ({width},)")
        q, v = eva.pop(qv[0]), eva.pop(qv[1])
        out[f"vision.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    _reject_left_over(eva, eva_vit, EVA_DROPPED, depth)

    if cfg.qformer is None:       # MiniGPT-4's Llama-2 variant never reads the BLIP-2 file
        out["vision.post_layernorm.weight"] = torch.ones(width)
        out["vision.post_layernorm.bias"] = torch.zeros(width)
        return out
    if blip2 is None:
        raise ValueError("a Q-Former model needs the BLIP-2 file too (blip2_pretrained_flant5xxl.pth)")
    blip2 = Path(blip2)
    sd = read_tensors(blip2, unwrap="model")
    q = cfg.qformer
    _take(sd, blip2_keys(q["num_hidden_layers"], q.get("cross_attention_frequency", 2)), own, blip2, out)
    _reject_left_over(sd, blip2, BLIP2_DROPPED)
    return out


def _reject_left_over(rest: dict, where: Path, dropped: dict, depth: int | None = None) -> None:
    left = {k: tuple(v.shape) for k, v in rest.items() if not _dropped(k, dropped, depth)}
    if left:
        shown = ", ".join(f"{k} {s}" for k, s in list(left.items())[:6])
        raise ValueError(f"{where}: {len(left)} tensors neither read nor known to be unused: {shown}"
                         f"{' ...' if len(left) > 6 else ''}")


# ------------------------------------------------------------------ the projection
def read_projection(path: str | Path) -> dict[str, torch.Tensor]:
    """`llama_proj.weight` / `.bias` from our safetensors file, a trainer folder, or a released
    MiniGPT-4 `.pth` (`{"model": {...}}`; other tensors there, e.g. buffers, are ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"projection checkpoint {path} does not exist")
    sd = read_tensors(path, unwrap="model", required=False)
    if "llama_proj.weight" not in sd or "llama_proj.bias" not in sd:
        raise ValueError(f"{path} holds no llama_proj.weight / llama_proj.bias (keys: {sorted(sd)[:8]})")
    return {"llama_proj.weight": sd["llama_proj.weight"], "llama_proj.bias": sd["llama_proj.bias"]}


def write_projection(path: str | Path, weight: torch.Tensor, bias: torch.Tensor) -> Path:
    """Write `llama_proj` as the official demo loads it: `torch.load(path)["model"]` into
    `load_state_dict(..., strict=False)`. Weight (D_llm, D_in), bias (D_llm,), stored as given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = {"llama_proj.weight": weight.detach().cpu().clone().contiguous(),
             "llama_proj.bias": bias.detach().cpu().clone().contiguous()}
    torch.save({"model": model}, str(path))
    return path


# ------------------------------------------------------------------ writing LAVIS's files
def write_lavis(encoder: nn.Module, folder: str | Path, extra_blocks: int = 1) -> tuple[Path, Path]:
    """`encoder`'s weights as LAVIS's two files in `folder`, the layout `read_lavis` reads
    (the inverse of its key maps): `eva_vit_g.pth` a flat fp16 state dict with q / v biases
    and `extra_blocks` more blocks than the encoder builds (EVA-CLIP-g has 40, BLIP-2 uses 39;
    copies of the last), `blip2_pretrained_flant5xxl.pth` `{"model": {...}}` (fp32). For
    plumbing runs with random weights (gpu_profile.py) and tests."""
    cfg, own = encoder.cfg, {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    depth, width = cfg.vision["num_hidden_layers"], cfg.vision_width
    eva = {k: own[ours] for k, ours in eva_keys(depth).items()}
    for i in range(depth):
        q, _, v = own[f"vision.encoder.layers.{i}.self_attn.qkv.bias"].split(width)   # (3W,) -> 3 x (W,)
        eva[f"blocks.{i}.attn.q_bias"], eva[f"blocks.{i}.attn.v_bias"] = q, v
    last = f"blocks.{depth - 1}."
    for j in range(depth, depth + extra_blocks):
        eva.update({f"blocks.{j}." + k[len(last):]: t for k, t in list(eva.items()) if k.startswith(last)})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eva_path, blip2_path = (folder / f for f in LAVIS_FILES)
    torch.save({k: t.half().contiguous() for k, t in eva.items()}, str(eva_path))
    if cfg.qformer is not None:
        q = cfg.qformer
        keymap = blip2_keys(q["num_hidden_layers"], q.get("cross_attention_frequency", 2))
        torch.save({"model": {k: own[ours].float().contiguous() for k, ours in keymap.items()}}, str(blip2_path))
    return eva_path, blip2_path

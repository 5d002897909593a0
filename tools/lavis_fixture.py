"""Make the LAVIS parity fixture: LAVIS's own EVA-ViT, ln_vision and Q-Former (the frozen parts
of MiniGPT-4, paper §3) at a reduced size with seeded random weights, saved under LAVIS's key
names together with their outputs on a few fixed images.

Runs ONLY in the side venv, never in .venv (salesforce-lavis 1.0.2 pins transformers<4.27):

    make lavis-fixture          # writes tests/fixtures/lavis/
    make lavis-fixture-check    # rebuilds it elsewhere and compares with the committed one

Written files (tests/test_checkpoints.py reads them through minigpt4_min.checkpoints):
    eva_vit_g.safetensors   the ViT's state dict as in eva_vit_g.pth: depth + 1 blocks (the
                            file holds one block more than BLIP-2 builds, like EVA-CLIP-g's 40)
    blip2.safetensors       what blip2_pretrained_flant5xxl.pth holds under "model": ln_vision.*,
                            query_tokens, Qformer.* (with its text embeddings, text FFNs and LM
                            head, which MiniGPT-4 drops) and t5_proj.*
    outputs.safetensors     images (B, 3, S, S); vit (B, 1 + P, W) before ln_vision;
                            ln_vision (B, 1 + P, W); qformer (B, Q, H)
    config.json             the reduced sizes, the seed and the package versions

Only the modules needed are imported, past their packages' __init__ (which pull in datasets,
processors, torchvision, ...): lavis.models.eva_vit, lavis.models.blip2_models.Qformer, and
the `LayerNorm` class of lavis/models/blip2_models/blip2.py (read from its source, because
importing blip2.py pulls in most of LAVIS).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG = {
    "seed": 0,
    "image_size": 28, "patch_size": 7,                      # 16 patches + CLS = 17 tokens
    "vit": {"embed_dim": 32, "depth": 2, "num_heads": 2,
            "mlp_ratio": 4.3637},                           # EVA-g's ratio: int(32 * 4.3637) = 139
    "vit_blocks_in_file": 3,                                # one more than built, like 40 vs 39
    "qformer": {"vocab_size": 30, "hidden_size": 16, "num_hidden_layers": 4,
                "num_attention_heads": 2, "intermediate_size": 32,
                "max_position_embeddings": 16, "cross_attention_freq": 2},
    "num_query_token": 8,
    "t5_hidden": 12,
    "num_images": 3,
    "noise": 0.05,          # every weight is moved off its init (LayerNorms != 1/0, q/v biases != 0)
}


def _bare_package(pkg: str, names: list[str]) -> None:
    """Register packages without running their __init__.py, so that `import pkg.sub` runs only sub."""
    root = Path(importlib.util.find_spec(pkg).submodule_search_locations[0])
    for name in names:
        d = root.joinpath(*name.split(".")[1:])
        spec = importlib.util.spec_from_file_location(name, d / "__init__.py", submodule_search_locations=[str(d)])
        sys.modules[name] = importlib.util.module_from_spec(spec)


def import_lavis():
    """LAVIS's eva_vit and Qformer modules, and blip2.py's LayerNorm class."""
    _bare_package("timm", ["timm", "timm.models"])
    import timm.version
    sys.modules["timm"].__version__ = timm.version.__version__   # timm.models.hub asks for it
    _bare_package("lavis", ["lavis", "lavis.common", "lavis.models", "lavis.models.blip2_models"])
    import lavis.models.blip2_models.Qformer as qformer
    from lavis.models import eva_vit
    blip2_py = Path(sys.modules["lavis.models"].__path__[0]) / "blip2_models" / "blip2.py"
    tree = ast.parse(blip2_py.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LayerNorm")
    ns = {"torch": torch, "nn": nn}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(blip2_py), "exec"), ns)  # noqa: S102
    return eva_vit, qformer, ns["LayerNorm"]


def _perturb(module: nn.Module, g: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _images(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(n, 3, S, S) fixed inputs in the normalized range: a ramp, a checkerboard, noise."""
    y, x = torch.meshgrid(torch.linspace(-1.5, 1.5, size), torch.linspace(-1.5, 1.5, size), indexing="ij")
    ramp = torch.stack([x, y, x * y])
    checker = ((torch.arange(size)[:, None] // 4 + torch.arange(size)[None, :] // 4) % 2).float() * 3 - 1.5
    imgs = [ramp, checker.expand(3, -1, -1), torch.randn(3, size, size, generator=g)]
    return torch.stack((imgs * n)[:n]).contiguous()


def build(out: Path) -> None:
    torch.set_num_threads(1)                     # one thread: the same sums in the same order
    torch.manual_seed(CONFIG["seed"])
    g = torch.Generator().manual_seed(CONFIG["seed"] + 1)
    eva_vit, qformer_mod, LayerNorm = import_lavis()
    v, q, s = CONFIG["vit"], CONFIG["qformer"], CONFIG["image_size"]

    # the ViT as create_eva_vit_g makes it (qkv_bias, LayerNorm eps 1e-6, no final norm), smaller
    def vit(depth):
        return eva_vit.VisionTransformer(img_size=s, patch_size=CONFIG["patch_size"], use_mean_pooling=False,
                                         embed_dim=v["embed_dim"], depth=depth, num_heads=v["num_heads"],
                                         mlp_ratio=v["mlp_ratio"], qkv_bias=True, drop_path_rate=0.0,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
    in_file = vit(CONFIG["vit_blocks_in_file"])
    _perturb(in_file, g, CONFIG["noise"])
    eva_sd = {k: t.clone().contiguous() for k, t in in_file.state_dict().items()}
    visual_encoder = vit(v["depth"]).eval()
    res = visual_encoder.load_state_dict(eva_sd, strict=False)   # as create_eva_vit_g loads it
    assert not res.missing_keys and all(k.startswith(f"blocks.{v['depth']}.") for k in res.unexpected_keys)

    ln_vision = LayerNorm(v["embed_dim"])        # Blip2Base.init_vision_encoder: LayerNorm(num_features)
    _perturb(ln_vision, g, CONFIG["noise"])

    # the Q-Former as MiniGPT-4's init_Qformer makes it (BertLMHeadModel, cross-attention every 2nd layer)
    bert_cfg = qformer_mod.BertConfig(vocab_size=q["vocab_size"], hidden_size=q["hidden_size"],
                                      num_hidden_layers=q["num_hidden_layers"],
                                      num_attention_heads=q["num_attention_heads"],
                                      intermediate_size=q["intermediate_size"],
                                      max_position_embeddings=q["max_position_embeddings"])
    bert_cfg.encoder_width = v["embed_dim"]
    bert_cfg.add_cross_attention = True
    bert_cfg.cross_attention_freq = q["cross_attention_freq"]
    bert_cfg.query_length = CONFIG["num_query_token"]
    Qformer = qformer_mod.BertLMHeadModel(config=bert_cfg).eval()
    query_tokens = torch.zeros(1, CONFIG["num_query_token"], q["hidden_size"])
    query_tokens.normal_(mean=0.0, std=bert_cfg.initializer_range, generator=g)
    t5_proj = nn.Linear(q["hidden_size"], CONFIG["t5_hidden"])
    for m in (Qformer, t5_proj):
        _perturb(m, g, CONFIG["noise"])
    query_tokens += torch.randn(query_tokens.shape, generator=g) * CONFIG["noise"]

    blip2_sd = {"query_tokens": query_tokens}
    for prefix, m in (("ln_vision.", ln_vision), ("Qformer.", Qformer), ("t5_proj.", t5_proj)):
        blip2_sd.update({prefix + k: t for k, t in m.state_dict().items()})
    blip2_sd = {k: t.clone().contiguous() for k, t in blip2_sd.items()}   # the LM head is tied: unshare

    images = _images(CONFIG["num_images"], s, g)
    with torch.no_grad():                        # MiniGPT-4's encode_img, in fp32 on the CPU
        vit_out = visual_encoder(images)                                   # (B, 1 + P, W)
        ln_out = ln_vision(vit_out)                                        # (B, 1 + P, W)
        atts = torch.ones(ln_out.shape[:-1], dtype=torch.long)
        q_out = Qformer.bert(query_embeds=query_tokens.expand(images.shape[0], -1, -1),
                             encoder_hidden_states=ln_out, encoder_attention_mask=atts,
                             return_dict=True).last_hidden_state            # (B, Q, H)

    import timm  # the bare package, its __version__ set above
    import transformers
    out.mkdir(parents=True, exist_ok=True)
    save_file(eva_sd, str(out / "eva_vit_g.safetensors"))
    save_file(blip2_sd, str(out / "blip2.safetensors"))
    save_file({"images": images, "vit": vit_out.contiguous(), "ln_vision": ln_out.contiguous(),
               "qformer": q_out.contiguous()}, str(out / "outputs.safetensors"))
    versions = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                "timm": timm.__version__, "salesforce-lavis": version("salesforce-lavis")}
    (out / "config.json").write_text(json.dumps({**CONFIG, "made_with": versions}, indent=2) + "\n")
    print(f"wrote {out}: {sum(f.stat().st_size for f in out.iterdir()) / 1024:.0f} KiB")


# A rebuild equals the committed fixture up to float32 rounding, not bit for bit: torch's CPU
# kernels (the vectorised init, the matrix multiplies) round differently on other instruction
# sets and thread counts. Rebuilt on a 2-core AVX-512 machine (2026-12-02) the weights differed
# by up to 7.5e-9 and the outputs by up to 1.2e-6; the tolerance is the parity tests' (1e-5,
# tests/test_encoder.py), far below what a changed key, init or layer would move.
ATOL = RTOL = 1e-5


def compare(new: Path, ref: Path, atol: float = ATOL, rtol: float = RTOL) -> int:
    """0 when `new` holds the same config, keys, shapes and dtypes as `ref`, and every weight
    and output agrees within |a - b| <= atol + rtol |b|; the largest difference is printed."""
    bad, worst = [], 0.0
    if json.loads((new / "config.json").read_text()) != json.loads((ref / "config.json").read_text()):
        bad.append("config.json differs")
    for name in ("eva_vit_g", "blip2", "outputs"):
        a, b = load_file(str(new / f"{name}.safetensors")), load_file(str(ref / f"{name}.safetensors"))
        if a.keys() != b.keys():
            bad.append(f"{name}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}")
            continue
        for k in a:
            if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
                bad.append(f"{name}/{k}: {tuple(a[k].shape)} {a[k].dtype} vs {tuple(b[k].shape)} {b[k].dtype}")
                continue
            if not a[k].numel():
                continue
            diff = (a[k].double() - b[k].double()).abs()
            worst = max(worst, diff.max().item())
            if (diff > atol + rtol * b[k].double().abs()).any():
                bad.append(f"{name}/{k}: max abs diff {diff.max().item():.3g} (tolerance {atol:g} + {rtol:g} x |ref|)")
    print("\n".join(bad) if bad else
          f"{new} reproduces {ref} (largest difference {worst:.3g}; tolerance {atol:g} + {rtol:g} x |ref|)")
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="a committed fixture the new one must equal")
    args = ap.parse_args()
    build(args.out)
    if args.compare:
        sys.exit(compare(args.out, args.compare))

"""The frozen visual encoder of MiniGPT-4: BLIP-2's ViT + Q-Former (paper §3, Fig. 1).

    image (B, 3, S, S)
      -> ViT (EVA ViT-g/14 at full scale)       (B, 1 + P, Wv)   P = (S / patch)^2
      -> ln_vision (LayerNorm, in fp32)          (B, 1 + P, Wv)
      -> Q-Former: Q learned queries cross-attend to the image
                                                 (B, Q, Hq)       Q = 32, Hq = 768 at full scale

transformers' `Blip2VisionModel` (its `post_layernorm` is LAVIS's `ln_vision`) and
`Blip2QFormerModel` are the maintained port of exactly these parts; the query tokens
are our own parameter. The Llama-2 variant has no Q-Former: it drops CLS and groups 4
adjacent patch tokens, (B, 256, 1408) -> (B, 64, 5632).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from .checkpoints import LAVIS_FILES, is_blip2_hf, load_strict, read_blip2_hf, read_lavis
from .config import ModelConfig, reads_patches
from .llm import freeze


class VisualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # initializer_range defaults to 1e-10 in Blip2VisionConfig: weights would be ~0
        self.vision = Blip2VisionModel(Blip2VisionConfig(**cfg.vision, initializer_range=0.02))
        if cfg.ln_vision_eps is not None:   # LAVIS's ln_vision: eps 1e-5, the ViT's own norms 1e-6
            self.vision.post_layernorm.eps = cfg.ln_vision_eps
        self.qformer = None
        if cfg.qformer is not None:
            qcfg = Blip2QFormerConfig(**cfg.qformer)
            qcfg._attn_implementation = "sdpa"   # eager only while attention maps are asked for
            assert qcfg.encoder_hidden_size == cfg.vision_width, "Q-Former must read the ViT's width"
            self.qformer = Blip2QFormerModel(qcfg)
            self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, qcfg.hidden_size) * 0.02)

    @property
    def out_dim(self) -> int:
        return self.cfg.proj_in

    def vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + P, Wv): ViT tokens after ln_vision, computed in fp32."""
        return self.ln_vision(self.vit_tokens(pixel_values))

    def vit_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + P, Wv): the last ViT block's output, before ln_vision
        (EVA has no final norm of its own), in the ViT's dtype."""
        v = self.vision
        w = next(v.encoder.parameters())                                # the ViT's device and dtype
        x = v.embeddings(pixel_values.to(w.device, w.dtype))            # (B, 1 + P, Wv)
        return v.encoder(inputs_embeds=x).last_hidden_state

    def ln_vision(self, x: torch.Tensor) -> torch.Tensor:
        """LAVIS's ln_vision (transformers' `post_layernorm`), always computed in fp32."""
        ln = self.vision.post_layernorm
        return nn.functional.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(),
                                        ln.bias.float(), ln.eps)

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False, projector: str | None = None):
        """(B, 3, S, S) -> (B, N, D) image features that `llama_proj` maps into the LLM.

        With `output_attentions`, also returns the Q-Former's cross-attention maps, a list
        of (B, heads, Q, 1 + P) tensors, one per cross-attention layer.
        """
        return self.read_out(self.vit(pixel_values), output_attentions, projector)

    def read_out(self, img: torch.Tensor, output_attentions: bool = False, projector: str | None = None):
        """ViT tokens (B, 1+P, Wv) -> image features: Q-Former queries (B, Q, Hq), grouped
        patches (B, P/g, g*Wv), or, for a "finetune_qformer" projector, the input of the
        Q-Former's last layer (B, Q, Hq), which `projectors.QFormerHead` trains a copy of.
        `projector` (default `cfg.projector`) picks which (notebook 06 computes all three)."""
        projector = projector or self.cfg.projector
        if reads_patches(self.cfg, projector):                          # Llama-2 variant / no_qformer
            patches = img[:, 1:, :]                                     # (B, P, Wv)
            b, p, w = patches.shape
            g = self.cfg.proj_group
            return patches.reshape(b, p // g, w * g)                    # (B, P/g, g*Wv)
        img = img.to(self.query_tokens.device)                          # low_resource: ViT on the CPU
        q = self.query_tokens.expand(img.shape[0], -1, -1).to(img.dtype)  # (B, Q, Hq)
        # SDPA is ~15% faster on CPU but cannot return attention maps (notebook 01 shows them)
        self.qformer.set_attn_implementation("eager" if output_attentions else "sdpa")
        before_last = []
        hook = None
        if projector == "finetune_qformer":                             # keep the last layer's input
            hook = self.qformer.encoder.layer[-1].register_forward_pre_hook(
                lambda mod, args: before_last.append(args[0]))
        try:
            out = self.qformer(query_embeds=q, encoder_hidden_states=img,
                               encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long,
                                                                 device=img.device),
                               output_attentions=output_attentions)
        finally:
            if hook is not None:
                hook.remove()
        feats = before_last[0] if before_last else out.last_hidden_state  # (B, Q, Hq)
        if output_attentions:
            return feats, [a for a in out.cross_attentions if a is not None]
        return feats

    # ------------------------------------------------------------ saving / loading
    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        meta = {"image_size": self.cfg.image_size, "vision": self.cfg.vision,
                "qformer": self.cfg.qformer, "num_query_tokens": self.cfg.num_query_tokens}
        (folder / "config.json").write_text(json.dumps({**meta, **(extra or {})}, indent=2))

    @classmethod
    def load(cls, cfg: ModelConfig, folder: str | Path | None = None) -> "VisualEncoder":
        """Build the encoder for `cfg` and load its frozen weights.

        `folder` (default `cfg.encoder_path`) is one written by `save` (tiny scale), a
        transformers BLIP-2 checkpoint (e.g. Salesforce/blip2-flan-t5-xxl), from which only
        `vision_model.*`, `qformer.*` and `query_tokens` are read, or a folder holding LAVIS's
        `eva_vit_g.pth` and `blip2_pretrained_flant5xxl.pth` (see `from_lavis`).
        """
        folder = Path(folder or cfg.encoder_path)
        eva, blip2 = (folder / f for f in LAVIS_FILES)
        if eva.exists() and (blip2.exists() or cfg.qformer is None):   # Llama-2: the ViT file only
            return cls.from_lavis(cfg, eva, blip2 if cfg.qformer is not None else None)
        enc = cls(cfg)
        if (folder / "model.safetensors").exists() and not is_blip2_hf(folder):
            sd = load_file(str(folder / "model.safetensors"))
        else:
            sd = read_blip2_hf(folder, want_qformer=cfg.qformer is not None)
        load_strict(enc, sd, folder)
        return freeze(enc.to_config_dtypes())

    @classmethod
    def from_lavis(cls, cfg: ModelConfig, eva_vit: str | Path,
                   blip2: str | Path | None = None) -> "VisualEncoder":
        """The encoder from LAVIS's files, as MiniGPT-4 builds it: the ViT (first
        `num_hidden_layers` blocks) from `eva_vit_g.pth`; ln_vision, the Q-Former's query path
        and the query tokens from `blip2_pretrained_flant5xxl.pth` (`checkpoints.read_lavis`)."""
        enc = cls(cfg)
        enc.load_state_dict(read_lavis(enc, eva_vit, blip2), strict=True)
        return freeze(enc.to_config_dtypes())

    def place(self, vit_device: str | torch.device, device: str | torch.device) -> "VisualEncoder":
        """The official demo's low-resource layout: the ViT and ln_vision on `vit_device` in
        fp32 (MiniGPT-4 moves them to the CPU and calls `.float()`), the Q-Former and the query
        tokens on `device` (the GPU the 8-bit LLM is on). `forward` moves the ViT's tokens over."""
        self.vision.to(vit_device, torch.float32)                       # ViT + post_layernorm (ln_vision)
        if self.qformer is not None:
            self.qformer.to(device)
            q = self.query_tokens                                       # (1, Q, Hq)
            self.query_tokens = nn.Parameter(q.detach().to(device), requires_grad=q.requires_grad)
        return self

    def to_config_dtypes(self) -> "VisualEncoder":
        """The ViT in `cfg.vit_dtype` (fp16 at full scale, as the paper runs it), its final
        LayerNorm and the Q-Former in fp32 (`vit` computes ln_vision in fp32)."""
        self.vision.to(getattr(torch, self.cfg.vit_dtype))
        self.vision.post_layernorm.float()
        return self


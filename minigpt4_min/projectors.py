"""The trainable bridge between the frozen encoder and the frozen LLM, and its ablations.

MiniGPT-4's claim is that ONE linear layer is enough (paper §3, and its architecture
ablation on AOK-VQA / GQA, DESIGN.md §2). `build_projector` makes the paper's layer, the
default, or one of the variants that ablation compares, all behind `MiniGPT4.llama_proj`:

    kind               features (frozen, cacheable)               trainable part
    linear             Q-Former output      (B, Q, Hq)           Linear(Hq, D)              the paper's
    mlp2 / mlp3        Q-Former output      (B, Q, Hq)           2 / 3 Linear, GELU between
    no_qformer         ViT patches, 4 adjacent concatenated       Linear(4 Wv, D)            the Llama-2 variant's
                       (B, P/4, 4 Wv)
    finetune_qformer   input of the Q-Former's last layer         that layer (a trainable    "finetune the Q-Former"
                       (B, Q, Hq)                                 copy) + Linear(Hq, D)

Whatever the kind, the features stay a pure function of the frozen encoder (the encoder's
`read_out` makes them, `ModelConfig.projector` picks which), so they are cached once and
only the part on the right trains. The Q-Former's last layer has no cross-attention (it
cross-attends every `cross_attention_frequency` = 2 layers, from layer 0), so it reads
only the queries, and its input is all it needs.
"""
from __future__ import annotations

import copy

from torch import nn

KINDS = ("linear", "mlp2", "mlp3", "no_qformer", "finetune_qformer")

# The paper's architecture ablation (arXiv 2304.10592; DESIGN.md §2), accuracy in %.
PAPER = {
    "linear": {"AOK-VQA": 58.2, "GQA": 32.2},
    "no_qformer": {"AOK-VQA": 56.9, "GQA": 33.4},
    "mlp3": {"AOK-VQA": 49.7, "GQA": 31.0},
    "finetune_qformer": {"AOK-VQA": 52.1, "GQA": 28.0},
}
LABELS = {"linear": "one linear layer", "mlp2": "2 linear layers (GELU)", "mlp3": "3 linear layers (GELU)",
          "no_qformer": "no Q-Former", "finetune_qformer": "finetune the Q-Former's last layer"}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown projector {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


class MLP(nn.Sequential):
    """`layers` linear layers with GELU between, every hidden width the LLM's: (B, N, d_in) -> (B, N, D)."""

    def __init__(self, d_in: int, d_llm: int, layers: int):
        mods: list[nn.Module] = [nn.Linear(d_in, d_llm)]
        for _ in range(layers - 1):
            mods += [nn.GELU(), nn.Linear(d_llm, d_llm)]
        super().__init__(*mods)


class QFormerHead(nn.Module):
    """A trainable copy of the Q-Former's last layer, then the linear layer.

    (B, Q, Hq) input of the last layer -> the layer -> (B, Q, Hq) -> Linear -> (B, Q, D).
    At initialisation it computes exactly what the frozen Q-Former's last layer does."""

    def __init__(self, qformer: nn.Module, d_llm: int):
        super().__init__()
        last = qformer.encoder.layer[-1]
        if last.has_cross_attention:
            raise ValueError("finetune_qformer trains the Q-Former's last layer from its cached input; "
                             "this Q-Former's last layer cross-attends to the image and would need the ViT too")
        self.layer = copy.deepcopy(last)
        for p in self.layer.parameters():
            p.requires_grad_(True)
        self.proj = nn.Linear(qformer.config.hidden_size, d_llm)

    def forward(self, x):                                    # x: (B, Q, Hq)
        h = self.layer(x, None, None, query_length=x.shape[1])
        return self.proj(h)                                  # (B, Q, D)


def build_projector(cfg, d_llm: int, encoder=None) -> nn.Module:
    """The trainable module for `cfg.projector`, mapping `encoder.read_out`'s features
    (B, N, cfg.proj_in) to image tokens (B, N, d_llm). The default is `nn.Linear`: the paper's."""
    kind = check_kind(getattr(cfg, "projector", "linear"))
    if kind in ("linear", "no_qformer"):
        return nn.Linear(cfg.proj_in, d_llm)
    if kind in ("mlp2", "mlp3"):
        return MLP(cfg.proj_in, d_llm, int(kind[-1]))
    if encoder is None or encoder.qformer is None:
        raise ValueError("finetune_qformer needs an encoder with a Q-Former")
    return QFormerHead(encoder.qformer, d_llm)

"""Named presets: the model (`ModelConfig`) and the two training stages (`TrainConfig`).

Values for the full scale are the paper's (arXiv 2304.10592 §3 and its public configs,
DESIGN.md §2); `tiny` is the project's miniature of the same architecture.

    >>> cfg = get_config("vicuna13b"); cfg.qformer["num_hidden_layers"], cfg.num_query_tokens
    (12, 32)
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MINIGPT4_MIN_DATA", REPO_ROOT / "data"))

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Vicuna v0 / stage-2 training template and its end symbol (DESIGN.md §2).
VICUNA_TEMPLATE = "###Human: {} ###Assistant: "
LLAMA2_TEMPLATE = "[INST] {} [/INST] "


@dataclass
class ModelConfig:
    """Everything that defines a MiniGPT-4 variant. Dicts are kwargs of transformers configs."""
    name: str
    image_size: int
    vision: dict                      # -> Blip2VisionConfig
    qformer: dict | None              # -> Blip2QFormerConfig; None = Llama-2 variant (no Q-Former)
    num_query_tokens: int
    llm: dict                         # -> LlamaConfig (used for parameter counts / tiny init)
    encoder_path: str = ""            # folder with the frozen encoder weights
    llm_path: str = ""                # HF-format LLM folder (weights + tokenizer)
    proj_group: int = 4               # where the features are ViT patches (`reads_patches`: the Llama-2
                                      # variant, the no_qformer ablation): 4 adjacent patch tokens -> 1 token
    vit_dtype: str = "float32"        # the paper runs the ViT in fp16 on GPUs
    ln_vision_eps: float | None = None  # LAVIS's ln_vision is nn.LayerNorm's 1e-5; None = the ViT's eps
    llm_dtype: str = "float32"
    prompt_template: str = VICUNA_TEMPLATE
    end_sym: str = "###"
    max_txt_len_stage1: int = 32
    max_txt_len_stage2: int = 160
    context_len: int = 2000           # chat context (prompt + answer); tiny LLM: 512-token blocks
    train_transform: str = "resize"   # "random_resized_crop" at full scale
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    # the official demo's `low_resource: True` (its eval configs): the LLM in 8-bit through
    # bitsandbytes on GPU `device_8bit`, the ViT and ln_vision on the CPU in fp32 (CUDA only;
    # `pip install 'minigpt4-min[gpu]'`; llm.load_llm, MiniGPT4.from_config, memory.py)
    low_resource: bool = False
    device_8bit: int = 0
    # the trainable bridge (projectors.py): "linear", the paper's ONE layer; the other kinds
    # exist for the architecture ablation of notebook 06 ("no_qformer" reads ViT patches
    # grouped `proj_group` at a time, as the Llama-2 variant does)
    projector: str = "linear"

    @property
    def reads_patches(self) -> bool:
        """The image features are grouped ViT patches, not Q-Former queries."""
        return reads_patches(self, self.projector)

    @property
    def vision_width(self) -> int:
        return self.vision["hidden_size"]

    @property
    def proj_in(self) -> int:
        """Input width of `llama_proj`: Q-Former width, or grouped ViT width (Llama-2)."""
        if self.reads_patches:
            return self.vision_width * self.proj_group
        return self.qformer["hidden_size"]

    @property
    def num_image_tokens(self) -> int:
        if self.reads_patches:
            patches = (self.image_size // self.vision["patch_size"]) ** 2
            return patches // self.proj_group
        return self.num_query_tokens


def reads_patches(cfg: ModelConfig, projector: str) -> bool:
    """Whether `projector` on this model reads grouped ViT patches (no Q-Former in the model, or
    the no_qformer ablation) rather than Q-Former queries."""
    return cfg.qformer is None or projector == "no_qformer"


@dataclass
class TrainConfig:
    """One training stage: AdamW + linear warmup then cosine (paper §3, DESIGN.md §2)."""
    lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    max_steps: int
    batch_size: int
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    seed: int = 42
    log_every: int = 10
    ckpt_every: int = 0               # 0 = only at the end
    # memory (memory.py): `batch_size` is the MICRO-batch; one optimizer step accumulates
    # `accum_steps` of them, so the global batch is batch_size x accum_steps (x GPUs), e.g.
    # batch 8 x 4 = 32. The update equals one batch of that size (train.Trainer).
    accum_steps: int = 1
    grad_checkpointing: bool = False  # recompute the frozen LLM's activations in backward

    def __post_init__(self):
        for name in ("batch_size", "accum_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step on one process: batch_size x accum_steps."""
        return self.batch_size * self.accum_steps

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------- model presets
EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                 num_attention_heads=16, image_size=224, patch_size=14, qkv_bias=True,
                 layer_norm_eps=1e-6)
BLIP2_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, cross_attention_frequency=2,
                     encoder_hidden_size=1408, vocab_size=30522)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, vocab_size=32000, max_position_embeddings=2048)
VICUNA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, vocab_size=32000, max_position_embeddings=2048)
LLAMA2_7B = dict(VICUNA_7B, max_position_embeddings=4096)

TINY_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, image_size=64, patch_size=8, qkv_bias=True,
                   layer_norm_eps=1e-6)
TINY_QFORMER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=512, cross_attention_frequency=2,
                    encoder_hidden_size=128, vocab_size=2)
TINY_LLM = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=6, max_position_embeddings=512)  # vocab from tokenizer

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig("tiny", 64, TINY_VISION, TINY_QFORMER, 24, TINY_LLM,
                        encoder_path=str(DATA_DIR / "tiny" / "encoder"),
                        llm_path=str(DATA_DIR / "tiny" / "llm"), context_len=512),
    "vicuna7b": ModelConfig("vicuna7b", 224, EVA_VIT_G, BLIP2_QFORMER, 32, VICUNA_7B,
                            encoder_path="Salesforce/blip2-flan-t5-xxl", llm_path="vicuna-7b",
                            vit_dtype="float16", llm_dtype="float16", ln_vision_eps=1e-5,
                            train_transform="random_resized_crop"),
    "vicuna13b": ModelConfig("vicuna13b", 224, EVA_VIT_G, BLIP2_QFORMER, 32, VICUNA_13B,
                             encoder_path="Salesforce/blip2-flan-t5-xxl", llm_path="vicuna-13b",
                             vit_dtype="float16", llm_dtype="float16", ln_vision_eps=1e-5,
                             train_transform="random_resized_crop"),
    "llama2-7b": ModelConfig("llama2-7b", 224, EVA_VIT_G, None, 0, LLAMA2_7B,
                             encoder_path="Salesforce/blip2-flan-t5-xxl",
                             llm_path="Llama-2-7b-chat-hf", proj_group=4,
                             vit_dtype="float16", llm_dtype="float16", ln_vision_eps=1e-5,
                             prompt_template=LLAMA2_TEMPLATE, end_sym="</s>",
                             train_transform="random_resized_crop"),
}

# ---------------------------------------------------------------- training presets
STAGE1: dict[str, TrainConfig] = {
    # paper: 4 epochs x 5000 iters, 64/GPU x 4 GPUs
    "full": TrainConfig(lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000,
                        max_steps=20000, batch_size=64, ckpt_every=5000),
    # tiny: same schedule shape, scaled to minutes on 2 CPU cores. Batch 32 for 1,500 steps
    # (benchmarks/stage1_recipes.py, seeds 0 / 1 / 2): 0.63 of the compute of 1,200 x 64,
    # caption attribute accuracy within 0.01 of it on every seed and the detailed-description
    # failure rate about as low (numbers in benchmarks/results/stage1_recipes.json). Tried and
    # not kept: 1,200 x 32 (half the compute; detailed failure higher on every seed, 0.039
    # against 0.021 on average), 1,200 x 40, lr 7e-3 or min_lr 1e-4 at 1,200 x 32, 600 steps of
    # 64 at lr 2e-2 (seed 1's captions 0.958), 800 of 64 at 2e-2 (after notebooks 03-04 VQA
    # 0.72 -> 0.68) and the tiny ViT in bf16 (`vit_dtype`: stage 2's failure 2 -> 4 of 300,
    # turn-5 check -0.03 -> -0.13)
    "tiny": TrainConfig(lr=1e-2, min_lr=1e-3, warmup_lr=1e-5, warmup_steps=100,
                        max_steps=1500, batch_size=32, log_every=20),
}
# max_steps: notebook 04 scales it to the curated set with `stage2.steps_for` (1.4 passes);
# the values here are what that gives for the paper's set (3,439 pairs) and our default (776).
STAGE2: dict[str, TrainConfig] = {
    "full": TrainConfig(lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200,
                        max_steps=400, batch_size=12),
    "tiny": TrainConfig(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=30,
                        max_steps=68, batch_size=16),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A fresh copy of a preset; keyword overrides replace fields (e.g. `llm_path=`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown scale {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def train_config(stage: int, scale: str, **overrides) -> TrainConfig:
    table = {1: STAGE1, 2: STAGE2}[stage]
    return table["tiny" if scale == "tiny" else "full"].replace(**overrides)

"""How much GPU memory MiniGPT-4 needs, estimated from first principles before anything
loads (paper §3.1 stage 1: 64 images per A100; §3.3 stage 2: batch 12; the demo of §4 and
the official `low_resource` mode: Vicuna in 8-bit so that 13B fits a 24 GB card).

    >>> describe(get_config("vicuna7b"), stage=2, batch=12)[:41]
    'vicuna7b stage 2, batch 12 x 223 tokens: '

`estimate(...)` returns a `MemoryEstimate`: `peak_gib` is what the tensors need at the
worst moment, the number `torch.cuda.max_memory_allocated()` reports; `device_gib` adds
the CUDA context and the caching allocator's slack (closer to what nvidia-smi shows).

What is counted (s = bytes per value of the LLM's dtype; d, f, H, L, V = LLaMA's width,
MLP width, heads, layers, vocabulary; T = tokens per sequence, B = sequences)
- weights: parameters counted on the meta device (`sizes.count_parts`) x bytes of their
  dtype: ViT in `vit_dtype` (on the CPU in low_resource mode: 0 here), Q-Former in fp32,
  LLM in `llm_dtype`. 8-bit (LLM.int8()): each decoder Linear 1 byte per weight + an fp32
  scale per output row; embeddings, norms and lm_head keep 2 bytes.
- optimizer: AdamW's two fp32 moments of llama_proj (its gradient only appears once
  backward has freed the activations, so it is not at the peak).
- activations: what autograd keeps to send the loss's gradient back to llama_proj through
  the frozen LLM. A frozen linear layer keeps nothing of its input (PyTorch saves a
  matmul's input only for the weight's gradient). Per decoder layer and token:
      2 RMSNorms: their input upcast to fp32, and 1/rms        2 x (4 d + 4)
      attention (fused SDPA): q, k after RoPE, v, the output  4 s d
        + its log-sum-exp (fp32 per head), the mask's row     4 H + s T
      MLP: gate (for SiLU's backward), SiLU(gate), up         3 s f
  = 128.5 KiB at 7B in fp16 (4 MiB per token over 32 layers); `test_memory.py` measures
  these bytes with autograd's saved-tensor hooks on a small LLaMA and finds them exactly.
  8-bit: bitsandbytes' MatMul8bitLt also keeps its fp16 input when that requires grad:
  + s (3 d + f) (q/k/v share one input, o, gate/up share one, down). Gradient
  checkpointing: each layer keeps only its input (s d), and one layer's set is rebuilt
  at a time in backward. Once per token: the final norm (4 d + 4), the input embeddings
  (s d), the labels (8); once per image token: llama_proj's fp32 input (proj_in x 4).
- logits: the loss upcasts the (B, T, V) logits to fp32; when backward starts, the saved
  fp32 log-softmax, its incoming gradient and its outgoing gradient are alive at once:
  12 V bytes per token (0.37 MiB at V = 32,000), the largest term after the activations.
- encoder: with images in the step, the ViT runs first under no_grad, one block at a time
  (residual, normed input, MLP hidden before and after GELU: s_vit (2 W + 2 F) per image
  token) plus ln_vision's fp32 output; a phase of its own, so the peak is the larger phase.
- chat: the KV cache, 2 L d s per token of context (answer included) per beam; the
  prefill's largest transient (one layer over the prompt: s (3 f + 4 d) + 4 d per token);
  logits for the last position only.

No constant is fitted to measurements. Sequence lengths default to the presets' longest
(every caption 32 tokens, every answer 160; the stage-2 prompt ~30 LLaMA tokens): pass
`text_tokens` for your data. `CUDA_CONTEXT_GIB` and `ALLOCATOR_SLACK` (in `device_gib`
only) are rules of thumb. Measured: benchmarks/results/full_scale_h200.json (random
weights, one H200) holds six training peaks; the estimate lies within 1 % of each of
them (`test_memory.py` holds it to +-15 %). The 8-bit mode and checkpointing are derived,
not yet measured here: the maintainers report the 8-bit demo at about 23 GB (13B) and
11.5 GB (7B) in nvidia-smi, with an older bitsandbytes and the ViT on the GPU, well above
this estimate's 15.8 / 9.0 GiB for a full 2000-token context (issue 14, part 7, measures it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .config import ModelConfig, get_config

GiB = 2 ** 30
BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}
CUDA_CONTEXT_GIB = 0.5          # rule of thumb: the driver's context and kernels, outside torch's allocator
ALLOCATOR_SLACK = 0.05          # rule of thumb: blocks the caching allocator holds but no tensor uses
STAGE2_PROMPT_TOKENS = 30       # `###Human: <Img>` + `</Img> <instruction> ###Assistant: ` in LLaMA's tokenizer, about
CHAT_NEW_TOKENS = 300           # the demo's max_new_tokens


@dataclass
class MemoryEstimate:
    name: str
    stage: str                   # "1", "2" or "chat"
    batch: int                   # sequences: the (micro-)batch, or chat's beams
    seq_len: int                 # tokens per sequence (chat: the whole context, answer included)
    parts: dict = field(default_factory=dict)    # GiB per part (see the module docstring)
    peak_gib: float = 0.0        # ~ torch.cuda.max_memory_allocated()
    device_gib: float = 0.0      # + CUDA context + allocator slack

    def __str__(self) -> str:
        what = (f"chat, {self.batch} beam(s) x {self.seq_len} tokens of context" if self.stage == "chat"
                else f"stage {self.stage}, batch {self.batch} x {self.seq_len} tokens")
        shown = ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items() if v >= 0.05)
        return (f"{self.name} {what}: peak ~{self.peak_gib:.1f} GiB "
                f"of tensors ({shown}); ~{self.device_gib:.1f} GiB on the card with the CUDA context")


def layer_bytes_per_token(d: int, f: int, heads: int, seq_len: int, s: int, int8: bool = False) -> int:
    """Bytes autograd keeps per decoder layer and token for gradients w.r.t. the inputs only."""
    norms = 2 * (4 * d + 4)                       # fp32 copy of the input + 1/rms, two RMSNorms
    attention = 4 * s * d + 4 * heads + s * seq_len   # q, k, v, out; log-sum-exp; mask row
    mlp = 3 * s * f                               # gate, SiLU(gate), up
    extra = s * (3 * d + f) if int8 else 0        # MatMul8bitLt keeps its fp16 inputs
    return norms + attention + mlp + extra


_COUNTS: dict[str, dict] = {}


def param_counts(cfg: ModelConfig) -> dict:
    """`sizes.count_parts` (meta device) plus the 8-bit split of the LLM: the decoder's Linear
    weights and output rows; the rest (embeddings, norms, lm_head) is checked to add up."""
    key = json.dumps([cfg.name, cfg.vision, cfg.qformer, cfg.llm, cfg.num_query_tokens, cfg.proj_group])
    if key not in _COUNTS:
        from .sizes import count_parts, llm_kwargs
        c = count_parts(cfg)
        kw = llm_kwargs(cfg)
        d, f, H, L, V = (kw["hidden_size"], kw["intermediate_size"], kw["num_attention_heads"],
                         kw["num_hidden_layers"], kw["vocab_size"])
        hd, kv = d // H, kw.get("num_key_value_heads", H)
        linear = d * H * hd + 2 * d * kv * hd + H * hd * d + 3 * d * f    # q, k, v, o; gate, up, down
        rows = H * hd + 2 * kv * hd + d + 2 * f + d
        others = 2 * V * d + (2 * L + 1) * d                               # embed, lm_head; norms
        if L * linear + others != c["llm"]:
            raise AssertionError(f"{cfg.name}: LLaMA layout {L * linear + others:,} != counted {c['llm']:,}")
        _COUNTS[key] = {**c, "llm_linear": L * linear, "llm_linear_rows": L * rows, "vocab": V}
    return _COUNTS[key]


def _bytes(dtype: str) -> int:
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(BYTES)}")
    return BYTES[dtype]


def estimate(cfg: ModelConfig | str, stage: int | str, batch: int = 1, *, text_tokens: int | None = None,
             prompt_tokens: int | None = None, llm_dtype: str | None = None, vit_dtype: str | None = None,
             llm_8bit: bool | None = None, grad_checkpointing: bool = False, encoder_in_step: bool = True,
             beams: int = 1, context_tokens: int | None = None,
             new_tokens: int = CHAT_NEW_TOKENS) -> MemoryEstimate:
    """Peak GPU memory of one training step (stage 1 or 2, `batch` = the micro-batch) or of
    chat (one conversation of `context_tokens`, default the preset's context, with `beams`).

    Defaults come from `cfg`: dtypes, 8-bit and the ViT's place (`cfg.low_resource`: LLM in
    8-bit, ViT on the CPU). `encoder_in_step`: images go through the ViT in each step (the
    paper's training; the notebooks train on cached features: False)."""
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    stage = str(stage)
    if stage not in ("1", "2", "chat"):
        raise ValueError(f"stage must be 1, 2 or 'chat', got {stage!r}")
    if batch < 1 or beams < 1:
        raise ValueError(f"batch and beams must be >= 1, got {batch} and {beams}")
    c = param_counts(cfg)
    llm = cfg.llm
    d, f, H, L, V = (llm["hidden_size"], llm["intermediate_size"], llm["num_attention_heads"],
                     llm["num_hidden_layers"], c["vocab"])
    s = _bytes(llm_dtype or cfg.llm_dtype)
    s_vit = _bytes(vit_dtype or cfg.vit_dtype)
    int8 = cfg.low_resource if llm_8bit is None else llm_8bit
    vit_on_gpu = not cfg.low_resource
    N = cfg.num_image_tokens

    # -------------------------------------------------- weights (+ optimizer when training)
    if int8:
        llm_w = c["llm_linear"] + 4 * c["llm_linear_rows"] + s * (c["llm"] - c["llm_linear"])
    else:
        llm_w = s * c["llm"]
    parts = {"weights": (s_vit * c["vit"] * vit_on_gpu + 4 * c["qformer"] + llm_w + 4 * c["llama_proj"]) / GiB}
    patches = (cfg.image_size // cfg.vision["patch_size"]) ** 2 + 1      # + CLS
    W, F = cfg.vision["hidden_size"], cfg.vision["intermediate_size"]
    vit_tokens = (batch if stage != "chat" else 1) * patches
    encoder = vit_tokens * (s_vit * (2 * W + 2 * F) + 4 * W) / GiB if vit_on_gpu else 0.0

    if stage == "chat":
        T = context_tokens or cfg.context_len
        prompt = max(T - new_tokens, 1)
        parts["kv_cache"] = 2 * L * d * s * T * beams / GiB
        parts["prefill"] = beams * prompt * (s * (3 * f + 4 * d) + 4 * d) / GiB
        parts["logits"] = 3 * 4 * V * beams / GiB
        llm_phase = parts["kv_cache"] + parts["prefill"] + parts["logits"]
    else:
        if text_tokens is None:
            text_tokens = cfg.max_txt_len_stage1 if stage == "1" else cfg.max_txt_len_stage2
        if prompt_tokens is None:
            prompt_tokens = 0 if stage == "1" else STAGE2_PROMPT_TOKENS
        T = 1 + prompt_tokens + N + text_tokens                  # [BOS] prompt [image] answer
        tokens = batch * T
        layer = layer_bytes_per_token(d, f, H, T, s, int8)
        once = (4 * d + 4) + s * d + 8                             # final norm, inputs_embeds, labels
        kept = L * s * d if grad_checkpointing else L * layer      # per token
        parts["optimizer"] = 2 * 4 * c["llama_proj"] / GiB
        parts["activations"] = (tokens * (kept + once) + batch * N * cfg.proj_in * 4) / GiB
        parts["logits"] = tokens * 12 * V / GiB
        parts["recompute"] = tokens * layer / GiB if grad_checkpointing else 0.0
        if int8:                                                     # one weight dequantized in backward
            parts["recompute"] = parts["recompute"] + s * max(d * f, d * d) / GiB
        llm_phase = parts["activations"] + max(parts["logits"], parts["recompute"])
    parts["encoder"] = encoder
    fixed = parts["weights"] + parts.get("optimizer", 0.0)
    peak = fixed + max(llm_phase, encoder)
    return MemoryEstimate(cfg.name + (" (8-bit)" if int8 else ""), stage, batch if stage != "chat" else beams,
                          T, {k: round(v, 3) for k, v in parts.items()}, round(peak, 2),
                          round(peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB, 2))


def largest_batch(cfg: ModelConfig | str, stage: int | str, card_gib: float, limit: int = 4096, **kw) -> int:
    """The largest (micro-)batch whose `device_gib` fits a card of `card_gib` GiB (0: none);
    the rest of a global batch then comes from `TrainConfig.accum_steps`."""
    fits = 0
    while fits < limit and estimate(cfg, stage, fits + 1, **kw).device_gib <= card_gib:
        fits += 1
    return fits


def describe(cfg: ModelConfig | str, stage: int | str, batch: int = 1, **kw) -> str:
    """One line for a notebook or the command line: `print(memory.describe(cfg, stage=2, batch=12))`."""
    return str(estimate(cfg, stage, batch, **kw))

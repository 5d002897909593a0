"""MiniGPT-4: frozen encoder -> ONE trainable linear layer -> frozen LLM (paper §3, Fig. 1).

    image (B, 3, S, S) --encoder (frozen)--> (B, Q, Hq) --llama_proj--> (B, Q, D) image tokens

The image tokens are spliced into the prompt where it says `<ImageHere>`: the prompt is
split there, both halves are tokenized without special tokens and embedded with the
LLM's own (frozen) embedding table, and the sequence

    [BOS] [prompt before] [image tokens] [prompt after] [answer + end_sym] [padding]
    labels: -100 ...................................... answer ids        -100

is fed to the frozen LLM; the loss is on the answer only. Stage 1 has no prompt:
`[BOS][image][caption + "\\n"]`. Generation uses the KV cache, stops at `###` whatever
its tokenization, and returns only the new text.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .checkpoints import read_projection, write_projection
from .config import ModelConfig
from .encoder import VisualEncoder
from .llm import load_llm
from .projectors import build_projector

IMAGE_PLACEHOLDER = "<ImageHere>"
STOP_STRINGS = ("###",)


@dataclass
class GenerationSettings:
    """Decoding settings (the demo's defaults: 300 new tokens, 1 beam, T=1.0, top-p 0.9)."""
    max_new_tokens: int = 300
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    min_length: int = 1


class MiniGPT4(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: VisualEncoder, llm, tokenizer):
        super().__init__()
        self.cfg, self.encoder, self.llm, self.tokenizer = cfg, encoder, llm, tokenizer
        d_llm = llm.config.hidden_size
        # the ONLY trainable layer (kept in fp32): nn.Linear(proj_in, d_llm), the paper's; the
        # architecture ablation (notebook 06) puts another module here (projectors.py)
        self.llama_proj = build_projector(cfg, d_llm, encoder)
        self.projection_source: str | None = None          # the file llama_proj was loaded from; None: random
        self._checkpointing = False                        # set_gradient_checkpointing
        self._token_ids = functools.lru_cache(maxsize=1 << 16)(
            lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"]))
        for m in (self.encoder, self.llm):                 # frozen, decided in one place
            for p in m.parameters():
                p.requires_grad_(False)
            m.eval()

    @classmethod
    def from_config(cls, cfg: ModelConfig, projection: str | Path | None = None) -> "MiniGPT4":
        """Load the frozen parts named by `cfg` (and a trained projection, if given).

        `cfg.low_resource` (the official demo's mode, CUDA only): the LLM in 8-bit on GPU
        `cfg.device_8bit`, the ViT and ln_vision on the CPU in fp32, the Q-Former, the query
        tokens and `llama_proj` on that GPU (`low_resource_layout`)."""
        llm, tok = load_llm(cfg.llm_path, cfg.llm_dtype, cfg.low_resource, cfg.device_8bit)
        model = cls(cfg, VisualEncoder.load(cfg), llm, tok)
        if cfg.low_resource:
            model.low_resource_layout(torch.device("cuda", cfg.device_8bit))
        if projection:
            model.load_projection(projection)
        return model

    def low_resource_layout(self, device: str | torch.device) -> "MiniGPT4":
        """ViT + ln_vision on the CPU in fp32; the Q-Former, query tokens and `llama_proj` on
        `device`, where the (8-bit) LLM already is: from_pretrained placed it (device_map), and
        an 8-bit model may not be moved with `.to`, so nothing here touches it."""
        self.encoder.place("cpu", device)
        self.llama_proj.to(device)
        return self

    # ------------------------------------------------------------- freezing
    def trainable_parameters(self):
        return [(f"llama_proj.{n}", p) for n, p in self.llama_proj.named_parameters()]

    def train(self, mode: bool = True) -> "MiniGPT4":
        """Only the projection ever leaves eval mode; the frozen parts stay frozen.

        One exception, a switch and nothing else: with gradient checkpointing on, the LLM's
        decoder-layer containers themselves (not their attention / MLP / norm children) carry
        `training=True`, because that flag is what makes transformers checkpoint a layer.
        A LLaMA decoder layer reads no other flag of its own (dropout lives in its children,
        which stay in eval mode), so the computed values do not change."""
        super().train(mode)
        self.encoder.eval()
        self.llm.eval()
        if mode and self._checkpointing:
            for layer in self._llm_layers():
                layer.training = True                       # this module only, not recursive
        return self

    def train_mode(self) -> "MiniGPT4":
        return self.train(True)

    # ------------------------------------------------------------- gradient checkpointing
    def _llm_layers(self) -> list[nn.Module]:
        from transformers.modeling_layers import GradientCheckpointingLayer
        return [m for m in self.llm.modules() if isinstance(m, GradientCheckpointingLayer)]

    def set_gradient_checkpointing(self, on: bool = True) -> "MiniGPT4":
        """Recompute the frozen LLM's activations during backward instead of keeping them.

        Training keeps, per decoder layer and token, what autograd saves to send the loss's
        gradient back to `llama_proj` (memory.py: ~130 KB per layer and token at 7B in fp16);
        with this on, only each layer's input is kept and the layer is run again in backward:
        one more forward pass per step (about half again the compute, as backward here only
        computes input gradients) for a fraction of the activation memory. transformers'
        checkpointing with `use_reentrant=False`, which needs no input that requires grad
        (ours do anyway: the image tokens come out of `llama_proj`); the frozen weights never
        get a gradient either way. The gradient reaching `llama_proj` is the same."""
        kw = {"use_reentrant": False}
        if on:
            if hasattr(self.llm, "activation_checkpointing_enable"):     # transformers >= 5.2x
                self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
            # transformers also hooks the token embedding so that its output requires grad
            # (for models fed `input_ids`); ours is fed `inputs_embeds` and is frozen: remove it
            self.llm.disable_input_require_grads()
        elif self._checkpointing:
            if hasattr(self.llm, "activation_checkpointing_disable"):
                self.llm.activation_checkpointing_disable()
            else:
                self.llm.gradient_checkpointing_disable()
        self._checkpointing = bool(on)
        return self.train(self.training)

    # ------------------------------------------------------------- checkpoints
    def save_projection(self, path: str | Path) -> None:
        save_file({n: p.detach().contiguous() for n, p in self.trainable_parameters()}, str(path))

    def load_projection(self, path: str | Path) -> None:
        """Load `llama_proj` from our safetensors file, a trainer checkpoint folder, or a
        released MiniGPT-4 `.pth` (`{"model": {...}}`, read with weights_only=True), and
        record the file in `projection_source` (None until then: the projection is random)."""
        path = Path(path)
        if path.is_dir():                                  # a trainer checkpoint folder
            path = path / "model.safetensors"
        if not isinstance(self.llama_proj, nn.Linear):     # an ablation's module: our own files only
            sd = load_file(str(path))
            self.llama_proj.load_state_dict({k.removeprefix("llama_proj."): v for k, v in sd.items()})
            self.projection_source = str(path)
            return
        sd = read_projection(path)
        w, b = sd["llama_proj.weight"], sd["llama_proj.bias"]
        if w.shape != self.llama_proj.weight.shape or b.shape != self.llama_proj.bias.shape:
            raise ValueError(f"{path}: llama_proj is {tuple(w.shape)} (bias {tuple(b.shape)}), this "
                             f"model needs {tuple(self.llama_proj.weight.shape)} ({self.cfg.name})")
        with torch.no_grad():
            self.llama_proj.weight.copy_(w)
            self.llama_proj.bias.copy_(b)
        self.projection_source = str(path)

    def export_projection(self, path: str | Path) -> Path:
        """Write `llama_proj` as a released MiniGPT-4 checkpoint (`{"model": {...}}` .pth), the
        file the official demo's `ckpt:` setting loads."""
        if not isinstance(self.llama_proj, nn.Linear):
            raise ValueError(f"only the paper's linear llama_proj has a released format; this model's is "
                             f"{self.cfg.projector!r} (save it with save_projection)")
        return write_projection(path, self.llama_proj.weight, self.llama_proj.bias)

    # ------------------------------------------------------------- embeddings
    @property
    def device(self) -> torch.device:
        return self._proj_weight.device

    @property
    def _proj_weight(self) -> torch.Tensor:
        """A parameter of the projection (its device and dtype), whatever its kind."""
        return next(self.llama_proj.parameters())

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, Hq) frozen encoder outputs (cacheable: no trainable part), the
        ones this model's projector reads (an ablation's model may share the encoder of another)."""
        return self.encoder(pixel_values.to(self.device), projector=self.cfg.projector)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, Hq) -> (B, N, D) image tokens in the LLM's embedding space (and dtype)."""
        out = self.llama_proj(feats.to(self._proj_weight))          # cached features may sit on the CPU
        return out.to(self.llm.get_input_embeddings().weight.dtype)

    def embed_images(self, images: torch.Tensor | None = None, feats: torch.Tensor | None = None):
        if feats is None:
            feats = self.image_features(images)
        return self.project(feats)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(t)                               # (T, D)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens; memoised (stage 1 tokenizes each of its
        20,000 captions once per pass, the chat its system prompt once per turn)."""
        return list(self._token_ids(text)) if text else []

    def prompt_segments(self, prompt: str | None) -> tuple[list[int], list[int]]:
        """Token ids before and after the single `<ImageHere>` of a prompt."""
        if prompt is None:
            return [], []
        parts = prompt.split(IMAGE_PLACEHOLDER)
        if len(parts) != 2:
            raise ValueError(f"a prompt needs exactly one {IMAGE_PLACEHOLDER}: {prompt!r}")
        return self.tokenize(parts[0]), self.tokenize(parts[1])

    # ------------------------------------------------------------- training
    def build_inputs(self, img_embeds: torch.Tensor, answers: list[str],
                     prompts: list[str | None] | None = None, max_txt_len: int = 32,
                     end_sym: str = "\n") -> dict[str, torch.Tensor]:
        """Training inputs: inputs_embeds (B, T, D), attention_mask (B, T), labels (B, T).

        Row b is `[BOS] before_b [image_b] after_b answer_b+end_sym`, right-padded; the
        answer (with end_sym) is cut to `max_txt_len` tokens; labels are -100 everywhere
        but on the answer tokens. All text of the batch is embedded in one lookup and put in
        place with two masks (text slots, image slots): no per-row copies.
        """
        B, N, D = img_embeds.shape
        prompts = prompts or [None] * B
        bos = self.tokenizer.bos_token_id
        rows = []                                              # (ids before, ids after, answer ids)
        for b in range(B):
            before, after = self.prompt_segments(prompts[b])
            rows.append(([bos] + before, after, self.answer_ids(answers[b], max_txt_len, end_sym)))
        lengths = torch.tensor([len(pre) + N + len(post) + len(ans) for pre, post, ans in rows])
        T = int(lengths.max())
        valid = torch.arange(T) < lengths[:, None]            # (B, T): not padding
        img_slot = torch.zeros(B, T, dtype=torch.bool)
        lab = torch.full((B, T), -100, dtype=torch.long)
        ids: list[int] = []
        for b, (pre, post, ans) in enumerate(rows):
            a = len(pre) + N + len(post)                       # the image starts at len(pre), the answer at a
            img_slot[b, len(pre): len(pre) + N] = True
            lab[b, a: a + len(ans)] = torch.tensor(ans, dtype=torch.long)
            ids += pre + post + ans                            # row-major, as the text slots are ordered
        text_slot = valid & ~img_slot
        emb = img_embeds.new_zeros(B, T, D)
        emb[text_slot.to(self.device)] = self.embed_ids(ids).to(emb.dtype)     # (n_text, D)
        emb[img_slot.to(self.device)] = img_embeds.reshape(B * N, D)          # (B*N, D)
        return {"inputs_embeds": emb, "attention_mask": valid.long().to(self.device), "labels": lab.to(self.device)}

    def answer_ids(self, answer: str, max_txt_len: int, end_sym: str) -> list[int]:
        """The target tokens of one answer: `answer + end_sym`, cut to `max_txt_len`."""
        return self.tokenize(answer + end_sym)[:max_txt_len]

    def num_targets(self, batch: dict) -> int:
        """How many answer tokens `loss(batch)` averages over (the labels that are not -100),
        counted without running the model (the trainer's accumulation needs it first)."""
        mx = batch.get("max_txt_len", self.cfg.max_txt_len_stage1)
        end = batch.get("end_sym", "\n")
        return sum(len(self.answer_ids(a, mx, end)) for a in batch["answers"])

    def loss(self, batch: dict, token_divisor=None) -> torch.Tensor:
        """batch: {"feats" (B, N, Hq) or "images" (B, 3, S, S), "answers", optional
        "prompts", "max_txt_len", "end_sym"} -> mean cross-entropy on the answers.

        `token_divisor(n)`, if given, maps this batch's number of answer tokens `n` (a 0-d
        tensor) to what the summed token loss is divided by instead of `n` (the
        distributed trainer divides by the global batch's count: `distributed.py`)."""
        img = self.embed_images(batch.get("images"), batch.get("feats"))
        inputs = self.build_inputs(img, batch["answers"], batch.get("prompts"),
                                   batch.get("max_txt_len", self.cfg.max_txt_len_stage1),
                                   batch.get("end_sym", "\n"))
        labels = inputs.pop("labels")
        # the decoder alone, then lm_head only where an answer token is predicted: the same
        # loss as `self.llm(**inputs).loss`, without the (B, T, vocab) logits of the image
        # and prompt positions (stage 1: ~2/3 of them at tiny scale), which nobody reads
        h = self.llm.model(**inputs, use_cache=False).last_hidden_state    # (B, T, D)
        target = labels[:, 1:]                                  # (B, T-1): position t predicts t+1
        keep = target != -100
        logits = self.llm.lm_head(h[:, :-1][keep]).float()      # (n, vocab)
        total = F.cross_entropy(logits, target[keep], reduction="sum")
        n = keep.sum()
        return total / (n if token_divisor is None else token_divisor(n))

    # ------------------------------------------------------------- generation
    def build_generation_inputs(self, img_embeds: torch.Tensor | None, prompts: list[str]):
        """Left-padded [BOS] before [image] after, for batched generation.

        `img_embeds` is (B, N, D), or None for text-only prompts (no `<ImageHere>`).
        """
        bos = self.tokenizer.bos_token_id
        rows = []
        for b, p in enumerate(prompts):
            if img_embeds is None:
                rows.append(self.embed_ids([bos] + self.tokenize(p)))
                continue
            before, after = self.prompt_segments(p)
            rows.append(torch.cat([self.embed_ids([bos] + before), img_embeds[b], self.embed_ids(after)]))
        T, D = max(len(r) for r in rows), rows[0].shape[-1]
        emb = rows[0].new_zeros(len(rows), T, D)
        mask = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            emb[b, T - len(r):] = r
            mask[b, T - len(r):] = 1
        return emb, mask

    @torch.no_grad()
    def generate(self, prompts: list[str], images: torch.Tensor | None = None,
                 feats: torch.Tensor | None = None, img_embeds: torch.Tensor | None = None,
                 settings: GenerationSettings | None = None, stop: tuple[str, ...] = STOP_STRINGS,
                 streamer=None, generator_seed: int | None = None, **generate_kwargs) -> list[str]:
        """Answer each prompt about its image; returns only the new text, cut at the stop
        strings and at `Assistant:` (the demo's post-processing). Extra keyword arguments
        go to transformers' `generate` (e.g. `logits_processor`)."""
        s = settings or GenerationSettings()
        if img_embeds is None and (images is not None or feats is not None):
            img_embeds = self.embed_images(images, feats)
        emb, mask = self.build_generation_inputs(img_embeds, prompts)
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        kw = dict(max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=s.do_sample,
                  repetition_penalty=s.repetition_penalty, min_length=s.min_length,
                  stop_strings=list(stop), tokenizer=self.tokenizer, use_cache=True,
                  pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
        kw.update(generate_kwargs)
        if s.do_sample:
            kw.update(temperature=s.temperature, top_p=s.top_p)
        out = self.llm.generate(inputs_embeds=emb, attention_mask=mask, **kw)  # new tokens only
        return [self.clean_output(self.tokenizer.decode(o, skip_special_tokens=True), stop) for o in out]

    @staticmethod
    def clean_output(text: str, stop: tuple[str, ...] = STOP_STRINGS) -> str:
        for s in stop:
            text = text.split(s)[0]
        return text.split("Assistant:")[0].strip()

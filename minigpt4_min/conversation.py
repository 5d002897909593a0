"""Chatting with MiniGPT-4: conversation templates and the demo's chat loop (paper §4,
Figs. 2-4; DESIGN.md §2 "Chat (demo)").

A `Conversation` renders the history as the text the frozen LLM reads. Both MiniGPT-4
templates join the parts with no spaces: system, separator, then each message as
role + text + separator, and the pending answer as the bare role:

    vicuna0: Give the following image: ...questions.###Human: <Img><ImageHere></Img> What
             is this?###Assistant: A cat.###Human: What color is it?###Assistant: 
    llama2:  ...questions.<s>[INST] <Img><ImageHere></Img> What is this? [/INST] A cat.<s>[INST] ...

`Chat` keeps one conversation and its images. Each uploaded image is embedded once
(frozen encoder -> `llama_proj`, (N, D)); to answer, the prompt is split on
`<ImageHere>` into k+1 segments, only the first gets BOS, and the k image embeddings
go in between, in upload order:

    [BOS] seg_0 [image_1] seg_1 ... [image_k] seg_k     -> inputs_embeds (1, T, D)

If T > max_length - max_new_tokens, the oldest positions are cut from the left, as the
demo does, with a warning that says in plain words what the model no longer sees. Answers
are cut at the template's stop strings and at `Assistant:`, and can be streamed piece by
piece. A front end (the terminal chat, the notebook widget) shows such warnings apart from
the answer with `Notices`, and says when the projection is random (`start_notices`).

    >>> chat = Chat(MiniGPT4.from_config(get_config("tiny"), projection="stage2.safetensors"))
    >>> chat.upload_img("cat.png"); chat.ask("What is this?"); print(chat.answer())
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event, Thread
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .data import ImageProcessor, load_image
from .model import IMAGE_PLACEHOLDER, GenerationSettings, MiniGPT4

IMAGE_MESSAGE = f"<Img>{IMAGE_PLACEHOLDER}</Img>"   # what uploading an image says
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the "
          "image once I provide it to you. Please answer my questions.")
ANSWER_CUTS = ("Assistant:",)                        # the demo also cuts answers here
DEFAULT_MAX_NEW_TOKENS = {"tiny": 120}               # else the paper's 300 (GenerationSettings)
NO_PROJECTION = ("no trained projection was given (--checkpoint, or projection= / load_projection): "
                 "llama_proj is random, so the answers will not be about the image; train one with "
                 "notebooks 02 and 04 (stage 1, stage 2), which write runs/latest/stage2/last "
                 "(`make series`: runs/series/stage2/last)")


@dataclass
class Conversation:
    """A chat history and how to render it. `messages` are [role, text] pairs; a text of
    None is the pending answer (rendered as the bare role)."""
    name: str
    system: str
    roles: tuple[str, str]               # (human, assistant), as rendered
    sep: str                             # after the system prompt and after every message
    stop: tuple[str, ...]                # generation stops at (and the answer is cut at) these
    messages: list[list] = field(default_factory=list)

    def append_message(self, role: str, text: str | None) -> None:
        if role not in self.roles:
            raise ValueError(f"role {role!r} is not one of this template's roles {self.roles}")
        self.messages.append([role, text])

    def get_prompt(self) -> str:
        out = self.system + self.sep
        for role, text in self.messages:
            out += role if text is None else role + text + self.sep
        return out

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])


CONV_TEMPLATES: dict[str, Conversation] = {
    # Vicuna v0 (the paper's demo): "Human: " / "Assistant: ", separator "###"
    "vicuna0": Conversation("vicuna0", SYSTEM, ("Human: ", "Assistant: "), "###", ("###",)),
    # Llama-2-chat (MiniGPT-4's CONV_VISION_LLama2): each turn opens with a literal <s>,
    # no separator; generation ends at </s> (EOS), or if the model starts a new turn
    "llama2": Conversation("llama2", SYSTEM, ("<s>[INST] ", " [/INST] "), "", ("</s>", "[INST]")),
}


def get_template(name: str) -> Conversation:
    """A fresh, empty copy of a registered template."""
    if name not in CONV_TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; expected one of {sorted(CONV_TEMPLATES)}")
    return CONV_TEMPLATES[name].copy()


def default_settings(model: MiniGPT4) -> GenerationSettings:
    """The demo's decoding defaults, with a max_new_tokens that fits the model's context."""
    return GenerationSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS.get(model.cfg.name, 300))


# =============================================================== for people: history, notices
def render_messages(conv: Conversation, image: Callable[[int], str],
                    text: Callable[[str], str] = lambda t: t) -> list[tuple[str, str | None]]:
    """The history as a person reads it: (who, body) per message, who "Human" or
    "Assistant". Each image message becomes `image(k)` (k counts the images in upload
    order), the rest of the text goes through `text` (e.g. html.escape); the pending
    answer's body is None."""
    rows, k = [], 0
    for role, body in conv.messages:
        if body is not None:
            parts = body.split(IMAGE_MESSAGE)
            body = text(parts[0]) + "".join(image(k + i) + text(p) for i, p in enumerate(parts[1:]))
            k += len(parts) - 1
        rows.append(("Human" if role == conv.roles[0] else "Assistant", body))
    return rows


def start_notices(model: MiniGPT4) -> list[str]:
    """What a chat should say before it starts: that llama_proj is random, if no trained
    projection was loaded (`MiniGPT4.projection_source` is None)."""
    return [NO_PROJECTION] if model.projection_source is None else []


class Notices:
    """Catches the warnings raised inside a `with` block (e.g. the history cut of
    `Chat.context`, raised when an answer starts), so that a front end can show them apart
    from the answer instead of letting them print into it:

        with Notices() as notes:
            pieces = chat.stream_answer()     # the prompt is built (and cut) here
            show(notes.take())                # before the answer
            ...                               # stream the answer
            show(notes.take())                # anything raised while generating
    """

    def __enter__(self) -> "Notices":
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        self._seen: set[str] = set()
        return self

    def __exit__(self, *exc) -> None:
        self._catch.__exit__(*exc)

    def take(self) -> list[str]:
        """The texts of the warnings caught since the last take, each text once per block."""
        new = [str(w.message) for w in self._caught]
        self._caught.clear()
        out = [t for t in dict.fromkeys(new) if t not in self._seen]
        self._seen.update(out)
        return out


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# =============================================================== prompt -> embeddings
@torch.no_grad()
def embed_prompt(model: MiniGPT4, prompt: str, images: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Splice image embeddings into a prompt: returns inputs_embeds (T, D) and the
    [start, end) positions of each image. `images[i]` (N, D) replaces the i-th
    `<ImageHere>`; only the first text segment gets BOS."""
    segments = prompt.split(IMAGE_PLACEHOLDER)
    if len(segments) != len(images) + 1:
        raise ValueError(f"the prompt has {len(segments) - 1} {IMAGE_PLACEHOLDER} but "
                         f"{len(images)} images were given")
    parts, spans, pos = [], [], 0
    for i, seg in enumerate(segments):
        ids = ([model.tokenizer.bos_token_id] if i == 0 else []) + model.tokenize(seg)
        if ids:
            parts.append(model.embed_ids(ids))                               # (len(ids), D)
            pos += len(ids)
        if i < len(images):
            parts.append(images[i])                                          # (N, D)
            spans.append((pos, pos + len(images[i])))
            pos += len(images[i])
    return torch.cat(parts), spans


# =============================================================== answer cleaning
def clean_answer(text: str, cuts: tuple[str, ...]) -> str:
    """Cut at the first of `cuts` (stop strings, `Assistant:`) and strip."""
    ends = [i for i in (text.find(c) for c in cuts) if i >= 0]
    return text[: min(ends, default=len(text))].strip()


def _visible(raw: str, cuts: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """The part of the answer `raw` already fixes: (text, complete). Holds back a tail
    that may still become a cut string, and trailing whitespace."""
    ends = [i for i in (raw.find(c) for c in cuts) if i >= 0]
    if ends:
        return raw[: min(ends)].strip(), True
    if not final:
        hold = max((k for c in cuts for k in range(1, len(c)) if raw.endswith(c[:k])), default=0)
        return raw[: len(raw) - hold].strip(), False
    return raw.strip(), True


def stream_clean(pieces: Iterable[str], cuts: tuple[str, ...]) -> Iterator[str]:
    """Incremental `clean_answer`: the yielded pieces join to clean_answer("".join(pieces))."""
    raw, sent = "", ""
    for piece in pieces:
        raw += piece
        text, complete = _visible(raw, cuts, final=False)
        if len(text) > len(sent):
            yield text[len(sent):]
            sent = text
        if complete:
            return
    text, _ = _visible(raw, cuts, final=True)
    if len(text) > len(sent):
        yield text[len(sent):]


class _Cancel(StoppingCriteria):
    """Stops generation when `event` is set (a stream closed early)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


# =============================================================== the chat
class Chat:
    """One conversation about one or more images with a MiniGPT-4 model (the paper's demo)."""

    def __init__(self, model: MiniGPT4, template: str = "vicuna0",
                 settings: GenerationSettings | None = None, max_length: int | None = None):
        self.model = model
        self.template = template
        self.conv = get_template(template)
        self.settings = settings or default_settings(model)
        self.max_length = max_length or min(2000, model.cfg.context_len)
        self.processor = ImageProcessor(model.cfg, train=False)
        self.images: list[torch.Tensor] = []                 # each (N, D), in upload order
        self._room(self.settings.max_new_tokens)            # fail now, not at the first answer

    # ------------------------------------------------------------- history
    def reset(self) -> None:
        """Forget the conversation and its images."""
        self.conv = get_template(self.template)
        self.images = []

    def _drop_pending(self) -> None:
        """Forget a pending answer that was never generated (a stream that was never read)."""
        if self.conv.messages and self.conv.messages[-1][1] is None:
            self.conv.messages.pop()

    @torch.no_grad()
    def upload_img(self, image: str | Path | Image.Image | np.ndarray) -> str:
        """Embed an image once and add the Human message `<Img><ImageHere></Img>`.
        Raises data.BadImageError (naming the file) for a missing or unreadable image."""
        if not isinstance(image, (str, Path, Image.Image, np.ndarray)):
            raise TypeError(f"expected an image path, PIL image or HxWx3 uint8 array, "
                            f"got {type(image).__name__}")
        name = str(image) if isinstance(image, (str, Path)) else None
        pixels = self.processor(load_image(image, name=name))                 # (3, S, S)
        emb = self.model.embed_images(pixels[None].to(self.model.device))[0]   # (N, D)
        self._drop_pending()
        self.images.append(emb)
        self.conv.append_message(self.conv.roles[0], IMAGE_MESSAGE)
        return "Received."

    def ask(self, text: str) -> None:
        """Add a question; right after an upload it joins the image's message."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a question must be a non-empty string, got {text!r}")
        self._drop_pending()
        msgs = self.conv.messages
        if msgs and msgs[-1][0] == self.conv.roles[0] and msgs[-1][1].endswith("</Img>"):
            msgs[-1][1] = msgs[-1][1] + " " + text
        else:
            self.conv.append_message(self.conv.roles[0], text)

    # ------------------------------------------------------------- generation inputs
    def context(self, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds (1, T, D) and attention_mask (1, T) of the current prompt, cut
        from the left to `max_length - max_new_tokens` positions (with a warning that says
        what the model no longer sees)."""
        keep = self._room(max_new_tokens)
        emb, spans = embed_prompt(self.model, self.conv.get_prompt(), self.images)  # (T, D)
        if len(emb) > keep:
            warnings.warn(f"the conversation is {len(emb)} positions long, more than max_length "
                          f"{self.max_length} - max_new_tokens {max_new_tokens} = {keep}: its first "
                          f"{len(emb) - keep} positions are cut, so the model no longer sees "
                          f"{self._lost(len(emb) - keep, spans)}", stacklevel=4)
            emb = emb[-keep:]
        return emb[None], torch.ones(1, len(emb), dtype=torch.long, device=emb.device)

    def _room(self, max_new_tokens: int) -> int:
        """How many prompt positions fit next to `max_new_tokens` new ones (at least 1)."""
        if max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt "
                             f"in max_length={self.max_length}")
        return self.max_length - max_new_tokens

    def _length(self, prompt: str) -> int:
        """Positions of `prompt` as embed_prompt builds it: BOS, its text, its images."""
        segments = prompt.split(IMAGE_PLACEHOLDER)
        return (1 + sum(len(self.model.tokenize(seg)) for seg in segments)
                + sum(len(e) for e in self.images[: len(segments) - 1]))

    def _lost(self, cut: int, spans: list[tuple[int, int]]) -> str:
        """What the first `cut` positions hold, in words: the system prompt, the images and
        about how many turns (each prefix of the prompt measured on its own: roughly)."""
        conv, human = self.conv.copy(), self.conv.roles[0]
        starts = []                                        # where each Human message starts
        for i, (role, _) in enumerate(self.conv.messages):
            conv.messages = self.conv.messages[:i]
            if role == human:
                starts.append(self._length(conv.get_prompt()))
        turns, images = sum(s < cut for s in starts), sum(s < cut for s, _ in spans)
        lost = ["the system prompt" if turns else "the start of the system prompt"]
        if images:
            n = len(spans)
            lost.append(f"{images} of the {n} images" if images < n else
                        {1: "the image", 2: "both images"}.get(n, f"all {n} images"))
        if turns and turns == len(starts):
            lost.append("every earlier turn, even the start of this question" if turns > 1
                        else "the start of this question")
        elif turns:
            first = "the first" if turns == 1 else f"the first {turns}"
            lost.append(f"all or part of {first} of {len(starts)} turns")
        return _join(lost)

    def _generate_kwargs(self, s: GenerationSettings, **extra) -> dict:
        self._drop_pending()
        msgs = self.conv.messages
        if not msgs or msgs[-1][0] != self.conv.roles[0]:
            raise ValueError("nothing to answer: upload an image or ask a question first")
        self.conv.append_message(self.conv.roles[1], None)            # the pending answer
        try:
            emb, mask = self.context(s.max_new_tokens)
        except Exception:
            self.conv.messages.pop()
            raise
        tok = self.model.tokenizer
        kw = dict(inputs_embeds=emb, attention_mask=mask, max_new_tokens=s.max_new_tokens,
                  num_beams=s.num_beams, do_sample=s.do_sample, min_length=s.min_length,
                  repetition_penalty=s.repetition_penalty, stop_strings=list(self.conv.stop),
                  tokenizer=tok, use_cache=True, pad_token_id=tok.pad_token_id)
        if s.do_sample:
            kw.update(temperature=s.temperature, top_p=s.top_p)
        kw.update(extra)
        return kw

    @property
    def _cuts(self) -> tuple[str, ...]:
        return tuple(self.conv.stop) + ANSWER_CUTS

    # ------------------------------------------------------------- answering
    def answer(self, settings: GenerationSettings | None = None, **generate_kwargs) -> str:
        """Generate the Assistant's answer to the conversation so far and record it.
        Extra keyword arguments go to transformers' `generate` (e.g. logits_processor)."""
        return self._answer(self._generate_kwargs(settings or self.settings, **generate_kwargs))

    @torch.no_grad()
    def _answer(self, kw: dict) -> str:
        try:
            out = self.model.llm.generate(**kw)                       # (1, new) new tokens only
        except Exception:
            self.conv.messages.pop()
            raise
        text = clean_answer(self.model.tokenizer.decode(out[0], skip_special_tokens=True), self._cuts)
        self.conv.messages[-1][1] = text
        return text

    def stream_answer(self, settings: GenerationSettings | None = None,
                      **generate_kwargs) -> Iterator[str]:
        """Like `answer`, but returns an iterator over the answer's text, piece by piece as
        it is generated (the pieces join to what `answer` returns). The prompt is built at
        the call, before the first piece: "nothing to answer" is raised and a cut is warned
        right away, so a caller can show them before the answer. Beam search cannot
        stream: with num_beams > 1 the whole answer comes as one piece."""
        s = settings or self.settings
        kw = self._generate_kwargs(s, **generate_kwargs)
        return self._one_piece(kw) if s.num_beams > 1 else self._stream(kw)

    def _one_piece(self, kw: dict) -> Iterator[str]:
        yield self._answer(kw)

    def _stream(self, kw: dict) -> Iterator[str]:
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, errors = Event(), []
        kw["streamer"] = streamer
        kw["stopping_criteria"] = StoppingCriteriaList([_Cancel(cancel), *kw.get("stopping_criteria", [])])

        def run() -> None:
            try:
                self.model.llm.generate(**kw)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        thread = Thread(target=run, daemon=True)
        thread.start()
        answer = ""
        try:
            for piece in stream_clean(streamer, self._cuts):
                answer += piece
                yield piece
        finally:                          # finished, cut, or closed early by the caller
            cancel.set()
            thread.join()
            if errors:
                self.conv.messages.pop()
                raise errors[0]
            self.conv.messages[-1][1] = answer

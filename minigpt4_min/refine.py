"""Refining the self-generated descriptions (MiniGPT-4, arXiv 2304.10592, §3.2 steps 3-4).

Stage-2 data is made by the stage-1 model itself: it describes 5,000 images, and the
paragraphs are full of repeated sentences, stray characters and half sentences. The
paper fixes every paragraph with ChatGPT using FIX_PROMPT, then drops known failures
with hard-coded rules (HARD_FILTERS), then a human checks each pair.

One interface, `Refiner` (`name`, `settings()`, `refine(text) -> RefineResult`), two
implementations:

* RuleRefiner    deterministic rules that do what FIX_PROMPT asks (the offline default at
                 tiny scale: no network, same output every run);
* OpenAIRefiner  any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
                 llama.cpp) through the `openai` client.

`refine_all` runs a refiner over [(image_id, raw_text)] with a thread pool and an
append-only JSONL cache, one fsync'ed line per finished item, so a killed kernel loses
at most the in-flight items and no paragraph is paid for twice:

    refiner = OpenAIRefiner("gpt-3.5-turbo")              # key from $OPENAI_API_KEY
    records = refine_all(items, refiner, "data/stage2/refine_cache.jsonl",
                         out_path="data/stage2/refined.jsonl")
    usage_total(records)   # {'items': ..., 'prompt_tokens': ..., 'completion_tokens': ...}
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from tqdm.auto import tqdm

FIX_PROMPT = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless "
    "characters, not English sentences, and so on. Remove unnecessary repetition. Rewrite "
    "any incomplete sentences. Return directly the results without explanation. Return "
    "directly the input paragraph if it is already correct without explanation."
)

# Step 4: the paper names "I'm sorry I made a mistake" and "I apologize"; the rest are the
# same family of chat-model failures. Matched case-insensitively, with ’ read as '.
HARD_FILTERS: tuple[str, ...] = (
    "I'm sorry", "I am sorry", "I apologize", "I made a mistake",
    "As an AI", "as a language model",
)


class RefineError(RuntimeError):
    """A refiner could not produce an answer (bad credentials, dead server, bad reply)."""


@dataclass
class RefineResult:
    text: str                   # refined paragraph ("" when dropped)
    dropped: str | None = None  # why the item must be dropped, else None
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})


@runtime_checkable
class Refiner(Protocol):
    name: str

    def settings(self) -> dict: ...            # all that changes the output; no secrets

    def refine(self, text: str) -> RefineResult: ...


def hard_filter(text: str) -> str | None:
    """The first HARD_FILTERS phrase found in `text` (case-insensitive), else None."""
    low = text.lower().replace("\u2019", "'")
    return next((p for p in HARD_FILTERS if p.lower() in low), None)


def finish(text: str, usage: dict | None = None) -> RefineResult:
    """Step 4 for any refiner: hard filters, then empty -> dropped."""
    usage = usage or {"prompt_tokens": 0, "completion_tokens": 0}
    text = text.strip()
    hit = hard_filter(text)
    if hit is not None:
        return RefineResult("", f"hard filter: {hit!r}", usage)
    if not text:
        return RefineResult("", "empty", usage)
    return RefineResult(text, None, usage)


# ----------------------------------------------------------------------------- rules
_TEMPLATE = re.compile(r"#*\s*human\s*:\s*continue\b|#*\s*(?:human|assistant)\s*:|</?\s*img\s*>"
                       r"|<\s*imagehere\s*>|imagecontent|</?s>|<unk>|<pad>", re.I)
_PUNCT_RUN = re.compile(r"[.!?,;:](?:\s*[.!?,;:])+")
_KEEP = set(" \n,;:'\"()-%/&.!?")  # besides letters and digits; everything else is noise
_SPLIT = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])(?!\d)|\n")  # after . ! ? (not 3.5), 。！？
_WORD = re.compile(r"[^\W\d_]+")
_FILLER = {"a", "an", "the", "also", "again", "too", "very", "just", "really", "indeed"}
_OPENER = re.compile(r"^(?:there (?:is|are)|i (?:can )?see|we can see|(?:the|this) image shows"
                     r"|in (?:the|this) image,?) ")
_DANGLING = {"a", "an", "the", "and", "or", "but", "of", "on", "in", "at", "to", "with", "is",
             "are", "was", "were", "its", "their", "this", "that", "which", "for", "by", "from",
             "as", "into", "some", "there"}


def _norm(word: str) -> str:
    return "".join(ch for ch in word.lower() if ch.isalnum())


def _gibberish(word: str) -> bool:
    """An ASCII word with no vowel (>= 3 letters) or a run of 6+ consonants: 'xkcdq'."""
    w = word.lower()
    if not w.isascii():
        return False
    return (len(w) >= 3 and not re.search(r"[aeiouy]", w)) or bool(re.search(r"[^aeiouy]{6}", w))


def _english(sentence: str, max_foreign: float) -> bool:
    """Mostly ASCII letters and mostly pronounceable words (a cheap script/gibberish test)."""
    letters = [ch for ch in sentence if ch.isalpha()]
    if not letters:
        return False
    if sum(not ch.isascii() for ch in letters) > max_foreign * len(letters):
        return False
    words = _WORD.findall(sentence)
    return sum(map(_gibberish, words)) <= max_foreign * len(words)


def collapse_repeats(words: list[str], max_n: int = 10) -> list[str]:
    """Drop back-to-back copies of a word n-gram: 'a red circle a red circle' -> 'a red circle'.

    Compared without case/punctuation; the kept copy takes the punctuation that ended the
    removed one, so 'a circle, a circle.' -> 'a circle.'.
    """
    words = list(words)
    changed = True
    while changed:
        changed = False
        for n in range(1, min(max_n, len(words) // 2) + 1):
            key = [_norm(w) for w in words]
            for i in range(len(words) - 2 * n + 1):
                if key[i:i + n] == key[i + n:i + 2 * n] and any(key[i:i + n]):
                    last = words[i + 2 * n - 1]
                    tail = last[len(last.rstrip(",;:.!?")):]
                    words[i + n - 1] = words[i + n - 1].rstrip(",;:.!?") + tail
                    del words[i + n:i + 2 * n]
                    changed = True
                    break
            if changed:
                break
    return words


@dataclass
class RuleRefiner:
    """Deterministic stand-in for the chat model: does what FIX_PROMPT asks, by rules.

    In order: template leftovers (<Img>, <ImageHere>, Human:/Assistant:, </s>) and
    non-printable characters out; runs of punctuation collapsed; split into sentences;
    non-English sentences (mostly non-ASCII letters, or mostly vowel-less / gibberish
    words) dropped; stray symbols (#, *, @, ...) removed; back-to-back repeated n-grams
    collapsed; an unterminated sentence dropped if shorter than `min_words_to_close`
    words, else closed with '.' (after removing dangling words like 'the', 'and');
    repeated sentences dropped (same words ignoring case, punctuation, an opener like
    'There is' / 'I can see' and fillers like 'the', 'also'; or such a word sequence of
    >= `near_min_words` words contained in an earlier sentence's);
    spacing fixed and sentence starts capitalised; then HARD_FILTERS and empty -> dropped.
    Limits: it cannot tell English from another Latin-script language, nor fix grammar.
    """

    max_foreign: float = 0.3         # share of non-ASCII letters / gibberish words allowed
    min_words_to_close: int = 5      # shorter unterminated sentences are dropped
    near_min_words: int = 4          # containment counts as a repeat from this length
    name: str = "rules"
    version: int = 1                 # bump when the rules change (invalidates caches)

    def settings(self) -> dict:
        return {"max_foreign": self.max_foreign, "min_words_to_close": self.min_words_to_close,
                "near_min_words": self.near_min_words, "version": self.version}

    def refine(self, text: str) -> RefineResult:
        return finish(self.fix(text))

    def fix(self, text: str) -> str:
        text = _TEMPLATE.sub(" ", text.replace("\u2019", "'"))
        text = "".join(ch if ch.isprintable() or ch == "\n" else " " for ch in text)
        text = _PUNCT_RUN.sub(lambda m: next((c for c in m[0] if c in ".!?"), m[0][0]), text)
        kept: list[str] = []
        keys: list[tuple[str, ...]] = []
        for raw in _SPLIT.split(text):
            s = self._sentence(raw)
            if s is None:
                continue
            plain = _OPENER.sub("", " ".join(map(_norm, s.split())) + " ")
            key = tuple(w for w in plain.split() if w not in _FILLER)
            if not key or any(self._repeats(key, k) for k in keys):
                continue
            kept.append(s)
            keys.append(key)
        return " ".join(kept)

    def _repeats(self, key: tuple[str, ...], earlier: tuple[str, ...]) -> bool:
        if key == earlier:
            return True
        n = len(key)
        return n >= self.near_min_words and any(earlier[i:i + n] == key
                                                for i in range(len(earlier) - n + 1))

    def _sentence(self, raw: str) -> str | None:
        """One cleaned sentence ending in . ! or ?, or None when it must go."""
        raw = raw.strip()
        if not raw or not _english(raw, self.max_foreign):
            return None
        s = "".join(ch for ch in raw if ch.isalnum() or ch in _KEEP)
        s = re.sub(r"-{2,}", " ", s)
        m = re.match(r"(.*?)([.!?]?)$", s.strip(), re.S)
        body, end = m[1], m[2]
        body = re.sub(r"^[\s,;:)\-]+", "", body)            # no leading punctuation
        words = collapse_repeats(body.split())
        if not end:                                             # incomplete sentence
            while words and _norm(words[-1]) in _DANGLING | {""}:
                words.pop()
            if len(words) < self.min_words_to_close:
                return None
            end = "."
        body = " ".join(words)
        body = re.sub(r"\s+([,;:%])", r"\1", body)             # no space before , ; :
        body = re.sub(r"([,;:])(?=[^\W\d_])", r"\1 ", body)    # one after them
        body = re.sub(r"[\s,;:\-]+$", "", body)                 # nothing dangling before '.'
        if not _WORD.search(body):
            return None
        return body[0].upper() + body[1:] + end


# ----------------------------------------------------------------------------- chat model
class OpenAIRefiner:
    """FIX_PROMPT through an OpenAI-compatible chat-completions server.

    The prompt is ONE user message, `FIX_PROMPT + "\\n\\n" + paragraph` (the paper gives
    ChatGPT the instruction with the paragraph; a single user turn also works with chat
    templates that have no system role). Retries (429, 5xx, timeouts, connection errors)
    are done here, not by the client (its max_retries is 0): wait `backoff * 2**k`
    seconds (at least the server's Retry-After, at most `max_backoff`), `max_retries`
    times, counted in `self.retries`. 400/401/403/404 and other 4xx raise RefineError at
    once. Output: the reply, stripped, then HARD_FILTERS.
    """

    name = "openai"
    layout = "user: FIX_PROMPT + blank line + paragraph"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 4,
                 temperature: float = 0.0, max_tokens: int | None = None,
                 backoff: float = 1.0, max_backoff: float = 30.0):
        import openai  # lazy: ~0.7 s, and the rule refiner does not need it

        key = api_key or os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise RefineError(f"no API key for model {model!r}: set the environment variable "
                                  f"{api_key_env} (or pass base_url= for a local server)")
            key = "not-needed"  # local servers (vLLM, Ollama, llama.cpp) accept any key
        self.model, self.api_key_env = model, api_key_env
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self._openai = openai
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        # no user:password@ in settings, records or messages
        self.base_url = re.sub(r"//[^/@]*@", "//", str(self._client.base_url)).rstrip("/")
        self.retries = 0   # retried attempts, all calls together
        self.calls = 0     # refine() calls
        self._lock = threading.Lock()

    def settings(self) -> dict:
        return {"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "layout": self.layout}

    def messages(self, text: str) -> list[dict]:
        return [{"role": "user", "content": f"{FIX_PROMPT}\n\n{text}"}]

    def refine(self, text: str) -> RefineResult:
        with self._lock:
            self.calls += 1
        return self._parse(self._create(text))

    def _where(self) -> str:
        return f"server {self.base_url}, model {self.model!r}"

    def _create(self, text: str):
        oa = self._openai
        kwargs = {"model": self.model, "messages": self.messages(text), "temperature": self.temperature}
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        for attempt in range(self.max_retries + 1):
            try:
                return self._client.chat.completions.create(**kwargs)
            except (oa.APIConnectionError, oa.RateLimitError, oa.InternalServerError) as e:
                # APITimeoutError is an APIConnectionError; InternalServerError is any 5xx
                status = getattr(e, "status_code", None) or type(e).__name__
                if attempt == self.max_retries:
                    raise RefineError(f"{self._where()}: still failing after {attempt + 1} attempts "
                                      f"(last: {status}: {e})") from e
                wait = self.backoff * 2 ** attempt
                response = getattr(e, "response", None)
                if response is not None:
                    try:
                        wait = max(wait, float(response.headers.get("retry-after", 0)))
                    except ValueError:
                        pass
                with self._lock:
                    self.retries += 1
                time.sleep(min(wait, self.max_backoff))
            except oa.APIStatusError as e:
                hint = f" (check {self.api_key_env})" if e.status_code in (401, 403) else ""
                raise RefineError(f"{self._where()}: HTTP {e.status_code}{hint}: {e.message}") from e
            except (oa.APIResponseValidationError, ValueError) as e:  # ValueError: invalid JSON
                raise RefineError(f"{self._where()}: malformed response body: {e}") from e

    def _parse(self, resp) -> RefineResult:
        try:
            content = resp.choices[0].message.content
            if not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}, expected str")
        except (AttributeError, IndexError, TypeError, KeyError) as e:
            raise RefineError(f"{self._where()}: malformed chat completion (expected "
                              f"choices[0].message.content): {e}; body: {str(resp)[:200]!r}") from e
        u = getattr(resp, "usage", None)
        usage = {"prompt_tokens": int(getattr(u, "prompt_tokens", 0) or 0),
                 "completion_tokens": int(getattr(u, "completion_tokens", 0) or 0)}
        return finish(content, usage)


# ----------------------------------------------------------------------------- batch + cache
def cache_key(image_id: str, text: str, refiner: Refiner) -> str:
    """sha256 of everything that decides the output: item, prompt, refiner and its settings."""
    blob = json.dumps([str(image_id), text, FIX_PROMPT, refiner.name, refiner.settings()],
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


_FIELDS = ("key", "image_id", "raw", "refined", "dropped", "usage")


def read_cache(path: str | Path, fields: tuple[str, ...] = _FIELDS) -> dict[str, dict]:
    """key -> record of an append-only JSONL cache whose records hold `fields`. A torn LAST line (a kill mid-write) is cut off the file with a warning;
    a bad line anywhere else is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    done: dict[str, dict] = {}
    offset = 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1 or (i == len(lines) - 2 and lines[-1] == b"")
        if line.strip():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or any(f not in rec for f in fields):
                    raise ValueError(f"expected a JSON object with fields {fields}")
            except ValueError as e:
                if not last:
                    raise ValueError(f"{path}:{i + 1}: corrupt cache line ({e}); "
                                     f"expected one JSON record per line. Fix or remove that line.") from e
                warnings.warn(f"{path}:{i + 1}: ignoring a torn last line ({len(line)} bytes, "
                              f"from an interrupted run); that item will be redone")
                with open(path, "r+b") as f:
                    f.truncate(offset)
                break
            done[rec["key"]] = rec
        offset += len(line) + 1
    else:
        if data and not data.endswith(b"\n"):   # complete last record without newline
            with open(path, "ab") as f:
                f.write(b"\n")
    return done


def refine_all(items: list[tuple[str, str]], refiner: Refiner, cache_path: str | Path,
               concurrency: int = 4, progress: bool = True,
               out_path: str | Path | None = None) -> list[dict]:
    """Refine every (image_id, raw_text); one record per item, in input order.

    Record: {"key", "image_id", "raw", "refined", "dropped", "usage"}. Finished items are
    appended to `cache_path` (flushed + fsync'ed one by one); items already there are not
    refined again. A refiner error stops the run (finished items stay cached) and is raised.
    """
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    keys = [cache_key(iid, raw, refiner) for iid, raw in items]
    done = read_cache(cache_path)
    todo = {k: (str(iid), raw) for k, (iid, raw) in zip(keys, items) if k not in done}
    lock = threading.Lock()

    with open(cache_path, "a", encoding="utf-8") as cache, \
            tqdm(total=len(set(keys)), initial=len(set(keys)) - len(todo), disable=not progress,
                 desc=f"refine ({refiner.name})") as bar:

        def work(key: str, iid: str, raw: str) -> dict:
            res = refiner.refine(raw)
            rec = {"key": key, "image_id": iid, "raw": raw, "refined": res.text,
                   "dropped": res.dropped, "usage": dict(res.usage)}
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            with lock:
                cache.write(line)
                cache.flush()
                os.fsync(cache.fileno())
                bar.update(1)
            return rec

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [pool.submit(work, k, iid, raw) for k, (iid, raw) in todo.items()]
            try:
                for fut in as_completed(futures):
                    rec = fut.result()
                    done[rec["key"]] = rec
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    records = [done[k] for k in keys]
    if out_path is not None:
        write_jsonl(records, out_path)
    return records


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """Atomic JSONL write: a temporary file next to `path`, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def usage_total(records: list[dict]) -> dict:
    """Token usage summed over distinct items (a duplicated input is paid once)."""
    seen = {r["key"]: r for r in records}.values()
    p = sum(int(r["usage"].get("prompt_tokens", 0)) for r in seen)
    c = sum(int(r["usage"].get("completion_tokens", 0)) for r in seen)
    return {"items": len(seen), "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

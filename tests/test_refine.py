"""Stage-2 refinement (paper §3.2 steps 3-4): rules, an OpenAI-compatible client against a
local fake server, and the resumable cache (including a SIGKILL in the middle of a run)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minigpt4_min import shapesworld as sw
from minigpt4_min.refine import (FIX_PROMPT, HARD_FILTERS, OpenAIRefiner, RefineError, RefineResult,
                                 Refiner, RuleRefiner, cache_key, read_cache, refine_all, usage_total)

REPO_ROOT = Path(__file__).resolve().parents[1]
rules = RuleRefiner()


# ----------------------------------------------------------------------------- rules
def test_fix_prompt_is_the_papers():
    assert FIX_PROMPT == (
        "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, "
        "not English sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete "
        "sentences. Return directly the results without explanation. Return directly the input "
        "paragraph if it is already correct without explanation.")
    assert "I apologize" in HARD_FILTERS and "I'm sorry" in HARD_FILTERS
    assert isinstance(rules, Refiner)


@pytest.mark.parametrize("raw, want", [
    # repeated sentences, exact and near (case, punctuation, opener, filler words)
    ("There is a red circle on the left. There is a red circle on the left. The background is white.",
     "There is a red circle on the left. The background is white."),
    (("A blue square is at the top. a blue square is at the top! I can see a small red circle on the "
      "right. There is a small red circle on the right too."),
     "A blue square is at the top. I can see a small red circle on the right."),
    # back-to-back repeated phrases and words
    ("There is a red circle a red circle a red circle on the left. The the background is white.",
     "There is a red circle on the left. The background is white."),
    ("I see a large green triangle, a large green triangle.", "I see a large green triangle."),
    # meaningless characters and template leftovers
    (("There is a #red circle### on the left!!!! <Img><ImageHere></Img> ###Assistant: The background "
      "is white.\x00\u200b ###Human: Continue ###Assistant: It is small...."),
     "There is a red circle on the left! The background is white. It is small."),
    ("The circle is red ,,, and the square is blue . </s>", "The circle is red, and the square is blue."),
    # non-English sentences (other script, gibberish)
    ("There is a red circle on the left. 这是一个红色的圆圈。 Xkcd qwrtz bnmpl. The background is white.",
     "There is a red circle on the left. The background is white."),
    # incomplete last sentence: short -> dropped, long -> closed (dangling words cut)
    ("There is a red circle on the left. The background is", "There is a red circle on the left."),
    ("There is a red circle on the left. A small blue square is at the top and the",
     "There is a red circle on the left. A small blue square is at the top."),
    # spacing and capitals
    ("there is a red circle  on the left .the square is blue , not green.",
     "There is a red circle on the left. The square is blue, not green."),
])
def test_rule_refiner_fixes(raw, want):
    res = rules.refine(raw)
    assert (res.text, res.dropped, res.usage) == (want, None, {"prompt_tokens": 0, "completion_tokens": 0})


def test_rule_refiner_keeps_correct_paragraphs_and_is_deterministic():
    texts = [sw.describe(s) for s in sw.make_scenes(200, seed=5)]
    texts.append("Its area is 3.5 units. The shapes (a circle and a square) don't touch; nice!")
    for t in texts:
        assert rules.refine(t) == RefineResult(t, None), t
    messy = "a red circle a red circle!!! ## xqzt brrr. 圆圈 The background is"
    assert len({rules.refine(messy).text for _ in range(3)}) == 1
    assert rules.refine(messy).text == RuleRefiner().refine(messy).text == "A red circle!"


@pytest.mark.parametrize("raw, reason", [
    ("I'm sorry, I made a mistake. There is a red circle.", "hard filter: \"I'm sorry\""),
    ("There is a red circle. I APOLOGIZE for the confusion.", "hard filter: 'I apologize'"),
    ("As an AI language model, I cannot see images.", "hard filter: 'As an AI'"),
    ("I am sorry but I can not help", "hard filter: 'I am sorry'"),
    ("", "empty"),
    ("#### !!! <ImageHere> ...", "empty"),
    ("这是一个红色的圆圈。", "empty"),
])
def test_rule_refiner_drops(raw, reason):
    res = rules.refine(raw)
    assert (res.text, res.dropped) == ("", reason)


# ----------------------------------------------------------------------------- fake server
def completion(content, prompt_tokens=11, completion_tokens=7):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "tiny-chat",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class FakeChatServer:
    """POST /v1/chat/completions on 127.0.0.1:<free port>; replies come from `script`, a list
    of (status, body, delay_s, content_type); the last entry repeats. Records each request."""

    def __init__(self):
        self.script = [(200, completion("ok."), 0.0, "application/json")]
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append({"path": self.path, "body": body, "headers": headers})
                i = min(len(server.requests), len(server.script)) - 1
                status, reply, delay, ctype = server.script[i]
                time.sleep(delay)
                data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def reply(self, *entries):
        self.script = [(e[0], e[1], e[2] if len(e) > 2 else 0.0, e[3] if len(e) > 3 else "application/json")
                       for e in entries]


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def client(server, **kw):
    kw = {"api_key": "sk-test-secret", "backoff": 0.001, "max_retries": 3, "timeout": 5.0, **kw}
    return OpenAIRefiner("tiny-chat", base_url=server.url, **kw)


def test_openai_success(server):
    server.reply((200, completion("  There is a red circle.\n")))
    r = client(server)
    res = r.refine("there is a red circle a red circle")
    assert res == RefineResult("There is a red circle.", None, {"prompt_tokens": 11, "completion_tokens": 7})
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "tiny-chat" and req["body"]["temperature"] == 0.0
    assert req["body"]["messages"] == [{"role": "user",
                                        "content": FIX_PROMPT + "\n\nthere is a red circle a red circle"}]
    assert req["headers"]["authorization"] == "Bearer sk-test-secret"
    assert "sk-test-secret" not in json.dumps(r.settings())
    assert r.settings()["base_url"] == server.url and r.retries == 0 and r.calls == 1
    assert isinstance(r, Refiner)


def test_openai_applies_hard_filters(server):
    server.reply((200, completion("I apologize, but the paragraph is unclear.")))
    assert client(server).refine("x y z").dropped == "hard filter: 'I apologize'"
    server.reply((200, completion("   ")))
    assert client(server).refine("x y z").dropped == "empty"


@pytest.mark.parametrize("first", [429, 500, 503])
def test_openai_retries_then_succeeds(server, first):
    server.reply((first, {"error": {"message": "busy"}}), (200, completion("Fine.", 5, 2)))
    r = client(server)
    assert r.refine("raw") == RefineResult("Fine.", None, {"prompt_tokens": 5, "completion_tokens": 2})
    assert len(server.requests) == 2 and r.retries == 1


def test_openai_gives_up_after_max_retries(server):
    server.reply((500, {"error": {"message": "boom"}}))
    r = client(server, max_retries=2)
    with pytest.raises(RefineError, match=r"after 3 attempts.*500") as e:
        r.refine("raw")
    assert server.url in str(e.value) and "tiny-chat" in str(e.value)
    assert len(server.requests) == 3 and r.retries == 2


def test_openai_timeout_retried_then_error(server):
    server.reply((200, completion("late."), 0.6))
    r = client(server, timeout=0.15, max_retries=1)
    with pytest.raises(RefineError, match=r"after 2 attempts.*Timeout") as e:
        r.refine("raw")
    assert server.url in str(e.value) and len(server.requests) == 2 and r.retries == 1
    server.requests.clear()
    server.reply((200, completion("late."), 0.6), (200, completion("On time.")))
    assert client(server, timeout=0.15).refine("raw").text == "On time."
    assert len(server.requests) == 2


@pytest.mark.parametrize("body, ctype", [
    ("{not json", "application/json"),
    ({"id": "x", "object": "chat.completion", "choices": []}, "application/json"),
    (completion(None), "application/json"),
    ({"id": "x", "object": "chat.completion"}, "application/json"),
    ("<html>gateway</html>", "text/html"),
])
def test_openai_malformed_body(server, body, ctype):
    server.reply((200, body, 0.0, ctype))
    with pytest.raises(RefineError, match="malformed") as e:
        client(server).refine("raw")
    assert server.url in str(e.value) and len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403, 400, 404])
def test_openai_client_errors_not_retried(server, status):
    server.reply((status, {"error": {"message": "nope"}}))
    r = client(server)
    with pytest.raises(RefineError, match=f"HTTP {status}") as e:
        r.refine("raw")
    msg = str(e.value)
    assert server.url in msg and "tiny-chat" in msg and "sk-test-secret" not in msg
    assert ("OPENAI_API_KEY" in msg) == (status in (401, 403))
    assert len(server.requests) == 1 and r.retries == 0


def test_openai_api_key_only_from_argument_or_env(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(RefineError, match="OPENAI_API_KEY"):
        OpenAIRefiner("gpt-3.5-turbo")
    monkeypatch.setenv("MY_KEY", "sk-from-env")
    r = OpenAIRefiner("tiny-chat", base_url=server.url, api_key_env="MY_KEY", backoff=0.001)
    r.refine("raw")
    OpenAIRefiner("tiny-chat", base_url=server.url, api_key_env="UNSET_KEY_VAR").refine("raw")
    assert [q["headers"]["authorization"] for q in server.requests] == ["Bearer sk-from-env",
                                                                        "Bearer not-needed"]
    assert "sk-from-env" not in json.dumps(r.settings())


# ----------------------------------------------------------------------------- refine_all
class Counting:
    """Deterministic refiner that records its calls (thread-safe) and its peak concurrency."""

    name = "counting"

    def __init__(self, delay=0.0):
        self.calls, self.delay, self.active, self.peak = [], delay, 0, 0
        self.lock = threading.Lock()

    def settings(self):
        return {"how": "upper"}

    def refine(self, text):
        with self.lock:
            self.calls.append(text)
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.delay * (1 + hash(text) % 3))
        with self.lock:
            self.active -= 1
        if "sorry" in text:
            return RefineResult("", "hard filter: \"I'm sorry\"")
        return RefineResult(text.upper(), None, {"prompt_tokens": len(text), "completion_tokens": 1})


ITEMS = [(f"img{i}", f"paragraph {i}") for i in range(12)] + [("img99", "I'm sorry")]


def test_refine_all_ordered_cached_and_concurrent(tmp_path):
    cache, out = tmp_path / "cache.jsonl", tmp_path / "out.jsonl"
    r = Counting(delay=0.01)
    recs = refine_all(ITEMS, r, cache, concurrency=4, progress=False, out_path=out)
    assert [x["image_id"] for x in recs] == [i for i, _ in ITEMS]
    assert [x["refined"] for x in recs[:12]] == [f"PARAGRAPH {i}" for i in range(12)]
    assert recs[-1]["dropped"] == "hard filter: \"I'm sorry\"" and recs[-1]["refined"] == ""
    assert recs[0] == {"key": cache_key("img0", "paragraph 0", r), "image_id": "img0", "raw": "paragraph 0",
                       "refined": "PARAGRAPH 0", "dropped": None,
                       "usage": {"prompt_tokens": 11, "completion_tokens": 1}}
    assert sorted(r.calls) == sorted(t for _, t in ITEMS) and 1 < r.peak <= 4
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs
    assert len(cache.read_text().splitlines()) == len(ITEMS) and not list(tmp_path.glob("*.tmp"))
    paid = sum(len(t) for _, t in ITEMS[:12])
    assert usage_total(recs) == {"items": 13, "prompt_tokens": paid, "completion_tokens": 12,
                                 "total_tokens": paid + 12}

    again = Counting()
    assert refine_all(ITEMS, again, cache, concurrency=2, progress=False) == recs and again.calls == []
    more = Counting()
    items2 = [("new", "fresh text"), *ITEMS, ("img0", "paragraph 0")]
    recs2 = refine_all(items2, more, cache, progress=False)
    assert more.calls == ["fresh text"] and recs2[1:-1] == recs and recs2[-1] == recs[0]


def test_cache_key_covers_item_prompt_and_settings():
    base = cache_key("1", "text", rules)
    assert base == cache_key("1", "text", RuleRefiner())
    assert len({base, cache_key("2", "text", rules), cache_key("1", "text!", rules),
                cache_key("1", "text", RuleRefiner(min_words_to_close=3)),
                cache_key("1", "text", Counting())}) == 5


def test_torn_last_line_tolerated_middle_corruption_rejected(tmp_path):
    cache = tmp_path / "cache.jsonl"
    refine_all(ITEMS[:3], Counting(), cache, progress=False)
    good = cache.read_bytes()
    cache.write_bytes(good + b'{"key": "abc", "image_id": "im')     # killed mid-write
    r = Counting()
    with pytest.warns(UserWarning, match="torn last line"):
        recs = refine_all(ITEMS[:5], r, cache, progress=False)
    assert sorted(r.calls) == ["paragraph 3", "paragraph 4"]
    assert [x["raw"] for x in recs] == [t for _, t in ITEMS[:5]]
    assert len(read_cache(cache)) == 5                               # file is clean again

    lines = good.splitlines(keepends=True)
    cache.write_bytes(lines[0] + b"garbage\n" + lines[1])
    with pytest.raises(ValueError, match=rf"{cache.name}:2: corrupt"):
        refine_all(ITEMS[:3], Counting(), cache, progress=False)


def test_refine_all_keeps_finished_items_when_refiner_fails(tmp_path):
    class Flaky(Counting):
        def refine(self, text):
            if text == "paragraph 5":
                raise RefineError("server down")
            return super().refine(text)

    cache = tmp_path / "cache.jsonl"
    with pytest.raises(RefineError, match="server down"):
        refine_all(ITEMS[:8], Flaky(), cache, concurrency=1, progress=False)
    assert {rec["raw"] for rec in read_cache(cache).values()} >= {f"paragraph {i}" for i in range(5)}


JOB = """
import sys, time
from minigpt4_min.refine import RefineResult, refine_all

class Slow:
    name = "slow"
    def __init__(self, log, delay):
        self.log, self.delay = log, delay
    def settings(self):
        return {"reverse": True}
    def refine(self, text):
        with open(self.log, "a") as f:
            f.write(text + "\\n")
        time.sleep(self.delay)
        return RefineResult(text[::-1], None, {"prompt_tokens": len(text), "completion_tokens": 3})

cache, out, log, delay = sys.argv[1:5]
items = [(f"img{i}", f"paragraph {i}") for i in range(40)]
refine_all(items, Slow(log, float(delay)), cache, concurrency=2, progress=False, out_path=out)
"""


def test_sigkill_mid_run_then_resume_is_byte_identical(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(JOB))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def run(name, delay):
        return subprocess.Popen([sys.executable, str(job), str(tmp_path / f"{name}.cache"),
                                 str(tmp_path / f"{name}.out"), str(tmp_path / f"{name}.log"), str(delay)],
                                cwd=REPO_ROOT, env=env)

    assert run("ref", 0.0).wait(timeout=30) == 0                       # uninterrupted run
    proc = run("kill", 0.05)
    cache = tmp_path / "kill.cache"
    deadline = time.time() + 20
    while time.time() < deadline and (not cache.exists() or cache.read_bytes().count(b"\n") < 5):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    done = set()
    for line in cache.read_text().splitlines():
        try:
            done.add(json.loads(line)["raw"])
        except ValueError:
            pass                                                       # torn by the kill
    assert 5 <= len(done) < 40 and not (tmp_path / "kill.out").exists()

    (tmp_path / "resume.log").unlink(missing_ok=True)
    resume = subprocess.Popen([sys.executable, str(job), str(cache), str(tmp_path / "kill.out"),
                               str(tmp_path / "resume.log"), "0"], cwd=REPO_ROOT, env=env)
    assert resume.wait(timeout=30) == 0
    called_again = set((tmp_path / "resume.log").read_text().splitlines())
    assert called_again == {f"paragraph {i}" for i in range(40)} - done   # nothing paid twice
    assert (tmp_path / "kill.out").read_bytes() == (tmp_path / "ref.out").read_bytes()

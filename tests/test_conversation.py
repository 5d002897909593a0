"""Conversation templates (golden strings), image splicing, truncation, answering,
streaming, notices and the terminal chat (DESIGN.md §2 "Chat (demo)")."""
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from minigpt4_min.config import get_config
from minigpt4_min.conversation import (CONV_TEMPLATES, NO_PROJECTION, Chat, Notices, clean_answer,
                                       embed_prompt, get_template, render_messages, start_notices,
                                       stream_clean)
from minigpt4_min.data import BadImageError, ImageProcessor
from minigpt4_min.model import GenerationSettings

REPO = Path(__file__).resolve().parents[1]
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
          "once I provide it to you. Please answer my questions.")
VICUNA0_GOLDEN = (SYSTEM + "###Human: <Img><ImageHere></Img> What is this?###Assistant: A cat."
                  "###Human: What color is it?###Assistant: ")
LLAMA2_GOLDEN = (SYSTEM + "<s>[INST] <Img><ImageHere></Img> What is this? [/INST] A cat."
                 "<s>[INST] What color is it? [/INST] ")


def _image(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)


def _embedding(model, image) -> torch.Tensor:
    """The image's embeddings computed independently of Chat: (N, D)."""
    with torch.no_grad():
        return model.embed_images(ImageProcessor(model.cfg)(image)[None])[0]


class Say(LogitsProcessor):
    """Forces the model to write `text` (then keep repeating its last token)."""

    def __init__(self, tokenizer, text: str):
        self.ids, self.calls = tokenizer(text, add_special_tokens=False)["input_ids"], 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -1e9)
        forced[:, self.ids[min(self.calls, len(self.ids) - 1)]] = 0
        self.calls += 1
        return forced


def _say(chat: Chat, text: str) -> LogitsProcessorList:
    return LogitsProcessorList([Say(chat.model.tokenizer, text)])


# ---------------------------------------------------------------- templates
@pytest.mark.parametrize("name, golden", [("vicuna0", VICUNA0_GOLDEN), ("llama2", LLAMA2_GOLDEN)])
def test_template_golden_strings(random_model, name, golden):
    chat = Chat(random_model, template=name)
    chat.upload_img(_image(0))
    chat.ask("What is this?")
    chat.conv.append_message(chat.conv.roles[1], "A cat.")
    chat.ask("What color is it?")
    chat.conv.append_message(chat.conv.roles[1], None)
    assert chat.conv.get_prompt() == golden


def test_get_template_returns_fresh_copies_and_names_the_choices():
    conv = get_template("vicuna0")
    conv.append_message(conv.roles[0], "hi")
    assert CONV_TEMPLATES["vicuna0"].messages == [] and get_template("vicuna0").messages == []
    assert conv.copy().messages == conv.messages and conv.copy().messages is not conv.messages
    with pytest.raises(ValueError, match=r"'nope'.*\['llama2', 'vicuna0'\]"):
        get_template("nope")
    with pytest.raises(ValueError, match="not one of"):
        conv.append_message("Robot: ", "beep")


def test_ask_after_upload_joins_the_image_message(random_model):
    chat = Chat(random_model)
    chat.upload_img(_image(0))
    chat.ask("What is this?")
    assert chat.conv.messages == [["Human: ", "<Img><ImageHere></Img> What is this?"]]
    chat.ask("And now?")                                   # no image pending: a new message
    assert chat.conv.messages[-1] == ["Human: ", "And now?"]
    with pytest.raises(ValueError, match="non-empty"):
        chat.ask("   ")


def test_defaults_fit_the_tiny_context(random_model):
    chat = Chat(random_model)
    assert chat.max_length == 512 and chat.settings.max_new_tokens == 120
    assert get_config("vicuna7b").context_len == 2000
    assert GenerationSettings().max_new_tokens == 300


# ---------------------------------------------------------------- splicing
def test_several_images_are_spliced_in_order_with_one_bos(random_model):
    m = random_model
    chat = Chat(m, max_length=2000)
    a, b = _image(1), _image(2)
    chat.upload_img(a)
    chat.ask("What is this?")
    chat.conv.append_message(chat.conv.roles[1], "A cat.")
    chat.upload_img(b)
    chat.ask("And this?")
    chat.conv.append_message(chat.conv.roles[1], None)
    emb, _ = chat.context(max_new_tokens=10)                              # (1, T, D)
    segs = chat.conv.get_prompt().split("<ImageHere>")
    ids = [[m.tokenizer.bos_token_id] + m.tokenize(segs[0]), m.tokenize(segs[1]), m.tokenize(segs[2])]
    n = m.cfg.num_query_tokens
    starts = [len(ids[0]), len(ids[0]) + n + len(ids[1])]
    assert emb.shape[1] == sum(map(len, ids)) + 2 * n
    torch.testing.assert_close(emb[0, starts[0]:starts[0] + n], _embedding(m, a))
    torch.testing.assert_close(emb[0, starts[1]:starts[1] + n], _embedding(m, b))
    text_pos = [i for i in range(emb.shape[1]) if not any(s <= i < s + n for s in starts)]
    all_ids = ids[0] + ids[1] + ids[2]
    torch.testing.assert_close(emb[0, text_pos], m.embed_ids(all_ids))    # text in between, in order
    assert all_ids.count(m.tokenizer.bos_token_id) == 1 and all_ids[0] == m.tokenizer.bos_token_id
    _, spans = embed_prompt(m, chat.conv.get_prompt(), chat.images)
    assert spans == [(s, s + n) for s in starts]


def test_placeholder_and_image_counts_must_match(random_model):
    with pytest.raises(ValueError, match="1 <ImageHere> but 0 images"):
        embed_prompt(random_model, "a <ImageHere> b", [])


def test_long_context_is_cut_from_the_left_with_a_warning(random_model):
    chat = Chat(random_model, max_length=2000)
    chat.upload_img(_image(0))
    chat.ask("What is this? " * 10)
    full, _ = chat.context(max_new_tokens=10)
    T = full.shape[1]
    chat.max_length = T - 15 + 10                          # room for T - 15 prompt positions
    with pytest.warns(UserWarning, match="first 15 positions are cut"):
        cut, mask = chat.context(max_new_tokens=10)
    assert cut.shape[1] == T - 15 and mask.shape == (1, T - 15)
    torch.testing.assert_close(cut[0], full[0, 15:])      # the LAST positions are kept
    with pytest.raises(ValueError, match="no room"):
        chat.context(max_new_tokens=chat.max_length)


def test_cut_warning_says_what_the_model_no_longer_sees(random_model):
    chat = Chat(random_model, max_length=2000)
    chat.upload_img(_image(0))
    chat.ask("What is this?")
    chat.conv.append_message(chat.conv.roles[1], "A red circle.")
    chat.upload_img(_image(1))
    chat.ask("And this one?")
    chat.conv.append_message(chat.conv.roles[1], "A blue square.")
    chat.ask("Which one is bigger? " * 3)
    chat.conv.append_message(chat.conv.roles[1], None)
    full, spans = embed_prompt(random_model, chat.conv.get_prompt(), chat.images)

    def warning_when_cutting(cut: int) -> str:
        chat.max_length = len(full) - cut + 10
        with pytest.warns(UserWarning) as caught:
            chat.context(max_new_tokens=10)
        assert len(caught) == 1
        return str(caught[0].message)

    said = "positions are cut, so the model no longer sees "
    assert warning_when_cutting(5).endswith("first 5 " + said + "the start of the system prompt")
    assert warning_when_cutting(spans[0][1] + 1).endswith(
        said + "the system prompt, 1 of the 2 images and all or part of the first of 3 turns")
    assert warning_when_cutting(spans[1][1] + 1).endswith(
        said + "the system prompt, both images and all or part of the first 2 of 3 turns")
    assert warning_when_cutting(len(full) - 3).endswith(
        said + "the system prompt, both images and every earlier turn, even the start of this question")


def test_max_new_tokens_must_leave_room_from_the_start(random_model):
    with pytest.raises(ValueError, match="max_new_tokens=100 leaves no room .* max_length=100"):
        Chat(random_model, settings=GenerationSettings(max_new_tokens=100), max_length=100)


# ---------------------------------------------------------------- answering
def test_answer_is_cut_at_the_stop_string_and_recorded(random_model):
    chat = Chat(random_model)
    chat.upload_img(_image(0))
    chat.ask("What is this?")
    out = chat.answer(logits_processor=_say(chat, "A red circle.### Human: more"))
    assert out == "A red circle."
    assert chat.conv.messages[-1] == ["Assistant: ", "A red circle."]
    assert chat.conv.get_prompt().endswith("What is this?###Assistant: A red circle.###")
    with pytest.raises(ValueError, match="nothing to answer"):
        chat.answer()                                      # the last message is the answer


def test_stream_pieces_join_to_the_greedy_answer(random_model):
    s = GenerationSettings(max_new_tokens=20)
    chats = [Chat(random_model, settings=s) for _ in range(2)]
    for c in chats:
        c.upload_img(_image(3))
        c.ask("Describe this image in detail.")
    full = chats[0].answer()
    pieces = list(chats[1].stream_answer())
    assert len(pieces) > 1 and "".join(pieces) == full
    assert chats[1].conv.messages == chats[0].conv.messages


def test_stream_stops_at_the_stop_string(random_model):
    chat = Chat(random_model)
    chat.upload_img(_image(0))
    chat.ask("What is this?")
    pieces = list(chat.stream_answer(logits_processor=_say(chat, "A blue star.###Human: x")))
    assert "".join(pieces) == "A blue star." and chat.conv.messages[-1][1] == "A blue star."


def test_stream_closed_early_keeps_what_was_said(random_model):
    chat = Chat(random_model, settings=GenerationSettings(max_new_tokens=40))
    chat.upload_img(_image(0))
    chat.ask("What is this?")
    stream = chat.stream_answer(logits_processor=_say(chat, "one two three four five six seven eight"))
    first = next(stream)
    stream.close()                                          # stops the generation thread
    assert chat.conv.messages[-1] == ["Assistant: ", first]
    chat.ask("Again?")                                      # the chat goes on
    assert chat.conv.messages[-1] == ["Human: ", "Again?"]


def test_stream_answer_builds_the_prompt_at_the_call(random_model):
    """So a front end can show an error or a cut before it prints "Assistant: "."""
    chat = Chat(random_model, settings=GenerationSettings(max_new_tokens=4))
    with pytest.raises(ValueError, match="nothing to answer"):
        chat.stream_answer()                                # raised at once, not at the first piece
    chat.upload_img(_image(0))
    chat.ask("What is this?")
    chat.max_length = 40
    with pytest.warns(UserWarning, match="positions are cut"):
        pieces = chat.stream_answer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # nothing more while streaming
        answer = "".join(pieces)
    assert chat.conv.messages[-1] == ["Assistant: ", answer]
    chat.max_length = 2000
    chat.ask("Again?")
    chat.stream_answer()                                    # never read: its pending answer is dropped
    chat.ask("And again?")
    assert chat.conv.messages[-2:] == [["Human: ", "Again?"], ["Human: ", "And again?"]]


def test_notices_collect_warnings_once_each():
    with Notices() as notes:
        for _ in range(2):
            warnings.warn("the history was cut")
        assert notes.take() == ["the history was cut"]
        warnings.warn("the history was cut")
        warnings.warn("something else")
        assert notes.take() == ["something else"]           # each text once per block
        assert notes.take() == []


def test_render_messages_for_people():
    conv = get_template("llama2")
    conv.append_message(conv.roles[0], "<Img><ImageHere></Img> What is <this>?")
    conv.append_message(conv.roles[1], "A cat.")
    conv.append_message(conv.roles[0], "<Img><ImageHere></Img>")
    conv.append_message(conv.roles[1], None)
    assert render_messages(conv, lambda k: f"[image {k}]", str.upper) == [
        ("Human", "[image 0] WHAT IS <THIS>?"), ("Assistant", "A CAT."),
        ("Human", "[image 1]"), ("Assistant", None)]


def test_projection_source_says_whether_llama_proj_was_trained(random_model, tmp_path):
    assert random_model.projection_source is None and start_notices(random_model) == [NO_PROJECTION]
    with pytest.raises(FileNotFoundError):
        random_model.load_projection(tmp_path / "missing.safetensors")
    assert random_model.projection_source is None           # a failed load leaves it random
    random_model.save_projection(tmp_path / "model.safetensors")
    random_model.load_projection(tmp_path)                  # a trainer folder
    assert random_model.projection_source == str(tmp_path / "model.safetensors")
    assert start_notices(random_model) == []


def test_beam_search_streams_one_piece(random_model):
    s = GenerationSettings(max_new_tokens=6, num_beams=2)
    chats = [Chat(random_model, settings=s) for _ in range(2)]
    for c in chats:
        c.upload_img(_image(0))
        c.ask("What is this?")
    assert list(chats[0].stream_answer()) == [chats[1].answer()]


@pytest.mark.parametrize("pieces, expected", [
    (["The ", "red #", "#", "# more"], ["The", " red"]),            # held back "#", cut at ###
    (["  a #", "b ", " c"], ["a", " #b", "  c"]),                    # "#" released; spaces held
    (["x Assis", "tant: y"], ["x"]),                                  # cut at Assistant:
])
def test_stream_clean_matches_clean_answer(pieces, expected):
    cuts = ("###", "Assistant:")
    assert list(stream_clean(pieces, cuts)) == expected
    assert "".join(expected) == clean_answer("".join(pieces), cuts)


def test_five_turns_keep_the_same_image_embeddings(random_model):
    chat = Chat(random_model, max_length=2000, settings=GenerationSettings(max_new_tokens=8))
    img = _image(4)
    chat.upload_img(img)
    expected = _embedding(random_model, img)
    n = random_model.cfg.num_query_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # no truncation in 5 turns
        for turn in range(5):
            chat.ask(f"Question {turn}?")
            chat.answer(logits_processor=_say(chat, f"Answer {turn}.###"))
            emb, spans = embed_prompt(random_model, chat.conv.get_prompt(), chat.images)
            s, e = spans[0]
            assert e - s == n
            torch.testing.assert_close(emb[s:e], expected)
    assert [m[1] for m in chat.conv.messages[1::2]] == [f"Answer {t}." for t in range(5)]
    assert len(chat.conv.messages) == 10 and len(chat.images) == 1


def test_reset_clears_history_and_images(random_model):
    chat = Chat(random_model)
    chat.upload_img(_image(0))
    chat.ask("What is this?")
    chat.reset()
    assert chat.conv.messages == [] and chat.images == []
    assert chat.conv.get_prompt() == SYSTEM + "###"
    assert CONV_TEMPLATES["vicuna0"].messages == []


def test_bad_images_raise_and_leave_the_chat_unchanged(random_model, tmp_path):
    chat = Chat(random_model)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    for bad, where in [(tmp_path / "missing.png", "missing.png"), (junk, "junk.png"),
                       (str(junk), "junk.png"), (np.zeros((8, 8, 3), np.float32), "uint8")]:
        with pytest.raises(BadImageError, match=where):
            chat.upload_img(bad)
    with pytest.raises(TypeError, match="PIL image"):
        chat.upload_img(b"raw bytes")
    assert chat.conv.messages == [] and chat.images == []


# ---------------------------------------------------------------- terminal chat
def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt4_min", "chat", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_chat_answers_each_question(tmp_path):
    from minigpt4_min import shapesworld as sw

    image = tmp_path / "scene.png"
    sw.render(sw.split("test", 1)[0]).save(image)
    r = _cli("--image", str(image), "--max-new-tokens", "6", "--temperature", "0",
             stdin="What is this?\n\nDescribe it in detail.\n")
    assert r.returncode == 0, r.stderr
    # one streamed answer per question (an answer may itself hold a newline)
    assert r.stdout.startswith("Assistant: ") and r.stdout.count("Assistant: ") == 2, r.stdout
    assert "Traceback" not in r.stderr


def test_cli_chat_missing_image_is_one_clear_error(tmp_path):
    r = _cli("--image", str(tmp_path / "nope.png"), stdin="What is this?\n")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.png'}: no such image file"]


class _Captured(io.StringIO):
    """stdout or stderr of an in-process run; each write also goes to `both`, in order."""

    def __init__(self, both: list[str]):
        super().__init__()
        self.both = both

    def write(self, s: str) -> int:
        self.both.append(s)
        return super().write(s)


def _chat_main(monkeypatch, model, *args: str, stdin: str = "") -> tuple[int, str, str, str]:
    """`python -m minigpt4_min chat ARGS` in this process, on `model` instead of the shipped
    parts: (exit code, stdout, stderr, both interleaved as a terminal would show them)."""
    from minigpt4_min.__main__ import main
    from minigpt4_min.model import MiniGPT4

    def from_config(cfg, projection=None):
        if projection:
            model.load_projection(projection)
        return model

    monkeypatch.setattr(MiniGPT4, "from_config", staticmethod(from_config))
    both: list[str] = []
    out, err = _Captured(both), _Captured(both)
    for name, stream in (("stdin", io.StringIO(stdin)), ("stdout", out), ("stderr", err)):
        monkeypatch.setattr(sys, name, stream)
    rc = main(["chat", *args])
    return rc, out.getvalue(), err.getvalue(), "".join(both)


def _png_file(folder: Path, name: str, seed: int) -> str:
    from PIL import Image
    Image.fromarray(_image(seed)).save(folder / name)
    return str(folder / name)


def _prompt_positions(model, image: str, question: str) -> int:
    """Positions of the first prompt of a chat about `image` that asks `question`."""
    chat = Chat(model)
    chat.upload_img(image)
    chat.ask(question)
    chat.conv.append_message(chat.conv.roles[1], None)
    return len(embed_prompt(model, chat.conv.get_prompt(), chat.images)[0])


GREEDY = ("--max-new-tokens", "4", "--temperature", "0")


def test_cli_chat_without_a_projection_says_so_first(monkeypatch, random_model, tmp_path):
    png = _png_file(tmp_path, "scene.png", 0)
    rc, out, err, both = _chat_main(monkeypatch, random_model, "--image", png, *GREEDY,
                                    stdin="What is this?\n")
    assert rc == 0 and out.startswith("Assistant: ")
    assert err == f"note: {NO_PROJECTION}\n" and "llama_proj is random" in err
    assert both.index("note: no trained projection") < both.index("Assistant: ")
    random_model.save_projection(tmp_path / "proj.safetensors")
    rc, out, err, _ = _chat_main(monkeypatch, random_model, "--image", png, *GREEDY,
                                 "--checkpoint", str(tmp_path / "proj.safetensors"), stdin="What is this?\n")
    assert rc == 0 and out.startswith("Assistant: ") and err == ""


def test_cli_chat_notes_a_cut_before_the_answer_never_inside_it(monkeypatch, random_model, tmp_path):
    png = _png_file(tmp_path, "scene.png", 0)
    fits = _prompt_positions(random_model, png, "What is this?")       # the first prompt just fits
    rc, out, err, both = _chat_main(monkeypatch, random_model, "--image", png, *GREEDY,
                                    "--max-length", str(fits + 4),
                                    stdin="What is this?\nWhat colour is it?\nAnd its size?\n")
    assert rc == 0
    lines = both.splitlines()
    answers = [i for i, line in enumerate(lines) if line.startswith("Assistant: ")]
    cuts = [i for i, line in enumerate(lines) if line.startswith("note: the conversation is")]
    assert len(answers) == 3 and cuts == [answers[1] - 1, answers[2] - 1]   # once each, just before
    assert all(w not in lines[i] for i in answers for w in ("note:", "warning", "positions are cut"))
    assert "positions" not in out and err.count("positions are cut, so the model no longer sees") == 2
    assert "warning" not in err                               # said once, as a note


def test_cli_chat_history_lists_the_conversation(monkeypatch, random_model, tmp_path):
    png, second = _png_file(tmp_path, "scene.png", 0), _png_file(tmp_path, "second.png", 1)
    random_model.save_projection(tmp_path / "model.safetensors")
    stdin = f"What is this?\n/image {second}\nAnd this one?\n/history\n/reset\n/history\n/quit\nNot asked.\n"
    rc, out, err, _ = _chat_main(monkeypatch, random_model, "--checkpoint", str(tmp_path), "--image", png,
                                 *GREEDY, stdin=stdin)
    assert rc == 0 and err == ""
    before, after = out.split(f"(conversation reset: {second})")
    history = [line for line in before.splitlines() if line.startswith("Human: ")]
    assert history == [f"Human: <image: {png}> What is this?", f"Human: <image: {second}> And this one?"]
    assert before.count("Assistant: ") == 2 * 2                # each answer streamed, then listed
    assert after.strip().splitlines() == [f"Human: <image: {second}>"]
    assert "Not asked" not in out


def test_cli_chat_help_lists_the_commands(capsys):
    from minigpt4_min.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["chat", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("/image PATH", "/history", "/reset", "/quit", "--checkpoint"))


# ---------------------------------------------------------------- notebook widget
def _png_bytes(seed: int) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(_image(seed)).save(buf, format="PNG")
    return buf.getvalue()


def _upload_value(name: str, content: bytes) -> list[dict]:
    """What ipywidgets 8's FileUpload holds after a browser upload."""
    from datetime import datetime, timezone
    return [{"name": name, "type": "image/png", "size": len(content), "content": memoryview(content),
             "last_modified": datetime.now(timezone.utc)}]


def test_chat_widget_upload_send_and_restart(random_model):
    import html

    import ipywidgets as W

    from minigpt4_min.widgets import ChatWidget
    w = ChatWidget(Chat(random_model, settings=GenerationSettings(max_new_tokens=12)))
    assert isinstance(w.ui, W.VBox) and w.sample_button.disabled and hasattr(w, "_ipython_display_")
    w.upload.value = _upload_value("cat.png", _png_bytes(5))
    assert len(w.chat.images) == 1 and 'src="data:image/png;base64,' in w.history.value
    torch.testing.assert_close(w.chat.images[0], _embedding(random_model, _image(5)))
    tok = random_model.tokenizer
    with torch.no_grad():                 # a random LLM may well stop at once: never let it say "#"
        for t, i in tok.get_vocab().items():
            if "#" in tok.convert_tokens_to_string([t]):
                random_model.llm.lm_head.weight[i] = -10.0 * random_model.llm.lm_head.weight[i].abs()
    w.text.value = "What is <this>?"
    w.send_button.click()
    answer = w.chat.conv.messages[-1][1]
    assert w.chat.conv.messages[-1][0] == "Assistant: " and answer
    assert "What is &lt;this&gt;?" in w.history.value and html.escape(answer) in w.history.value
    assert w.text.value == ""
    w.send_button.click()                                   # empty question: nothing asked
    assert len(w.chat.conv.messages) == 2 and "question" in w.status.value
    w.restart_button.click()
    assert w.chat.conv.messages == [] and w.chat.images == [] and "base64" not in w.history.value


def test_chat_widget_bad_upload_and_samples(random_model):
    from minigpt4_min import shapesworld as sw
    from minigpt4_min.widgets import ChatWidget
    scenes = sw.split("test", 3)
    w = ChatWidget(Chat(random_model), samples=lambda i: sw.render(scenes[i]))
    w.upload.value = _upload_value("junk.png", b"not a png")
    assert "junk.png" in w.status.value and w.chat.images == [] and w.chat.conv.messages == []
    w.sample_index.value = 2
    w.sample_button.click()
    torch.testing.assert_close(w.chat.images[0], _embedding(random_model, sw.render(scenes[2])))
    assert w.chat.conv.messages == [["Human: ", "<Img><ImageHere></Img>"]]


def test_chat_widget_sliders_set_the_decoding(random_model):
    from minigpt4_min.widgets import ChatWidget
    s = GenerationSettings(max_new_tokens=6)
    w = ChatWidget(Chat(random_model, settings=s))
    assert (w.beams.value, w.temperature.value) == (1, 0.0)       # greedy chat -> temperature 0
    reference = Chat(random_model, settings=GenerationSettings(max_new_tokens=6, num_beams=3))
    for c in (w.chat, reference):
        c.upload_img(_image(6))
    reference.ask("What is this?")
    w.beams.value = 3
    w.text.value = "What is this?"
    w.send_button.click()
    greedy = Chat(random_model, settings=s)
    greedy.upload_img(_image(6))
    greedy.ask("What is this?")
    assert w.chat.conv.messages[-1][1] == reference.answer() != greedy.answer()


def test_chat_speed_benchmark_script_runs_and_reports(tmp_path):
    """The README's benchmark command: both settings measured, same number of new tokens."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "chat_speed.py"
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, str(script), "--tokens", "5", "--repeats", "1", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    text = json.dumps(res)
    assert "use_cache" in text or "cache" in text
    assert res


def test_chat_widget_shows_notices_apart_from_the_history(random_model, tmp_path):
    from minigpt4_min.widgets import ChatWidget
    png = _png_file(tmp_path, "scene.png", 0)
    fits = _prompt_positions(random_model, png, "What is this?")       # the first prompt just fits
    w = ChatWidget(Chat(random_model, settings=GenerationSettings(max_new_tokens=4), max_length=fits + 4))
    assert "no trained projection" in w.notice.value and "projection" not in w.history.value
    w.upload.value = _upload_value("scene.png", Path(png).read_bytes())
    w.text.value = "What is this?"
    w.send_button.click()
    assert "positions are cut" not in w.notice.value                  # the first prompt fits
    w.text.value = "What colour is it?"
    w.send_button.click()
    assert w.notice.value.count("positions are cut, so the model no longer sees") == 1
    assert "no trained projection" in w.notice.value and w.status.value == ""
    assert "positions" not in w.history.value and "note" not in w.history.value
    assert w.chat.conv.messages[-1][0] == "Assistant: "
    w.restart_button.click()                                            # the cut is forgotten, not the projection
    assert "positions" not in w.notice.value and "no trained projection" in w.notice.value
    random_model.save_projection(tmp_path / "proj.safetensors")
    random_model.load_projection(tmp_path / "proj.safetensors")
    assert ChatWidget(Chat(random_model)).notice.value == ""


def test_images_command_writes_test_images_and_their_truth(tmp_path, capsys):
    from PIL import Image

    from minigpt4_min import shapesworld as sw
    from minigpt4_min.__main__ import main
    assert main(["images", "--out", str(tmp_path), "--n", "3"]) == 0
    pngs = sorted(tmp_path.glob("test_*.png"))
    assert [p.name for p in pngs] == ["test_000.png", "test_001.png", "test_002.png"]
    assert Image.open(pngs[1]).tobytes() == sw.test_image(1).tobytes()
    truth = (tmp_path / "truth.txt").read_text().splitlines()
    assert truth[2] == f"test_002.png: {sw.describe(sw.scene_at('test', 2))}"
    assert main(["images", "--out", str(tmp_path), "--n", "0"]) == 2 and "--n" in capsys.readouterr().err

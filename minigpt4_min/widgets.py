"""ipywidgets adapters: thin views over library objects that tests drive headlessly.

Each widget holds no state of its own beyond what it shows: every click calls the library
object it wraps (so, e.g., each review decision is on disk at once), and every child widget
is an attribute, so a test can type into `.text` and `.click()` a button without a browser.

* `ReviewWidget`  the human check of the stage-2 pairs (paper §3.2) over a `review.ReviewSession`.
* `ChatWidget`    the demo chat (paper §4) over a `conversation.Chat`.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
from typing import Callable

import ipywidgets as W
from PIL import Image

from . import data
from .conversation import Chat, Notices, render_messages, start_notices
from .review import ReviewSession


def png_bytes(img: Image.Image, px: int) -> bytes:
    """PNG of `img` scaled up by a whole factor to about `px` (NEAREST: 64-px pixels stay sharp)."""
    k = max(1, px // max(img.size))
    buf = io.BytesIO()
    img.resize((img.width * k, img.height * k), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


class ReviewWidget:
    """Review stage-2 pairs one by one: the image, the stage-1 text, the refined text (editable),
    Accept / Save edit / Reject (with a reason), Previous / Next unreviewed.

    Accept with a changed text records an "edit". After each decision the widget moves to the
    next unreviewed item and says when all are done. Opening it on a file that already holds
    decisions starts at the first unreviewed item.
    """

    def __init__(self, session: ReviewSession, load_image: Callable[[str], Image.Image],
                 display_px: int = 256):
        if not session.items:
            raise ValueError(f"nothing to review: the session on {session.path} has no items")
        self.session, self.load_image, self.display_px = session, load_image, display_px
        self.index = 0
        self.image = W.Image(format="png")
        self.title = W.HTML()
        self.raw = W.Textarea(description="stage 1", disabled=True, rows=5, layout=W.Layout(width="100%"))
        self.text = W.Textarea(description="refined", rows=5, layout=W.Layout(width="100%"))
        self.reason = W.Text(description="reason", placeholder="why reject (optional)",
                             layout=W.Layout(width="100%"))
        self.accept_button = W.Button(description="Accept", button_style="success")
        self.edit_button = W.Button(description="Save edit", button_style="info")
        self.reject_button = W.Button(description="Reject", button_style="danger")
        self.prev_button = W.Button(description="Previous")
        self.next_button = W.Button(description="Next unreviewed")
        self.progress = W.Label()
        self.status = W.Label()     # the current item's decision
        self.message = W.Label()    # "all done" or the last error
        self.accept_button.on_click(lambda _: self._decide("accept"))
        self.edit_button.on_click(lambda _: self._decide("edit"))
        self.reject_button.on_click(lambda _: self._decide("reject"))
        self.prev_button.on_click(lambda _: self.show(max(self.index - 1, 0)))
        self.next_button.on_click(lambda _: self._next())
        controls = W.VBox([self.title, self.raw, self.text, self.reason,
                           W.HBox([self.accept_button, self.edit_button, self.reject_button]),
                           W.HBox([self.prev_button, self.next_button, self.progress]),
                           self.status, self.message], layout=W.Layout(width="640px"))
        self.ui = W.VBox([W.HBox([self.image, controls])])
        start = session.next_unreviewed(0)
        self.show(0 if start is None else start)
        self._say_if_done()

    # --- view
    def _png(self, image_id: str) -> bytes:
        return png_bytes(self.load_image(image_id), self.display_px)

    def show(self, index: int) -> None:
        """Show item `index` with its decision, if any."""
        items = self.session.items
        self.index = index % len(items)
        item = items[self.index]
        self.message.value = ""
        try:
            self.image.value = self._png(item.image_id)
        except Exception as e:          # a bad image must not stop the review: show why
            self.image.value = b""
            self.message.value = f"cannot show image {item.image_id!r}: {e}"
        self.title.value = f"<b>{self.index + 1} / {len(items)}</b> &nbsp; image <code>{item.image_id}</code>"
        self.raw.value = item.raw
        d = self.session.decision(item.image_id)
        self.text.value = d["caption"] if d and d["decision"] == "edit" else item.refined
        self.reason.value = d["reason"] if d and d["decision"] == "reject" else ""
        self.status.value = (f"decision: {d['decision']} (by {d['reviewer']})"
                             + (f" - {d['reason']}" if d["reason"] else "") if d else "not reviewed yet")
        done, total = self.session.progress()
        self.progress.value = f"{done} of {total} reviewed"

    def _say_if_done(self) -> bool:
        done, total = self.session.progress()
        if done == total:
            self.message.value = f"All {total} items reviewed ({len(self.session.kept())} kept)."
        return done == total

    # --- actions
    def _decide(self, decision: str) -> None:
        item = self.session.items[self.index]
        text = self.text.value.strip()
        if decision == "accept" and text != item.refined.strip():
            decision = "edit"                   # accepting a changed text keeps the change
        try:
            self.session.decide(item.image_id, decision,
                                caption=text if decision == "edit" else None,
                                reason=self.reason.value if decision == "reject" else "")
        except ValueError as e:
            self.message.value = f"not saved: {e}"
            return
        self._next()

    def _next(self) -> None:
        nxt = self.session.next_unreviewed(self.index + 1)
        self.show(self.index if nxt is None else nxt)
        self._say_if_done()

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)


class ChatWidget:
    """The paper's demo (§4, Figs. 2-4) as a notebook widget over a `conversation.Chat`:
    upload an image (or draw a ShapesWorld sample), ask, read the streamed answer; beams
    and temperature sliders (temperature 0 = greedy), Restart clears the conversation.

    Each new image joins the current conversation (several images per chat are allowed);
    Restart starts over. `samples(index) -> PIL.Image` supplies the sample images.
    `notice` shows, apart from the history, that the projection is random (if it is) and
    the warnings of the last answer (e.g. that the history was cut); `status` the last action.
    """

    def __init__(self, chat: Chat, samples: Callable[[int], Image.Image] | None = None,
                 thumb_px: int = 128):
        self.chat, self.samples, self.thumb_px = chat, samples, thumb_px
        self._thumbs: list[str] = []             # data: URIs of the uploaded images, in order
        self._notices: list[str] = []            # the last answer's warnings
        s = chat.settings
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="Upload image")
        self.sample_index = W.IntText(value=0, description="sample", layout=W.Layout(width="160px"))
        self.sample_button = W.Button(description="ShapesWorld sample", disabled=samples is None)
        self.restart_button = W.Button(description="Restart", button_style="warning")
        self.history = W.HTML()
        self.text = W.Text(placeholder="Ask about the image", layout=W.Layout(width="480px"))
        self.send_button = W.Button(description="Send", button_style="primary")
        self.beams = W.IntSlider(value=s.num_beams, min=1, max=10, description="beams")
        self.temperature = W.FloatSlider(value=s.temperature if s.do_sample else 0.0, min=0.0,
                                         max=2.0, step=0.1, description="temperature")
        self.status = W.Label()
        self.notice = W.HTML()
        self.upload.observe(self._on_upload, names="value")
        self.sample_button.on_click(lambda _: self._add_image(
            lambda: self.samples(self.sample_index.value), f"sample {self.sample_index.value}"))
        self.send_button.on_click(lambda _: self.send())
        self.restart_button.on_click(lambda _: self.restart())
        self.ui = W.VBox([W.HBox([self.upload, self.sample_index, self.sample_button, self.restart_button]),
                          self.notice, self.history, W.HBox([self.text, self.send_button]),
                          W.HBox([self.beams, self.temperature]), self.status])
        self._render()
        self._show_notices()

    # --- view
    def _thumb(self, k: int) -> str:
        src = self._thumbs[k] if k < len(self._thumbs) else ""
        return f'<br><img src="{src}" width="{self.thumb_px}"><br>'

    def _render(self, pending: str | None = None) -> None:
        """The conversation as HTML; images inline, `pending` = the answer being streamed."""
        rows = [f"<p><b>{who}:</b> {html.escape(pending or '') if body is None else body}</p>"
                for who, body in render_messages(self.chat.conv, self._thumb, html.escape)]
        self.history.value = "".join(rows) or "<p><i>Upload an image or draw a sample, then ask.</i></p>"

    def _show_notices(self, new: list[str] | None = None) -> None:
        """Add `new` to the last answer's notices and show them, after the projection's."""
        self._notices += new or []
        notes = start_notices(self.chat.model) + self._notices
        self.notice.value = "".join(f"<p><b>note:</b> {html.escape(n)}</p>" for n in notes)

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.ui)

    # --- actions
    def _add_image(self, get: Callable[[], Image.Image], label: str) -> None:
        try:
            img = get()
            self.chat.upload_img(img)
        except Exception as e:                  # a bad image must not break the chat: say why
            self.status.value = f"cannot use {label}: {e}"
            return
        png = png_bytes(img.convert("RGB"), self.thumb_px)
        self._thumbs.append("data:image/png;base64," + base64.b64encode(png).decode())
        self.status.value = f"{label} received"
        self._render()

    def _on_upload(self, change) -> None:
        if not change["new"]:
            return
        f = change["new"][0]                    # ipywidgets 8: ({"name", "content", ...},)
        self._add_image(lambda: data.load_image(bytes(f["content"]), name=f["name"]), f["name"])

    def send(self) -> None:
        """Ask `.text` and stream the answer into the history."""
        question = self.text.value.strip()
        if not question:
            self.status.value = "type a question first"
            return
        T = self.temperature.value
        settings = dataclasses.replace(self.chat.settings, num_beams=self.beams.value, do_sample=T > 0,
                                       temperature=T if T > 0 else self.chat.settings.temperature)
        self.chat.ask(question)
        self.text.value = ""
        self._notices, answer = [], ""
        with Notices() as notes:                # warnings go to `notice`, never into the history
            try:
                pieces = self.chat.stream_answer(settings)      # builds the prompt: a cut is noted here
                self._show_notices(notes.take())
                for piece in pieces:
                    answer += piece
                    self._render(pending=answer)
            except Exception as e:              # a failed answer must not break the chat: say why
                self.status.value = f"no answer: {e}"
            else:
                self.status.value = ""
            self._show_notices(notes.take())
        self._render()

    def restart(self) -> None:
        self.chat.reset()
        self._thumbs, self._notices = [], []
        self.status.value = ""
        self._render()
        self._show_notices()

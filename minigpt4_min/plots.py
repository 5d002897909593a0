"""Figures for the notebooks: the MiniGPT-4 pipeline (paper §3, Fig. 1), parameter counts,
image grids. Matplotlib only; every function returns its `Figure` (no `plt.show()`).

    fig = architecture_figure(get_config("vicuna13b"), counts=parameter_table(["vicuna13b"])[0])
"""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch

from .config import ModelConfig

FROZEN = dict(face="#dce6f2", edge="#4a6c96")        # grey-blue: frozen, eval mode
TRAINABLE = dict(face="#ffb74d", edge="#d9600d")     # orange: the one trained layer
NEUTRAL = dict(face="#ffffff", edge="#888888")       # data / no parameters
SNOW = "\u2744"                                      # snowflake (DejaVu Sans has it)
PART_COLOURS = {"vit": "#6f8fb8", "qformer": "#9db4d3", "llm": "#3d5a80", "llama_proj": "#f28c28"}
PART_LABELS = {"vit": "ViT", "qformer": "Q-Former + queries", "llm": "LLM", "llama_proj": "llama_proj"}


def new_figure(**kw) -> Figure:
    """A Figure made through pyplot (so Jupyter can render it) but closed at once: it shows
    where the caller displays it (last expression / `display(fig)`), never twice."""
    fig = plt.figure(**kw)
    plt.close(fig)
    return fig


def _shape(*dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _human(n: int) -> str:
    from .sizes import human
    return human(n)


def pipeline_shapes(cfg: ModelConfig) -> list[str]:
    """Tensor shapes along the pipeline: image, ViT tokens, image features, LLM inputs."""
    s, p, wv = cfg.image_size, cfg.vision["patch_size"], cfg.vision_width
    tokens = 1 + (s // p) ** 2                                     # CLS + patches
    n, d_llm = cfg.num_image_tokens, cfg.llm["hidden_size"]
    return [_shape("B", 3, s, s), _shape("B", tokens, wv), _shape("B", n, cfg.proj_in),
            _shape("B", n, d_llm)]


def _box(ax, x, w, title, lines, style, dashed=False, h=2.0):
    ax.add_patch(FancyBboxPatch((x, -h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                                fc=style["face"], ec=style["edge"], lw=2.2 if style is TRAINABLE else 1.5,
                                ls="--" if dashed else "-"))
    ax.text(x + w / 2, h / 2 - 0.42, title, ha="center", va="center", fontsize=11.5, weight="bold")
    ax.text(x + w / 2, -0.2 if h >= 2 else -0.15, "\n".join(lines), ha="center", va="center",
            fontsize=8.5, linespacing=1.35)


def _arrow(ax, x0, x1, label=None, note=None, y=0.0):
    ax.annotate("", xy=(x1, y), xytext=(x0, y),
                arrowprops=dict(arrowstyle="-|>", lw=1.6, color="#333333", mutation_scale=16))
    if label:
        ax.text((x0 + x1) / 2, y + 0.15, label, ha="center", va="bottom", fontsize=9,
                family="monospace", color="#222222")
    if note:
        ax.text((x0 + x1) / 2, y - 0.15, note, ha="center", va="top", fontsize=8,
                color="#666666", linespacing=1.2)


def architecture_figure(cfg: ModelConfig, counts: dict | None = None) -> Figure:
    """The MiniGPT-4 pipeline of `cfg` as boxes and arrows, tensor shapes on the arrows.

    `counts` (a row of `sizes.parameter_table`, or any dict with `vit`, `qformer`, `llm`,
    `llama_proj`) adds parameter counts to the boxes. The Llama-2 variant (`cfg.qformer`
    is None) shows the grouping of 4 adjacent patch tokens in place of the Q-Former.
    """
    counts = counts or {}
    sh = pipeline_shapes(cfg)
    v, d_llm = cfg.vision, cfg.llm["hidden_size"]

    def n(part):
        return [f"{_human(counts[part])} params"] if part in counts else []

    big = cfg.name != "tiny"
    vit_title = "EVA ViT-g/14" if big else "ViT (tiny)"
    llm_title = {"vicuna7b": "Vicuna-7B", "vicuna13b": "Vicuna-13B",
                 "llama2-7b": "Llama-2-7B-chat"}.get(cfg.name, "LLaMA (tiny)")
    q = cfg.llm

    s, p = cfg.image_size, cfg.vision["patch_size"]
    n_patch, n_img = (s // p) ** 2, cfg.num_image_tokens

    fig = new_figure(figsize=(16, 4.2))
    ax = fig.add_axes((0.005, 0.0, 0.99, 0.88))
    ax.set_xlim(-0.1, 21.2)
    ax.set_ylim(-2.0, 2.55)
    ax.axis("off")

    gap, w = 2.15, 2.5
    xs = [0.0]                                   # left edge of each box
    for width in (1.4, w, w, w):
        xs.append(xs[-1] + width + gap)
    _box(ax, xs[0], 1.4, "image", [f"{s} x {s}", "RGB"], NEUTRAL, h=1.4)
    _box(ax, xs[1], w, vit_title,
         [f"{v['num_hidden_layers']} blocks, width {v['hidden_size']}",
          f"patch {p}, + ln_vision", *n("vit"), f"{SNOW} frozen"], FROZEN)
    if cfg.qformer is not None:
        qf = cfg.qformer
        _box(ax, xs[2], w, "Q-Former",
             [f"{cfg.num_query_tokens} learned queries",
              f"{qf['num_hidden_layers']} layers, width {qf['hidden_size']}",
              *n("qformer"), f"{SNOW} frozen"], FROZEN)
        note2 = f"{n_img} query outputs"
    else:
        _box(ax, xs[2], w, f"group {cfg.proj_group} tokens",
             ["drop CLS, concatenate", f"{cfg.proj_group} adjacent patches:",
              f"{cfg.vision_width} x {cfg.proj_group} = {cfg.proj_in}", "no parameters"],
             NEUTRAL, dashed=True)
        note2 = f"{n_patch} patches / {cfg.proj_group}"
    _box(ax, xs[3], w, "llama_proj",
         [f"Linear({cfg.proj_in}, {d_llm})", f"{cfg.proj_in * d_llm + d_llm:,} params",
          "TRAINABLE"], TRAINABLE)
    _box(ax, xs[4], w, llm_title,
         [f"{q['num_hidden_layers']} layers, width {d_llm}", *n("llm"), f"{SNOW} frozen"], FROZEN)

    notes = ["pixels", f"CLS + {n_patch} patches", note2, f"{n_img} image tokens\n(LLM width)"]
    rights = [xs[0] + 1.4, xs[1] + w, xs[2] + w, xs[3] + w]
    for x0, x1, label, note in zip(rights, xs[1:], sh, notes):
        _arrow(ax, x0, x1, label, note)
    x_llm = xs[4]
    _arrow(ax, x_llm + w, x_llm + w + 0.8)
    ax.text(x_llm + w + 0.88, 0, "text", ha="left", va="center", fontsize=11, style="italic")

    # the prompt text enters the LLM through the LLM's own embedding table
    tmpl = cfg.prompt_template.format("<Img><ImageHere></Img> Describe this image ...").strip()
    top = 2.15
    ax.text(x_llm + w + 0.4, top, f"prompt:  {tmpl}", ha="right", va="center",
            fontsize=8.5, family="monospace",
            bbox=dict(boxstyle="round,pad=0.3", fc="#f5f5f5", ec="#bbbbbb"))
    ax.annotate("", xy=(x_llm + w / 2, 1.02), xytext=(x_llm + w / 2, top - 0.2),
                arrowprops=dict(arrowstyle="-|>", lw=1.3, color="#555555", mutation_scale=14))
    ax.text(x_llm + w / 2 - 0.1, 1.5, f"{n_img} image tokens replace <ImageHere>",
            ha="right", va="center", fontsize=8, color="#555555")

    ax.legend(handles=[Patch(fc=FROZEN["face"], ec=FROZEN["edge"],
                             label=f"frozen {SNOW} (eval mode, no gradients)"),
                       Patch(fc=TRAINABLE["face"], ec=TRAINABLE["edge"],
                             label="trainable (the only part that learns)")],
              loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False, fontsize=9.5)
    frac = ""
    if counts.get("trainable_fraction") is not None:
        frac = f" = {100 * counts['trainable_fraction']:.2g}% of {_human(counts['total'])} parameters"
    fig.suptitle(f"MiniGPT-4 [{cfg.name}]: only llama_proj trains{frac}", fontsize=13, y=0.97)
    return fig


def parameter_bar_chart(table: list[dict]) -> Figure:
    """Per-part parameter counts of each variant (log scale), trainable fraction annotated."""
    parts = ("vit", "qformer", "llm", "llama_proj")
    fig = new_figure(figsize=(10, 1.55 * len(table) + 0.9))
    axes = fig.subplots(len(table), 1, sharex=True, squeeze=False)[:, 0]
    lo = min(r["llama_proj"] for r in table) / 3
    hi = max(r["llm"] for r in table) * 12
    for ax, r in zip(axes, table):
        ys = range(len(parts))[::-1]
        for y, part in zip(ys, parts):
            val = r[part]
            if val:
                ax.barh(y, val, color=PART_COLOURS[part], height=0.72,
                        edgecolor="#222222" if part == "llama_proj" else "none")
                ax.text(val * 1.15, y, f"{_human(val)}", va="center", fontsize=8.5)
            else:
                ax.text(lo * 1.2, y, "(no Q-Former)", va="center", fontsize=8.5, color="#777777")
        ax.set_yticks(list(ys), [PART_LABELS[p] for p in parts], fontsize=9)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_title(f"{r['name']}: total {_human(r['total'])},  trainable {r['trainable']:,} "
                     f"= {100 * r['trainable_fraction']:.3g}%", loc="left", fontsize=10.5)
        ax.grid(axis="x", which="major", alpha=0.3)
    axes[-1].set_xlabel("parameters (log scale)")
    fig.suptitle("Where the parameters are: frozen parts (blue) vs the trainable projection (orange)",
                 fontsize=11.5)
    fig.tight_layout()
    return fig


def image_grid(images, titles=None, ncols: int = 4, wrap: int | None = None, cell: float = 2.6,
               fontsize: float = 8.0) -> Figure:
    """Show PIL images / arrays in a grid, each with a title wrapped to the cell's width.

    `cell` is the size of one image in inches; `wrap` (characters per title line) defaults
    to what fits in it. Newlines in a title are kept. Each row is as tall as its longest title.
    """
    images = list(images)
    titles = list(titles) if titles is not None else [""] * len(images)
    wrap = wrap or max(10, int(cell * 72 / (fontsize * 0.62)))
    wrapped = ["\n".join(textwrap.fill(part, wrap) for part in t.split("\n")) if t else ""
               for t in titles]
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    line_h = fontsize * 1.45 / 72                                  # inches per title line
    pad = 0.12                                                     # inches between cells
    title_h = [max([w.count("\n") + 1 if w else 0 for w in wrapped[r * ncols:(r + 1) * ncols]])
               * line_h + pad for r in range(nrows)]
    width = ncols * cell + (ncols + 1) * pad
    height = sum(title_h) + nrows * cell + pad
    fig = new_figure(figsize=(width, height))
    top = height
    for r in range(nrows):
        top -= title_h[r] + cell                                   # bottom edge of this row's images
        for c in range(ncols):
            i = r * ncols + c
            if i >= len(images):
                break
            ax = fig.add_axes(((pad + c * (cell + pad)) / width, top / height,
                               cell / width, cell / height))
            ax.imshow(images[i], interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(wrapped[i], fontsize=fontsize, pad=3)
    return fig


# ----------------------------------------------------------------- notebook 01: ViT patches, Q-Former attention
def patch_grid_figure(image, patch_size: int, cell: float = 5.0) -> Figure:
    """The image cut into the ViT's patches: grid lines, each patch numbered by its token index.

    Token 0 is CLS (it has no place in the image), so patch i (row-major) is token i + 1 —
    the same indices as the last axis of the Q-Former's cross-attention maps.
    """
    import numpy as np

    arr = np.asarray(image)
    h, w = arr.shape[:2]
    rows, cols = h // patch_size, w // patch_size
    n = rows * cols
    fig = new_figure(figsize=(cell, cell + 0.5))
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.86))
    ax.imshow(arr, interpolation="nearest", extent=(0, w, h, 0))
    for k in range(rows + 1):
        ax.axhline(k * patch_size, color="white", lw=0.9, alpha=0.85)
    for k in range(cols + 1):
        ax.axvline(k * patch_size, color="white", lw=0.9, alpha=0.85)
    fs = max(3.5, min(9.0, 48.0 * cell / 5.0 / max(rows, cols)))
    for r in range(rows):
        for c in range(cols):
            ax.text(c * patch_size + 1.2, r * patch_size + 1.0, str(1 + r * cols + c),
                    ha="left", va="top", fontsize=fs, color="white", alpha=0.8,
                    bbox=dict(boxstyle="square,pad=0.1", fc="black", ec="none", alpha=0.25))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    fig.suptitle(f"{w}x{h} px, patch {patch_size}: {rows}x{cols} = {n} patches + 1 CLS = "
                 f"{n + 1} tokens\n(numbers: token index; token 0 is CLS, which has no place)",
                 fontsize=10.5, y=0.985)
    return fig


def query_attention_figure(image, attn, patch_size: int, queries: list[int] | None = None,
                           labels: list[str] | None = None, ncols: int = 4,
                           cell: float = 2.7) -> Figure:
    """Where each query looks: its cross-attention over the image patches, on the image.

    `attn` is one cross-attention map of one image, (heads, Q, 1 + P) as returned by
    `VisualEncoder.forward(..., output_attentions=True)[1][layer][b]`. For each query in
    `queries` (default: all) the heads are averaged, CLS (token 0) is dropped, the P patch
    weights are laid out on the patch grid, upsampled to the image and drawn over it.
    Only attention ABOVE uniform (1/P per patch) is drawn, brightest at the panel's own
    peak but never stretched below 2x uniform: a query that looks everywhere shows (almost)
    nothing, one that looks at a few patches shows them. The corner gives the largest
    single-patch weight and the share that went to CLS.
    """
    import numpy as np
    import torch

    arr = np.asarray(image)
    h, w = arr.shape[:2]
    rows, cols = h // patch_size, w // patch_size
    a = attn.detach().float().mean(0)                                  # (Q, 1+P)
    if a.shape[-1] != 1 + rows * cols:
        raise ValueError(f"attention has {a.shape[-1]} keys but a {w}x{h} image with patch "
                         f"{patch_size} has {rows * cols} patches + CLS")
    queries = list(range(a.shape[0])) if queries is None else list(queries)
    labels = [f"query {q}" for q in queries] if labels is None else list(labels)
    if len(labels) != len(queries):
        raise ValueError(f"{len(labels)} labels for {len(queries)} queries")
    grid = a[:, 1:].reshape(-1, 1, rows, cols)                         # (Q, 1, rows, cols)
    up = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear",
                                         align_corners=False)[:, 0]    # (Q, H, W)
    panels = 1 + len(queries)
    ncols = max(1, min(ncols, panels))
    nrows = -(-panels // ncols)
    nlines = max(t.count("\n") + 1 for t in labels + ["image"])
    fig = new_figure(figsize=(cell * ncols, (cell + 0.2 * nlines + 0.2) * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    grey = arr.astype(float).mean(-1, keepdims=True) / 255.0           # dimmed grey backdrop,
    backdrop = 0.35 * arr / 255.0 + 0.4 * grey                             # so the heat stands out
    heat = plt.get_cmap("inferno")
    axes.ravel()[0].imshow(arr, interpolation="nearest")
    axes.ravel()[0].set_title("image", fontsize=9)
    for ax, q, lab in zip(axes.ravel()[1:], queries, labels):
        ax.imshow(backdrop, interpolation="nearest", extent=(0, w, h, 0))
        m = up[q].numpy()
        uniform = 1.0 / (rows * cols)
        m = (m - uniform).clip(min=0) / max(float(m.max()) - uniform, uniform)  # excess over uniform
        rgba = heat(0.25 + 0.75 * m)
        rgba[..., 3] = 0.85 * m                                            # weak weight = see-through
        ax.imshow(rgba, extent=(0, w, h, 0))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(lab, fontsize=9)
        ax.text(0.02, 0.02, f"peak patch {100 * float(a[q, 1:].max()):.1f}%  CLS {100 * float(a[q, 0]):.1f}%",
                transform=ax.transAxes, fontsize=7, color="white", va="bottom",
                bbox=dict(boxstyle="round,pad=0.2", fc="black", ec="none", alpha=0.5))
    fig.suptitle(f"Q-Former cross-attention per query (mean over heads, CLS dropped): heat = "
                 f"attention above uniform ({100 / (rows * cols):.1f}% per patch)", fontsize=10.5)
    fig.tight_layout(pad=0.5)
    return fig


def loss_figure(history: list[dict], title: str = "training loss", smooth: int = 10):
    """Loss per logged step (light) and its running mean (bold), with the learning rate."""
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    k = max(1, min(smooth, len(loss)))
    mean = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    fig = new_figure(figsize=(7, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1, label="loss")
    ax.plot(steps, mean, color="tab:blue", lw=2, label=f"running mean ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on the answer")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if history and "lr" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [h["lr"] for h in history], color="tab:orange", lw=1, label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax2.tick_params(axis="y", colors="tab:orange")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def funnel_figure(stages: list[tuple[str, int]], title: str = "stage-2 data funnel") -> Figure:
    """Horizontal bars, one per pipeline step (e.g. generated -> continued -> refined -> kept)."""
    fig = new_figure(figsize=(7, 0.6 * len(stages) + 1.2))
    ax = fig.add_subplot()
    names, counts = [s for s, _ in stages], [n for _, n in stages]
    top = max(max(counts), 1)
    bars = ax.barh(range(len(stages)), counts, color=[PART_COLOURS["qformer"]] * (len(stages) - 1)
                   + [TRAINABLE["face"]], edgecolor="#555555")
    for b, n in zip(bars, counts):
        ax.text(b.get_width() + top * 0.01, b.get_y() + b.get_height() / 2, f"{n:,} ({n / counts[0]:.0%})",
                va="center", fontsize=9)
    ax.set_yticks(range(len(stages)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("image-text pairs")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def grouped_bars(groups: list[str], series: dict[str, list[float]], ylabel: str, title: str = "",
                 ylim: tuple[float, float] | None = (0, 1), errors: dict[str, list[float]] | None = None) -> Figure:
    """Bars of several series (e.g. stage 1 / stage 2 / no image) per group (e.g. poem / story / ad);
    `errors` {series: [std per group]} draws each bar's spread (mean ± std over seeds)."""
    fig = new_figure(figsize=(1.6 + 1.5 * len(groups), 3.4))
    ax = fig.add_subplot()
    w = 0.8 / max(len(series), 1)
    for k, (name, vals) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * w for i in range(len(groups))]
        err = (errors or {}).get(name)
        bars = ax.bar(xs, vals, w, label=name, yerr=err, capsize=3 if err else 0)
        ax.bar_label(bars, ["" if v != v else f"{v:.2f}" for v in vals], fontsize=7, padding=2,   # NaN: no bar
                     rotation=90 if len(series) > 2 else 0)      # side by side, upright labels overlap
    ax.set_xticks(range(len(groups)), groups)
    if ylim:
        lo, hi = ylim                           # room above `hi` for the labels of the tallest bars
        ax.set_ylim(lo, hi + (0.2 if len(series) > 2 else 0.1) * (hi - lo))
        ax.set_yticks([t for t in ax.get_yticks() if lo <= t <= hi])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def curves(xs: list[float], series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
           title: str = "", ylim: tuple[float, float] | None = (0, 1)) -> Figure:
    """One line per series through (x, mean), with a band of ± std (seeds) around it."""
    fig = new_figure(figsize=(5.6, 3.4))
    ax = fig.add_subplot()
    for name, (mean, std) in series.items():
        ax.plot(xs, mean, marker="o", label=name)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig

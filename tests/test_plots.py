"""Figures a learner reads: the value labels of grouped bars stay legible."""
import itertools

from matplotlib.backends.backend_agg import FigureCanvasAgg

from minigpt4_min import plots


def _label_boxes(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    ax = fig.axes[0]
    return [t.get_window_extent(r) for t in ax.texts if t.get_text()], ax.title.get_window_extent(r), ax


def test_grouped_bar_labels_overlap_neither_each_other_nor_the_title():
    """Four series side by side, all at the top of the axis (as in notebook 01's kinds, where
    several are 1.00): no two value labels overlap, none reaches the title, the ticks stop at 1."""
    fig = plots.grouped_bars(["colour", "count"], {f"s{k}": [0.97, 1.0] for k in range(4)}, "accuracy",
                             title="the LLM, scenes in words")
    boxes, title, ax = _label_boxes(fig)
    assert len(boxes) == 8
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert all(b.y1 < title.y0 for b in boxes)
    assert max(ax.get_yticks()) == 1.0 and ax.get_ylim()[1] > 1.0


def test_grouped_bars_leave_nan_unlabelled():
    fig = plots.grouped_bars(["a", "b"], {"x": [1.0, 0.5], "y": [0.7, float("nan")]}, "acc")
    boxes, _, ax = _label_boxes(fig)
    assert sorted(t.get_text() for t in ax.texts if t.get_text()) == ["0.50", "0.70", "1.00"]

"""Seeds, spreads and verdicts for the ablations of notebook 06 (`ablations.py`).

A setting (an `ablations.Cell` without its seed) is run for several seeds; its numbers are
the mean and the sample standard deviation over them. A claim compares two settings, and its
verdict is resolved only when the difference of the means is larger than the two seed spreads
together (std + std): "holds", "does not hold", otherwise "not resolved by the spread".
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from .ablations import Cell

def by_setting(results: list[dict], metric: str) -> dict[Cell, list[float]]:
    """{setting (seed 0): [the metric of each seed]}, in the order the results come."""
    out: dict[Cell, list[float]] = {}
    for r in results:
        out.setdefault(Cell(**r["cell"]).setting(), []).append(r[metric])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(better: list[float], worse: list[float]) -> str:
    """Does `better` (a claim's favoured setting, one value per seed) beat `worse`?

    "holds" when its mean is higher by more than the two seed spreads together (std + std),
    "does not hold" when it is lower by more than that, otherwise "not resolved by the spread"
    (also with a single seed: no spread is known)."""
    if len(better) < 2 or len(worse) < 2:
        return "not resolved (one seed: no spread)"
    (ma, sa), (mb, sb) = mean_std(better), mean_std(worse)
    if ma - mb > sa + sb:
        return "holds"
    if mb - ma > sa + sb:
        return "does not hold"
    return "not resolved by the spread"


@dataclass(frozen=True)
class Claim:
    text: str
    better: Cell
    worse: Cell
    metric: str = "stage2/vqa_accuracy"


CLAIMS = (
    Claim("one linear layer beats three (paper, AOK-VQA: 58.2 vs 49.7)", Cell("linear"), Cell("mlp3")),
    Claim("one linear layer beats two (not in the paper)", Cell("linear"), Cell("mlp2")),
    Claim("one linear layer beats finetuning the Q-Former (paper: 58.2 vs 52.1)", Cell("linear"),
          Cell("finetune_qformer")),
    Claim("the Q-Former helps (paper: 58.2 vs 56.9 on AOK-VQA, but 32.2 vs 33.4 on GQA)", Cell("linear"),
          Cell("no_qformer")),
    Claim("all the stage-1 pairs beat 10 % of them, at the same steps", Cell(), Cell(data_fraction=0.1)),
    Claim("captions that name positions teach positions (position VQA, all vs none)", Cell(position_share=1.0),
          Cell(position_share=0.0), "stage2/vqa_position"),
    Claim("more position captions than shipped raise object recall after stage 2 (all vs shipped)",
          Cell(position_share=1.0), Cell(), "stage2/detailed/object_recall"),
)


def verdicts(results: list[dict], claims=CLAIMS) -> list[dict]:
    """Each claim with both settings' mean ± std and its verdict (claims whose cells did not run are left out)."""
    rows = []
    for c in claims:
        vals = by_setting(results, c.metric)
        if c.better not in vals or c.worse not in vals:
            continue
        (ma, sa), (mb, sb) = mean_std(vals[c.better]), mean_std(vals[c.worse])
        rows.append({"claim": c.text, "metric": c.metric, "better": (ma, sa), "worse": (mb, sb),
                     "difference": ma - mb, "spread": sa + sb, "verdict": verdict(vals[c.better], vals[c.worse])})
    return rows


def summary(results: list[dict], settings: list[Cell], metrics: list[str]) -> dict[Cell, dict[str, tuple[float, float]]]:
    """{setting: {metric: (mean, std over seeds)}} for the given settings, in their order."""
    per = {m: by_setting(results, m) for m in metrics}
    return {c: {m: mean_std(per[m][c]) for m in metrics} for c in settings if c in per[metrics[0]]}


def pm(mean_and_std: tuple[float, float]) -> str:
    """A table cell: mean ± std."""
    m, s = mean_and_std
    return f"{m:.3f} ± {s:.3f}"

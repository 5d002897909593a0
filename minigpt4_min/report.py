"""The series' report: quality targets and metrics beside a committed reference run.

Notebooks record each quality target with `target(name, measured, goal, op)`: a target is
recorded, not raised (a missed one shows **no** with its number; the run goes on).
`report` writes `metrics.md`: first one table of every target of the series, then each
notebook's metrics beside the reference run committed with the project, flagged where they
drift beyond `TOLERANCE`. `write_reference` makes a run the new reference. Both a run and
the reference record the `machine` they ran on, since the CPU moves times (and float
rounding) from day to day.
"""
from __future__ import annotations

import datetime
import json
import operator
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .config import REPO_ROOT

REFERENCE_DIR = REPO_ROOT / "benchmarks" / "results"


OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
MET = "_target_met"


def target(name: str, measured: float | None, goal: float, op: str = ">=") -> dict:
    """One quality target as metrics: `{name}_target_met` (bool: `measured op goal`),
    `{name}_target_measured`, `{name}_target_goal` and `{name}_target_op`. Not measured
    (None) counts as not met. Merge the dicts of a notebook's targets into its metrics."""
    if op not in OPS:
        raise ValueError(f"target {name!r}: op {op!r} is not one of {list(OPS)}")
    met = measured is not None and bool(OPS[op](measured, goal))
    return {f"{name}{MET}": met, f"{name}_target_measured": measured,
            f"{name}_target_goal": goal, f"{name}_target_op": op}


@dataclass
class Target:
    """A target as read back from a notebook's metrics (measured / goal None: not recorded)."""
    name: str
    met: bool
    measured: float | None = None
    goal: float | None = None
    op: str | None = None

    @property
    def goal_text(self) -> str:
        return "–" if self.goal is None else f"{self.op or ''} {cell(self.goal)}".strip()

    def row(self) -> list[str]:
        return [self.name, cell(self.measured), self.goal_text, "yes" if self.met else "**no**"]


def targets_of(metrics: dict) -> list[Target]:
    """The targets recorded in one notebook's metrics, in the order they were recorded."""
    names = [k[:-len(MET)] for k in metrics if k.endswith(MET)]
    return [Target(n, bool(metrics[n + MET]), metrics.get(f"{n}_target_measured"),
                   metrics.get(f"{n}_target_goal"), metrics.get(f"{n}_target_op")) for n in names]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def targets_table(metrics: dict, extra: dict[str, dict] | None = None) -> str:
    """A notebook's targets as a markdown table (target, measured, goal, met); each entry of
    `extra` adds a column {title: {target name: value}}."""
    extra = extra or {}
    rows = [t.row() + [cell(col.get(t.name)) for col in extra.values()] for t in targets_of(metrics)]
    return markdown_table(["target", "measured", "goal", "met", *extra], rows)


# =============================================================== reference and drift
TOLERANCE = {"seconds": (5.0, 0.50), "default": (0.02, 0.05)}   # (absolute, relative), see ABOUT
ABOUT = ("Quality targets are recorded, not raised: a target that is missed shows **no** here "
         "(and in its notebook's last cell) and the series still completes; only a failed check "
         "(an assert or an error in a notebook) stops it. Drift: a number is flagged when "
         "|this run - reference| > max({0}, {1:.0%} of |reference|) (times, `*seconds*`: "
         "max({2:g} s, {3:.0%})); a flag or a text when it differs. A drift is a change to explain "
         "(code, parameters, library versions, machine), not by itself an error."
         ).format(*TOLERANCE["default"], *TOLERANCE["seconds"])


def reference_path(ci: bool = False) -> Path:
    """The committed reference run: default parameters, or the CI parameters with `ci`."""
    return REFERENCE_DIR / ("series_reference_ci.json" if ci else "series_reference.json")


def load_reference(path: str | Path) -> dict[str, dict]:
    """{notebook: {metric: value}} of a reference file; {} when it is absent or empty."""
    path = Path(path)
    text = path.read_text().strip() if path.is_file() else ""
    notebooks = json.loads(text).get("notebooks", {}) if text else {}
    if not isinstance(notebooks, dict):
        raise ValueError(f"{path}: 'notebooks' must map notebook names to metrics")
    return notebooks


def machine() -> dict[str, object]:
    """What this process runs on: the CPU's name, the vector unit torch uses (AVX2, AVX512:
    different kernels round floats differently), cores, the GPU if any, library versions."""
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if ln.startswith("model name")]
    return {"cpu": names[0] if names else (platform.processor() or platform.machine()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def describe_machine(m: dict | None) -> str:
    if not m:
        return "not recorded"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']} ({m['cpu_capability']}, {m['cores']} cores){gpu}, "
            f"torch {m['torch']}, transformers {m['transformers']}")


def load_machine(path: str | Path) -> dict | None:
    """The `machine` of a run folder's machine.json or of a reference file; None if absent."""
    path = Path(path)
    path = path / "machine.json" if path.is_dir() else path
    doc = json.loads(path.read_text() or "{}") if path.is_file() else {}
    return doc.get("machine")


def write_reference(run_dir: str | Path, path: str | Path, note: str = "") -> Path:
    """(Re)write the reference file `path` from `run_dir/metrics.json` (a finished series)
    and the machine it ran on (`run_dir/machine.json`)."""
    src = Path(run_dir) / "metrics.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no metrics.json (run the series into {run_dir} first)")
    doc = {"about": "metrics of the reference run of the notebook series; "
                    "the series' report (metrics.md) compares each run with it",
           "written": datetime.date.today().isoformat(), "note": note,
           "machine": load_machine(run_dir), "notebooks": json.loads(src.read_text())}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def tolerance(key: str, ref: float) -> float:
    """How far a number may move from its reference before it is flagged (see ABOUT)."""
    absolute, relative = TOLERANCE["seconds" if "seconds" in key else "default"]
    return max(absolute, relative * abs(ref))


def drift(key: str, value, ref) -> str:
    """'' when `value` agrees with the reference `ref` (or there is none), else a flag."""
    if ref is None:
        return ""
    if value is None:
        return "**missing**"
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, ref))
    if not numbers:
        return "" if type(value) is type(ref) and value == ref else "**differs**"
    delta = value - ref
    return f"**{delta:+.4g}** (tol {tolerance(key, ref):.3g})" if abs(delta) > tolerance(key, ref) else ""


def cell(v) -> str:
    """A report cell: "–" for a missing value, numbers rounded to 4 decimals."""
    if v is None:
        return "–"
    return str(round(v, 4)) if isinstance(v, float) else str(v)


def _scalar(v) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def report(table: dict[str, dict], reference: dict[str, dict], reference_name: str,
           machines: tuple[dict | None, dict | None] = (None, None)) -> str:
    """metrics.md: what to read how, the series' targets, then each notebook's metrics
    (sorted) beside the reference, with the drifts flagged; `machines`: (this run's, the
    reference's), named under the summary."""
    rows, n_drift, n_compared = [], 0, 0
    for nb in sorted(set(table) | set(reference)):
        mine, ref = table.get(nb, {}), reference.get(nb, {})
        lines = []
        for k in sorted(set(mine) | set(ref)):
            if not (_scalar(mine.get(k)) and _scalar(ref.get(k))):
                continue
            flag = drift(k, mine.get(k), ref.get(k)) if ref else ""
            n_compared += k in ref
            n_drift += bool(flag)
            lines.append([k, cell(mine.get(k)), cell(ref.get(k)), flag])
        rows.append(f"### {nb}\n\n" + markdown_table(["metric", "this run", "reference", "drift"], lines))
    targets = [[nb, *t.row()] for nb in sorted(table) for t in targets_of(table[nb])]
    missed = sum(r[-1] != "yes" for r in targets)
    if reference:
        summary = f"{n_drift} of {n_compared} metrics drift beyond tolerance from {reference_name}."
    else:
        summary = (f"No reference recorded yet ({reference_name}): write one from a run with "
                   "`python -m minigpt4_min.series reference RUN_DIR`.")
    return "\n\n".join([
        "# Metrics of the notebook series", ABOUT,
        f"## Targets: {len(targets) - missed} of {len(targets)} met",
        markdown_table(["notebook", "target", "measured", "goal", "met"], targets),
        "## Metrics per notebook", summary,
        f"This run: {describe_machine(machines[0])}. Reference: {describe_machine(machines[1])}.", *rows]) + "\n"


# =============================================================== running

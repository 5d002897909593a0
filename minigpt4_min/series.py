"""Running the notebook series end-to-end with papermill, and reporting its metrics.

Every notebook has exactly one cell tagged `parameters` (with at least `run_dir`), and its
last cell calls `save_metrics(run_dir, "NN_slug", {...})`. This module executes the
notebooks in order into `OUT/notebooks/`, all sharing `OUT` as `run_dir` (shards, cached
features and checkpoints pass from one notebook to the next), showing each notebook's cells
as they run, then writes `OUT/metrics.json` and the report `OUT/metrics.md`: the series'
quality targets first, then every metric beside the reference run committed with the
project (`benchmarks/results/series_reference.json`), flagged where it drifts.

    python -m minigpt4_min series --out runs/series          # full quality (defaults)
    python -m minigpt4_min series --out runs/ci --ci         # small parameters (CI)
    python -m minigpt4_min series --gpu                      # the GPU profile (gpu_profile.py)
    python -m minigpt4_min.series reference runs/series      # make that run the reference
"""
from __future__ import annotations

import ast
import functools
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

from .config import REPO_ROOT
from .report import load_machine, load_reference, machine, reference_path, report, write_reference

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
CI_PARAMS_DIR = NOTEBOOK_DIR / "ci_params"


def save_metrics(run_dir: str | Path, name: str, metrics: dict) -> Path:
    """Write a notebook's metrics to `run_dir/metrics/name.json` (atomically); returns the path."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"metrics {bad} of {name} are not finite")
    path = Path(run_dir) / "metrics" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def fmt(v) -> str:
    """A table cell: "–" for a missing value, 1 decimal above 1.5 (word counts), else 3."""
    if v is None:
        return "–"
    return f"{v:.1f}" if abs(v) > 1.5 else f"{v:.3f}"


# =============================================================== quality targets
# A target is recorded, never asserted: a missed one is reported with its measured number
# and goal, and the series goes on. Notebooks record one as metrics with `target(...)`;
# older ones record only `{name}_target_met`, which the tables show with measured "–".
def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def declared_parameters(nb_path: str | Path) -> dict[str, object]:
    """Names (and literal defaults) assigned in the notebook's single `parameters` cell."""
    nb = json.loads(Path(nb_path).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{nb_path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    src = "".join(cells[0]["source"])
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    try:
                        out[t.id] = ast.literal_eval(node.value)
                    except ValueError:
                        out[t.id] = None
    return out


def ci_parameters(nb_path: str | Path) -> dict:
    f = CI_PARAMS_DIR / f"{Path(nb_path).stem}.json"
    return json.loads(f.read_text()) if f.exists() else {}


def check_parameters(nb_path: str | Path, params: dict) -> None:
    """papermill only warns about unknown parameters; we refuse them."""
    unknown = sorted(set(params) - set(declared_parameters(nb_path)))
    if unknown:
        raise ValueError(f"{Path(nb_path).name}: parameters {unknown} are not declared in its "
                         "'parameters' cell")


class CellProgress:
    """One notebook's progress in the terminal: cells done of all, the running cell's first
    line and the elapsed time. A thread redraws it every `every` seconds, so a cell that
    runs for minutes (notebook 02's training) still shows the clock moving."""

    def __init__(self, every: float = 5.0, file=None):
        from tqdm import tqdm              # the terminal bar, not tqdm.auto's widget

        self.bar = tqdm(file=file or sys.stderr, mininterval=0, dynamic_ncols=True,
                        bar_format="  {n_fmt}/{total_fmt} cells |{bar:16}| {elapsed}{postfix}")
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(every,), daemon=True)
        self._ticker.start()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self.bar.refresh()

    def begin(self, n_cells: int) -> None:
        """The executed notebook is known (with papermill's injected-parameters cell)."""
        self.bar.total = n_cells
        self.bar.refresh()

    def cell_start(self, cell: dict, index: int) -> None:
        first = next((ln.strip() for ln in cell.get("source", "").splitlines() if ln.strip()), "")
        self.bar.set_postfix_str(f"cell {index + 1}: {first[:48]}")

    def cell_complete(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self.bar.close()


@functools.cache
def _engine() -> str:
    """Register (once) papermill's nbclient engine with a hook that reports each cell to a
    `CellProgress` passed as the engine argument `progress`; returns the engine's name."""
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, progress=None, **kwargs):
            if progress is not None:
                progress.begin(len(nb_man.nb.cells))
                start, complete = nb_man.cell_start, nb_man.cell_complete

                def cell_start(cell, cell_index=None, **kw):
                    progress.cell_start(cell, cell_index)
                    return start(cell, cell_index, **kw)

                def cell_complete(cell, cell_index=None, **kw):
                    progress.cell_complete()
                    return complete(cell, cell_index, **kw)

                nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("minigpt4_min", ProgressEngine)
    return "minigpt4_min"


def _kernel_config():
    """CurveZMQ keys for the kernel's sockets, which the venv's ipykernel supports: the
    kernel then does not warn, once per notebook, that it runs over TCP without encryption."""
    from traitlets.config import Config

    return Config({"KernelManager": {"transport_encryption": "auto"}})


def run_notebook(nb_path: str | Path, out_dir: str | Path, params: dict, kernel: str = "python3",
                 progress: bool = False) -> float:
    """Execute one notebook with `params` into `out_dir/notebooks/`; returns its seconds.
    With `progress`, its cells are shown in the terminal as they run (`CellProgress`)."""
    import papermill as pm

    check_parameters(nb_path, params)
    out = Path(out_dir) / "notebooks" / Path(nb_path).name
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = CellProgress() if progress else None
    t0 = time.time()
    try:
        pm.execute_notebook(str(nb_path), str(out), parameters=params, kernel_name=kernel,
                            cwd=str(Path(nb_path).parent), progress_bar=False, engine_name=_engine(),
                            progress=bar, config=_kernel_config())
    finally:
        if bar:
            bar.close()
    return time.time() - t0


def gather(out_dir: str | Path, seconds: dict[str, float] | None = None,
           reference: str | Path | None = None) -> dict:
    """Collect `out_dir/metrics/*.json` (+ the notebooks' `seconds`) into `metrics.json`,
    record this machine in `machine.json`, and write the report `metrics.md` against the
    reference file (default: the committed one for the default parameters); returns
    {notebook: metrics}."""
    out_dir = Path(out_dir)
    table = {p.stem: json.loads(p.read_text()) for p in sorted((out_dir / "metrics").glob("*.json"))}
    for name, s in (seconds or {}).items():
        table.setdefault(name, {})["notebook_seconds"] = round(s, 1)
    (out_dir / "metrics.json").write_text(json.dumps(table, indent=2, sort_keys=True))
    ref_path = Path(reference) if reference is not None else reference_path()
    ref = {nb: m for nb, m in load_reference(ref_path).items() if nb in table}
    name = os.path.relpath(ref_path, REPO_ROOT) if ref_path.is_relative_to(REPO_ROOT) else str(ref_path)
    here = machine()                              # of the latest run into out_dir (--only: its notebooks)
    (out_dir / "machine.json").write_text(json.dumps({"machine": here}, indent=2))
    (out_dir / "metrics.md").write_text(report(table, ref, name, (here, load_machine(ref_path))))
    return table


def keep_seconds(out_dir: Path, name: str, seconds: float) -> None:
    """Write a notebook's wall-clock time into its own metrics file, so that a later run of
    other notebooks into the same folder (`--only`) still reports it."""
    path = Path(out_dir) / "metrics" / f"{name}.json"
    if path.exists():
        save_metrics(out_dir, name, {**json.loads(path.read_text()), "notebook_seconds": round(seconds, 1)})


# What each notebook reads from the run folder, by the notebooks that write it.
NEEDS = {"03": ("02",), "04": ("02", "03"), "05": ("02", "04"), "06": ("03",)}


def check_order(out_dir: Path, chosen: list[Path]) -> None:
    """Refuse, before running anything, a notebook whose inputs no earlier run wrote."""
    running = {nb.stem[:2] for nb in chosen}
    done = {p.stem[:2] for p in (out_dir / "metrics").glob("*.json")}
    for nb in chosen:
        missing = [k for k in NEEDS.get(nb.stem[:2], ()) if k not in running | done]
        if missing:
            raise RuntimeError(f"{nb.name} needs what notebook(s) {', '.join(missing)} write into the run "
                               f"folder, and {out_dir} has no run of them: add them to --only, or run "
                               f"the series into this folder first")


def chosen_notebooks(only: list[str] | None = None) -> list[Path]:
    """The notebooks whose names start with a prefix in `only` (all without it), in order."""
    return [nb for nb in notebooks() if not only or any(nb.stem.startswith(o) for o in only)]


def run_series(out_dir: str | Path, ci: bool = False, only: list[str] | None = None,
               kernel: str = "python3", profile=None, reference: str | Path | None = None) -> dict:
    """Run the notebooks (those starting with a prefix in `only`, or all) in order into
    `out_dir`, showing their progress; gather and print the report; returns {notebook: metrics}.
    `profile(nb)` gives a notebook's parameters instead of the CI ones (gpu_profile.py), and
    `reference` the reference file of the report (default: the committed one for `ci`)."""
    out_dir = Path(out_dir).resolve()
    chosen = chosen_notebooks(only)
    check_order(out_dir, chosen)
    seconds = {}
    for k, nb in enumerate(chosen, 1):
        params = {"run_dir": str(out_dir), **(profile(nb) if profile else ci_parameters(nb) if ci else {})}
        print(f"notebook {k} of {len(chosen)}: {nb.stem}", flush=True)
        seconds[nb.stem] = run_notebook(nb, out_dir, params, kernel, progress=True)
        keep_seconds(out_dir, nb.stem, seconds[nb.stem])
        print(f"  done in {seconds[nb.stem]:.0f} s (series so far {sum(seconds.values()):.0f} s)", flush=True)
    table = gather(out_dir, seconds, reference or reference_path(ci))
    head = (out_dir / "metrics.md").read_text().split("\n### ", 1)[0]
    print(head.rstrip() + f"\n\nall metrics, beside the reference: {out_dir / 'metrics.md'}")
    print(f"total {sum(seconds.values()):.0f} s; executed notebooks in {out_dir / 'notebooks'}")
    return table


def main(argv: list[str] | None = None) -> int:
    """`python -m minigpt4_min.series reference RUN_DIR [--ci]`: make a run the reference."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m minigpt4_min.series", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference", help="(re)write the committed reference from a run's metrics.json")
    r.add_argument("run_dir", help="the --out folder of a finished series")
    r.add_argument("--ci", action="store_true", help="the run used the CI parameters")
    r.add_argument("--note", default="", help="what the run was (machine, commit)")
    a = ap.parse_args(argv)
    try:
        print("wrote", write_reference(a.run_dir, reference_path(a.ci), a.note))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

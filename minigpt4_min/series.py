"""Running the notebook series end-to-end with papermill, and gathering its metrics.

Every notebook has exactly one cell tagged `parameters` (with at least `run_dir`), and its
last cell calls `save_metrics(run_dir, "NN_slug", {...})`. This module executes the
notebooks in order into `OUT/notebooks/`, all sharing `OUT` as `run_dir` (shards, cached
features and checkpoints pass from one notebook to the next), then writes
`OUT/metrics.json` and a table `OUT/metrics.md`.

    python -m minigpt4_min series --out runs/series          # full quality (defaults)
    python -m minigpt4_min series --out runs/ci --ci         # small parameters (CI)
"""
from __future__ import annotations

import ast
import json
import math
import os
import time
from pathlib import Path

from .config import REPO_ROOT

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


def run_notebook(nb_path: str | Path, out_dir: str | Path, params: dict, kernel: str = "python3") -> float:
    import papermill as pm
    check_parameters(nb_path, params)
    out = Path(out_dir) / "notebooks" / Path(nb_path).name
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pm.execute_notebook(str(nb_path), str(out), parameters=params, kernel_name=kernel,
                        cwd=str(Path(nb_path).parent), progress_bar=False)
    return time.time() - t0


def gather(out_dir: str | Path, seconds: dict[str, float] | None = None) -> dict:
    out_dir = Path(out_dir)
    table = {p.stem: json.loads(p.read_text()) for p in sorted((out_dir / "metrics").glob("*.json"))}
    for name, s in (seconds or {}).items():
        table.setdefault(name, {})["notebook_seconds"] = round(s, 1)
    (out_dir / "metrics.json").write_text(json.dumps(table, indent=2, sort_keys=True))
    lines = ["| notebook | metric | value |", "|---|---|---|"]
    for name, m in table.items():
        for k, v in m.items():
            if isinstance(v, (int, float, str, bool)):
                lines.append(f"| {name} | {k} | {round(v, 4) if isinstance(v, float) else v} |")
    (out_dir / "metrics.md").write_text("\n".join(lines) + "\n")
    return table


def run_series(out_dir: str | Path, ci: bool = False, only: list[str] | None = None,
               kernel: str = "python3") -> dict:
    out_dir = Path(out_dir).resolve()
    seconds = {}
    for nb in notebooks():
        if only and not any(nb.stem.startswith(o) for o in only):
            continue
        params = {"run_dir": str(out_dir), **(ci_parameters(nb) if ci else {})}
        print(f"running {nb.name} ...", flush=True)
        seconds[nb.stem] = run_notebook(nb, out_dir, params, kernel)
        print(f"  done in {seconds[nb.stem]:.0f} s", flush=True)
    table = gather(out_dir, seconds)
    print((out_dir / "metrics.md").read_text())
    print(f"total {sum(seconds.values()):.0f} s; executed notebooks in {out_dir / 'notebooks'}")
    return table

"""The series runner's parts that need no notebook of the project: targets, the report
(metrics.md) against a reference, the reference file, and the terminal progress."""
import io
import json
import time

import pytest

from minigpt4_min import report, series


# ---------------------------------------------------------------- targets
def test_target_records_measured_goal_and_met():
    assert report.target("recall", 0.9, 0.85) == {
        "recall_target_met": True, "recall_target_measured": 0.9,
        "recall_target_goal": 0.85, "recall_target_op": ">="}
    assert report.target("failure", 0.06, 0.05, "<=")["failure_target_met"] is False
    assert report.target("cut_off", 0, 0, "==")["cut_off_target_met"] is True
    assert report.target("not_measured", None, 0.9)["not_measured_target_met"] is False
    with pytest.raises(ValueError, match="=>"):
        report.target("x", 1.0, 1.0, "=>")


def test_targets_table_reads_new_and_plain_targets():
    metrics = {**report.target("recall", 0.9, 0.85), "other": 3.0, "old_style_target_met": False,
               **report.target("failure", 0.25, 0.05, "<=")}
    assert report.targets_table(metrics, {"reference": {"failure": 0.01}}).splitlines() == [
        "| target | measured | goal | met | reference |", "|---|---|---|---|---|",
        "| recall | 0.9 | >= 0.85 | yes | – |",
        "| old_style | – | – | **no** | – |",
        "| failure | 0.25 | <= 0.05 | **no** | 0.01 |"]


# ---------------------------------------------------------------- drift
@pytest.mark.parametrize("key, value, ref, flagged", [
    ("rate", 0.50, 0.52, False),           # |0.02| is within max(0.02, 5% of 0.52)
    ("rate", 0.50, 0.53, True),
    ("rate", 0.01, 0.0, False),            # the absolute floor of 0.02 near zero
    ("count", 104, 100, False),            # 5% of 100
    ("count", 106, 100, True),
    ("train_seconds", 140.0, 100.0, False),  # times: max(5 s, 50%)
    ("train_seconds", 160.0, 100.0, True),
    ("flag", True, True, False), ("flag", False, True, True), ("flag", 1, True, True),
    ("refiner", "rules", "openai", True),
    ("new_metric", 0.3, None, False),      # nothing to compare with
])
def test_drift_rule(key, value, ref, flagged):
    assert bool(report.drift(key, value, ref)) is flagged


def test_drift_of_a_metric_the_run_lost():
    assert report.drift("gone", None, 0.5) == "**missing**"


# ---------------------------------------------------------------- gather / report
def _synthetic_run(tmp_path):
    """A run folder as two notebooks leave it: one records targets with `target`, one
    (as notebooks 01 / 05 still do) only `*_target_met`."""
    run = tmp_path / "run"
    series.save_metrics(run, "02_stage1", {
        "caption_attribute_accuracy": 0.81, "loss_last": 1.2, "train_seconds": 100.0, "steps": 1200,
        "frozen_unchanged": True, "history": [1, 2, 3],
        **report.target("caption_attribute_accuracy", 0.81, 0.85),
        **report.target("detail_failure", 0.02, 0.05, "<=")})
    series.save_metrics(run, "01_frozen", {"llm_redescribe_exact": 0.93, "llm_redescribe_exact_target_met": True})
    return run


def test_gather_writes_targets_first_then_metrics_beside_the_reference(tmp_path):
    run = _synthetic_run(tmp_path)
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"notebooks": {
        "02_stage1": {"caption_attribute_accuracy": 0.86, "loss_last": 1.21, "train_seconds": 90.0,
                      "steps": 1200, "frozen_unchanged": True, "removed_metric": 0.5},
        "03_not_run": {"x": 1.0}}}))
    table = series.gather(run, {"01_frozen": 12.34}, reference=ref)
    assert table["01_frozen"]["notebook_seconds"] == 12.3
    assert json.loads((run / "metrics.json").read_text()) == table
    md = (run / "metrics.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "# Metrics of the notebook series"
    assert "recorded, not raised" in md and "max(0.02, 5% of |reference|)" in md
    # the targets table comes first, for the whole series, notebooks in order
    targets = md.index("## Targets: 2 of 3 met")
    assert targets < md.index("## Metrics per notebook")
    rows = [ln for ln in lines if ln.startswith(("| 01_", "| 02_"))]
    assert rows == ["| 01_frozen | llm_redescribe_exact | – | – | yes |",
                    "| 02_stage1 | caption_attribute_accuracy | 0.81 | >= 0.85 | **no** |",
                    "| 02_stage1 | detail_failure | 0.02 | <= 0.05 | yes |"]
    # then each notebook's metrics, sorted, beside the reference; drifts flagged
    assert md.index("### 01_frozen") < md.index("### 02_stage1")
    assert "03_not_run" not in md                          # only notebooks this run executed
    sec = md[md.index("### 02_stage1"):].splitlines()
    keys = [ln.split(" | ")[0].removeprefix("| ") for ln in sec[4:] if ln.startswith("| ")]
    assert keys == sorted(keys) and "history" not in keys  # stable order, scalars only
    row = {ln.split(" | ")[0].removeprefix("| "): ln for ln in sec if ln.startswith("| ")}
    assert row["caption_attribute_accuracy"] == "| caption_attribute_accuracy | 0.81 | 0.86 | **-0.05** (tol 0.043) |"
    assert row["loss_last"].endswith("| 1.2 | 1.21 |  |")
    assert row["train_seconds"].endswith("|  |")           # +10 s is within the time tolerance
    assert row["removed_metric"] == "| removed_metric | – | 0.5 | **missing** |"
    assert "2 of 6 metrics drift beyond tolerance from" in md


def test_a_partial_run_keeps_the_other_notebooks_times(tmp_path, monkeypatch):
    """`--only 01` after a whole series: the report still has notebook 00's wall time."""
    run = tmp_path / "run"
    for name in ("00_overview", "01_frozen_encoder"):
        series.save_metrics(run, name, {"x": 1.0, "notebook_seconds": 0.5})    # as a notebook writes it
    times = iter([3.0, 7.0])
    monkeypatch.setattr(series, "run_notebook", lambda *a, **kw: next(times))
    series.run_series(run, only=["00"], reference=tmp_path / "absent.json")
    table = series.run_series(run, only=["01"], reference=tmp_path / "absent.json")
    assert (table["00_overview"]["notebook_seconds"], table["01_frozen_encoder"]["notebook_seconds"]) == (3.0, 7.0)
    assert table["00_overview"]["x"] == 1.0


def test_gather_without_reference_says_how_to_record_one(tmp_path):
    run = _synthetic_run(tmp_path)
    series.gather(run, reference=tmp_path / "absent.json")
    md = (run / "metrics.md").read_text()
    assert "No reference recorded yet" in md and "python -m minigpt4_min.series reference" in md
    assert "**" not in md.split("## Metrics per notebook")[1].replace("**no**", "")  # nothing flagged


def test_reference_round_trip_and_tolerated_absence(tmp_path):
    assert report.load_reference(tmp_path / "absent.json") == {}
    (tmp_path / "empty.json").write_text("")
    assert report.load_reference(tmp_path / "empty.json") == {}
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        report.write_reference(tmp_path / "no_run", tmp_path / "ref.json")
    run = _synthetic_run(tmp_path)
    table = series.gather(run, reference=tmp_path / "absent.json")
    path = report.write_reference(run, tmp_path / "ref.json", note="a test run")
    assert report.load_reference(path) == table
    assert json.loads(path.read_text())["note"] == "a test run"
    series.gather(run, reference=path)                     # the same run: no drift at all
    assert "0 of " in (run / "metrics.md").read_text()


def test_run_and_reference_record_their_machine_and_the_report_names_both(tmp_path, monkeypatch):
    run = _synthetic_run(tmp_path)
    series.gather(run, reference=tmp_path / "absent.json")
    here = report.load_machine(run)
    assert here == report.machine() and here["cores"] >= 1 and here["cpu"]
    assert here["cpu_capability"] in {"DEFAULT", "NO AVX", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE", "SVE128", "SVE256", "SVE512"}
    path = report.write_reference(run, tmp_path / "ref.json")
    assert report.load_machine(path) == here
    # a reference from another machine: the report names both, so a drift can be explained
    doc = json.loads(path.read_text())
    doc["machine"] = {**here, "cpu": "Other CPU 9000", "cpu_capability": "AVX512"}
    path.write_text(json.dumps(doc))
    series.gather(run, reference=path)
    md = (run / "metrics.md").read_text()
    assert f"This run: {here['cpu']} ({here['cpu_capability']}" in md
    assert "Reference: Other CPU 9000 (AVX512" in md
    series.gather(run, reference=tmp_path / "absent.json")   # an older reference has no machine
    assert "Reference: not recorded." in (run / "metrics.md").read_text()
    assert report.describe_machine({**here, "gpu": "NVIDIA H200"}).startswith(f"{here['cpu']} (") \
        and ", GPU NVIDIA H200, torch " in report.describe_machine({**here, "gpu": "NVIDIA H200"})


def test_reference_cli_writes_the_committed_file(tmp_path, monkeypatch, capsys):
    run = _synthetic_run(tmp_path)
    series.gather(run, reference=tmp_path / "absent.json")
    monkeypatch.setattr(report, "REFERENCE_DIR", tmp_path / "results")
    assert series.main(["reference", str(run), "--ci"]) == 0
    assert (tmp_path / "results" / "series_reference_ci.json").is_file()
    assert "series_reference_ci.json" in capsys.readouterr().out
    assert series.main(["reference", str(tmp_path / "never_run")]) == 2
    assert "never_run/metrics.json" in capsys.readouterr().err


# ---------------------------------------------------------------- progress
def test_cell_progress_redraws_while_a_cell_runs():
    out = io.StringIO()
    bar = series.CellProgress(every=0.05, file=out)
    bar.begin(3)
    bar.cell_start({"source": "\n  train(model)  # a long cell\n"}, 0)
    drawn = out.getvalue().count("cells")
    time.sleep(0.5)                                        # nothing completes meanwhile
    bar.close()
    text = out.getvalue()
    assert text.count("cells") >= drawn + 4, text          # the ticker redrew it
    assert "0/3 cells" in text and "cell 1: train(model)  # a long cell" in text


@pytest.mark.notebook
def test_run_notebook_shows_cells_and_no_kernel_warning(tmp_path, capfd):
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                            "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell("run_dir = 'x'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(run_dir)")]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    series.run_notebook(path, tmp_path / "out", {"run_dir": "y"}, progress=True)
    err = capfd.readouterr().err
    assert "3/3 cells" in err and "cell 3: print(run_dir)" in err   # + papermill's parameters cell
    assert "without encryption" not in err
    done = nbformat.read(tmp_path / "out" / "notebooks" / "tiny.ipynb", as_version=4)
    assert done.cells[-1].outputs[0]["text"] == "y\n"


def test_only_refuses_a_notebook_whose_inputs_are_missing(tmp_path, capsys):
    from minigpt4_min.__main__ import main
    assert main(["series", "--out", str(tmp_path), "--only", "05"]) == 2
    err = capsys.readouterr().err
    assert "05_chat.ipynb needs" in err and "02, 04" in err
    (tmp_path / "metrics").mkdir()
    for nb in ("02_stage1_pretraining", "04_stage2_finetuning"):
        (tmp_path / "metrics" / f"{nb}.json").write_text("{}")
    series.check_order(tmp_path, [p for p in series.notebooks() if p.stem.startswith("05")])   # now fine

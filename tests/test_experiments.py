"""Smoke runs of the experiment scripts (DESIGN convention 10): each runs a few steps on tiny."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_trains_and_decodes(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "demo.py"), "--steps", "30",
         "--log_every", "10", "--sample_tokens", "8", "--corpus_bytes", "200000",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    first, last = result["history"][0]["loss"], result["history"][-1]["loss"]
    assert last < first - 1.0, result["history"]  # it learns
    assert result["decode_max_abs_diff"] < 1e-4  # absorbed decode == training forward
    assert "greedy sample:" in proc.stdout


def test_demo_flags_have_help():
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "demo.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--preset", "--steps", "--seed", "--lr", "--json"):
        assert flag in proc.stdout

"""One measurement in a fresh interpreter (its own device memory peak, compile caches and
failures), its result read back as the last JSON line it prints. Used by compile_time.py and
bench_scaling.py."""

import json
import os
import subprocess
import sys


def json_from_child(args: list[str], env: dict | None = None,
                    timeout: float | None = None) -> dict:
    """Run `python ARGS`; its last stdout line starting with "{" as a dict, or {"error": why}
    (the exit status and the last error line of its stderr, or the timeout)."""
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=dict(os.environ) if env is None else env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = proc.stderr.strip().splitlines() or ["(no output)"]
    named = [line for line in err if "Error" in line.split(":")[0]]
    return {"error": f"exit {proc.returncode}: {(named or err)[-1][:300]}"}

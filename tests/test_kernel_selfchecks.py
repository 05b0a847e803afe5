"""`python -m pallas_kernels.<kernel>`: each kernel file's self-check runs and passes (on the CPU
in Pallas' GPU interpret mode, on a Hopper GPU natively), and the harness it shares
(`pallas_kernels._mosaic`) reports failures."""

import io
import pathlib
import subprocess
import sys

import pytest

from pallas_kernels import _mosaic as mg

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _self_check(module: str) -> str:
    """Runs `python -m pallas_kernels.<module>` as a user would; returns its output, failing
    the test on a non-zero exit status."""
    run = subprocess.run([sys.executable, "-m", f"pallas_kernels.{module}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


# about 15-35 s each in interpret mode on a 2-core CPU: the three longest are `slow`
@pytest.mark.parametrize("module", [
    pytest.param("grouped_matmul", marks=pytest.mark.slow),
    pytest.param("fp8_gemm", marks=pytest.mark.slow),
    "fp8_quant_kernel",
    pytest.param("mla_decode", marks=pytest.mark.slow),
])
def test_mosaic_kernel_self_check_passes(module):
    out = _self_check(module)
    assert f"pallas_kernels.{module} (" in out and out.rstrip().endswith("all passed"), out
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL"))]
    assert len(rows) >= 5 and all(line.rstrip().endswith("PASS") for line in rows), out


def test_triton_self_check_says_where_it_cannot_run():
    """jax-triton has no CPU path: without a GPU (or without triton) the self-check says so and
    exits 0; on a GPU with triton it runs its table like the others."""
    out = _self_check("fp8_triton")
    assert "not run" in out or out.rstrip().endswith("all passed"), out


def test_the_harness_reports_failures_and_exceptions():
    def boom():
        raise ValueError("no such tile")

    out = io.StringIO()
    status = mg.run_checks("demo", [mg.Check("exact", "1x1", lambda: 0.0, 0.0),
                                    mg.Check("too far", "2x2", lambda: 0.5, 1e-2),
                                    mg.Check("raises", "3x3", boom, 1e-2)], out=out)
    text = out.getvalue()
    assert status == 1 and text.rstrip().endswith("2 failed")
    assert "ValueError: no such tile" in text
    assert [line.split()[-1] for line in text.splitlines()[2:5]] == ["PASS", "FAIL", "tile)"]
    assert mg.run_checks("demo", [mg.Check("exact", "1x1", lambda: 0.0, 0.0)], out=out) == 0
    assert mg.rel_error([1.0, float("nan")], [1.0, 2.0]) == float("inf")  # an unwritten tile


def test_assumed_sm_count_nests_and_is_restored():
    """`_mosaic.assume_num_sms` (lowering for CUDA on a CPU: experiments/lowering_stats.py)
    sets the count kernels are built for, inside its block only; interpret mode keeps its own."""
    before = mg.device_num_sms()
    with mg.assume_num_sms(132):
        assert mg.num_sms(False) == mg.device_num_sms() == 132
        with mg.assume_num_sms(16):
            assert mg.num_sms(False) == 16
        assert mg.num_sms(False) == 132
        assert mg.num_sms(True) == mg.INTERPRET_NUM_SMS
    assert mg.device_num_sms() == before

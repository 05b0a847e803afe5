"""The Mosaic GPU quantizers (pallas_kernels/fp8_quant_kernel.py) against fp8_quant's XLA ones.

On the CPU: GPU interpret mode, bit-identical e4m3 values and fp32 scales (small shapes: the
interpreter is slow on 2 cores), the GPU code path lowered for CUDA at real sizes (Mosaic GPU's
layout, transfer and TMA checks run at lowering), and the input checks. On the GPU machine
(DSV3_TEST_GPU=1): the compiled kernels at real sizes, bit-identical too.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_quant as q8
from pallas_kernels import fp8_quant_kernel as qk

BF16 = jnp.bfloat16


def _input(m: int, k: int, seed: int = 0) -> jax.Array:
    """bf16 [M, K] whose 128-wide row tiles and 128-tall column tiles differ in magnitude by up
    to 2^50 (so some tiles' small entries land in e4m3's subnormals), with one all-zero
    128 x 128 block (a zero tile for both quantizers) and exact zeros scattered elsewhere."""
    kx, kz = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    row_exp = (jnp.arange(m) * 7 % 11) * 3.0 - 15.0  # per row: 2^-15 .. 2^15
    col_exp = (jnp.arange(k) // 64 % 5) * 5.0 - 10.0  # per 64 columns: 2^-10 .. 2^10
    x = x * jnp.exp2(row_exp)[:, None] * jnp.exp2(col_exp)[None, :]
    x = x.at[:128, :128].set(0.0)
    x = jnp.where(jax.random.bernoulli(kz, 0.02, (m, k)), 0.0, x)
    return x.astype(BF16)


def _assert_same(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.shape == q_ref.shape and q.dtype == q_ref.dtype == q8.FP8
    assert s.shape == s_ref.shape and s.dtype == s_ref.dtype == jnp.float32
    # bit for bit: the e4m3 bytes and the float32 scales' bits
    chex.assert_trees_all_equal(
        {"q": np.asarray(q).view(np.uint8), "s": np.asarray(s).view(np.uint32)},
        {"q": np.asarray(q_ref).view(np.uint8), "s": np.asarray(s_ref).view(np.uint32)})


# ------------------------------------------------------------------------------------------
# Interpret mode (CPU): bit-identical to the XLA quantizers
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(128, 256), (256, 384)])
def test_rows_interpret_matches_xla(shape, pow2):
    x = _input(*shape)
    got = jax.jit(lambda x: qk.quantize_rows_kernel(x, pow2=pow2, interpret=True))(x)
    _assert_same(got, jax.jit(lambda x: q8.quantize_rows(x, pow2=pow2))(x))
    assert not np.asarray(got[0][:128, :128], np.float32).any()  # the zero tiles
    assert len(np.unique(np.log2(np.asarray(got[1])).round())) > 10  # magnitudes really differ


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(128, 256), (256, 384)])
def test_cols_interpret_matches_xla(shape, pow2):
    x = _input(*shape, seed=1)
    got = jax.jit(lambda x: qk.quantize_cols_kernel(x, pow2=pow2, interpret=True))(x)
    _assert_same(got, jax.jit(lambda x: q8.quantize_cols(x, pow2=pow2))(x))


# Several steps per CTA through fewer stages: the ring's refills, slot reuse, output-stage
# waits and barrier phases (the interpreter checks each barrier phase is waited for).
@pytest.mark.parametrize("cfg", [qk.QuantConfig(k_splits=1, stages=2, out_stages=1),
                                 qk.QuantConfig(block_m=128, block_k=256, k_splits=1, stages=2)])
def test_rows_interpret_pipeline_configs(cfg):
    x = _input(128, 768, seed=2)
    got = jax.jit(lambda x: qk.quantize_rows_kernel(x, interpret=True, config=cfg))(x)
    _assert_same(got, jax.jit(q8.quantize_rows)(x))


@pytest.mark.parametrize("cfg", [qk.QuantConfig(block_m=128, block_k=64, k_splits=1, stages=2,
                                                out_stages=1),
                                 qk.QuantConfig(block_m=128, block_k=128, k_splits=2, stages=2)])
def test_cols_interpret_pipeline_configs(cfg):
    x = _input(128, 512, seed=3)
    got = jax.jit(lambda x: qk.quantize_cols_kernel(x, interpret=True, config=cfg))(x)
    _assert_same(got, jax.jit(q8.quantize_cols)(x))


def test_transposed_scales_are_the_kernel_layout():
    x = _input(128, 256, seed=4)
    q, s_t = qk.quantize_rows_kernel(x, interpret=True, transposed_scales=True)
    q_ref, s_ref = q8.quantize_rows(x)
    assert s_t.shape == (2, 128)
    _assert_same((q, s_t.T), (q_ref, s_ref))
    q, s_t = qk.quantize_cols_kernel(x, interpret=True, transposed_scales=True)
    q_ref, s_ref = q8.quantize_cols(x)
    assert s_t.shape == (1, 256)
    _assert_same((q, s_t.T), (q_ref, s_ref))


# ------------------------------------------------------------------------------------------
# The GPU code path, lowered for CUDA on the CPU
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["rows", "cols"])
@pytest.mark.parametrize("shape, pow2, cfg", [
    ((8192, 7168), False, None), ((16384, 2048), True, None), ((4096, 7168), False, None),
    ((8192, 7168), True, "alt")])
def test_kernels_lower_for_cuda(fn, shape, pow2, cfg):
    if cfg == "alt":
        cfg = (qk.QuantConfig(block_m=128, block_k=256, stages=2) if fn == "rows"
               else qk.QuantConfig(block_m=128, block_k=128, stages=3))
    kernel = qk.quantize_rows_kernel if fn == "rows" else qk.quantize_cols_kernel
    x = jax.ShapeDtypeStruct(shape, BF16)
    lowered = jax.jit(lambda x: kernel(x, pow2=pow2, config=cfg)).trace(x).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("fn", ["rows", "cols"])
def test_every_sweep_config_lowers_for_cuda(fn):
    kernel = qk.quantize_rows_kernel if fn == "rows" else qk.quantize_cols_kernel
    x = jax.ShapeDtypeStruct((8192, 7168), BF16)
    for cfg in qk.SWEEP[fn]:
        lowered = jax.jit(lambda x, cfg=cfg: kernel(x, config=cfg, transposed_scales=True)).trace(
            x).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text(), cfg


# ------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------

def test_identical_quantizer_calls_share_one_lowering():
    """Equal calls (statics and shapes) lower to one Mosaic GPU kernel, as the GEMMs do
    (_mosaic.launch_shared): the `small` FP8 step with these quantizers had 155 call
    sites of 144 distinct kernels before, 61 of 43 after (experiments/lowering_stats.py).
    Two rows calls of one shape, one of another, one cols call: three kernels."""
    def f(x, y):
        return (qk.quantize_rows_kernel(x), qk.quantize_rows_kernel(x * 2),
                qk.quantize_rows_kernel(y), qk.quantize_cols_kernel(x))

    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16)
    text = jax.jit(f).trace(x, y).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3


def test_bad_inputs_name_the_dimension():
    rows, cols = qk.quantize_rows_kernel, qk.quantize_cols_kernel
    with pytest.raises(ValueError, match=r"x must be 2-D \[M, K\]"):
        rows(jnp.zeros((2, 128, 256), BF16))
    with pytest.raises(ValueError, match="float32 is not supported"):
        cols(jnp.zeros((128, 256), jnp.float32))
    with pytest.raises(ValueError, match=r"x M \(shape\[0\]\) = 96 must be a positive multiple "
                                         "of 64"):
        rows(jnp.zeros((96, 256), BF16))
    with pytest.raises(ValueError, match=r"x K \(shape\[1\]\) = 200 must be a positive "
                                         "multiple of 128"):
        rows(jnp.zeros((64, 200), BF16))
    with pytest.raises(ValueError, match=r"x M \(shape\[0\]\) = 192 must be a positive multiple "
                                         "of 128"):
        cols(jnp.zeros((192, 256), BF16))
    with pytest.raises(ValueError, match=r"x K \(shape\[1\]\) = 96 must be a positive "
                                         "multiple of 64"):
        cols(jnp.zeros((128, 96), BF16))
    with pytest.raises(ValueError, match=r"k_splits = 3 must divide the 2 steps"):
        rows(jnp.zeros((64, 256), BF16), config=qk.QuantConfig(k_splits=3))
    with pytest.raises(ValueError, match="block_k = 64 must be a multiple of 128"):
        rows(jnp.zeros((64, 256), BF16), config=qk.QuantConfig(block_k=64))
    with pytest.raises(ValueError, match="bytes of shared memory"):
        rows(jnp.zeros((256, 1024), BF16),
             config=qk.QuantConfig(block_m=256, block_k=512, stages=4))
    with pytest.raises(ValueError, match="block_m=96 must be a positive multiple of 64"):
        qk.QuantConfig(block_m=96)


def test_default_k_splits_fill_the_sms():
    assert qk.default_k_splits(128, 56) == 4  # 8192 x 7168 rows: 128 row blocks -> 512 CTAs
    assert qk.default_k_splits(64, 112) == 7  # 8192 x 7168 cols: 64 row blocks -> 448 CTAs
    assert qk.default_k_splits(1024, 8) == 1
    assert qk.default_k_splits(1, 3) == 3  # tiny inputs: one step per CTA


# ------------------------------------------------------------------------------------------
# On the GPU: the compiled kernels at real sizes
# ------------------------------------------------------------------------------------------

# kernel name -> (the kernel, the XLA quantizer it must equal, the input's seed)
GPU_PAIRS = {"rows": (qk.quantize_rows_kernel, q8.quantize_rows, 5),
             "cols": (qk.quantize_cols_kernel, q8.quantize_cols, 6)}


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(8192, 7168), (16384, 2048), (4096, 7168)])
@pytest.mark.parametrize("fn", ["rows", "cols"])
def test_gpu_kernel_matches_xla(fn, shape, pow2):
    kernel, reference, seed = GPU_PAIRS[fn]
    x = _input(*shape, seed=seed)
    got = jax.jit(lambda x: kernel(x, pow2=pow2))(x)
    _assert_same(got, jax.jit(lambda x: reference(x, pow2=pow2))(x))


@pytest.mark.gpu
@pytest.mark.parametrize("fn", ["rows", "cols"])
def test_gpu_alternative_configs_match_xla(fn):
    x = _input(8192, 7168, seed=7)
    if fn == "rows":
        cfg = qk.QuantConfig(block_m=128, block_k=256, stages=2)
        got, want = qk.quantize_rows_kernel(x, config=cfg), q8.quantize_rows(x)
    else:
        cfg = qk.QuantConfig(block_m=128, block_k=128, stages=3)
        got, want = qk.quantize_cols_kernel(x, config=cfg), q8.quantize_cols(x)
    _assert_same(got, want)


@pytest.mark.slow  # every sweep config of both kernels in interpret mode
def test_tuning_sweep_smoke_in_interpret_mode(tmp_path):
    import json

    recs = qk.sweep(["--interpret", "--shapes", "128x256", "--iterations", "1",
                     "--json", str(tmp_path / "sweep.json")])
    assert len(recs) == len(qk.SWEEP["rows"]) + len(qk.SWEEP["cols"])
    assert all(r.get("matches_xla") and r["gbps"] > 0 for r in recs), recs
    assert json.loads((tmp_path / "sweep.json").read_text())[0]["run"]["interpret"]

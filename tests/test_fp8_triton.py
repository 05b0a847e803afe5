"""The jax-triton block-scaled FP8 GEMM (pallas_kernels/fp8_triton.py).

CPU, always: the module imports without Triton, operands are validated before Triton is
imported, and a missing Triton/jax-triton raises an ImportError that says how to install it.
CPU, where triton is installed (the `test` extras install triton 3.6.0 on Linux x86_64, so
CI runs them; jax-triton is not needed): the kernel compiles for sm_90 into e4m3 wgmma, and
the public functions run end to end with
jax-triton's `triton_call` replaced by a stand-in that launches the kernel in Triton's
interpreter (exact fp32 products of the fp8 values: checks tiling, edge wrap, masks and
scale indexing against the XLA reference). GPU (marker `gpu`, DSV3_TEST_GPU=1 with triton
3.6 + jax-triton 0.3.1): the kernel against the reference where FP8 tensor cores are real.
"""

import os
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_gemm as fg
from pallas_kernels import fp8_quant as q8
from pallas_kernels import fp8_triton as ft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _operands(m, n, k, b_scale="blocks", seed=0):
    """e4m3 operands from the quantizers, with scales spread over K-blocks, rows and columns
    so a scale read from the wrong K-block, row or column moves the product far past the
    tolerance. For 128 x 128 blocks N must be a multiple of 128; 1 x 128 rows take any N."""
    ka, kb = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(ka, (m, k)) * jnp.exp2(jnp.arange(k) // q8.BLOCK * 2.0 - 3)
    x = x * jnp.exp2(jnp.arange(m) % 5 - 2.0)[:, None]
    w = jax.random.normal(kb, (n, k)) * jnp.exp2(jnp.arange(n) // q8.BLOCK - 1.0)[:, None]
    aq, sa = q8.quantize_rows(x)
    bq, sb = q8.quantize_blocks(w) if b_scale == "blocks" else q8.quantize_rows(w)
    return aq, sa, bq, sb


def _reference(aq, sa, bq, sb, b_scale):
    gemm = fg.gemm_1d2d if b_scale == "blocks" else fg.gemm_1d1d
    return gemm(aq, sa, bq, sb, out_dtype=jnp.float32, impl="xla")


def _assert_close(got, want):
    """The interpreter's exact fp32 products of the e4m3 values against the XLA reference's:
    float32 sums in another order (per K block, scaled, then summed)."""
    chex.assert_trees_all_close(np.asarray(got), np.asarray(want), rtol=1e-5,
                                atol=1e-5 * float(jnp.abs(want).max()))


def calc_diff(x, y) -> float:
    """DeepGEMM's 1 - 2<x,y>/(|x|^2+|y|^2), in float64 on the host."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(1 - 2 * (x * y).sum() / ((x * x).sum() + (y * y).sum()))


@pytest.fixture
def no_triton(monkeypatch):
    """`import triton` and `import jax_triton` raise ImportError (a None entry in sys.modules)."""
    for name in ("triton", "triton.language", "jax_triton"):
        monkeypatch.setitem(sys.modules, name, None)


# --------------------------------------------------------------------------------------------
# CPU: import, validation, install hint
# --------------------------------------------------------------------------------------------


def test_module_imports_and_validates_without_triton():
    code = ("import sys; sys.modules.update(triton=None, jax_triton=None)\n"
            "import jax.numpy as jnp\n"
            "from pallas_kernels import fp8_triton as ft\n"
            "a = jnp.zeros((128, 200), ft.q8.FP8)\n"
            "try:\n"
            "    ft.gemm_1d2d_triton(a, jnp.ones((128, 2)), a, jnp.ones((1, 2)))\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ValueError: fp8 gemm: K=200 must be a multiple of 128" in out.stdout


@pytest.mark.parametrize("fn", [ft.gemm_1d2d_triton, ft.gemm_1d1d_triton])
@pytest.mark.parametrize("change, message", [
    (dict(a=jnp.zeros((128, 200), q8.FP8), b=jnp.zeros((128, 200), q8.FP8)),
     "K=200 must be a multiple of 128"),
    (dict(a=jnp.zeros((128, 256), jnp.bfloat16)), "a must be a 2-D float8_e4m3fn"),
    (dict(b=jnp.zeros((128, 384), q8.FP8)), "K must match"),
    (dict(s_a=jnp.ones((128, 2), jnp.bfloat16)), r"s_a must be float32\[128, 2\]"),
    (dict(out_dtype=jnp.int8), "out_dtype=int8 must be one of"),
    (dict(config="fast"), "config='fast' must be None, a TritonConfig or 'autotune'"),
])
def test_bad_operands_raise_before_triton_is_imported(no_triton, fn, change, message):
    b_scale = "blocks" if fn is ft.gemm_1d2d_triton else "rows"
    aq, sa, bq, sb = _operands(128, 128, 256, b_scale)
    args = {"a": aq, "s_a": sa, "b": bq, "s_b": sb, **change}
    kwargs = {k: args.pop(k) for k in ("out_dtype", "config") if k in args}
    with pytest.raises(ValueError, match=message):
        fn(args["a"], args["s_a"], args["b"], args["s_b"], **kwargs)


def test_block_scaled_n_must_be_a_multiple_of_128(no_triton):
    aq, sa, _, _ = _operands(128, 128, 256)
    bq, sb = jnp.zeros((200, 256), q8.FP8), jnp.ones((1, 2))
    with pytest.raises(ValueError, match="N=200 must be a multiple of 128"):
        ft.gemm_1d2d_triton(aq, sa, bq, sb)


@pytest.mark.parametrize("fn", [ft.gemm_1d2d_triton, ft.gemm_1d1d_triton])
def test_missing_triton_says_how_to_install(no_triton, fn):
    aq, sa, bq, sb = _operands(128, 128, 256, "blocks" if fn is ft.gemm_1d2d_triton else "rows")
    with pytest.raises(ImportError, match=r"pip install --no-deps jax-triton==0\.3\.1") as info:
        fn(aq, sa, bq, sb)
    assert "triton 3.6" in str(info.value)


@pytest.mark.parametrize("change, message", [
    (dict(block_m=96), "block_m=96 must be a power of two"),
    (dict(block_n=512), "block_n=512 must be a power of two"),
    (dict(num_warps=2), "num_warps=2 must be 4 or 8"),
    (dict(num_stages=0), "num_stages=0 must be >= 1"),
    (dict(block_m=256, block_n=256, num_stages=4), "bytes of shared memory"),
])
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        ft.TritonConfig(**change)


def test_default_and_autotune_configs_fit():
    assert ft.default_config(4096, 7168) == ft.TritonConfig(block_m=128, block_n=128,
                                                            num_warps=8, num_stages=4)
    assert ft.default_config(64, 7168).block_m == 64
    for cfg in ft.AUTOTUNE_CONFIGS:
        assert cfg.smem_bytes() <= ft.SMEM_BYTES


# --------------------------------------------------------------------------------------------
# CPU with triton installed: compile for sm_90; run through Triton's interpreter
# --------------------------------------------------------------------------------------------


@pytest.fixture
def triton_lang(monkeypatch):
    """triton and triton.language, with the module's `tl` bound (what `_modules()` does);
    skips where triton is not installed (platforms other than Linux x86_64)."""
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install "
                                 "triton==3.6.0 to compile and interpret the kernel on CPU)")
    import triton.language as language
    monkeypatch.setattr(ft, "tl", language)
    return triton


def test_kernel_compiles_for_hopper_into_fp8_wgmma(triton_lang, monkeypatch, tmp_path):
    """Triton's own compiler for sm_90 (no GPU needed): the dot becomes e4m3 x e4m3 wgmma (so
    the b tile reached it K-major) and the a/b tiles are software-pipelined in shared memory."""
    from triton.backends.compiler import GPUTarget
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    cfg = ft.TritonConfig()
    kernel = triton_lang.jit(ft._fp8_gemm_kernel)
    signature = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
                 "y_ptr": "*bf16"}
    consts = dict(M=4096, N=7168, K=2048, SA_STRIDE_M=16, SA_STRIDE_K=1, SB_STRIDE_N=16,
                  SB_STRIDE_K=1, SB_ROWS=128, BLOCK_K=128, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m)
    signature.update({name: "constexpr" for name in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}  # what jax-triton assumes
    compiled = triton_lang.compile(
        triton_lang.compiler.ASTSource(kernel, signature, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx
    assert compiled.metadata.shared >= 2 * (cfg.block_m + cfg.block_n) * q8.BLOCK


class _HostTensor:
    """The little of torch.Tensor's interface Triton's interpreter uses, over a numpy array
    (Triton's dtype given explicitly; fp8 held as uint8, bf16 as uint16)."""

    def __init__(self, arr, dtype):
        self.arr, self.dtype = np.ascontiguousarray(arr), dtype

    def data_ptr(self):
        return self.arr.ctypes.data

    def untyped_storage(self):
        return self

    cpu = untyped_storage

    def storage_offset(self):
        return 0

    def size(self):
        return self.arr.shape

    def stride(self):
        return tuple(s // self.arr.itemsize for s in self.arr.strides)

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args):
        return self

    def copy_(self, other):
        return self


def _host(x, language):
    x = np.asarray(x)
    views = {np.dtype(q8.FP8): (np.uint8, language.float8e4nv),
             np.dtype(jnp.bfloat16): (np.uint16, language.bfloat16),
             np.dtype(np.float16): (np.float16, language.float16),
             np.dtype(np.float32): (np.float32, language.float32)}
    view, dtype = views[x.dtype]
    return _HostTensor(x.view(view), dtype)


@pytest.fixture
def interpreted(triton_lang, monkeypatch):
    """The module with jax-triton replaced by a stand-in for `triton_call` (0.3.1's calling
    convention: array inputs, then the outputs appended; keyword metaparams are the kernel's
    constexprs and the arguments of a callable grid) that runs the kernel in Triton's
    interpreter. Records each call's keyword arguments."""
    import triton.language as language
    calls = []

    def launch(kernel, grid, args, out_shape, metaparams):
        y = _host(np.zeros(out_shape.shape, out_shape.dtype), language)
        grid = grid(metaparams) if callable(grid) else grid
        kernel[grid](*[_host(x, language) for x in args], y, **metaparams)
        return jnp.asarray(y.arr.view(out_shape.dtype))

    def triton_call(*args, kernel, out_shape, grid, name="", num_warps=None, num_stages=None,
                    **metaparams):
        call = dict(name=name, num_warps=num_warps, num_stages=num_stages, **metaparams)
        calls.append(call)
        if isinstance(kernel, triton_lang.runtime.Autotuner):
            # jax-triton compiles every config (metaparams + config.kwargs, the grid called
            # with both) and times them on the device; the stand-in runs them all
            call["outputs"] = [launch(kernel.fn, grid, args, out_shape,
                                      {**metaparams, **c.kwargs}) for c in kernel.configs]
            return call["outputs"][0]
        return launch(kernel, grid, args, out_shape, metaparams)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ft, "_modules",
                        lambda: (triton_lang, types.SimpleNamespace(triton_call=triton_call)))
    ft._jitted.cache_clear()
    yield calls
    ft._jitted.cache_clear()  # the real (compiled) kernel for later tests


@pytest.mark.parametrize("m, n, k, b_scale, config", [
    (128, 256, 256, "blocks", ft.TritonConfig(block_m=64, block_n=128, num_warps=4)),
    (200, 384, 384, "blocks", ft.TritonConfig(block_m=64, block_n=256, group_m=2)),  # ragged M
    (130, 256, 128, "blocks", None),  # default config: one full and one 2-row tile of M
    (200, 200, 256, "rows", ft.TritonConfig(block_m=64, block_n=64, group_m=3)),  # ragged M, N
    (1, 136, 256, "rows", None),  # one row (decode), 64-row default tile
])
def test_public_functions_in_the_triton_interpreter(interpreted, m, n, k, b_scale, config):
    aq, sa, bq, sb = _operands(m, n, k, b_scale)
    want = _reference(aq, sa, bq, sb, b_scale)
    fn = ft.gemm_1d2d_triton if b_scale == "blocks" else ft.gemm_1d1d_triton
    got = fn(aq, sa, bq, sb, out_dtype=jnp.float32, config=config)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    _assert_close(got, want)
    call = interpreted[-1]
    cfg = config or ft.default_config(m, n)
    assert (call["BLOCK_M"], call["BLOCK_N"], call["num_warps"], call["num_stages"]) == (
        cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
    assert call["SB_ROWS"] == (q8.BLOCK if b_scale == "blocks" else 1)


def test_autotune_configs_in_the_triton_interpreter(interpreted):
    aq, sa, bq, sb = _operands(200, 384, 256)
    want = _reference(aq, sa, bq, sb, "blocks")
    ft.gemm_1d2d_triton(aq, sa, bq, sb, out_dtype=jnp.float32, config="autotune")
    call = interpreted[-1]
    assert "BLOCK_M" not in call and call["num_warps"] is None  # left to the configs
    assert len(call["outputs"]) == len(ft.AUTOTUNE_CONFIGS)
    for got in call["outputs"]:
        _assert_close(got, want)


def test_default_output_dtypes_in_the_triton_interpreter(interpreted):
    aq, sa, bq, sb = _operands(128, 128, 256)
    y = ft.gemm_1d2d_triton(aq, sa, bq, sb)
    assert y.dtype == jnp.bfloat16
    assert calc_diff(y, _reference(aq, sa, bq, sb, "blocks")) < 1e-4  # bf16 rounding only
    aq, sa, bq, sb = _operands(128, 128, 256, "rows")
    assert ft.gemm_1d1d_triton(aq, sa, bq, sb).dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# GPU: the compiled kernel through jax-triton
# --------------------------------------------------------------------------------------------


@pytest.fixture
def on_gpu():
    """Skips, saying why, where triton or jax-triton cannot be imported on the GPU machine."""
    try:
        ft._modules()
    except ImportError as e:
        pytest.skip(f"jax-triton route unavailable: {e}")


GPU_SHAPES = [(256, 512, 1024), (4096, 7168, 2048), (200, 512, 1024), (1, 256, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", GPU_SHAPES)
def test_gemm_1d2d_triton_on_gpu(on_gpu, m, n, k):
    aq, sa, bq, sb = _operands(m, n, k, seed=m)
    want = _reference(aq, sa, bq, sb, "blocks")
    got = jax.jit(ft.gemm_1d2d_triton)(aq, sa, bq, sb)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert calc_diff(got, want) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", GPU_SHAPES + [(200, 200, 512)])
def test_gemm_1d1d_triton_on_gpu(on_gpu, m, n, k):
    aq, sa, bq, sb = _operands(m, n, k, "rows", seed=m + 1)
    want = _reference(aq, sa, bq, sb, "rows")
    got = jax.jit(ft.gemm_1d1d_triton)(aq, sa, bq, sb)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    assert calc_diff(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("config", [ft.TritonConfig(block_m=64, block_n=256, num_stages=3),
                                    ft.TritonConfig(block_m=64, block_n=128, num_warps=4),
                                    "autotune"])
def test_other_configs_on_gpu(on_gpu, config):
    aq, sa, bq, sb = _operands(1024, 1024, 2048, seed=7)
    want = _reference(aq, sa, bq, sb, "blocks")
    got = ft.gemm_1d2d_triton(aq, sa, bq, sb, config=config)
    assert calc_diff(got, want) < 1e-4


@pytest.mark.gpu
def test_plain_normals_match_xla_reference_on_gpu(on_gpu):
    """The brief's case: quantized random normals, bf16 out, against impl='xla' in bf16."""
    x = jax.random.normal(jax.random.key(3), (512, 2048))
    w = jax.random.normal(jax.random.key(4), (1024, 2048))
    (aq, sa), (bq, sb) = q8.quantize_rows(x), q8.quantize_blocks(w)
    want = fg.gemm_1d2d(aq, sa, bq, sb, impl="xla")
    assert calc_diff(ft.gemm_1d2d_triton(aq, sa, bq, sb), want) < 1e-4

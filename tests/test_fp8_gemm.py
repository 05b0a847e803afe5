"""The Mosaic GPU block-scaled FP8 GEMM (pallas_kernels/fp8_gemm.py).

CPU: the kernel in Pallas' GPU interpret mode (wgmma computed in exact fp32, so it checks
tiling, scale indexing and the persistent loop, not FP8 rounding) against the XLA reference,
which multiplies the dequantized values exactly; the XLA references themselves against the
values dequantized by hand in float64 numpy. GPU (marker `gpu`): the same at benchmark-like
sizes on the device, where the tensor cores' FP8 accumulation is real.
"""

import json
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import testing
from pallas_kernels import _mosaic as mg
from pallas_kernels import fp8_gemm as fg
from pallas_kernels import fp8_quant as q8
from pallas_kernels import grouped_matmul as gm


def _operands(m, n, k, seed=0, b_scale="blocks"):
    return fg.selfcheck_operands(m, n, k, b_scale, seed)


def _assert_close(got, want, rel=1e-5):
    """Elementwise |got - want| <= rel * max |want|: the kernel and the reference sum the same
    exact products in float32 in another order (per 128-wide K block, scaled, then summed);
    a scale of the wrong block, row or column, or a tile missed, moves elements by O(1) of
    the largest (the operands' magnitudes differ by 2^6 across K blocks, rows and columns)."""
    want = np.asarray(want, np.float32)
    chex.assert_shape(got, want.shape)
    chex.assert_trees_all_close(np.asarray(got, np.float32), want, rtol=0,
                                atol=rel * float(np.abs(want).max()))


def _deq_rows(q, s):
    """By hand, in float64: e4m3 values q [..., K] times their 1 x 128 tile's scale."""
    q, s = np.asarray(q).astype(np.float64), np.asarray(s, np.float64)
    return q * np.repeat(s, q.shape[-1] // s.shape[-1], axis=-1)


def _deq_blocks(q, s):
    """By hand, in float64: e4m3 values q [..., N, K] times their 128 x 128 block's scale."""
    q, s = np.asarray(q).astype(np.float64), np.asarray(s, np.float64)
    return q * np.repeat(np.repeat(s, q8.BLOCK, axis=-1), q8.BLOCK, axis=-2)


def _group_of_padded_rows(sizes, padded_rows):
    """Each row of the padded layout: its expert (each expert's rows start on a 128-row
    tile, in order), or -1 for padding: written out, not read from the plan."""
    group = np.full(padded_rows, -1)
    start = 0
    for e, size in enumerate(np.asarray(sizes)):
        group[start:start + size] = e
        start += -(-int(size) // q8.BLOCK) * q8.BLOCK
    return group


# (m, n, k, config): each schedule of the kernel, with 128 x 128 weight blocks (gemm_1d2d).
KERNEL_CASES = [
    (128, 256, 256, None),  # one tile, two K-blocks
    (384, 512, 384, None),  # 3 x 2 tiles on 3 simulated SMs: the persistent loop, chained
    (256, 384, 512, fg.Fp8Config(max_concurrent_steps=2, wg_split="cols")),  # 2 stages
    (256, 256, 384, fg.Fp8Config(splits=2, wg_split="cols")),  # two row blocks in flight
    (128, 512, 256, fg.Fp8Config(block_n=256, max_concurrent_steps=3, wg_split="cols")),
    (128, 512, 256, fg.Fp8Config(block_m=64, block_n=256, max_concurrent_steps=4,
                                 wg_split="cols")),
    # the default "rows" split (DeepGEMM's): each warpgroup takes 64 rows and the whole width
    (384, 512, 384, fg.Fp8Config(wg_split="cols")),  # the "cols" split: 64 columns each
    (256, 384, 256, fg.Fp8Config(block_n=192, wg_split="rows")),  # two weight blocks a warpgroup
    (256, 128, 256, fg.Fp8Config(block_m=256, wg_split="rows", splits=2, max_concurrent_steps=2)),
    # two K-blocks a stage, the second's wgmma over the first's promotion; 3 stages of 2 blocks
    # with 6 K-blocks: chained tiles on 3 simulated SMs
    (384, 256, 768, fg.Fp8Config(overlap="stage", max_concurrent_steps=3, epilogue_slots=1)),
    (256, 384, 512, fg.Fp8Config(overlap="stage", max_concurrent_steps=2)),
    (256, 256, 512, fg.Fp8Config(overlap="stage", max_concurrent_steps=2, wg_split="cols")),
    # clusters of two CTAs with one operand multicast (one cluster on 3 simulated SMs): b shared
    # by m tiles 2i, 2i + 1 (4 x 2 tiles: 4 work items, chained), a shared by n tiles
    (512, 256, 512, fg.Fp8Config(overlap="stage", max_concurrent_steps=2, multicast="b")),
    (128, 512, 768, fg.Fp8Config(overlap="stage", max_concurrent_steps=3, epilogue_slots=1,
                                 multicast="a")),
    (256, 384, 384, fg.Fp8Config(multicast="b")),  # one-block stages
    # split-K: K in equal ranges, one float32 partial product each, summed after the kernel
    (128, 384, 1024, fg.Fp8Config(overlap="stage", max_concurrent_steps=2, split_k=2)),
    (256, 256, 768, fg.Fp8Config(split_k=3)),  # 12 work items on 3 simulated SMs
]
# 1 x 128 weight rows (gemm_1d1d, the wgrad) change only how b's scales are read: they run with
# the cases that read them differently (the persistent loop, 256- and 192-wide tiles, two-block
# stages, multicast, split-K) rather than with every schedule (the 11 others added ~20% to the
# file's time and nothing the 6 do not reach).
ROWS_CASES = [1, 4, 7, 10, 14, 16]


@pytest.mark.parametrize("m, n, k, config, b_scale", [
    pytest.param(*case, "blocks", id=f"blocks-{i}") for i, case in enumerate(KERNEL_CASES)] + [
    pytest.param(*KERNEL_CASES[i], "rows", id=f"rows-{i}") for i in ROWS_CASES])
def test_kernel_equals_the_reference_in_interpret_mode(m, n, k, config, b_scale):
    aq, sa, bq, sb = _operands(m, n, k, b_scale=b_scale)
    reference = fg.gemm_1d2d if b_scale == "blocks" else fg.gemm_1d1d
    scale = float(jnp.abs(reference(aq, sa, bq, sb, out_dtype=jnp.float32)).max())
    testing.assert_kernel_matches_reference(
        lambda *ops: fg._pallas_gemm(*ops, b_scale, jnp.float32, True, config),
        lambda *ops: reference(*ops, out_dtype=jnp.float32), aq, sa, bq, sb,
        atol=1e-5 * scale)


def test_kernel_bf16_output_and_public_entry_points():
    aq, sa, bq, sb = _operands(128, 256, 256, seed=3)
    ref = fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32)
    got = fg.gemm_1d2d(aq, sa, bq, sb, impl="pallas", interpret=True)
    assert got.dtype == jnp.bfloat16 and got.shape == (128, 256)
    # bf16 rounding of the output only: 2^-8 of each element (and the float32 sums' order)
    chex.assert_trees_all_close(np.asarray(got, np.float32), np.asarray(ref), rtol=2 ** -8,
                                atol=1e-5 * float(jnp.abs(ref).max()))


def test_references_are_the_exact_products_of_the_dequantized_values():
    """gemm_1d2d and gemm_1d1d (the XLA references the kernels are checked against) equal the
    product of the e4m3 values times their scales, dequantized by hand in float64."""
    aq, sa, bq, sb = _operands(128, 128, 256, seed=1)
    want = _deq_rows(aq, sa) @ _deq_blocks(bq, sb).T
    chex.assert_trees_all_close(np.asarray(fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32),
                                           np.float64), want,
                                rtol=1e-6, atol=1e-6 * np.abs(want).max())
    aq, sa, bq, sb = _operands(128, 256, 256, seed=2, b_scale="rows")
    want = _deq_rows(aq, sa) @ _deq_rows(bq, sb).T
    chex.assert_trees_all_close(np.asarray(fg.gemm_1d1d(aq, sa, bq, sb, out_dtype=jnp.float32),
                                           np.float64), want,
                                rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("change, message", [
    (dict(a=jnp.zeros((128, 256), jnp.bfloat16)), "a must be a 2-D float8_e4m3fn"),
    (dict(b=jnp.zeros((256, 384), q8.FP8), s_b=jnp.ones((2, 3))), "K must match"),
    (dict(s_a=jnp.ones((128, 3))), r"s_a must be float32\[128, 2\]"),
    (dict(b=jnp.zeros((200, 256), q8.FP8), s_b=jnp.ones((2, 2))), "N=200 must be a multiple"),
])
def test_bad_operands_name_the_problem(change, message):
    aq, sa, bq, sb = _operands(128, 256, 256)
    args = {"a": aq, "s_a": sa, "b": bq, "s_b": sb, **change}
    with pytest.raises(ValueError, match=message):
        fg.gemm_1d2d(args["a"], args["s_a"], args["b"], args["s_b"])


def test_kernel_tile_multiples_are_explicit_errors():
    aq, sa, bq, sb = _operands(192, 256, 128)  # M = 192 is not a multiple of block_m 128
    with pytest.raises(ValueError, match=r"M \(a.shape\[0\]\) = 192 must be a multiple"):
        fg.gemm_1d2d(aq, sa, bq, sb, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="impl='triton'"):
        fg.gemm_1d2d(aq, sa, bq, sb, impl="triton")
    with pytest.raises(ValueError, match="max_concurrent_steps"):
        fg.Fp8Config(block_n=256, max_concurrent_steps=5, wg_split="cols")  # over SMEM
    with pytest.raises(ValueError, match="wg_split='diagonal' must be one of"):
        fg.Fp8Config(wg_split="diagonal")
    with pytest.raises(ValueError,
                       match=r"block_m=64 must be a positive multiple of 128 \(wg_split='rows'\)"):
        fg.Fp8Config(block_m=64, wg_split="rows")
    with pytest.raises(ValueError, match="64 rows / splits >= 64"):
        fg.Fp8Config(wg_split="rows", splits=2)


def test_overlap_stage_checks_its_inputs_and_is_the_default_where_k_allows():
    with pytest.raises(ValueError, match="overlap='fast' must be one of"):
        fg.Fp8Config(overlap="fast")
    with pytest.raises(ValueError, match="overlap='stage' needs splits=1"):
        fg.Fp8Config(overlap="stage", splits=2, wg_split="cols")
    with pytest.raises(ValueError, match="max_concurrent_steps"):  # 4 two-block stages: no SMEM
        fg.Fp8Config(overlap="stage", max_concurrent_steps=4)
    with pytest.raises(ValueError, match="more than 192 registers"):  # 64 x 192 a warpgroup
        fg.Fp8Config(overlap="stage", block_n=192, max_concurrent_steps=2)
    aq, sa, bq, sb = _operands(128, 128, 384)  # 3 K-blocks: not whole stages of 2
    sa_t, sb_t = fg.kernel_scales(sa, sb, "blocks")
    with pytest.raises(ValueError, match="K = 384 must be a multiple of 256"):
        fg.gemm_kernel(aq, bq, sa_t, sb_t, b_blocks=True, interpret=True,
                       config=fg.Fp8Config(overlap="stage", max_concurrent_steps=2))
    # the default takes K as it comes: two-block stages where K allows, one-block ones elsewhere;
    # b multicast where M is an even number of tiles, and work items in groups of GROUP_M rows,
    # for the dense kernel only
    assert fg.default_config(128, 128, 384).overlap == "none"
    assert fg.default_config(128, 128, 384).group_m == 1  # one-block stages: not measured
    assert fg.default_config(384, 4096, 7168) == fg.Fp8Config(  # 96 tiles: no split
        overlap="stage", max_concurrent_steps=3, epilogue_slots=1, group_m=fg.GROUP_M)
    assert fg.default_config(4096, 4096, 7168) == fg.Fp8Config(
        overlap="stage", max_concurrent_steps=3, epilogue_slots=1, multicast="b",
        group_m=fg.GROUP_M)
    assert fg.GROUP_M == 8  # the measured winner (default_config's note)
    assert fg.default_config(384, 7168, 7168).multicast == "none"  # 3 m tiles
    assert fg.default_config(4096, 4096, 7168, dense=False) == fg.Fp8Config(
        overlap="stage", max_concurrent_steps=3, epilogue_slots=1)  # grouped: none of them
    assert fg.default_config(4096, 4096, 384).multicast == "none"
    # split-K where the output tiles fill at most half the SMs: ranges doubled while tiles x
    # ranges fit the SMs and each range is whole two-block stages of at least MIN_SPLIT_RANGE
    # (the M = 128 measurements)
    split = {(128, 2176, 7168): 4, (128, 4096, 7168): 4, (128, 7168, 16384): 2,
             (128, 7168, 2048): 1,  # ranges of 1024: shorter than MIN_SPLIT_RANGE
             (128, 7168, 4096): 2, (128, 24576, 1536): 1, (128, 32768, 512): 1,
             (128, 128, 7168): 4,  # 8 ranges of 896 would be too short
             (128, 128, 3840): 1,  # 2 ranges of 1920: long enough, but not whole stages
             (128, 128, 16384): 8,  # the cap
             (128, 8448, 4096): 2}  # 66 tiles: exactly half the SMs still splits
    for (m, n, k), want in split.items():
        cfg = fg.default_config(m, n, k)
        assert cfg.split_k == want and cfg.multicast == "none", ((m, n, k), cfg)
        assert cfg.group_m == (fg.GROUP_M if want == 1 else 1), ((m, n, k), cfg)
    assert fg.default_config(128, 2176, 7168, dense=False).split_k == 1
    assert fg.default_config(128, 2176, 16384).split_k == 4  # 8 x 17 tiles > 132 SMs
    assert fg.default_config(128, 2176, 16384, sms=264).split_k == 8  # the SM count decides
    assert fg.default_config(256, 2176, 7168, sms=16).split_k == 1  # 34 tiles, 16 SMs
    got = fg.gemm_kernel(aq, bq, sa_t, sb_t, b_blocks=True, interpret=True, out_dtype=jnp.float32)
    _assert_close(got, fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32))


def test_default_split_k_runs_with_the_devices_sm_count(monkeypatch):
    """gemm_kernel's default asks for the device's SM count (interpret mode simulates 3), so a
    one-tile GEMM with K = 3584 splits into 2 ranges there (1 x 2 <= 3 SMs, ranges of 1792) and
    still computes the product."""
    seen = []
    real = fg.default_config

    def spy(*args, **kw):
        assert kw.get("sms") == mg.num_sms(True) == 3  # the simulated device's, not 132
        seen.append(real(*args, **kw))
        return seen[-1]
    monkeypatch.setattr(fg, "default_config", spy)
    aq, sa, bq, sb = _operands(128, 128, 3584, seed=3)
    sa_t, sb_t = fg.kernel_scales(sa, sb, "blocks")
    got = fg.gemm_kernel(aq, bq, sa_t, sb_t, b_blocks=True, interpret=True, out_dtype=jnp.float32)
    assert [c.split_k for c in seen] == [2]
    _assert_close(got, fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32))


@pytest.mark.parametrize("m, n, k, multicast", [
    (768, 128, 512, "b"),  # 3 work items on 2 clusters: unequal counts, the last flag differs
    (384, 512, 768, "a"),  # 6 work items on 2 clusters, chained
])
def test_multicast_on_two_clusters_in_interpret_mode(monkeypatch, m, n, k, multicast):
    """The other tests run one cluster (3 simulated SMs); here 5 SMs give two clusters, so the
    persistent loop strides over clusters and each cluster's last item differs."""

    monkeypatch.setattr(mg, "INTERPRET_NUM_SMS", 5)  # the launch's jit is keyed by the count
    aq, sa, bq, sb = _operands(m, n, k, seed=3)
    cfg = fg.Fp8Config(overlap="stage", max_concurrent_steps=3, epilogue_slots=1,
                       multicast=multicast)
    got = fg._pallas_gemm(aq, sa, bq, sb, "blocks", jnp.float32, True, cfg)
    _assert_close(got, fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32))


@pytest.mark.parametrize("m_items, n_items, group", [(5, 3, 2), (4, 6, 4), (3, 7, 8), (6, 1, 4)])
def test_grouped_item_order_is_a_permutation(m_items, n_items, group):
    """Fp8Config.group_m's order visits every (row, column) item once, M minor within each
    group of `group` rows (the last group shorter), N minor between groups."""
    lin = jnp.arange(m_items * n_items, dtype=jnp.int32)
    mi, ni = (np.asarray(v) for v in fg._item_of(lin, m_items, n_items, group))
    assert sorted(zip(mi.tolist(), ni.tolist())) == [
        (i, j) for i in range(m_items) for j in range(n_items)]
    want = [(g + r, j) for g in range(0, m_items, group) for j in range(n_items)
            for r in range(min(group, m_items - g))]
    assert list(zip(mi.tolist(), ni.tolist())) == want
    one = [np.asarray(v).tolist() for v in fg._item_of(lin, m_items, n_items, 1)]
    assert one == [(lin // n_items).tolist(), (lin % n_items).tolist()]


@pytest.mark.parametrize("m, n, k, multicast, group", [
    (768, 256, 512, "b", 2),  # 3 row pairs, 2 n tiles: groups of 2 pairs, then 1
    (640, 384, 256, "none", 2),  # 5 x 3 tiles: the last group one row
    (384, 512, 512, "a", 4),  # 3 rows of 2 n pairs: one short group
])
def test_grouped_item_order_in_interpret_mode(monkeypatch, m, n, k, multicast, group):
    """The kernel with work items in groups of rows (`Fp8Config.group_m`) computes the product,
    with and without multicast, on two clusters (5 simulated SMs)."""
    monkeypatch.setattr(mg, "INTERPRET_NUM_SMS", 5)
    aq, sa, bq, sb = _operands(m, n, k, seed=4)
    cfg = fg.Fp8Config(overlap="stage", max_concurrent_steps=2, epilogue_slots=1,
                       multicast=multicast, group_m=group)
    got = fg._pallas_gemm(aq, sa, bq, sb, "blocks", jnp.float32, True, cfg)
    _assert_close(got, fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32))


def test_multicast_and_split_k_check_their_inputs():
    with pytest.raises(ValueError, match="multicast='c' must be one of"):
        fg.Fp8Config(multicast="c")
    with pytest.raises(ValueError, match=r"split_k=2 must be >= 1, and 1 with multicast='b'"):
        fg.Fp8Config(multicast="b", split_k=2)
    with pytest.raises(ValueError, match="split_k=0 must be >= 1"):
        fg.Fp8Config(split_k=0)
    with pytest.raises(ValueError, match="group_m=0 must be >= 1"):
        fg.Fp8Config(group_m=0)
    aq, sa, bq, sb = _operands(384, 384, 256)
    sa_t, sb_t = fg.kernel_scales(sa, sb, "blocks")
    with pytest.raises(ValueError, match="K = 256 must split into Fp8Config.split_k=3 equal"):
        fg.gemm_kernel(aq, bq, sa_t, sb_t, b_blocks=True, interpret=True,
                       config=fg.Fp8Config(split_k=3))
    with pytest.raises(ValueError, match="K = 128 must be a multiple of 256"):  # a range, K / 2
        fg.gemm_kernel(aq, bq, sa_t, sb_t, b_blocks=True, interpret=True,
                       config=fg.Fp8Config(split_k=2, overlap="stage", max_concurrent_steps=2))
    for mc, name in (("b", r"M \(a.shape\[0\]\) = 384"), ("a", r"N \(b.shape\[0\]\) = 384")):
        with pytest.raises(ValueError, match=name + " is an odd number of 128-wide tiles"):
            fg.gemm_kernel(aq, bq, sa_t, sb_t, b_blocks=True, interpret=True,
                           config=fg.Fp8Config(multicast=mc))
    gaq, gsa, gbq, gsb, plan = _grouped_operands([100, 60], 256, 256)
    with pytest.raises(ValueError, match="multicast='b' is for the dense GEMMs only"):
        fg.grouped_gemm_1d2d(gaq, gsa, gbq, gsb, plan, impl="pallas", interpret=True,
                             config=fg.Fp8Config(multicast="b"))
    t_q, t_s = q8.quantize_rows(jnp.ones((128, plan.padded_rows)))  # [P, tokens]
    with pytest.raises(ValueError, match="multicast='a' is for the dense GEMMs only"):
        fg.grouped_wgrad_1d1d(t_q, t_s, t_q, t_s, plan, impl="pallas", interpret=True,
                              config=fg.Fp8Config(multicast="a"))
    with pytest.raises(ValueError, match="split_k=2 is for the dense GEMMs only"):
        fg.grouped_gemm_1d2d(gaq, gsa, gbq, gsb, plan, impl="pallas", interpret=True,
                             config=fg.Fp8Config(split_k=2))
    with pytest.raises(ValueError, match="group_m=2 is for the dense GEMMs only"):
        fg.grouped_gemm_1d2d(gaq, gsa, gbq, gsb, plan, impl="pallas", interpret=True,
                             config=fg.Fp8Config(group_m=2))


def test_identical_kernel_calls_share_one_lowering():
    """Calls of a kernel with the same statics and shapes lower to one function (one Mosaic GPU
    module, compiled once): the `small` FP8 train step had 117 Mosaic GPU call sites, each
    lowered and compiled on its own, before `_mosaic.launch_shared` (38 after). Lowered for
    CUDA on the CPU; two forward GEMMs of one shape and one of another give two kernels."""

    aq, sa, bq, sb = _operands(128, 256, 256)
    bq2, sb2 = bq[:128], sb[:1]

    def f(aq, sa, bq, sb, bq2, sb2):
        y1 = fg.gemm_1d2d(aq, sa, bq, sb, impl="pallas")
        y2 = fg.gemm_1d2d(aq, sa * 2, bq, sb, impl="pallas")  # same kernel, another call site
        y3 = fg.gemm_1d2d(aq, sa, bq2, sb2, impl="pallas")    # N = 128: another kernel
        return y1, y2, y3

    with mg.assume_num_sms(132):  # no GPU to ask
        text = jax.jit(f).trace(aq, sa, bq, sb, bq2, sb2).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2


@pytest.mark.slow  # ~20 kernel runs in interpret mode
def test_bench_fp8_gemm_smoke_in_interpret_mode(tmp_path):
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import bench_fp8_gemm

    recs = bench_fp8_gemm.main(["--interpret", "--shapes", "128x200x128", "--grouped",
                                "2x128x256x128", "--configs", "128x256x2", "--wgrad",
                                "128x256x256", "--quant", "128x256",
                                "--iterations", "1", "--json", str(tmp_path / "r.json"),
                                "--quant_json", str(tmp_path / "q.json")])
    impls = {r["impl"] for r in recs}
    tags = ("[128x256x2x1]",)  # one extra config (the syntax of others: _config below)
    kernels = {f"pallas_fp8{kind}{t}" for kind in ("", "_grouped", "_wgrad") for t in ("",) + tags}
    assert impls == kernels | {"xla_bf16", "xla_fp8_unscaled", "xla_dequant_bf16", "triton_fp8",
                               "xla_bf16_wgrad", "pallas_bf16_grouped"}
    assert all(r["tflops"] for r in recs if r["impl"] != "triton_fp8")
    assert "not run" in next(r for r in recs if r["impl"] == "triton_fp8")["note"]
    checked = [r for r in recs if r["impl"] in kernels and "grouped" not in r["impl"]]
    assert len(checked) == 4 and all(r["calc_diff"] < 1e-4 for r in checked)
    assert next(r for r in recs if r["impl"] == "pallas_fp8")["n_padded_to"] == 256
    quant = json.loads((tmp_path / "q.json").read_text())
    assert {r["impl"] for r in quant} == {"copy_bf16", "quantize_rows", "quantize_cols",
                                          "quantize_blocks", "quantize_rows_pallas",
                                          "quantize_rows_pallas_st", "quantize_cols_pallas",
                                          "quantize_cols_pallas_st"}
    assert all(r["matches_xla"] for r in quant if "pallas" in r["impl"])
    assert all(r["gbps"] > 0 and r["fraction_of_copy"] > 0 for r in quant)
    assert json.loads((tmp_path / "r.json").read_text())[0]["run"]["complete"] is True
    # the splits' syntax (a fourth number), the rows split's (r), and the two-block stages':
    # one epilogue slot where two do not fit
    assert bench_fp8_gemm._config("128x128x2x2") == fg.Fp8Config(
        max_concurrent_steps=2, splits=2, wg_split="cols")
    cfg = bench_fp8_gemm._config("128x128x2r")
    assert cfg == fg.Fp8Config(max_concurrent_steps=2, wg_split="rows")
    assert bench_fp8_gemm._tag(cfg) == "128x128x2x1r"
    cfg = bench_fp8_gemm._config("128x128x3r+stage")
    assert cfg == fg.Fp8Config(overlap="stage", max_concurrent_steps=3, epilogue_slots=1)
    assert bench_fp8_gemm._tag(cfg) == "128x128x3x1r+stage_e1"
    assert bench_fp8_gemm._config("128x128x2r+stage").epilogue_slots == 2
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['steps'\]"):
        bench_fp8_gemm._config("128x128x3r+steps")
    cfg = bench_fp8_gemm._config("128x128x3r+stage+mb")  # multicast: dense cases with even tiles
    assert cfg == fg.Fp8Config(overlap="stage", max_concurrent_steps=3, epilogue_slots=1,
                               multicast="b")
    assert bench_fp8_gemm._tag(cfg) == "128x128x3x1r+stage+mb_e1"
    assert bench_fp8_gemm._fits(cfg, 256, 128, 512) and not bench_fp8_gemm._fits(cfg, 384, 128, 512)
    cfg = bench_fp8_gemm._config("128x128x3r+stage+k4")  # split-K: K / 4 in whole stages
    assert cfg.split_k == 4 and bench_fp8_gemm._tag(cfg) == "128x128x3x1r+stage+k4_e1"
    assert bench_fp8_gemm._fits(cfg, 128, 128, 7168) and not bench_fp8_gemm._fits(cfg, 128, 128,
                                                                                    1536)


def _grouped_operands(sizes, n, k, seed=0):

    sizes = jnp.asarray(sizes, jnp.int32)
    m, e = int(sizes.sum()) + 7, sizes.shape[0]  # 7 rows past the last group: no group's
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k)) * jnp.exp2(jnp.arange(k) // q8.BLOCK * 2.0 - 2)
    w = jax.random.normal(kw, (e, n, k)) * jnp.exp2(jnp.arange(e) - 1.0)[:, None, None]
    plan = gm.pad_plan(sizes, m, 128)
    aq, sa = q8.quantize_rows(gm.pad_rows(x, plan))
    bq, sb = q8.quantize_blocks(w)
    return aq, sa, bq, sb, plan


@pytest.mark.parametrize("config", [None, fg.Fp8Config(wg_split="cols")])
def test_grouped_kernel_equals_the_reference_in_interpret_mode(config):
    """Experts of 100, 0 (empty), 150 and 50 rows: each M-tile must use its own expert's
    weights and scales, and the unused tiles at the end must be zeros."""

    sizes = [100, 0, 150, 50]
    aq, sa, bq, sb, plan = _grouped_operands(sizes, 256, 256)
    ref = fg.grouped_gemm_1d2d(aq, sa, bq, sb, plan, out_dtype=jnp.float32)
    # by hand: each padded row times its expert's weights, dequantized in float64
    group = _group_of_padded_rows(sizes, plan.padded_rows)
    a, b = _deq_rows(aq, sa), _deq_blocks(bq, sb)  # [Mp, K], [E, N, K]
    want = np.zeros((plan.padded_rows, 256))
    for e in range(len(sizes)):
        want[group == e] = a[group == e] @ b[e].T
    chex.assert_trees_all_close(np.asarray(ref, np.float64), want, rtol=1e-6,
                                atol=1e-6 * np.abs(want).max())
    got = fg.grouped_gemm_1d2d(aq, sa, bq, sb, plan, out_dtype=jnp.float32, impl="pallas",
                               interpret=True, config=config)
    assert plan.padded_rows > int(plan.num_tiles) * 128  # zero tiles are exercised
    _assert_close(got, ref)
    chex.assert_trees_all_equal(np.asarray(got[int(plan.num_tiles) * 128:]),
                                np.zeros((plan.padded_rows - int(plan.num_tiles) * 128, 256),
                                         np.float32))


def test_grouped_kernel_checks_the_plan():

    aq, sa, bq, sb, plan = _grouped_operands([100, 60], 256, 128)
    with pytest.raises(ValueError, match="2 groups"):
        fg.grouped_gemm_1d2d(aq, sa, bq[:1], sb[:1], plan)
    plan64 = gm.pad_plan(jnp.asarray([100, 60], jnp.int32), 167, 64)
    aq64, sa64 = q8.quantize_rows(jnp.zeros((plan64.padded_rows, 128)))
    with pytest.raises(ValueError, match="block_m=64 must equal the kernel's block_m=128"):
        fg.grouped_gemm_1d2d(aq64, sa64, bq, sb, plan64, impl="pallas", interpret=True)


@pytest.mark.parametrize("config", [None, fg.Fp8Config(splits=2, max_concurrent_steps=2,
                                                      wg_split="cols"),
                                    fg.Fp8Config(wg_split="cols")])
def test_grouped_wgrad_kernel_equals_the_reference_in_interpret_mode(config):
    """dw[g] = dy_g^T x_g over each expert's own tokens (quantized along tokens); an empty
    expert gets exact zeros."""

    sizes = jnp.asarray([100, 0, 150, 50], jnp.int32)
    m, n, k = 307, 128, 256
    x = jax.random.normal(jax.random.key(0), (m, k))
    dy = jax.random.normal(jax.random.key(1), (m, n)) * jnp.exp2(jnp.arange(m) % 7 - 3.0)[:, None]
    plan = gm.pad_plan(sizes, m, 128)
    aq, sa = q8.quantize_cols(gm.pad_rows(dy, plan))
    bq, sb = q8.quantize_cols(gm.pad_rows(x, plan))
    ref = fg.grouped_wgrad_1d1d(aq, sa, bq, sb, plan)
    # by hand: dw[g] = dy_g^T x_g over each expert's own (padded) rows, dequantized in float64
    group = _group_of_padded_rows(np.asarray(sizes), plan.padded_rows)
    dy_t, x_t = _deq_rows(aq, sa), _deq_rows(bq, sb)  # [N, Mp], [K, Mp]
    want = np.stack([dy_t[:, group == g] @ x_t[:, group == g].T for g in range(4)])
    chex.assert_trees_all_close(np.asarray(ref, np.float64), want, rtol=1e-5,
                                atol=1e-5 * np.abs(want).max())
    got = fg.grouped_wgrad_1d1d(aq, sa, bq, sb, plan, impl="pallas", interpret=True,
                                config=config)
    _assert_close(got, ref)
    chex.assert_trees_all_equal(np.asarray(got[1]), np.zeros((n, k), np.float32))
    if config is None:  # an expert's tokens come in 128s: no two-block stages here
        with pytest.raises(ValueError, match="overlap='stage' is not supported"):
            fg.grouped_wgrad_1d1d(aq, sa, bq, sb, plan, impl="pallas", interpret=True,
                                  config=fg.Fp8Config(overlap="stage", max_concurrent_steps=2))


@pytest.mark.gpu
def test_grouped_kernel_on_the_gpu():
    aq, sa, bq, sb, plan = _grouped_operands([1000, 0, 3000, 96, 4000], 512, 2048, seed=5)
    got = fg.grouped_gemm_1d2d(aq, sa, bq, sb, plan, impl="pallas").astype(jnp.float32)
    want = fg.grouped_gemm_1d2d(aq, sa, bq, sb, plan, out_dtype=jnp.float32)
    _assert_close(got, want, rel=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, fg.Fp8Config(splits=2, wg_split="cols"),
                                    fg.Fp8Config(block_n=256, max_concurrent_steps=3,
                                                 wg_split="cols"),
                                    fg.Fp8Config(wg_split="cols"),
                                    fg.Fp8Config(block_n=192, wg_split="rows"),
                                    fg.Fp8Config(overlap="stage", max_concurrent_steps=2),
                                    fg.Fp8Config(overlap="stage", max_concurrent_steps=3,
                                                 epilogue_slots=1),  # the default before multicast
                                    fg.Fp8Config(overlap="stage", max_concurrent_steps=3,
                                                 epilogue_slots=1, multicast="a"),
                                    fg.Fp8Config(multicast="b"),
                                    fg.Fp8Config(),  # one-block stages, the default before
                                    fg.Fp8Config(overlap="stage", max_concurrent_steps=3,
                                                 epilogue_slots=1, split_k=4)])
@pytest.mark.parametrize("m, n, k", [(4096, 4096, 7168), (128, 7168, 2048), (512, 2176, 7168),
                                     (128, 2176, 7168)])
def test_kernel_on_the_gpu(m, n, k, config):
    """Real FP8 tensor cores: DeepGEMM's calc_diff < 1e-3 against the exact product of the
    quantized values (the benchmark's shapes gave 1.2e-6 to 1.5e-6 on an H200, 2026-12-02).
    On an H200, 2026-12-02 (experiments/results/gpu_tests_fp8_h200_2026-12-02_*.log): the
    cases before multicast passed (the stage config without multicast was then the default,
    None); after it, None (now multicast b where M allows) and the two multicast configs
    passed; with split-K the default (commit a17d2d2, _splitk.log) all 38 GPU tests of
    test_fp8_gemm.py and test_fp8.py passed, the split-K config included (the shape 128 x
    2176 x 7168, where the default itself splits, was added after that run). Only here can a
    wrong wgmma wait show: interpret mode runs wgmma synchronously. A config the shape does
    not take must be refused with an error (`check_shapes`), not run.
    Each config draws its own operands (those runs drew seed 7 for all), so an output tile a
    kernel leaves unwritten cannot hold a previous config's correct result from a reused
    buffer."""
    aq, sa, bq, sb = _operands(m, n, k, seed=7 + zlib.crc32(repr(config).encode()) % 1000)
    if config is not None and (n % config.block_n or (config.multicast != "none" and (
            (m if config.multicast == "b" else n) // 128) % 2)):
        with pytest.raises(ValueError, match="multiple of the|odd number of"):
            fg._pallas_gemm(aq, sa, bq, sb, "blocks", jnp.bfloat16, False, config)
        return
    got = fg._pallas_gemm(aq, sa, bq, sb, "blocks", jnp.bfloat16, False, config)
    got = got.astype(jnp.float32)
    want = fg.gemm_1d2d(aq, sa, bq, sb, out_dtype=jnp.float32)
    diff = 1 - 2 * jnp.sum(got * want) / (jnp.sum(got * got) + jnp.sum(want * want))
    assert float(diff) < 1e-3
    _assert_close(got, want, rel=2e-2)


@pytest.mark.slow  # 8 variants run in interpret mode
def test_fp8_gemm_variants_smoke_in_interpret_mode(tmp_path):
    """experiments/lab/fp8_gemm_variants.py: each kind of variant (multicast, in place, serial with
    column halves, the deferred promotion over two stages, the kernel's former schedule, the
    early stage release, the sliding window over a wider tile) computes the product it claims,
    so its timing on a GPU means something; the GPU-only carry variant says so."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "lab"))
    import fp8_gemm_variants as fv

    names = ["promote[128x128, 2-block stages, multicast b]", "inplace[256x128]",
             "serial[128x256, 2 column halves]", "deferred[128x128, 2-block stages]"]
    recs = fv.main(["--interpret", "--shapes", "256x256x512", "--iterations", "1",
                    "--variants", *names, "carry[128x128, 2-block stages]",
                    "--json", str(tmp_path / "v.json")])
    assert [r["variant"] for r in recs] == names + ["carry[128x128, 2-block stages]"]
    assert all(r["tflops"] and r["max_rel_err"] < 1e-2 for r in recs[:-1])  # e4m3 -> bf16 out
    assert recs[-1]["tflops"] is None and "GPU only" in recs[-1]["error"]
    # the kernel's schedule before its scales were read early, the early stage release, and the
    # sliding window over a 128 x 192 tile's parts, whose tiles start on a weight block only
    # every other time (a scalar b scale per part came out wrong in the second tile)
    wide = ["upfront[128x128, 2-block stages]", "release[128x128, 2-block stages, multicast b]",
            "window[128x192, 128+64 columns, 2-block stages x2]"]
    recs = fv.main(["--interpret", "--shapes", "256x384x512", "--iterations", "1",
                    "--variants", *wide, "--json", str(tmp_path / "w.json")])
    assert [r["variant"] for r in recs] == wide
    assert all(r["tflops"] and r["max_rel_err"] < 1e-2 for r in recs), recs
    with pytest.raises(SystemExit, match="unknown"):
        fv.main(["--variants", "promote[9x9]"])

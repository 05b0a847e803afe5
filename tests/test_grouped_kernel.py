"""The Pallas Mosaic GPU grouped matmul (pallas_kernels/grouped_matmul.py) against references.

On CPU the kernels run in GPU interpret mode (`interpret=True`): the same kernel bodies, TMA and
wgmma simulated in fp32, so these tests check indexing, group assignment, pipelining and the
epilogue. The `gpu` tests repeat the checks at MoE sizes on the GPU (DSV3_TEST_GPU=1).

References are independent of the padded layout where possible: `jax.lax.ragged_dot` on the
unpadded rows for the forward and data gradient, a one-hot per-group sum for the weight gradient.
Checks are elementwise (chex): interpret mode multiplies bf16 values exactly and sums in fp32, so
what separates the kernel from the fp32 reference is the bf16 rounding of its output.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import testing
from pallas_kernels import grouped_matmul as gm

# Small tiles so the interpret-mode runs stay a few seconds: 64-row tiles, 128-wide CTA tiles
# (two 64-wide warpgroup halves), 4 K steps of 64 at K = 256.
SMALL = gm.TileConfig(block_m=64, block_n=128, block_k=64, tgmm_block_k=64, tgmm_block_n=128,
                      tgmm_block_rows=32)
G, M, K, N = 4, 300, 256, 256
# Group 1 is empty, group 3 is not a multiple of block_m, and 300 is not a multiple of 64.
SIZES = (120, 0, 130, 50)
# Elementwise: |got - want| <= BF16_RTOL |want| + atol. A bf16 output is the fp32 sum rounded to
# 8 significant bits, a relative error of at most 2^-8 = 3.9e-3 (measured: 3.89e-3 for gmm, dx
# and dw of the custom VJP); `atol` covers fp32 sums taken in another order (measured <= 3e-9 of
# the largest value; allowed: 1e-5). The check this replaced allowed 2% of the largest |want|
# for every element (~10x this error): a kernel that truncated its fp32 sums to bf16 (an error
# of up to 2^-7) passed it.
BF16_RTOL = 4e-3
SUM_ATOL = 1e-5  # times max |want|


def _assert_bf16_close(got, want, rtol=BF16_RTOL, atol=SUM_ATOL):
    """got (a bf16 kernel output) equals the fp32 reference `want` up to its own rounding."""
    want = np.asarray(want, np.float32)
    chex.assert_shape(got, want.shape)
    chex.assert_trees_all_close(np.asarray(got, np.float32), want, rtol=rtol,
                                atol=atol * float(np.abs(want).max()))


def _assert_within_max(got, want, rel):
    """max |got - want| <= rel * max |want| (the GPU tests' bound at MoE sizes, unmeasured here)."""
    want = np.asarray(want, np.float32)
    chex.assert_trees_all_close(np.asarray(got, np.float32), want, rtol=0,
                                atol=rel * float(np.abs(want).max()))


def _inputs(g=G, m=M, k=K, n=N, sizes=SIZES, seed=0):
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (g, k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.float32).astype(jnp.bfloat16)
    return x, w, dy, jnp.asarray(sizes, jnp.int32)


def _ragged(x, w, sizes):
    return jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), sizes,
                              precision=jax.lax.Precision.HIGHEST)


def _per_group_dw(x, dy, sizes):
    """dw[g] = x_g^T dy_g in fp32 via a one-hot row -> group map (no padded layout involved)."""
    group_of_row = np.repeat(np.arange(len(sizes)), np.asarray(sizes))
    onehot = np.zeros((x.shape[0], len(sizes)), np.float32)
    onehot[np.arange(len(group_of_row)), group_of_row] = 1.0
    return jnp.einsum("mg,mk,mn->gkn", onehot, x.astype(jnp.float32), dy.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------
# pad_plan / pad_rows / unpad_rows
# ------------------------------------------------------------------------------------------


def _plan_by_loop(sizes, m, block_m):
    """The layout written out row by row: the definition the vectorised pad_plan must match."""
    t = gm.max_tiles(m, len(sizes), block_m)
    positions = np.full(m, -1)
    tile_group = np.full(t, -1)
    starts, counts = [], []
    row, tile = 0, 0
    for g, size in enumerate(sizes):
        count = -(-size // block_m)
        starts.append(tile)
        counts.append(count)
        for i in range(size):
            if row < m:
                positions[row] = tile * block_m + i
                row += 1
        tile_group[tile:tile + count] = g
        tile += count
    positions[row:] = t * block_m + np.arange(row, m)  # rows in no group: distinct, out of range
    return positions, tile_group, np.array(starts), np.array(counts), tile, t * block_m


@pytest.mark.parametrize("sizes,m,block_m", [
    ((120, 0, 130, 50), 300, 64),                 # empty group, M not a multiple of block_m
    ((0, 0, 256, 0), 256, 64),                    # all rows in one group, exact tiles
    ((1, 1, 1, 1, 1, 1, 1, 1), 8, 128),           # every group shorter than a tile
    ((37, 0, 0, 91, 5, 200, 0, 11), 344, 128),    # uneven, several empty groups
    ((10, 20, 30), 100, 16),                      # sum < m: the last 40 rows are in no group
])
def test_pad_plan_matches_row_by_row_layout(sizes, m, block_m):
    plan = gm.pad_plan(jnp.asarray(sizes, jnp.int32), m, block_m)
    positions, tile_group, starts, counts, used, rows = _plan_by_loop(sizes, m, block_m)
    chex.assert_trees_all_equal(
        (np.asarray(plan.positions), np.asarray(plan.tile_group),
         np.asarray(plan.group_tile_start), np.asarray(plan.group_tile_count)),
        (positions, tile_group, starts, counts), strict=False)
    assert int(plan.num_tiles) == used
    assert plan.padded_rows == rows and plan.block_m == block_m
    assert plan.tile_group.shape[0] * block_m == plan.padded_rows
    # sources inverts positions: each padded row names its sorted row, or m for padding
    sources = np.full(rows, m)
    inside = positions < rows
    sources[positions[inside]] = np.arange(m)[inside]
    chex.assert_trees_all_equal(np.asarray(plan.sources), sources, strict=False)


def test_row_gathers_differentiate_to_gathers():
    """pad_rows / unpad_rows gradients (gathers through the inverse map) equal autodiff of the
    scatter formulation, and the jaxpr of the gradient has no scatter."""
    sizes, m, k = (5, 0, 9, 3), 20, 8
    plan = gm.pad_plan(jnp.asarray(sizes, jnp.int32), m, 4)
    x = jax.random.normal(jax.random.key(0), (m, k))
    wts = jax.random.normal(jax.random.key(1), (plan.padded_rows, k))

    def ours(x):
        return (gm.unpad_rows(gm.pad_rows(x, plan) * wts, plan) ** 2).sum()

    def scatter_form(x):
        xp = jnp.zeros((plan.padded_rows, k)).at[plan.positions].set(x, mode="drop")
        y = (xp * wts).at[plan.positions].get(mode="fill", fill_value=0)
        return (y ** 2).sum()

    # a gather's gradient adds each row's cotangent once: the same float32 values
    chex.assert_trees_all_close(jax.grad(ours)(x), jax.grad(scatter_form)(x), rtol=1e-6,
                                atol=1e-6)
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(ours))(x))
    assert "scatter" in str(jax.make_jaxpr(jax.grad(scatter_form))(x))  # the check can fail


def test_pad_plan_random_sizes_fit_the_static_bound():
    rng = np.random.default_rng(0)
    plan_of = jax.jit(gm.pad_plan, static_argnums=(1, 2))  # one compile per group count
    for _ in range(20):
        g = int(rng.choice([1, 3, 8, 11]))
        cuts = np.sort(rng.integers(0, 500, g - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [500]]))
        plan = plan_of(jnp.asarray(sizes, jnp.int32), 500, 64)
        positions, tile_group, *_ = _plan_by_loop(tuple(sizes), 500, 64)
        chex.assert_trees_all_equal((np.asarray(plan.positions), np.asarray(plan.tile_group)),
                                    (positions, tile_group), strict=False)
        assert int(plan.num_tiles) <= plan.tile_group.shape[0]


def test_few_rows_get_one_tile_per_row_at_most():
    """Decoding routes a handful of rows over many experts: the layout's tiles are bounded by
    the rows (6 rows over 64 experts: 6 tiles, not the 63 the per-group bound gives), and any
    split of those rows still fits."""
    assert gm.max_tiles(6, 64, 128) == 6
    assert gm.max_tiles(6 * 64, 64, 128) == 64 + (6 * 64 - 64) // 128  # the per-group bound
    rng = np.random.default_rng(1)
    for _ in range(10):
        sizes = np.bincount(rng.integers(0, 64, 6), minlength=64)
        plan = gm.pad_plan(jnp.asarray(sizes, jnp.int32), 6, 128)
        assert plan.padded_rows == 6 * 128
        assert int(plan.num_tiles) == int((sizes > 0).sum())


def test_pad_plan_is_a_jittable_pytree_with_static_ints():
    plan = jax.jit(gm.pad_plan, static_argnums=(1, 2))(jnp.asarray(SIZES, jnp.int32), M, 64)
    assert len(jax.tree.leaves(plan)) == 6  # the arrays; block_m and padded_rows are static
    rebuilt = jax.jit(lambda p: p)(plan)
    assert rebuilt.padded_rows == plan.padded_rows and rebuilt.block_m == 64


def test_pad_and_unpad_rows_round_trip_with_zero_padding():
    x, *_ = _inputs()
    plan = gm.pad_plan(jnp.asarray(SIZES, jnp.int32), M, 64)
    x_pad = gm.pad_rows(x, plan)
    assert x_pad.shape == (plan.padded_rows, K)
    chex.assert_trees_all_equal(gm.unpad_rows(x_pad, plan), x)
    used = np.zeros(plan.padded_rows, bool)
    used[np.asarray(plan.positions)] = True
    assert not np.asarray(x_pad)[~used].any()  # every other row is zero


# ------------------------------------------------------------------------------------------
# Kernels in interpret mode
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case():
    x, w, dy, sizes = _inputs()
    plan = gm.pad_plan(sizes, M, SMALL.block_m)
    return dict(x=x, w=w, dy=dy, sizes=sizes, plan=plan, x_pad=gm.pad_rows(x, plan),
                dy_pad=gm.pad_rows(dy, plan))


@pytest.fixture(scope="module")
def vjp_out(case):
    """The custom VJP on the main case, run once: y_pad (gmm), dx_pad (gmm with w read
    transposed) and dw (tgmm, bf16 out) for the cotangent dy_pad."""
    plan = case["plan"]
    y_pad, pull = jax.vjp(lambda x_pad, w: gm.grouped_matmul_padded(
        x_pad, w, plan, config=SMALL, interpret=True), case["x_pad"], case["w"])
    dx_pad, dw = pull(case["dy_pad"])
    return y_pad, dx_pad, dw


def test_gmm_matches_ragged_dot(case, vjp_out):
    plan, y_pad = case["plan"], vjp_out[0]
    assert y_pad.dtype == jnp.bfloat16 and y_pad.shape == (plan.padded_rows, N)
    _assert_bf16_close(gm.unpad_rows(y_pad, plan), _ragged(case["x"], case["w"], case["sizes"]))
    # Padding rows and the tiles past the last group come out as exact zeros.
    used = np.zeros(plan.padded_rows, bool)
    used[np.asarray(plan.positions)] = True
    chex.assert_trees_all_equal(np.asarray(y_pad, np.float32)[~used],
                                np.zeros(((~used).sum(), N), np.float32))


@pytest.mark.parametrize("cfg,sizes,m", [
    # Unchained pipelines and 4 epilogue slots, on the main case.
    (SMALL.replace(chain_tiles=False, epilogue_slots=4, max_concurrent_steps=3), SIZES, M),
    # 2 used tiles x 2 N tiles over 3 simulated SMs: one SM chains two tiles (START, STOP), the
    # others get a single tile (plain pipeline); 3 K steps per tile with 3 stages.
    (SMALL.replace(max_concurrent_steps=3), (10, 0, 0, 50), 60),
    # The "rows" warpgroup split: 128-row tiles, each warpgroup 64 rows x the whole width.
    (SMALL.replace(block_m=128, wg_split="rows"), SIZES, M),
])
def test_gmm_variants_match_ragged_dot(cfg, sizes, m):
    x, w, _, sizes = _inputs(m=m, k=192, sizes=sizes, seed=4)
    plan = gm.pad_plan(sizes, m, cfg.block_m)
    y_pad = gm.gmm(gm.pad_rows(x, plan), w, plan, config=cfg, interpret=True)
    _assert_bf16_close(gm.unpad_rows(y_pad, plan), _ragged(x, w, sizes))


def test_gmm_transposed_weights_matches_ragged_dot(case):
    """w read as [G, N, K] with the "rows" split (the "cols" split's transposed read is the
    custom VJP's dx, test_custom_vjp_matches_ragged_dot_and_per_group_sums)."""
    w_t = jnp.swapaxes(case["w"], 1, 2)  # [G, N, K]
    rows = SMALL.replace(block_m=128, wg_split="rows")
    plan = gm.pad_plan(case["sizes"], M, rows.block_m)
    y_pad = gm.gmm(gm.pad_rows(case["x"], plan), w_t, plan, transpose_w=True, config=rows,
                   interpret=True)
    _assert_bf16_close(gm.unpad_rows(y_pad, plan), _ragged(case["x"], case["w"], case["sizes"]))


def test_check_catches_a_wrong_group_a_shifted_row_a_missing_k_block_and_truncation(case,
                                                                                   vjp_out):
    plan = case["plan"]
    want = np.asarray(_ragged(case["x"], case["w"], case["sizes"]))
    y = np.asarray(gm.unpad_rows(vjp_out[0], plan), np.float32)
    _assert_bf16_close(y, want)
    # The kernel fed a plan whose tiles point at the wrong experts.
    wrong = plan._replace(tile_group=jnp.where(plan.tile_group >= 0,
                                               (plan.tile_group + 1) % G, -1))
    y_wrong = gm.unpad_rows(gm.gmm(case["x_pad"], case["w"], wrong, config=SMALL,
                                   interpret=True), plan)
    with pytest.raises(AssertionError):
        _assert_bf16_close(y_wrong, want)
    # Off by one row: group 2's rows (120..249) each written from the row before, or only its
    # last row from its neighbour.
    shifted, last = y.copy(), y.copy()
    shifted[120:250] = y[119:249]
    last[249] = y[248]
    for bad in (shifted, last):
        with pytest.raises(AssertionError):
            _assert_bf16_close(bad, want)
    # A product that skips one of the four K blocks.
    w_drop = case["w"].at[:, 64:128, :].set(0)
    with pytest.raises(AssertionError):
        _assert_bf16_close(_ragged(case["x"], w_drop, case["sizes"]), want)
    # fp32 sums truncated to bf16 instead of rounded (an error of up to 2^-7): the former bound,
    # 2% of max |want| for every element, passed it.
    truncated = (want.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    assert np.abs(truncated - want).max() < 2e-2 * np.abs(want).max()
    with pytest.raises(AssertionError):
        _assert_bf16_close(truncated, want)


def test_tgmm_matches_per_group_sum_and_empty_group_is_exact_zero(case):
    # fp32 out: interpret mode sums the exact bf16 products in fp32, in another order than the
    # references (measured: 1.1e-5 at values up to 53)
    dw = testing.assert_kernel_matches_reference(
        lambda *a: gm.tgmm(*a, config=SMALL, interpret=True), gm.tgmm_reference,
        case["x_pad"], case["dy_pad"], case["plan"], G, rtol=1e-5, atol=1e-4)
    assert dw.dtype == jnp.float32 and dw.shape == (G, K, N)
    want = _per_group_dw(case["x"], case["dy"], SIZES)
    chex.assert_trees_all_close(dw, want, rtol=1e-5, atol=1e-4)
    assert SIZES[1] == 0 and not np.asarray(dw[1]).any()


def test_custom_vjp_matches_ragged_dot_and_per_group_sums(case, vjp_out):
    """dx = dy @ w[g]^T and dw[g] = x_g^T dy_g for a bf16 cotangent, each exact but for the
    bf16 rounding of the output (x's and w's dtype)."""
    x, w, dy, sizes, plan = (case[k] for k in ("x", "w", "dy", "sizes", "plan"))
    _, dx_pad, dw = vjp_out
    dx = gm.unpad_rows(dx_pad, plan)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype and dw.shape == w.shape
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    _assert_bf16_close(dx, jax.lax.ragged_dot(f32(dy), jnp.swapaxes(f32(w), 1, 2), sizes,
                                              precision=jax.lax.Precision.HIGHEST))
    _assert_bf16_close(dw, _per_group_dw(x, dy, SIZES))
    assert not np.asarray(dw[1], np.float32).any()  # the empty expert gets no gradient


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_errors_naming_the_tensor(case):
    x_pad, w, plan = case["x_pad"], case["w"], case["plan"]
    with pytest.raises(ValueError, match=r"x_pad: dtype float32 .*bfloat16 or float16"):
        gm.gmm(x_pad.astype(jnp.float32), w, plan, config=SMALL, interpret=True)
    with pytest.raises(ValueError, match=r"w: dtype float16 must equal x_pad's dtype"):
        gm.gmm(x_pad, w.astype(jnp.float16), plan, config=SMALL, interpret=True)
    with pytest.raises(ValueError, match=r"x_pad: K \(shape\[1\]\) = 192 is not a multiple of "
                                         r"TileConfig.block_k = 128"):
        cfg = gm.TileConfig(block_m=64, block_n=128, block_k=128, tgmm_block_k=64,
                            tgmm_block_n=128)
        gm.gmm(x_pad[:, :192], w[:, :192], plan, config=cfg, interpret=True)
    with pytest.raises(ValueError, match=r"w: 3 groups \(shape\[0\]\) but len\(group_sizes\) = 4"):
        gm.gmm(x_pad, w[:3], plan, config=SMALL, interpret=True)
    with pytest.raises(ValueError, match=r"w: K = 128 .* must equal x_pad.shape\[1\] = 256"):
        gm.gmm(x_pad, w[:, :128], plan, config=SMALL, interpret=True)
    with pytest.raises(ValueError, match=r"x_pad: 256 rows \(shape\[0\]\) but plan.padded_rows"):
        gm.gmm(x_pad[:256], w, plan, config=SMALL, interpret=True)
    with pytest.raises(ValueError, match=r"plan.block_m = 64 must equal TileConfig.block_m = 128"):
        gm.gmm(x_pad, w, plan, config=gm.TileConfig(), interpret=True)
    with pytest.raises(ValueError, match=r"num_groups=5 but len\(group_sizes\) = 4"):
        gm.tgmm(x_pad, case["dy_pad"], plan, 5, config=SMALL, interpret=True)
    with pytest.raises(ValueError, match=r"dy_pad: dtype float32 is not supported"):
        gm.tgmm(x_pad, case["dy_pad"].astype(jnp.float32), plan, G, config=SMALL)
    with pytest.raises(ValueError, match=r"grouped_matmul_padded: N \(w.shape\[2\]\) = 64 must "
                                         r"be a multiple of TileConfig.block_n = 128"):
        gm.grouped_matmul_padded(x_pad, w[:, :, :64], plan, config=SMALL, interpret=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_m=96), r"TileConfig.block_m=96 must be a positive multiple of 64"),
    (dict(block_n=64), r"TileConfig.block_n=64 must be a positive multiple of 128"),
    (dict(block_k=32), r"TileConfig.block_k=32 must be a positive multiple of 64"),
    (dict(tgmm_block_rows=48), r"tgmm_block_rows=48 must divide block_m=128"),
    (dict(max_concurrent_steps=1), r"max_concurrent_steps=1 must be >= 2"),
    (dict(max_concurrent_steps=6), r"the gmm tiles need \d+ bytes of shared memory"),
    (dict(epilogue_slots=4), r"the gmm tiles need \d+ bytes of shared memory"),
    (dict(epilogue_slots=3), r"epilogue_slots=3 must be 2 or 4"),
    (dict(wg_split="diagonal"), r"wg_split='diagonal' must be 'cols' or 'rows'"),
    (dict(block_m=64, tgmm_block_rows=64, wg_split="rows"),
     r"TileConfig.block_m=64 must be a positive multiple of 128"),
])
def test_tile_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gm.TileConfig(**kwargs)


# ------------------------------------------------------------------------------------------
# GPU: MoE sizes, real kernels (DSV3_TEST_GPU=1 on the GPU machine)
# ------------------------------------------------------------------------------------------

GPU_G, GPU_M = 64, 98304


def _skewed_sizes(g, m, seed=0):
    """Zipf-like split of m rows over g groups (some groups tiny), shuffled."""
    return gm._group_sizes(m, g, True, jax.random.key(seed))


@pytest.mark.gpu
@pytest.mark.parametrize("chain,split", [(True, "cols"), (False, "cols"), (True, "rows")])
@pytest.mark.parametrize("k,n", [(1024, 512), (512, 1024)])
def test_gpu_gmm_and_transposed_match_ragged_dot(k, n, chain, split):
    cfg = gm.TileConfig(chain_tiles=chain, wg_split=split)
    sizes = _skewed_sizes(GPU_G, GPU_M)
    x, w, _, _ = _inputs(GPU_G, GPU_M, k, n, sizes=sizes, seed=1)
    plan = gm.pad_plan(sizes, GPU_M, cfg.block_m)
    x_pad = gm.pad_rows(x, plan)
    want = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
    _assert_within_max(gm.unpad_rows(gm.gmm(x_pad, w, plan, config=cfg), plan), want, 2e-2)
    y_t = gm.gmm(x_pad, jnp.swapaxes(w, 1, 2), plan, transpose_w=True, config=cfg)
    _assert_within_max(gm.unpad_rows(y_t, plan), want, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(1024, 512), (512, 1024)])
def test_gpu_tgmm_matches_reference(k, n):
    sizes = _skewed_sizes(GPU_G, GPU_M).at[3].set(0)
    sizes = sizes.at[0].add(GPU_M - sizes.sum())
    x, _, dy, _ = _inputs(GPU_G, GPU_M, k, n, sizes=sizes, seed=2)
    plan = gm.pad_plan(sizes, GPU_M, gm.TileConfig().block_m)
    x_pad, dy_pad = gm.pad_rows(x, plan), gm.pad_rows(dy, plan)
    dw = gm.tgmm(x_pad, dy_pad, plan, GPU_G)
    _assert_within_max(dw, gm.tgmm_reference(x_pad, dy_pad, plan, GPU_G), 1e-3)
    assert not np.asarray(dw[3]).any()


@pytest.mark.gpu
def test_gpu_custom_vjp_matches_ragged_dot():
    g, m, k, n = 16, 8192, 512, 1024
    sizes = _skewed_sizes(g, m, seed=3)
    x, w, dy, _ = _inputs(g, m, k, n, sizes=sizes, seed=3)
    plan = gm.pad_plan(sizes, m, gm.TileConfig().block_m)

    def loss_kernel(x, w):
        y = gm.unpad_rows(gm.grouped_matmul_padded(gm.pad_rows(x, plan), w, plan), plan)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    def loss_ref(x, w):
        return jnp.sum(_ragged(x, w, sizes) * dy.astype(jnp.float32))

    dx, dw = jax.jit(jax.grad(loss_kernel, argnums=(0, 1)))(x, w)
    dx_ref, dw_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(x.astype(jnp.float32),
                                                                 w.astype(jnp.float32))
    _assert_within_max(dx, dx_ref, 2e-2)
    _assert_within_max(dw, dw_ref, 2e-2)


# ----------------------------------------------------------------------------- the MoE's use


@pytest.mark.parametrize("sizes", [(120, 0, 97, 60), (440, 0, 357, 260)],
                         ids=["gate_up_apart", "gate_up_fused"])
def test_expert_swiglu_through_the_kernel_equals_ragged_dot(sizes):
    """dsv3_jax.grouped.grouped_swiglu with impl="pallas" (rows padded once for the three
    matmuls; interpret mode) against the ragged_dot path: values and gradients, with an empty
    expert and rows past the last group (as expert parallelism's buffers have), with fewer rows
    than E x F (gate and up as two products) and more (one product over the concatenation). Both paths
    round their bf16 intermediates (gate, up, h) separately, so an intermediate one bf16 step
    apart moves an output by a fraction of 2^-8 of its row's scale: each check allows the
    output rounding elementwise plus that, as a fraction of the largest value (measured:
    5.6e-4 for y, <= 5.2e-4 for the weight gradients, 2.7e-3 for the rows' gradient)."""
    from dsv3_jax import grouped

    e, d, f = 4, 256, 256  # D and F: the default tiles' block_n
    n_in = sum(sizes)
    m = n_in + 23
    ks = jax.random.split(jax.random.key(3), 5)
    bf = jnp.bfloat16
    p = {"w_gate": jax.random.normal(ks[0], (e, d, f), bf) * 0.06,
         "w_up": jax.random.normal(ks[1], (e, d, f), bf) * 0.06,
         "w_down": jax.random.normal(ks[2], (e, f, d), bf) * 0.06}
    rows = jax.random.normal(ks[3], (m, d), bf)
    assert (m >= e * f) == (sizes[0] == 440)  # the two paths of grouped_swiglu
    sizes = jnp.array(sizes, jnp.int32)  # 23 rows past the groups

    def loss(p, rows, impl):
        y = grouped.grouped_swiglu(p, rows, sizes, impl=impl, interpret=True)
        return (y.astype(jnp.float32) * jnp.cos(jnp.arange(d) / 7.0)).sum(), y

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y_ref), g_ref = grad(p, rows, "ragged_dot")
    (_, y_got), g_got = grad(p, rows, "pallas")
    # rows in no group are zeros, as ragged_dot gives
    chex.assert_trees_all_equal(np.asarray(y_got[n_in:], np.float32),
                                np.zeros((23, d), np.float32))
    _assert_bf16_close(y_got, y_ref, atol=1e-3)
    for name in p:
        _assert_bf16_close(g_got[0][name], g_ref[0][name], atol=1e-3)
    _assert_bf16_close(g_got[1], g_ref[1], atol=4e-3)
    assert np.abs(np.asarray(g_got[0]["w_gate"][1], np.float32)).max() == 0.0  # the empty expert

"""The Pallas Mosaic GPU grouped matmul (pallas_kernels/grouped_matmul.py) against references.

On CPU the kernels run in GPU interpret mode (`interpret=True`): the same kernel bodies, TMA and
wgmma simulated in fp32, so these tests check indexing, group assignment, pipelining and the
epilogue. The `gpu` tests repeat the checks at MoE sizes on the GPU (DSV3_TEST_GPU=1).

References are independent of the padded layout where possible: `jax.lax.ragged_dot` on the
unpadded rows for the forward and data gradient, a one-hot per-group sum for the weight gradient.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul as gm

# Small tiles so the interpret-mode runs stay a few seconds: 64-row tiles, 128-wide CTA tiles
# (two 64-wide warpgroup halves), 4 K steps of 64 at K = 256.
SMALL = gm.TileConfig(block_m=64, block_n=128, block_k=64, tgmm_block_k=64, tgmm_block_n=128,
                      tgmm_block_rows=32)
G, M, K, N = 4, 300, 256, 256
# Group 1 is empty, group 3 is not a multiple of block_m, and 300 is not a multiple of 64.
SIZES = (120, 0, 130, 50)
# Max-abs error relative to the reference's max-abs value. bf16 output rounding is 2^-9 relative;
# a wrong group or a dropped K block (1/4 of the sum at K = 256) moves results by tens of percent.
REL_TOL = 2e-2


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _assert_close(got, want, rel=REL_TOL):
    err = _rel_err(got, want)
    assert err <= rel, f"max |got - want| / max |want| = {err:.3e} > {rel}"


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
    np.testing.assert_array_equal(plan.positions, positions)
    np.testing.assert_array_equal(plan.tile_group, tile_group)
    np.testing.assert_array_equal(plan.group_tile_start, starts)
    np.testing.assert_array_equal(plan.group_tile_count, counts)
    assert int(plan.num_tiles) == used
    assert plan.padded_rows == rows and plan.block_m == block_m
    assert plan.tile_group.shape[0] * block_m == plan.padded_rows
    # sources inverts positions: each padded row names its sorted row, or m for padding
    sources = np.full(rows, m)
    inside = positions < rows
    sources[positions[inside]] = np.arange(m)[inside]
    np.testing.assert_array_equal(plan.sources, sources)


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

    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(scatter_form)(x), rtol=1e-6)
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(ours))(x))
    assert "scatter" in str(jax.make_jaxpr(jax.grad(scatter_form))(x))  # the check can fail


def test_pad_plan_random_sizes_fit_the_static_bound():
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = int(rng.integers(1, 12))
        cuts = np.sort(rng.integers(0, 500, g - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [500]]))
        plan = gm.pad_plan(jnp.asarray(sizes, jnp.int32), 500, 64)
        positions, tile_group, *_ = _plan_by_loop(tuple(sizes), 500, 64)
        np.testing.assert_array_equal(plan.positions, positions)
        np.testing.assert_array_equal(plan.tile_group, tile_group)
        assert int(plan.num_tiles) <= plan.tile_group.shape[0]


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
    np.testing.assert_array_equal(gm.unpad_rows(x_pad, plan), x)
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


def test_gmm_matches_ragged_dot(case):
    plan = case["plan"]
    y_pad = gm.gmm(case["x_pad"], case["w"], plan, config=SMALL, interpret=True)
    assert y_pad.dtype == jnp.bfloat16 and y_pad.shape == (plan.padded_rows, N)
    _assert_close(gm.unpad_rows(y_pad, plan), _ragged(case["x"], case["w"], case["sizes"]))
    # Padding rows and the tiles past the last group come out as exact zeros.
    used = np.zeros(plan.padded_rows, bool)
    used[np.asarray(plan.positions)] = True
    assert not np.asarray(y_pad, np.float32)[~used].any()


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
    _assert_close(gm.unpad_rows(y_pad, plan), _ragged(x, w, sizes))


def test_gmm_transposed_weights_matches_ragged_dot(case):
    w_t = jnp.swapaxes(case["w"], 1, 2)  # [G, N, K]
    y_pad = gm.gmm(case["x_pad"], w_t, case["plan"], transpose_w=True, config=SMALL,
                   interpret=True)
    _assert_close(gm.unpad_rows(y_pad, case["plan"]),
                  _ragged(case["x"], case["w"], case["sizes"]))
    rows = SMALL.replace(block_m=128, wg_split="rows")
    plan = gm.pad_plan(case["sizes"], M, rows.block_m)
    y_pad = gm.gmm(gm.pad_rows(case["x"], plan), w_t, plan, transpose_w=True, config=rows,
                   interpret=True)
    _assert_close(gm.unpad_rows(y_pad, plan), _ragged(case["x"], case["w"], case["sizes"]))


def test_tolerance_catches_a_wrong_group_and_a_missing_k_block(case):
    plan = case["plan"]
    want = _ragged(case["x"], case["w"], case["sizes"])
    # The kernel fed a plan whose tiles point at the wrong experts must fail the check.
    wrong = plan._replace(tile_group=jnp.where(plan.tile_group >= 0,
                                               (plan.tile_group + 1) % G, -1))
    y_wrong = gm.unpad_rows(gm.gmm(case["x_pad"], case["w"], wrong, config=SMALL,
                                   interpret=True), plan)
    assert _rel_err(y_wrong, want) > 10 * REL_TOL
    # So must a product that skips one of the four K blocks.
    w_drop = case["w"].at[:, 64:128, :].set(0)
    assert _rel_err(_ragged(case["x"], w_drop, case["sizes"]), want) > 10 * REL_TOL


def test_tgmm_matches_per_group_sum_and_empty_group_is_exact_zero(case):
    dw = gm.tgmm(case["x_pad"], case["dy_pad"], case["plan"], G, config=SMALL, interpret=True)
    assert dw.dtype == jnp.float32 and dw.shape == (G, K, N)
    want = _per_group_dw(case["x"], case["dy"], SIZES)
    _assert_close(dw, want, rel=1e-4)  # interpret mode accumulates bf16 products exactly in fp32
    _assert_close(dw, gm.tgmm_reference(case["x_pad"], case["dy_pad"], case["plan"], G), 1e-5)
    assert SIZES[1] == 0 and not np.asarray(dw[1]).any()


def test_custom_vjp_gradients_match_ragged_dot(case):
    x, w, sizes, plan = case["x"], case["w"], case["sizes"], case["plan"]
    c = jax.random.normal(jax.random.key(7), (M, N), jnp.float32)

    def loss_kernel(x, w):
        y = gm.unpad_rows(gm.grouped_matmul_padded(gm.pad_rows(x, plan), w, plan, config=SMALL,
                                                   interpret=True), plan)
        return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * c)

    def loss_ref(x, w):
        return jnp.sum(jnp.tanh(_ragged(x, w, sizes)) * c)

    (dx, dw) = jax.grad(loss_kernel, argnums=(0, 1))(x, w)
    (dx_ref, dw_ref) = jax.grad(loss_ref, argnums=(0, 1))(x.astype(jnp.float32),
                                                            w.astype(jnp.float32))
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    _assert_close(dx, dx_ref)
    _assert_close(dw, dw_ref)
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
    _assert_close(gm.unpad_rows(gm.gmm(x_pad, w, plan, config=cfg), plan), want)
    y_t = gm.gmm(x_pad, jnp.swapaxes(w, 1, 2), plan, transpose_w=True, config=cfg)
    _assert_close(gm.unpad_rows(y_t, plan), want)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(1024, 512), (512, 1024)])
def test_gpu_tgmm_matches_reference(k, n):
    sizes = _skewed_sizes(GPU_G, GPU_M).at[3].set(0)
    sizes = sizes.at[0].add(GPU_M - sizes.sum())
    x, _, dy, _ = _inputs(GPU_G, GPU_M, k, n, sizes=sizes, seed=2)
    plan = gm.pad_plan(sizes, GPU_M, gm.TileConfig().block_m)
    x_pad, dy_pad = gm.pad_rows(x, plan), gm.pad_rows(dy, plan)
    dw = gm.tgmm(x_pad, dy_pad, plan, GPU_G)
    _assert_close(dw, gm.tgmm_reference(x_pad, dy_pad, plan, GPU_G), rel=1e-3)
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
    _assert_close(dx, dx_ref)
    _assert_close(dw, dw_ref)


# ----------------------------------------------------------------------------- the MoE's use


def test_expert_swiglu_through_the_kernel_equals_ragged_dot():
    """dsv3_jax.grouped.grouped_swiglu with impl="pallas" (rows padded once for the three
    matmuls; interpret mode) against the ragged_dot path: values and gradients, with an empty
    expert and rows past the last group (as expert parallelism's buffers have)."""
    from dsv3_jax import grouped

    e, d, f, m = 4, 256, 256, 300
    ks = jax.random.split(jax.random.key(3), 5)
    bf = jnp.bfloat16
    p = {"w_gate": jax.random.normal(ks[0], (e, d, f), bf) * 0.06,
         "w_up": jax.random.normal(ks[1], (e, d, f), bf) * 0.06,
         "w_down": jax.random.normal(ks[2], (e, f, d), bf) * 0.06}
    rows = jax.random.normal(ks[3], (m, d), bf)
    sizes = jnp.array([120, 0, 97, 60], jnp.int32)  # 277 rows in groups, 23 past them

    def loss(p, rows, impl):
        y = grouped.grouped_swiglu(p, rows, sizes, impl=impl, interpret=True)
        return (y.astype(jnp.float32) * jnp.cos(jnp.arange(d) / 7.0)).sum(), y

    (l_ref, y_ref), g_ref = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, rows, "ragged_dot")
    (l_got, y_got), g_got = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, rows, "pallas")
    y_ref, y_got = np.asarray(y_ref, np.float32), np.asarray(y_got, np.float32)
    assert np.abs(y_got[277:]).max() == 0.0  # rows in no group are zeros, as ragged_dot gives
    np.testing.assert_allclose(y_got, y_ref, atol=2e-2 * np.abs(y_ref).max())
    for got, ref in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        assert np.linalg.norm(got - ref) <= 2e-2 * np.linalg.norm(ref)
    assert np.abs(np.asarray(g_got[0]["w_gate"][1], np.float32)).max() == 0.0  # the empty expert

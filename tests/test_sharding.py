"""Meshes, rule tables, sharded numerics and expert parallelism on 8 fake CPU devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dsv3_jax
from dsv3_jax import placement
from dsv3_jax.train.loss import loss_fn
from dsv3_jax.moe import moe
from dsv3_jax.router import update_router_bias
from sharding import ep
from sharding.context import ShardingContext
from sharding.mesh import abstract_mesh, make_mesh, parse_mesh_spec
from sharding.rules import FSDP_EP, ZERO1_EP, spec_for

CFG = dsv3_jax.get_config("tiny")
# (mesh, strategy, dispatch): every strategy, both CPU-capable dispatch implementations
# Each compiles a whole sharded training step; both dispatch implementations run under each EP
# strategy, one of them in the fast suite (the other `slow`): the dispatch itself is tested
# directly (test_ep_dispatch_and_combine) and in one MoE layer (test_expert_parallel_moe_*).
SETUPS = [
    ("fsdp=8", "fsdp", "allgather"),
    ("data=2,fsdp=4", "fsdp", "allgather"),
    pytest.param("fsdp=2,expert=4", "fsdp_ep", "allgather", marks=pytest.mark.slow),
    pytest.param("fsdp=2,expert=4", "fsdp_ep", "ragged_a2a_emulated", marks=pytest.mark.slow),
    ("fsdp=2,expert=4", "fsdp_ep", "a2a"),
    ("fsdp=2,expert=2,tensor=2", "fsdp_ep_tp", "allgather"),
    pytest.param("fsdp=2,expert=2,tensor=2", "fsdp_ep_tp", "ragged_a2a_emulated",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("spec, message", [
    ("fsdp4", "malformed item 'fsdp4'"),
    ("fsdp=2,foo=2", "unknown axis 'foo'"),
    ("fsdp=2,fsdp=2", "axis 'fsdp' given twice"),
    ("fsdp=0", "has size 0"),
    ("", "non-empty"),
])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh_spec(spec)


def test_mesh_must_use_every_device():
    assert parse_mesh_spec("fsdp=4")["expert"] == 1
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        make_mesh("fsdp=4")
    assert dict(make_mesh("fsdp=2,expert=4").shape)["expert"] == 4


def test_rules_errors_and_claims():
    sizes = parse_mesh_spec("fsdp=2,expert=4")
    with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
        spec_for(("embed", "bogus"), (8, 8), FSDP_EP.params, sizes, "w")
    with pytest.raises(ValueError, match=r"w: dimension 1 \(embed, size 12\) is not divisible by "
                                         r"mesh axes \('fsdp', 'expert'\) \(8 ways\)"):
        spec_for(("layers", "embed"), (2, 12), FSDP_EP.params, sizes, "w")
    # an expert weight keeps D on fsdp once the expert axis is taken by its expert dimension
    assert spec_for(("layers", "experts", "embed", "expert_mlp"), (2, 8, 64, 32), FSDP_EP.params,
                    sizes, "w") == P(None, "expert", "fsdp", None)
    assert spec_for(("embed", "mlp"), (64, 128), FSDP_EP.params, sizes, "w") == \
        P(("fsdp", "expert"), None)
    # ZeRO-1 moments claim greedily: at V3's widths on its own mesh each leaf splits 2048 ways
    # (heads take data x expert, the width pipeline), or stays whole over what cannot divide
    v3 = parse_mesh_spec("pipeline=16,expert=64,data=2")
    assert spec_for(("heads", "v_head", "embed"), (128, 128, 7168), ZERO1_EP.optimizer, v3,
                    "w_o", greedy=True) == P(("data", "expert"), None, "pipeline")
    assert spec_for(("embed", "q_latent"), (7168, 1536), ZERO1_EP.optimizer, v3, "w_dq",
                    greedy=True) == P("expert", ("pipeline", "data"))
    assert spec_for(("embed", "qk_rope"), (7168, 64), ZERO1_EP.optimizer, v3, "w_kr",
                    greedy=True) == P(("expert", "pipeline"), None)
    with pytest.raises(ValueError, match="not divisible"):  # without greedy: an error
        spec_for(("embed", "qk_rope"), (7168, 64), ZERO1_EP.optimizer, v3, "w_kr")


def test_context_validation():
    with pytest.raises(ValueError, match=r"mesh axes \['expert'\] have size > 1 but strategy fsdp"):
        ShardingContext(abstract_mesh("fsdp=2,expert=4"), "fsdp")
    # a pipeline axis is a ZeRO axis of the parameters at rest (stages gather per step)
    ctx = ShardingContext(abstract_mesh("fsdp=4,pipeline=2"), "fsdp")
    assert ctx.pipeline == 2 and ctx.expert_axis == "fsdp"  # pipeline routes no tokens
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero'"):
        ShardingContext(abstract_mesh("fsdp=8"), "zero")
    with pytest.raises(ValueError, match="dispatch='nccl'"):
        ShardingContext(abstract_mesh("fsdp=8"), "fsdp", "nccl")


def test_non_dividing_preset_dimension_is_an_error():
    # tiny's 8 experts cannot be split 16 ways
    shard = ShardingContext(abstract_mesh("fsdp=1,expert=16"), "fsdp_ep")
    with pytest.raises(ValueError, match="experts, size 8.*16 ways"):
        placement.param_specs(CFG, shard)


@pytest.fixture(scope="module")
def reference():
    params = dsv3_jax.init_params(CFG.replace(init_std=0.1), jax.random.key(0))
    toks = np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, CFG.vocab_size))
    batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}
    (loss, metrics), grads = _step(params, batch, None)
    return params, batch, loss, metrics, grads


@jax.jit
def _bias_update(bias, load):
    return update_router_bias(bias, load, 0.01)


def _loss(params, batch, shard):
    return loss_fn(params, batch, CFG, shard=shard)


# one program per mesh (the shard is static), the single-device one shared by every setup
_step = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=2)


@pytest.mark.parametrize("mesh_spec, strategy, dispatch", SETUPS)
def test_sharded_step_equals_single_device(reference, mesh_spec, strategy, dispatch):
    """Loss and every gradient equal the single-device ones; the router-bias update uses the
    global per-expert load and leaves the bias bitwise identical on every device."""
    params, batch, ref_loss, ref_metrics, ref_grads = reference
    shard = ShardingContext(make_mesh(mesh_spec), strategy, dispatch)
    sp = placement.shard_params(params, CFG, shard)
    (loss, metrics), grads = _step(sp, placement.shard_batch(batch, shard), shard)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(jax.device_get(grads), ref_grads, rtol=1e-5, atol=2e-6)
    # parameters really are split as the plan says (nothing silently replicated)
    w = sp["weights"]["moe_layers"]["moe"]["experts"]["w_gate"]
    assert w.sharding.spec == placement.param_specs(CFG, shard)["weights"]["moe_layers"]["moe"][
        "experts"]["w_gate"]
    assert w.addressable_shards[0].data.size < w.size
    # the global load, identical to the unsharded count
    chex.assert_trees_all_equal(np.asarray(metrics["load"]), np.asarray(ref_metrics["load"]))
    new = _bias_update(sp["router_state"]["moe_layers"]["bias"], metrics["load"])
    shards = [np.asarray(s.data) for s in new.addressable_shards]
    assert len(shards) == 8 and all(s.shape == new.shape for s in shards)  # replicated
    chex.assert_trees_all_equal(*shards)  # bitwise identical on every device
    ref = _bias_update(params["router_state"]["moe_layers"]["bias"], ref_metrics["load"])
    chex.assert_trees_all_equal(shards[0], np.asarray(ref))  # = the global, unsharded update
    assert np.abs(shards[0]).max() > 0


EP_SHARD = {d: ShardingContext(make_mesh("fsdp=2,expert=4"), "fsdp_ep", d)
            for d in ("a2a", "allgather", "ragged_a2a_emulated")}


def _moe_loss(p, x, forced, shard):
    y, aux = moe(p, x, None, jnp.ones(x.shape[:2], bool), CFG, None, forced, shard)
    return (y ** 2).sum(), (y, aux["load"], aux["balance"])


# one compiled program per (forced or not, mesh): the reference (shard None) shared by all
_moe_value_and_grad = jax.jit(jax.value_and_grad(_moe_loss, (0, 1), has_aux=True),
                              static_argnums=3)


@pytest.fixture(scope="module")
def moe_inputs():
    params = dsv3_jax.init_params(CFG.replace(init_std=0.2), jax.random.key(3))
    p = jax.tree.map(lambda a: a[0], params["weights"]["moe_layers"]["moe"])
    x = jax.random.normal(jax.random.key(4), (8, 12, CFG.dim))
    return p, x


@pytest.mark.parametrize("dispatch", ["a2a", "allgather", "ragged_a2a_emulated"])
@pytest.mark.parametrize("skew", [False, True])
def test_expert_parallel_moe_equals_dense_reference(moe_inputs, dispatch, skew):
    """One MoE layer under EP against the single-device layer, forward and backward; `skew`
    sends every token to the two experts of one device (worst-case buffers, empty experts;
    `a2a` overflows its fast buffers and takes its worst-case path)."""
    p, x = moe_inputs
    forced = jnp.tile(jnp.array([4, 5]), (8, 12, 1)) if skew else None
    (_, (y_ref, load_ref, bal_ref)), g_ref = _moe_value_and_grad(p, x, forced, None)
    (_, (y, load, bal)), g = _moe_value_and_grad(p, x, forced, EP_SHARD[dispatch])
    # (the expert GEMMs' rounding on XLA:CPU depends on how many rows each call gets; the
    # round trip alone is bitwise: test_a2a_round_trip_is_exact_with_and_without_overflow)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(np.asarray(load), np.asarray(load_ref))
    chex.assert_trees_all_close(bal, bal_ref, rtol=1e-6, atol=0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):  # fp32 error relative to scale
        chex.assert_trees_all_close(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))
    if skew:
        assert int(load[4]) == int(load[5]) == 96 and int(load.sum()) == 192


# ----------------------------------------------------------------------------- ep directly
N_EXPERTS, EP_SIZE, M_LOCAL, SLOTS, DIM = 16, 8, 6, 2, 3
E_LOCAL = N_EXPERTS // EP_SIZE


def _ep_program(impl):
    """dispatch, then two combines (identity experts; expert e multiplying by e + 1), inside
    shard_map over the 8 devices as one expert axis "ep" (device d holds experts 2d, 2d + 1)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("ep",))

    def body(x, experts, weights):
        rows, sizes, plan = ep.dispatch(x, experts, n_experts=N_EXPERTS, axis="ep", impl=impl)
        # the local expert of each received row, from the group sizes (E_LOCAL past the end)
        local = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows.shape[0]), side="right")
        expert = jax.lax.axis_index("ep") * E_LOCAL + local
        identity = ep.combine(rows, weights, plan, axis="ep", impl=impl)
        scaled = ep.combine(rows * (expert + 1).astype(rows.dtype)[:, None], weights, plan,
                            axis="ep", impl=impl)
        return rows[None], sizes[None], identity, scaled

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep")),
                                 out_specs=(P("ep"), P("ep"), P("ep"), P("ep")), check_vma=False))


EP_PROGRAMS = {}


def _routing(kind):
    rng = np.random.default_rng(0)
    n = EP_SIZE * M_LOCAL
    if kind == "random":  # two distinct experts per token
        experts = np.stack([rng.permutation(N_EXPERTS)[:SLOTS] for _ in range(n)])
    else:  # every token to both experts of device 5: its buffer full, the others empty
        experts = np.tile([10, 11], (n, 1))
    return experts.astype(np.int32)


@pytest.mark.parametrize("routing", ["random", "one_device"])
@pytest.mark.parametrize("impl", ["allgather", "ragged_a2a_emulated"])
def test_ep_dispatch_and_combine(impl, routing):
    """`sharding.ep` on its own: every (token, expert) pair arrives on the device holding its
    expert, grouped by local expert in order, none dropped or duplicated; combine brings each
    expert's output back to its token and slot: with identity experts sum_a w_a x_t, with
    expert e multiplying by e + 1, sum_a w_a (e_a + 1) x_t (float64 reference)."""
    n = EP_SIZE * M_LOCAL
    rng = np.random.default_rng(1)
    # row t carries its token id in column 0: each received row says where it came from
    x = np.concatenate([np.arange(n)[:, None], rng.normal(size=(n, DIM - 1))], 1).astype(np.float32)
    experts = _routing(routing)
    weights = rng.uniform(0.1, 1.0, (n, SLOTS)).astype(np.float32)
    if impl not in EP_PROGRAMS:
        EP_PROGRAMS[impl] = _ep_program(impl)
    rows, sizes, identity, scaled = jax.device_get(EP_PROGRAMS[impl](x, experts, weights))
    assert sizes.shape == (EP_SIZE, E_LOCAL)
    for d in range(EP_SIZE):
        start = 0
        for g in range(E_LOCAL):
            e = d * E_LOCAL + g
            got = rows[d, start:start + sizes[d, g]]
            start += sizes[d, g]
            want_tokens = np.flatnonzero((experts == e).any(1))  # each pair once
            assert sorted(got[:, 0].astype(int).tolist()) == want_tokens.tolist(), (d, g)
            chex.assert_trees_all_equal(got[np.argsort(got[:, 0])], x[want_tokens])
    assert sizes.sum() == n * SLOTS  # nothing dropped
    x64, w64 = x.astype(np.float64), weights.astype(np.float64)
    chex.assert_trees_all_close(identity, x64 * w64.sum(1, keepdims=True), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(scaled, x64 * (w64 * (experts + 1)).sum(1, keepdims=True),
                                rtol=1e-6, atol=1e-5)


def _run_experts_program(impl, capacity_factor):
    """`ep.run_experts` over the 8 devices as one expert axis, expert e multiplying its rows by
    e + 1 (the expert of a row read from the group sizes, as the grouped kernels do)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("ep",))

    def ffn(rows, sizes):
        local = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows.shape[0]), side="right")
        return rows * (jax.lax.axis_index("ep") * E_LOCAL + local + 1).astype(rows.dtype)[:, None]

    def body(x, experts, weights):
        y, over = ep.run_experts(ffn, x, experts, weights, n_experts=N_EXPERTS, axis="ep",
                                 impl=impl, capacity_factor=capacity_factor)
        return y, over[None]

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep")),
                                 out_specs=(P("ep"), P("ep")), check_vma=False))


@pytest.mark.parametrize("routing", ["random", "one_device"])
def test_a2a_round_trip_is_exact_with_and_without_overflow(routing):
    """`a2a` through `run_experts`: equal bit for bit to the ragged path's round trip (the same
    pairs summed in the same order) and to a float64 reference within float32 rounding, with
    its fast buffers when the pairs fit and its worst-case path when one device would overflow
    (every device agrees which one ran); never a token lost."""
    n = EP_SIZE * M_LOCAL
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    experts = _routing(routing)
    weights = rng.uniform(0.1, 1.0, (n, SLOTS)).astype(np.float32)
    want = x.astype(np.float64) * (weights * (experts + 1)).sum(1, keepdims=True)
    # one device, the same float32 ops: each pair's row scaled, then the weighted sum over slots
    pairs = jnp.asarray(x)[:, None, :] * (jnp.asarray(experts) + 1).astype(jnp.float32)[..., None]
    one_device = np.asarray(jnp.einsum("mad,ma->md", pairs, jnp.asarray(weights)))
    ragged, over = _run_experts_program("ragged_a2a_emulated", 1.0)(x, experts, weights)
    assert not np.asarray(over).any()
    for factor in (1.0, 4.0, 8.0):  # 8.0: the fast buffers hold the worst case, no branch
        y, over = _run_experts_program("a2a", factor)(x, experts, weights)
        chex.assert_trees_all_equal(np.asarray(y), np.asarray(ragged))
        chex.assert_trees_all_equal(np.asarray(y), one_device)
        chex.assert_trees_all_close(np.asarray(y), want, rtol=1e-6, atol=1e-5)
        # capacity: ceil(f * 12 pairs / 8 peers) rounded up to 8, at most 12: 8, 8, 12. Random
        # routing sends at most 8 pairs to a peer (asserted below); all to one device, 12
        overflowed = routing == "one_device" and factor < 8.0
        assert np.asarray(over).tolist() == [overflowed] * EP_SIZE, (factor, over)
    per_peer = max(np.bincount(experts[d * M_LOCAL:(d + 1) * M_LOCAL].reshape(-1) // E_LOCAL,
                               minlength=EP_SIZE).max() for d in range(EP_SIZE))
    assert (per_peer > 8) == (routing == "one_device")  # the premise of `overflowed` above


def test_a2a_capacity_rounds_up_and_is_bounded():
    assert ep.a2a_capacity(12, 8, 1.0) == 8  # ceil(1.5) = 2 -> 8
    assert ep.a2a_capacity(4096 * 8, 64, 2.0) == 1024  # 2 x the mean of 512
    assert ep.a2a_capacity(12, 8, 8.0) == 12  # never past the worst case
    with pytest.raises(ValueError, match="capacity_factor"):
        ep.a2a_capacity(12, 8, 0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        ShardingContext(make_mesh("fsdp=2,expert=4"), "fsdp_ep", "a2a", capacity_factor=-1)


def test_ragged_dispatch_refuses_cpu(moe_inputs):
    shard = ShardingContext(make_mesh("fsdp=2,expert=4"), "fsdp_ep", "ragged_a2a")
    p, x = moe_inputs
    # XLA:CPU has no ragged all-to-all: an error from XLA, never a silent fallback
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match="UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported"):
        jax.jit(lambda p, x: moe(p, x, None, jnp.ones((8, 12), bool), CFG, None, None, shard))(p, x)


def test_single_device_decides_where_fp8_ops_run_without_shard_map():
    """fp8.matmul runs its FP8 GEMMs in a shard_map of their own only on a mesh of several
    devices (tests/test_fp8.py: test_fp8_model_on_a_mesh_equals_one_device and beside it)."""
    from sharding.context import single_device

    assert single_device(None)
    assert single_device(ShardingContext(abstract_mesh("fsdp=1"), "fsdp"))
    assert not single_device(ShardingContext(abstract_mesh("fsdp=8"), "fsdp"))


def test_plain_forward_refuses_a_pipeline_mesh():
    """A mesh with a pipeline axis runs the model through a pipeline schedule only: the plain
    forward would repeat every layer on every pipeline rank. (What it refused before, the FP8
    kernels on a mesh, now runs there, each call in its own shard_map.)"""
    from dsv3_jax import model

    shard = ShardingContext(abstract_mesh("fsdp=4,pipeline=2"), "fsdp")
    tokens = jnp.zeros((8, 16), jnp.int32)
    params = jax.eval_shape(lambda: dsv3_jax.init_params(CFG, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"pipeline=2 runs the model only through a pipeline "
                                         r"schedule"):
        jax.eval_shape(lambda p: model.forward(p, tokens, CFG, None, shard=shard), params)
    model.check_plain_mesh(ShardingContext(abstract_mesh("fsdp=8"), "fsdp"))

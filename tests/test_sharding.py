"""Meshes, rule tables, sharded numerics and expert parallelism on 8 fake CPU devices."""

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
from sharding.context import ShardingContext
from sharding.mesh import abstract_mesh, make_mesh, parse_mesh_spec
from sharding.rules import FSDP_EP, spec_for

CFG = dsv3_jax.get_config("tiny")
# (mesh, strategy, dispatch): every strategy, both CPU-capable dispatch implementations
SETUPS = [
    ("fsdp=8", "fsdp", "allgather"),
    ("data=2,fsdp=4", "fsdp", "allgather"),
    ("fsdp=2,expert=4", "fsdp_ep", "allgather"),
    ("fsdp=2,expert=4", "fsdp_ep", "ragged_a2a_emulated"),
    ("fsdp=2,expert=2,tensor=2", "fsdp_ep_tp", "allgather"),
    ("fsdp=2,expert=2,tensor=2", "fsdp_ep_tp", "ragged_a2a_emulated"),
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


def test_context_validation():
    with pytest.raises(ValueError, match=r"mesh axes \['expert'\] have size > 1 but strategy fsdp"):
        ShardingContext(abstract_mesh("fsdp=2,expert=4"), "fsdp")
    with pytest.raises(ValueError, match="pipeline parallelism is not available yet"):
        ShardingContext(abstract_mesh("fsdp=4,pipeline=2"), "fsdp")
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


def _step(params, batch, shard):
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, CFG, shard=shard), has_aux=True))
    return fn(params, batch)


@pytest.mark.parametrize("mesh_spec, strategy, dispatch", SETUPS)
def test_sharded_step_equals_single_device(reference, mesh_spec, strategy, dispatch):
    """Loss and every gradient equal the single-device ones; the router-bias update uses the
    global per-expert load and leaves the bias bitwise identical on every device."""
    params, batch, ref_loss, ref_metrics, ref_grads = reference
    shard = ShardingContext(make_mesh(mesh_spec), strategy, dispatch)
    sp = placement.shard_params(params, CFG, shard)
    (loss, metrics), grads = _step(sp, placement.shard_batch(batch, shard), shard)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # parameters really are split as the plan says (nothing silently replicated)
    w = sp["weights"]["moe_layers"]["moe"]["experts"]["w_gate"]
    assert w.sharding.spec == placement.param_specs(CFG, shard)["weights"]["moe_layers"]["moe"][
        "experts"]["w_gate"]
    assert w.addressable_shards[0].data.size < w.size
    # the global load, identical to the unsharded count
    np.testing.assert_array_equal(np.asarray(metrics["load"]), np.asarray(ref_metrics["load"]))
    new = _bias_update(sp["router_state"]["moe_layers"]["bias"], metrics["load"])
    shards = [np.asarray(s.data) for s in new.addressable_shards]
    assert len(shards) == 8 and all(s.shape == new.shape for s in shards)  # replicated
    for s in shards[1:]:
        np.testing.assert_array_equal(s, shards[0])  # bitwise identical on every device
    ref = _bias_update(params["router_state"]["moe_layers"]["bias"], ref_metrics["load"])
    np.testing.assert_array_equal(shards[0], np.asarray(ref))  # = the global, unsharded update
    assert np.abs(shards[0]).max() > 0


@pytest.mark.parametrize("dispatch", ["allgather", "ragged_a2a_emulated"])
@pytest.mark.parametrize("skew", [False, True])
def test_expert_parallel_moe_equals_dense_reference(dispatch, skew):
    """One MoE layer under EP against the single-device layer, forward and backward; `skew`
    sends every token to the two experts of one device (worst-case buffers, empty experts)."""
    params = dsv3_jax.init_params(CFG.replace(init_std=0.2), jax.random.key(3))
    p = jax.tree.map(lambda a: a[0], params["weights"]["moe_layers"]["moe"])
    x = jax.random.normal(jax.random.key(4), (8, 12, CFG.dim))
    mask = jnp.ones((8, 12), bool)
    forced = jnp.tile(jnp.array([4, 5]), (8, 12, 1)) if skew else None
    shard = ShardingContext(make_mesh("fsdp=2,expert=4"), "fsdp_ep", dispatch)

    def f(p, x, s):
        y, aux = moe(p, x, None, mask, CFG, None, forced, s)
        return (y ** 2).sum(), (y, aux["load"], aux["balance"])

    (_, (y_ref, load_ref, bal_ref)), g_ref = jax.value_and_grad(f, (0, 1), has_aux=True)(p, x, None)
    fn = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True), static_argnums=2)
    (_, (y, load, bal)), g = fn(p, x, shard)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(load), np.asarray(load_ref))
    assert float(bal) == pytest.approx(float(bal_ref), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):  # fp32 error relative to scale
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6 * np.abs(np.asarray(b)).max()
    if skew:
        assert int(load[4]) == int(load[5]) == 96 and int(load.sum()) == 192


def test_ragged_dispatch_refuses_cpu():
    shard = ShardingContext(make_mesh("fsdp=2,expert=4"), "fsdp_ep", "ragged_a2a")
    params = dsv3_jax.init_params(CFG, jax.random.key(0))
    p = jax.tree.map(lambda a: a[0], params["weights"]["moe_layers"]["moe"])
    x = jnp.ones((8, 4, CFG.dim))
    with pytest.raises(Exception, match="ragged"):
        jax.jit(lambda p, x: moe(p, x, None, jnp.ones((8, 4), bool), CFG, None, None, shard))(p, x)


def test_single_device_decides_where_fp8_projections_fuse():
    """fp8.matmul_parts concatenates weights along their outputs only where nothing is split."""
    from sharding.context import single_device

    assert single_device(None)
    assert single_device(ShardingContext(abstract_mesh("fsdp=1"), "fsdp"))
    assert not single_device(ShardingContext(abstract_mesh("fsdp=8"), "fsdp"))


def test_pallas_fp8_kernels_on_a_mesh_are_an_error_not_a_replication():
    """The dense FP8 kernels have no sharding rule: resolving a runtime for a mesh of several
    devices says so, and a runtime resolved for one device refuses to meet such a mesh,
    instead of letting XLA gather their operands onto every device."""
    from dsv3_jax import model
    from dsv3_jax.runtime import Devices, Fp8, Runtime, resolve

    hopper = Devices("gpu", hopper=True)
    with pytest.raises(ValueError, match=r"fp8_gemm resolves to 'pallas' on a mesh of 8 .*--fp8_impl xla"):
        resolve(CFG, dtype="bfloat16", fp8=True, mesh_devices=8, devices=hopper)
    on_mesh = resolve(CFG, dtype="bfloat16", fp8=True, fp8_gemm="xla", mesh_devices=8,
                      devices=hopper)
    assert on_mesh.fp8 == Fp8("xla", "xla")  # auto takes XLA's quantizers beside XLA GEMMs
    with pytest.raises(ValueError, match=r"fp8_quant resolves to 'pallas' on a mesh"):
        resolve(CFG, dtype="bfloat16", fp8=True, fp8_gemm="xla", fp8_quant="pallas",
                mesh_devices=8, devices=hopper)
    one_device = Runtime(dtype="bfloat16", fp8=Fp8("pallas", "pallas"))
    shard = ShardingContext(abstract_mesh("fsdp=8"), "fsdp")
    tokens = jnp.zeros((8, 16), jnp.int32)
    params = jax.eval_shape(lambda: dsv3_jax.init_params(CFG, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"'pallas' on a mesh of .*fsdp"):
        jax.eval_shape(lambda p: model.forward(p, tokens, CFG, one_device, shard=shard), params)
    model.check_runtime_on_mesh(one_device, ShardingContext(abstract_mesh("fsdp=1"), "fsdp"))
    model.check_runtime_on_mesh(on_mesh, shard)

"""Pipeline parallelism: the schedules' placement, the executor's exact gradients, the model's
pipelined gradient against the unpipelined one, and the training script on a pipeline mesh."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from dsv3_jax.config import Config
from dsv3_jax.params import init_params
from dsv3_jax.train import pipeline as pl
from dsv3_jax.train.loss import loss_fn
from sharding import pipeline, schedules
from sharding.context import ShardingContext
from sharding.mesh import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- placement
@pytest.mark.parametrize("schedule", schedules.SCHEDULES)
@pytest.mark.parametrize("ranks,micro", [(1, 1), (1, 4), (2, 1), (2, 4), (3, 5), (4, 8)])
def test_placement_runs_every_task_once_after_its_inputs(schedule, ranks, micro):
    tl = schedules.place(schedule, ranks, micro)
    seen = {}
    for t, tick in enumerate(tl.ticks):
        for r, lanes in enumerate(tick):
            for x in lanes:
                if x is None:
                    continue
                assert schedules.home(schedule, ranks, x.stage)[0] == r
                key = (x.kind if x.kind != "Bx" else "B", x.stage, x.micro)
                assert key not in seen, f"{x} twice"
                seen[key] = t
    stages = tl.stages
    for s in range(stages):
        for m in range(micro):
            f, b = seen[("F", s, m)], seen[("B", s, m)]
            assert b > f
            if s:
                assert f > seen[("F", s - 1, m)]
            if s < stages - 1:
                assert b > seen[("B", s + 1, m)]
            if ("W", s, m) in seen:
                assert seen[("W", s, m)] > b


@pytest.mark.parametrize("ranks,micro", [(2, 4), (4, 8), (4, 16), (8, 32)])
def test_bubbles_and_memory_against_the_published_formulas(ranks, micro):
    g = schedules.place("gpipe", ranks, micro).summary()
    assert g["bubble_fraction"] == pytest.approx(g["theory_bubble"])
    zb = schedules.place("zero_bubble", ranks, micro).summary()
    assert zb["bubble_fraction"] == pytest.approx(zb["theory_bubble"])
    one = schedules.place("1f1b", ranks, micro).summary()
    assert max(one["activations_in_flight"]) <= ranks  # 1F1B's memory bound
    assert one["bubble_fraction"] >= one["theory_bubble"] - 1e-9  # lock step costs, never gains
    dv = schedules.place("dualpipev", ranks, micro).summary()
    assert max(dv["activations_in_flight"]) <= ranks + 0.5  # PP + 1 chunks of half a share
    assert dv["bubble_fraction"] < one["bubble_fraction"]


def test_render_shows_each_rank_and_the_V():
    tl = schedules.place("dualpipev", 2, 4)
    text = schedules.render(tl)
    assert "rank 0" in text and "rank 1" in text and "F0'" in text and "W" in text
    assert "bubble" in schedules.describe(tl)


# ------------------------------------------------------------------------------- executor
def _toy(ranks, per):
    d = 6

    def stage(w, c, x, mb):
        h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w["l"])
        return (h, (h ** 2).mean() * c["k"]), {"n": jnp.ones((), jnp.int32)}

    def embed(s, mb):
        return s["emb"][mb["tok"]]

    def loss(s, y, mb):
        v = ((y @ s["head"] - mb["tgt"]) ** 2).sum() / 50.0
        return v, {"l": v}

    fns = pipeline.StageFns(embed, stage, loss, lambda mb: jnp.float32(0.5))
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    sw = {"l": jax.random.normal(ks[0], (ranks, per, 2, d, d)) * 0.5}
    sc = {"k": jnp.ones((ranks, per))}
    sh = {"emb": jax.random.normal(ks[1], (9, d)), "head": jax.random.normal(ks[2], (d, 2))}
    return fns, sw, sc, sh


@pytest.mark.parametrize("schedule", schedules.SCHEDULES)
@pytest.mark.parametrize("ranks,micro", [(1, 3), (2, 4)])
def test_executor_gradients_equal_autodiff(schedule, ranks, micro):
    tl = schedules.place(schedule, ranks, micro)
    fns, sw, sc, sh = _toy(ranks, tl.per_rank)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    micro_data = {"tok": jax.random.randint(k1, (micro, 2, 5), 0, 9),
                  "tgt": jax.random.normal(k2, (micro, 2, 5, 2))}
    mesh = None if ranks == 1 else jax.make_mesh(
        (ranks,), ("pipeline",), axis_types=(AxisType.Auto,), devices=jax.devices()[:ranks])
    g_w, g_s, loss, metrics, aux = jax.jit(
        lambda *a: pipeline.run(tl, fns, *a, mesh=mesh))(sw, sc, sh, micro_data)

    def reference(sw, sh):
        total = 0.0
        for m in range(micro):
            mb = jax.tree.map(lambda a: a[m], micro_data)
            x = fns.embed(sh, mb)
            for s in range(tl.stages):
                r, v = schedules.home(schedule, ranks, s)
                (x, side), _ = fns.stage(jax.tree.map(lambda a: a[r, v], sw),
                                         jax.tree.map(lambda a: a[r, v], sc), x, mb)
                total = total + 0.5 * side
            total = total + fns.loss(sh, x, mb)[0]
        return total

    ref_loss, (ref_w, ref_s) = jax.value_and_grad(reference, argnums=(0, 1))(sw, sh)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g_w["l"], ref_w["l"], atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(ref_s)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(aux["n"].sum()) == micro * tl.stages  # every stage ran every microbatch once


# ------------------------------------------------------------------------------- the model
def test_partition_gives_the_last_stage_fewer_layers_and_refuses_too_many_stages():
    cfg = Config.small()  # 12 layers; the head (V 32768) weighs on the last stage
    ranges = pl.partition(cfg, 4, seq_len=2048)
    assert ranges[0][0] == 0 and ranges[-1][1] == cfg.n_layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert sizes[-1] < max(sizes)
    with pytest.raises(ValueError, match="every stage needs a layer"):
        pl.partition(Config.tiny(), 5)
    # V3 on DualPipeV's 32 stages: the head and MTP make the last stage the costliest; the
    # others then share the 60 layers evenly (no stage wider than 2) rather than the first
    # ones taking 4 each, which would pad every stage's slots to 4 layers
    v3 = pl.partition(Config.v3_671b(), 32, seq_len=4096)
    assert max(hi - lo for lo, hi in v3) == 2 and v3[-1] == (60, 61)


def test_stage_layout_round_trips():
    cfg = Config.tiny()
    plan = pl.stage_plan(cfg, "1f1b", 2, 2)
    stack = jnp.arange(cfg.n_moe_layers * 3.0).reshape(cfg.n_moe_layers, 3)
    back = pl.from_stages(plan.moe, pl.to_stages(plan.moe, stack), cfg.n_moe_layers)
    np.testing.assert_array_equal(back, stack)


_MESHES = [  # (schedule, mesh, strategy, microbatches): every schedule, every other axis
    pytest.param("dualpipev", "pipeline=2", "fsdp", 4, marks=pytest.mark.slow),
    pytest.param("1f1b", "pipeline=2,fsdp=2", "fsdp", 2),
    pytest.param("zero_bubble", "pipeline=2,expert=2,tensor=2", "fsdp_ep_tp", 2,
                 marks=pytest.mark.slow),
    # V3's layout: ZeRO-1 data parallelism and expert parallelism beside the pipeline
    pytest.param("gpipe", "pipeline=2,expert=2,data=2", "zero1_ep", 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("schedule,mesh,strategy,micro", _MESHES)
def test_pipelined_gradient_equals_the_unpipelined_one(schedule, mesh, strategy, micro):
    """Loss, every gradient leaf and the expert loads as `loss_fn`'s on one device, with MTP
    and a router bias; with FSDP, expert and tensor axes beside `pipeline` (dualpipev: 4
    stages of one layer, the V's turn, B, Bx and W tasks)."""
    cfg = Config.tiny()
    params = init_params(cfg, jax.random.PRNGKey(0))
    params["router_state"] = jax.tree.map(lambda b: b + 0.01 * jnp.arange(b.shape[-1]),
                                          params["router_state"])
    tok = jax.random.randint(jax.random.PRNGKey(1), (8, 17), 0, cfg.vocab_size)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}

    def reference(w):
        return loss_fn({"weights": w, "router_state": params["router_state"]}, batch, cfg)

    (ref_loss, ref_m), ref_g = jax.jit(jax.value_and_grad(reference, has_aux=True))(
        params["weights"])
    m_ = make_mesh(mesh, jax.devices()[:int(np.prod([int(a.split("=")[1])
                                                       for a in mesh.split(",")]))])
    shard = ShardingContext(m_, strategy)
    plan = pl.stage_plan(cfg, schedule, 2, micro)
    loss, m, g = jax.jit(lambda p, b: pl.pipelined_grads(p, b, cfg, plan, shard=shard))(
        params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for key in ("main_loss", "balance_loss", "mtp_loss"):
        np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-5)
    np.testing.assert_array_equal(m["load"], ref_m["load"])
    np.testing.assert_array_equal(m["mtp_load"], ref_m["mtp_load"])
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        b = ref_g
        for k in path:
            b = b[k.key]
        scale = float(jnp.abs(b).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) <= 2e-6 * scale, jax.tree_util.keystr(path)


def test_a_stage_keeps_activations_not_weights():
    """A forward task's slot holds only what depends on the stage's input (every kept leaf
    but the routers' per-expert statistics doubles with the microbatch); the stage's weights and what is computed from weights alone
    are looked up or recomputed at the backward, never copied into a slot."""
    cfg = Config.tiny()
    params = init_params(cfg, jax.random.PRNGKey(0))
    plan = pl.stage_plan(cfg, "1f1b", 1, 2)
    rt = pl.runtime_for(cfg, None)
    stage_w, stage_c = pl._stage_inputs(cfg, plan, params, rt, None)
    fns = pipeline.StageFns(None, pl.stage_fn(cfg, rt, None), None, None)
    w, c = (jax.tree.map(lambda a: a[0, 0], t) for t in (stage_w, stage_c))

    def kept(rows):
        x = jnp.zeros((rows, 16, cfg.dim))
        mb = {"inputs": jnp.zeros((rows, 16), jnp.int32), "balance_weight": jnp.float32(1)}
        stash = pipeline._stash_of(fns, w, c, x, mb)
        assert sum(kind == "re" for kind, _ in stash.source) > 10  # the weights' slices
        return [int(np.prod(s.shape)) for s in stash.shapes]

    one, two = kept(2), kept(4)
    assert len(one) == len(two) > 0
    fixed = [a for a, b in zip(one, two) if b != 2 * a]  # per-expert statistics, [layers, E]
    assert sum(fixed) <= 2 * Config.tiny().n_routed_experts, fixed


def test_a_pipeline_mesh_refuses_the_plain_forward_and_bad_flags():
    from dsv3_jax.model import forward
    from dsv3_jax.train import pretrain
    from dsv3_jax.train.settings import parse_settings

    cfg = Config.tiny()
    shard = ShardingContext(make_mesh("pipeline=2", jax.devices()[:2]), "fsdp")
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="pipeline schedule"):
        forward(params, jnp.zeros((2, 4), jnp.int32), cfg, shard=shard)
    both = ShardingContext(make_mesh("pipeline=2,fsdp=4"), "fsdp")
    s = parse_settings(["--preset", "tiny", "--mesh", "pipeline=2,fsdp=4", "--global_batch",
                        "8", "--microbatches", "4"])
    with pytest.raises(ValueError, match="must split evenly over the 4 devices"):
        pretrain.build_pipeline(s, cfg, both)
    s = parse_settings(["--preset", "tiny", "--pipeline_schedule", "1f1b", "--microbatches",
                        "3", "--global_batch", "8"])
    with pytest.raises(ValueError, match="--microbatches 3 must divide"):
        pretrain.build_pipeline(s, cfg, None)
    s = parse_settings(["--preset", "tiny", "--mesh", "pipeline=2", "--pipeline_schedule",
                        "none"])
    with pytest.raises(ValueError, match="choose a --pipeline_schedule"):
        pretrain.build_pipeline(s, cfg, shard)


@pytest.mark.slow
def test_pretrain_script_on_a_pipeline_mesh_matches_fsdp_and_resumes_across_layouts(tmp_path):
    """The issue's check: the training script on `pipeline=2,fsdp=2` gives the per-step losses
    of `fsdp=4` (fp32, four CPU devices), with 1F1B and with DualPipeV (gpipe and zero bubble:
    the gradient tests above, on these axes too); and a checkpoint written under one layout
    resumes under another (1F1B's 2 stages -> DualPipeV's 4) and under none (`zero1_ep`: the
    moments re-split for ZeRO-1), continuing the same losses."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    common = ["--preset", "tiny", "--precision", "fp32", "--global_batch", "8", "--seq_len",
              "32", "--embedded_bytes", "200000", "--sample_tokens", "0", "--no-progress",
              "--log_every", "1000", "--no-async_checkpoint"]
    pipe = ["--mesh", "pipeline=2,fsdp=2", "--microbatches", "4", "--pipeline_schedule"]
    ck = tmp_path / "ck"
    runs = (("fsdp", 4, ["--mesh", "fsdp=4"]),  # the reference, from scratch
            ("1f1b", 2, [*pipe, "1f1b", "--checkpoint_dir", str(ck)]),
            ("dualpipev", 3, [*pipe, "dualpipev", "--checkpoint_dir", str(ck)]),  # resumes
            # resumes with no pipeline, as V3's ZeRO-1 + expert-parallel layout
            ("none", 4, ["--mesh", "data=2,expert=2", "--strategy", "zero1_ep",
                         "--checkpoint_dir", str(ck)]))
    losses = {}
    for name, steps, flags in runs:
        out = tmp_path / f"{name}.jsonl"
        p = subprocess.run([sys.executable, str(ROOT / "experiments" / "pretrain.py"), *common,
                            "--steps", str(steps), *flags, "--metrics_file", str(out)], env=env,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        losses[name] = {r["step"]: r["loss"] for r in map(json.loads,
                                                          out.read_text().splitlines())
                        if "loss" in r}
    ref = losses["fsdp"]
    assert sorted(ref) == [1, 2, 3, 4]
    assert sorted(losses["1f1b"]) == [1, 2] and sorted(losses["dualpipev"]) == [3]
    assert sorted(losses["none"]) == [4]
    for name in ("1f1b", "dualpipev", "none"):
        for step, loss in losses[name].items():
            np.testing.assert_allclose(loss, ref[step], rtol=1e-5, err_msg=f"{name} step {step}")

"""Print (and write) the sharding plan of a preset on a mesh, without allocating the model.

    python -m sharding.dump --preset v3_671b --mesh fsdp=16,expert=16 --strategy fsdp_ep
    python -m sharding.dump --preset tiny --mesh fsdp=2,expert=4 --strategy fsdp_ep --compile

The table has one row per parameter leaf: path, shape, logical axes, PartitionSpec and bytes per
device; then per-device totals for parameters, gradients, optimizer state (the V3 AdamW with
bf16 moments) and an activation estimate for the stated batch, and where the expert groups
live. The estimate traces what one layer's backward keeps under the step's remat policy,
attention kernel and precision (`layer_saved_bytes`), and with `--pipeline_schedule` counts the
executor's slots per rank, its stages' gathered weights and their gradients. Everything is computed from `jax.eval_shape` and an abstract mesh, so the 671B plan on
256 or 2048 devices prints in seconds on a laptop.

`--compile` lowers and compiles the training computation (forward, loss and gradients, as the
training step will run it) on fake CPU devices (this process sets
`--xla_force_host_platform_device_count` itself) and reports `memory_analysis()` and the
collectives in the optimized HLO per layer kind (scan bodies count once: per layer, forward and
backward together). Compiling a full-size preset on a CPU takes long; use it on tiny or small.
`--json PATH` writes all of it (`params` entries with `path`, `shape`, `logical`, `spec`,
`bytes_per_device`; `per_device_bytes` totals; `expert_placement`; `compile`).

The tool sits above both the model and `sharding/` and imports what it needs at the top;
`python -m sharding.dump` is its command (a thin entry in `sharding/`).
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import numpy as np
import jax.numpy as jnp
import optax

from dsv3_jax.config import get_config
from dsv3_jax.params import abstract_params, logical_axes_tree
from dsv3_jax.placement import batch_sharding, optimizer_specs, param_shardings, param_specs
from dsv3_jax.model import compute_weights, runtime_for
from dsv3_jax.runtime import Fp8, Runtime
from dsv3_jax.train.loss import loss_fn
from dsv3_jax.train.optim import adamw_v3
from dsv3_jax.train.pipeline import stage_fn as pipeline_stage_fn, stage_plan
from sharding import pipeline as executor, schedules
from sharding.context import ShardingContext
from sharding.mesh import abstract_mesh, make_mesh, mesh_size, parse_mesh_spec

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
LAYER_KINDS = ("dense_layers", "moe_layers", "mtp")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sharding.dump", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True, help="config preset (v3_671b, v2_236b, v2_lite_16b, "
                    "tiny, small)")
    ap.add_argument("--mesh", required=True, help="mesh spec, e.g. fsdp=16,expert=16 (axes: data, "
                    "fsdp, expert, tensor, pipeline; omitted axes are 1)")
    ap.add_argument("--strategy", default=None, help="fsdp, fsdp_ep, fsdp_ep_tp or zero1_ep (default: the "
                    "simplest one that uses every mesh axis)")
    ap.add_argument("--dispatch", default="allgather", help="expert dispatch for --compile: "
                    "a2a, allgather, ragged_a2a (GPU only) or ragged_a2a_emulated")
    ap.add_argument("--batch", type=int, default=None, help="global batch in sequences for the "
                    "activation estimate and --compile (default: one sequence per batch shard)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: 4096, or "
                    "the preset's max_seq_len if smaller)")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"),
                    help="per-layer remat policy of the step: the activation estimate and "
                         "--compile follow it (default: none)")
    ap.add_argument("--attention_impl", default="cudnn", choices=("cudnn", "xla"),
                    help="attention core the estimate assumes: cudnn (a fused kernel, what a "
                         "GPU step in 16 bits runs: no S x S matrix kept) or xla (scores and "
                         "probabilities kept, as on a CPU; --compile uses xla)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8", "fp32"),
                    help="compute precision the estimate traces (fp8: FP8 GEMM inputs, and "
                         "what they keep for the backward)")
    ap.add_argument("--pipeline_schedule", default=None, choices=schedules.SCHEDULES,
                    help="print this pipeline schedule's stages, timeline (rank x tick), "
                    "bubble and activations in flight (default with pipeline > 1: 1f1b)")
    ap.add_argument("--microbatches", type=int, default=None,
                    help="microbatches per step through the pipeline (default: 2 x pipeline)")
    ap.add_argument("--redundant_experts", type=int, default=0,
                    help="EPLB: place this many redundant expert copies over the expert axis "
                         "(sharding/eplb.py) and print each rank's load before and after")
    ap.add_argument("--expert_load", default=None,
                    help="per-expert loads for --redundant_experts: a pretrain --metrics_file "
                         "(.jsonl: its last record with expert_load [L, E]) or a .npy [L, E] or "
                         "[E] (default: synthetic Zipf loads, said as such)")
    ap.add_argument("--nodes", type=int, default=1,
                    help="nodes the expert ranks span, for --redundant_experts' hierarchical "
                         "placement (expert groups to nodes first; default 1)")
    ap.add_argument("--json", default=None, help="also write the plan as JSON to this path")
    ap.add_argument("--compile", action="store_true", help="compile forward+loss+grad on fake "
                    "CPU devices; report memory_analysis() and HLO collectives per layer kind")
    return ap.parse_args(argv)


def default_strategy(sizes: dict[str, int]) -> str:
    if sizes["tensor"] > 1:
        return "fsdp_ep_tp"
    return "fsdp_ep" if sizes["expert"] > 1 else "fsdp"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def spec_str(spec) -> str:
    return "P(" + ", ".join("None" if a is None else (a if isinstance(a, str) else
                                                     "(" + ",".join(a) + ")") for a in spec) + ")"


def bytes_per_device(shape, itemsize: int, spec, sizes: dict[str, int]) -> int:
    ways = 1
    for entry in spec:
        for axis in ((entry,) if isinstance(entry, str) else (entry or ())):
            ways *= sizes[axis]
    return math.prod(shape) * itemsize // ways


def param_rows(cfg, shard):
    shapes, names, specs = abstract_params(cfg), logical_axes_tree(cfg), param_specs(cfg, shard)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    rows = []
    for (path, s), spec in zip(flat_shapes, flat_specs):
        logical = names
        for k in path:
            logical = logical[k.key]
        rows.append({"path": jax.tree_util.keystr(path, simple=True, separator="/"),
                     "shape": list(s.shape), "dtype": str(s.dtype), "logical": list(logical),
                     "spec": spec_str(spec),
                     "bytes_per_device": bytes_per_device(s.shape, s.dtype.itemsize, spec,
                                                          shard.sizes)})
    return rows, specs


def optimizer_bytes(cfg, shard) -> int:
    """Per-device bytes of the V3 AdamW state (bf16 mu and nu), from its eval_shape, split by
    the strategy's optimizer table (the parameters' unless ZeRO-1)."""
    weights = abstract_params(cfg)["weights"]
    opt = adamw_v3(1e-4, cfg)
    state = jax.eval_shape(opt.init, weights)
    state_specs = optax.tree_map_params(opt, lambda _, spec: spec, state,
                                        optimizer_specs(cfg, shard),
                                        transform_non_params=lambda _: jax.sharding.PartitionSpec(),
                                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    leaves = jax.tree.leaves(state)
    leaf_specs = jax.tree.leaves(state_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return sum(bytes_per_device(a.shape, a.dtype.itemsize, s, shard.sizes)
               for a, s in zip(leaves, leaf_specs))


# The backward's working set beyond what the layers keep: about 1.6 x one MoE layer's saved
# residuals (its recomputed or read residuals plus their cotangents while its backward runs),
# fitted to the compiled programs' temp memory of `tiny` on CPU (tests/test_dump.py checks the
# whole estimate's growth with the batch against memory_analysis within 10%).
TRANSIENT = 1.6


def _local_cfg(cfg, tp: int):
    """The config one tensor-parallel rank computes: heads, FFN and expert widths and the
    vocabulary divided by `tp`."""
    if tp == 1:
        return cfg
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // tp, inter_dim=cfg.inter_dim // tp,
                               moe_inter_dim=cfg.moe_inter_dim // tp,
                               vocab_size=cfg.vocab_size // tp)


def layer_saved_bytes(cfg, rt, kind: str, rows: int, seq: int) -> int:
    """Bytes one layer of `kind` ("dense_layers" or "moe_layers") keeps for its backward over
    `rows` sequences of `seq` tokens: the residuals autodiff saves under `rt` (remat policy,
    FP8 GEMM inputs), traced abstractly (no compute), without the weights or anything computed
    from weights alone (the pipeline executor's own split, `sharding.pipeline.kept_shapes`).
    A fused attention kernel (`rt.attention` "cudnn") keeps no S x S matrix: its trace cannot
    run on a CPU, so XLA's is traced and its score and probability matrices are replaced by
    the kernel's softmax statistics (rows x heads x seq float32)."""
    fused = rt.attention == "cudnn"
    rt = rt.replace(attention="xla") if fused else rt
    one = jax.eval_shape(lambda w: compute_weights({kind: w[kind]}, cfg, rt),
                         abstract_params(cfg)["weights"])
    w = {kind: jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype),
                            one[kind])}
    c = {kind.split("_")[0] + "_valid": jnp.ones((1,), bool)}
    if kind == "moe_layers":
        c["bias"] = jnp.zeros((1, cfg.n_routed_experts), jnp.float32)
    x = jax.ShapeDtypeStruct((rows, seq, cfg.dim), jnp.dtype(rt.dtype))
    mb = {"inputs": jax.ShapeDtypeStruct((rows, seq), jnp.int32),
          "balance_weight": jax.ShapeDtypeStruct((), jnp.float32)}
    fns = executor.StageFns(None, pipeline_stage_fn(cfg, rt, None), None, None)
    total = 0
    for leaf in executor.kept_shapes(fns, w, c, x, mb):
        if fused and leaf.shape[-2:] == (seq, seq) and seq > 1:
            continue
        total += math.prod(leaf.shape) * leaf.dtype.itemsize
    if fused:
        total += rows * cfg.n_heads * seq * 4
    return total


def activation_model(cfg, shard, rows: int, seq: int, *, remat: str = "none",
                     attention: str = "cudnn", precision: str = "bf16") -> dict:
    """Per-device bytes of what a training step keeps for its backward, for `rows` sequences of
    `seq` tokens on this device (one microbatch under a pipeline): per dense and MoE layer
    (`layer_saved_bytes` under the remat policy), the head (float32 logits and their
    log-normaliser, which the cross entropy keeps, and its input), each MTP module (a MoE
    block outside the remat policy, its projection and head) and the backward's transient
    working set (`TRANSIENT`)."""
    tp = shard.sizes.get("tensor", 1)  # a context refuses a tensor axis its strategy ignores
    local = _local_cfg(cfg, tp)
    fp8 = Fp8() if precision == "fp8" else None
    rt = runtime_for(local, Runtime(remat=remat, attention=attention, fp8=fp8,
                                    dtype="float32" if precision == "fp32" else "bfloat16"))
    item = jnp.dtype(rt.dtype).itemsize
    dense = layer_saved_bytes(local, rt, "dense_layers", rows, seq) if cfg.n_dense_layers else 0
    moe = layer_saved_bytes(local, rt, "moe_layers", rows, seq) if cfg.n_moe_layers else 0
    moe_all = (moe if remat == "none" else
               layer_saved_bytes(local, rt.replace(remat="none"), "moe_layers", rows, seq))
    tokens = rows * seq
    head = tokens * (local.vocab_size * 4 + 4 + cfg.dim * item)
    mtp = cfg.mtp_depth * (moe_all + head + 3 * tokens * cfg.dim * item)
    return {"dense_layer": dense, "moe_layer": moe, "head": head, "mtp": mtp,
            "transient": int(TRANSIENT * moe_all), "tokens": tokens}


def activation_estimate(cfg, shard, batch: int, seq: int, **kw) -> int:
    """Per-device activation bytes of the unpipelined step over `batch` global sequences."""
    rows = max(1, batch // max(1, math.prod(shard.sizes[a] for a in shard.batch_axes)))
    m = activation_model(cfg, shard, rows, seq, **kw)
    return (cfg.n_dense_layers * m["dense_layer"] + cfg.n_moe_layers * m["moe_layer"]
            + m["head"] + m["mtp"] + m["transient"])


def expert_placement(cfg, shard) -> dict:
    """Which expert-axis ranks hold each expert group, and how many ranks a token can reach."""
    axis = shard.expert_axis
    ep = shard.sizes[axis] if axis else 1
    per_rank = cfg.n_routed_experts // ep
    groups = []
    for g in range(cfg.n_expert_groups):
        lo = g * cfg.experts_per_group
        hi = lo + cfg.experts_per_group - 1
        groups.append({"group": g, "experts": [lo, hi],
                       "ranks": list(range(lo // per_rank, hi // per_rank + 1))})
    ranks_per_group = max(len(x["ranks"]) for x in groups)
    reach = min(ep, cfg.n_activated_experts, cfg.n_limited_groups * ranks_per_group)
    return {"axis": axis, "ranks": ep, "experts_per_rank": per_rank, "groups": groups,
            "max_ranks_per_token": reach}


def hlo_collectives(text: str) -> dict:
    """Collective ops in optimized HLO text, per layer kind (by the op's named-scope path)."""
    counts: dict = {}
    # the op name follows its result type, which may be a tuple with spaces: anchor on "op("
    op_re = re.compile(r"[\s)](" + "|".join(COLLECTIVES) + r")(-start)?\(")
    kind_re = re.compile(r"\b(" + "|".join(LAYER_KINDS) + r")(_\d+)?\b")
    for line in text.splitlines():
        m = op_re.search(line)
        if not m:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        kind_m = kind_re.search(name.group(1)) if name else None
        kind = kind_m.group(1) if kind_m else "other"
        kind_counts = counts.setdefault(kind, {})
        kind_counts[m.group(1)] = kind_counts.get(m.group(1), 0) + 1
    return counts


def all_gather_results(text: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in optimized HLO text (to spot gathered activations)."""
    shapes = []
    for m in re.finditer(r"=\s*\w+\[([\d,]*)\][^=]*?[\s)]all-gather(?:-start)?\(", text):
        shapes.append(tuple(int(v) for v in m.group(1).split(",") if v))
    return shapes


def compile_report(cfg, shard, batch: int, seq: int, *, remat: str = "none",
                   precision: str = "bf16", keep_hlo: bool = False) -> dict:
    rt = Runtime(remat=remat, dtype="float32" if precision == "fp32" else "bfloat16")
    shardings = param_shardings(cfg, shard)
    params = abstract_params(cfg)
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sharding(shard))
    args = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         params, shardings), {"inputs": tok, "targets": tok})

    def grads(p, b):
        return jax.value_and_grad(lambda p: loss_fn(p, b, cfg, rt, shard=shard)[0])(p)

    t = time.perf_counter()
    compiled = jax.jit(grads, out_shardings=(None, shardings)).lower(*args).compile()
    seconds = time.perf_counter() - t
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    memory = {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}
    text = compiled.as_text()
    report = {"seconds": round(seconds, 1), "memory_analysis": memory,
              "collectives_per_layer_kind": hlo_collectives(text),
              "all_gather_shapes": sorted(set(all_gather_results(text)), key=math.prod,
                                          reverse=True)}
    if keep_hlo:
        report["hlo"] = text
    return report


def print_pipeline(pp: dict) -> None:
    print(f"\npipeline: {pp['schedule']}, {pp['microbatches']} microbatches; stages (layer "
          f"ranges, dense first): {pp['stage_layers']}")
    print(pp["timeline"])
    print(pp["about"])
    a = pp["activations"]
    print(f"activations per rank (estimate): {_fmt_bytes(a['per_rank'])} = {a['slots']} slots x "
          f"{a['stages_per_rank']} stage(s) x {_fmt_bytes(a['per_slot'])} (a microbatch of "
          f"{a['rows']} sequence(s) through the widest stage, {a['widest_stage']}) + "
          f"{_fmt_bytes(a['head_and_transient'])} (head, MTP and the backward's working set) + "
          f"{_fmt_bytes(a['stage_weights_and_grads'])} (the stages' weights in the compute dtype "
          f"and their float32 gradients); "
          f"in flight at the peak: {pp['summary']['activations_in_flight']} microbatches per rank")


def print_plan(plan: dict) -> None:
    rows = plan["params"]
    w_path = max(len(r["path"]) for r in rows)
    w_shape = max(len(str(tuple(r["shape"]))) for r in rows)
    w_log = max(len(" ".join(r["logical"])) for r in rows)
    w_spec = max(len(r["spec"]) for r in rows)
    print(f"preset {plan['preset']}  mesh {plan['mesh']}  strategy {plan['strategy']}  "
          f"({plan['devices']} devices)")
    print(f"{'path':<{w_path}}  {'shape':<{w_shape}}  {'logical axes':<{w_log}}  "
          f"{'PartitionSpec':<{w_spec}}  bytes/device")
    for r in rows:
        print(f"{r['path']:<{w_path}}  {str(tuple(r['shape'])):<{w_shape}}  "
              f"{' '.join(r['logical']):<{w_log}}  {r['spec']:<{w_spec}}  "
              f"{_fmt_bytes(r['bytes_per_device'])}")
    t = plan["per_device_bytes"]
    how = (f"remat {plan['remat']}, {plan['attention_impl']} attention, {plan['precision']}")
    what = (f"pipelined: {plan['pipeline']['schedule']} x {plan['pipeline']['microbatches']} "
            "microbatches" if "pipeline" in plan else "no pipeline")
    print(f"\nper device: parameters {_fmt_bytes(t['params'])}, gradients {_fmt_bytes(t['grads'])}, "
          f"optimizer state {_fmt_bytes(t['optimizer'])}, activations (estimate, batch "
          f"{plan['batch']} x {plan['seq']}, {how}, {what}) "
          f"{_fmt_bytes(t['activations_estimate'])}; total {_fmt_bytes(sum(t.values()))}")
    e = plan["expert_placement"]
    spans = "; ".join(f"g{g['group']}: experts {g['experts'][0]}-{g['experts'][1]} on ranks "
                      f"{g['ranks'][0]}-{g['ranks'][-1]}" for g in e["groups"])
    print(f"experts over {e['axis'] or 'no axis'} ({e['ranks']} ranks, {e['experts_per_rank']} "
          f"each): {spans}; a token reaches at most {e['max_ranks_per_token']} ranks")
    if "redundant_experts" in plan:
        r = plan["redundant_experts"]
        b, a = np.asarray(r["before_max_over_mean"]), np.asarray(r["after_max_over_mean"])
        print(f"\nredundant experts: {r['slots']} slots ({r['slots_per_rank']} per rank over "
              f"{r['ranks']} ranks, {r['nodes']} node(s)), from {r['source']}")
        print(f"  busiest rank / mean over {len(b)} layers: before mean {b.mean():.2f} max "
              f"{b.max():.2f}; after mean {a.mean():.2f} max {a.max():.2f}")
        for i in range(min(len(b), 4)):
            print(f"  layer {i}: {b[i]:.2f} -> {a[i]:.2f}")
    if "compile" in plan:
        c = plan["compile"]
        print(f"\ncompiled in {c['seconds']} s; memory_analysis: " +
              ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in c["memory_analysis"].items()))
        for kind, ops in sorted(c["collectives_per_layer_kind"].items()):
            print(f"  {kind}: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))


def build_plan(args) -> dict:
    sizes = parse_mesh_spec(args.mesh)
    strategy = args.strategy or default_strategy(sizes)
    cfg = get_config(args.preset)
    mesh = make_mesh(sizes) if args.compile else abstract_mesh(sizes)
    shard = ShardingContext(mesh, strategy, args.dispatch)
    seq = args.seq or min(4096, cfg.max_seq_len)
    batch = args.batch or max(1, math.prod(shard.sizes[a] for a in shard.batch_axes))
    rows, specs = param_rows(cfg, shard)
    params = sum(r["bytes_per_device"] for r in rows if r["path"].startswith("weights"))
    state = sum(r["bytes_per_device"] for r in rows if r["path"].startswith("router_state"))
    how = {"remat": args.remat, "attention": args.attention_impl, "precision": args.precision}
    plan = {"preset": cfg.name, "mesh": args.mesh, "strategy": strategy,
            "devices": math.prod(sizes.values()), "batch": batch, "seq": seq, "remat": args.remat,
            "attention_impl": args.attention_impl, "precision": args.precision, "params": rows,
            "per_device_bytes": {"params": params + state, "grads": params,
                                 "optimizer": optimizer_bytes(cfg, shard)},
            "expert_placement": expert_placement(cfg, shard)}
    if args.pipeline_schedule or shard.pipeline > 1:
        plan["pipeline"] = pipeline_plan(cfg, shard, args, batch, seq, how, rows)
        acts = plan["pipeline"]["activations"]["per_rank"]
    else:
        acts = activation_estimate(cfg, shard, batch, seq, **how)
    plan["per_device_bytes"]["activations_estimate"] = acts
    if args.compile:
        plan["compile"] = compile_report(cfg, shard, batch, seq, remat=args.remat,
                                         precision=args.precision)
    if getattr(args, "redundant_experts", 0):
        plan["redundant_experts"] = redundancy_plan(cfg, shard, args.redundant_experts,
                                                    args.expert_load, args.nodes)
    return plan


def _loads(cfg, path: str | None) -> tuple[np.ndarray, str]:
    """([L, E] per-expert loads, where they came from)."""
    layers = max(cfg.n_layers - cfg.n_dense_layers, 1)
    if path is None:  # a hot few, as trained routers show before the bias settles them
        rng = np.random.default_rng(0)
        zipf = 1.0 / np.arange(1, cfg.n_routed_experts + 1) ** 1.2
        return (np.stack([rng.permutation(zipf) for _ in range(layers)]),
                "synthetic Zipf(1.2) loads (no --expert_load given)")
    if path.endswith(".npy"):
        load = np.load(path)
    else:
        recs = [json.loads(line) for line in open(path) if '"expert_load"' in line]
        if not recs:
            raise ValueError(f"--expert_load {path}: no record with expert_load (pretrain writes "
                             "it on logged steps)")
        load = np.asarray(recs[-1]["expert_load"], float)
    load = np.atleast_2d(load)
    if load.shape[-1] != cfg.n_routed_experts:
        raise ValueError(f"--expert_load {path}: {load.shape[-1]} experts, the preset has "
                         f"{cfg.n_routed_experts}")
    return load, path


def redundancy_plan(cfg, shard, redundant: int, load_path: str | None, nodes: int) -> dict:
    """EPLB over the expert axis: per-rank load max/mean before (contiguous experts) and after
    placing `redundant` copies (`sharding.eplb.plan`)."""
    from sharding import eplb

    ranks = shard.sizes.get(shard.expert_axis, 1) if shard.expert_axis else 1
    load, source = _loads(cfg, load_path)
    slots = cfg.n_routed_experts + redundant
    placed = eplb.plan(load, slots, cfg.n_expert_groups, nodes, ranks)
    before = eplb.imbalance(eplb.rank_load_plain(load, ranks))
    after = eplb.imbalance(placed.rank_load)
    return {"source": source, "ranks": ranks, "nodes": nodes, "slots": slots,
            "slots_per_rank": slots // ranks, "before_max_over_mean": before.tolist(),
            "after_max_over_mean": after.tolist(),
            "copies_max": int(placed.copies.max())}


def stage_weight_bytes(rows, shard, width_d: int, width_m: int, per_rank: int,
                       item: int) -> int:
    """What the executor holds per rank besides activations: its stages' layers gathered
    from the ZeRO split in the compute dtype (`item` bytes; split over fsdp and expert as the
    parameters are, whole under a tensor axis) and their float32 gradient accumulator, each
    stage padded to the widest (`width_d` dense, `width_m` MoE layers)."""
    total = 0.0
    for r in rows:
        parts = r["path"].split("/")
        if parts[0] != "weights" or parts[1] not in ("dense_layers", "moe_layers"):
            continue
        width = width_d if parts[1] == "dense_layers" else width_m
        if shard.sizes.get("tensor", 1) > 1:
            per_layer = math.prod(r["shape"][1:]) * 4
        else:
            unsplit = shard.sizes["pipeline"] if "pipeline" in r["spec"] else 1
            per_layer = r["bytes_per_device"] * unsplit / r["shape"][0]
        total += per_rank * width * per_layer / 4 * (item + 4)  # rows count float32 masters
    return int(total)


def pipeline_plan(cfg, shard, args, batch: int, seq: int, how: dict,
                  rows_of_params: list) -> dict:
    """The schedule's stages, timeline, bubble and activations. The executor gives every rank
    the same buffers (one SPMD program): `slots` per stage it holds, each one microbatch's
    residuals through the widest stage (stages are padded to it), plus the input and gradient
    activations of each slot, the head and MTP (run at once by the last stage's forward task,
    not kept) and the backward's working set."""
    ranks = shard.pipeline
    name = args.pipeline_schedule or "1f1b"
    micro = args.microbatches or 2 * ranks
    if batch % micro:
        raise ValueError(f"--microbatches {micro} must divide --batch {batch}")
    stages = stage_plan(cfg, name, ranks, micro, seq)
    tl = stages.timeline
    n_batch = max(1, math.prod(shard.sizes[a] for a in shard.batch_axes))
    if (batch // micro) % n_batch:
        raise ValueError(f"a microbatch ({batch // micro} sequences) must split over the "
                         f"{n_batch} devices of the batch axes: change --batch or --microbatches")
    rows = batch // micro // n_batch
    m = activation_model(cfg, shard, rows, seq, **how)
    width_d, width_m = stages.dense.shape[-1], stages.moe.shape[-1]
    item = 4 if how["precision"] == "fp32" else 2
    per_slot = (width_d * m["dense_layer"] + width_m * m["moe_layer"]
                + 2 * m["tokens"] * cfg.dim * item)
    rest = m["head"] + m["mtp"] + m["transient"]
    weights = stage_weight_bytes(rows_of_params, shard, width_d, width_m, tl.per_rank, item)
    acts = {"per_rank": tl.per_rank * tl.n_slots * per_slot + rest + weights,
            "stage_weights_and_grads": weights, "slots": tl.n_slots,
            "stages_per_rank": tl.per_rank, "per_slot": per_slot, "rows": rows,
            "widest_stage": f"{width_d} dense + {width_m} MoE layers",
            "head_and_transient": rest, "model": m}
    return {"schedule": name, "microbatches": micro, "stage_layers": list(stages.ranges),
            "timeline": schedules.render(tl), "about": schedules.describe(tl),
            "summary": tl.summary(), "activations": acts}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compile:  # fake CPU devices, before jax initialises its backend
        n = mesh_size(parse_mesh_spec(args.mesh))
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        if "JAX_PLATFORMS" not in os.environ:  # read at import: set the config itself
            jax.config.update("jax_platforms", "cpu")
    plan = build_plan(args)
    print_plan(plan)
    if "pipeline" in plan:
        print_pipeline(plan["pipeline"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(plan, fh, indent=1)
    return plan


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

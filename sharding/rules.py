"""Named sharding strategies: small tables from logical axis names to mesh axes.

Each strategy has one table for parameters and one for activations (levanter's split of
parameter and compute mappings). A table is an ordered tuple of (logical name, mesh axes); the
order is the priority with which a tensor's dimensions claim mesh axes:

  * a mesh axis shards at most one dimension of a tensor; dimensions claim in table order and
    take those of their mesh axes that are still free (so an expert weight [E, D, f] under
    fsdp_ep is [E_expert, D_fsdp, f], while a dense weight [D, F] is [D_(fsdp,expert), F]);
  * a logical name with no rule, or a dimension whose size the product of its mesh axes does not
    divide, is an error naming the tensor, never a silent replication;
  * size-1 mesh axes are dropped from specs (they shard nothing).

With pipeline parallelism (`pipeline` > 1) the parameters at rest are also split over the
pipeline axis wherever they are split over fsdp (ZeRO over the stages too: `pipeline` is the
last claimant of a dimension, so it changes nothing at size 1); each step gathers a stage's
layers to its rank (`dsv3_jax.train.pipeline`).

A strategy may give its optimizer state a table of its own (`optimizer`; by default the
moments are split like the parameters): `zero1_ep` keeps the dense weights whole on every rank
of a stage (no per-layer gathers; gradients all-reduced) and splits only the moments and the
update over the data-parallel ranks, ZeRO stage 1 as DeepSeek-V3 trained ([PAPER] §3.2.1:
16-way pipeline, 64-way expert parallelism, ZeRO-1 data parallelism).

Leaves the caller marks as replicated (`tree_specs(..., replicated=...)`) get P() in every
strategy, and the plan shows them: the model marks its RMSNorm gains (a few KiB per layer;
splitting them would force their widths to divide every mesh axis) and the router's
correction bias (every device routes with the whole bias, and it must stay bitwise identical
everywhere) in its parameter declarations.
"""

import dataclasses
import math

import jax
from jax.sharding import PartitionSpec as P

Table = tuple[tuple[str, tuple[str, ...]], ...]


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    params: Table
    activations: Table
    optimizer: Table | None = None  # the optimizer moments' table; None: as `params`

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return dict(self.activations)["batch"]

    @property
    def expert_axes(self) -> tuple[str, ...]:
        """Mesh axes the routed experts are split over (expert parallelism when 'expert'); the
        pipeline axis only stores them (ZeRO), it routes no tokens."""
        return tuple(a for a in dict(self.params)["experts"] if a != "pipeline")


# Dimensions that are never split (per-head widths, top-k, layer stacks until pipelining).
_NEVER = (("layers", ()), ("qk_nope", ()), ("qk_rope", ()), ("v_head", ()), ("topk", ()),
          ("expert_groups", ()), ("seq", ()), ("kv_seq", ()), ("tokens", ()))

# ZeRO axes of the parameter tables: fsdp (with expert where experts do not claim it, and tensor
# for the latents under TP), then pipeline (see the module docstring)
_Z = ("fsdp", "pipeline")
_ZE = ("fsdp", "expert", "pipeline")
_ZET = ("fsdp", "expert", "tensor", "pipeline")

FSDP = Strategy(
    name="fsdp",
    description="pure FSDP (ZeRO-3): every parameter split over fsdp, gathered per layer; "
                "batch over data x fsdp; experts computed locally after the gather",
    params=(("experts", _Z), ("embed", _Z), ("q_latent", _Z), ("kv_latent", _Z), ("mlp", _Z),
            ("expert_mlp", _Z), ("mtp_in", _Z), ("vocab", _Z), ("heads", ())) + _NEVER,
    activations=(("batch", ("data", "fsdp")), ("embed", ()), ("heads", ()), ("mlp", ()),
                 ("expert_mlp", ()), ("vocab", ()), ("experts", ()), ("q_latent", ()),
                 ("kv_latent", ()), ("mtp_in", ())) + _NEVER,
)

FSDP_EP = Strategy(
    name="fsdp_ep",
    description="FSDP + expert parallelism: routed experts split over expert (dropless "
                "dispatch/combine), their D over fsdp; other parameters over fsdp x expert; "
                "batch over data x fsdp x expert",
    params=(("experts", ("expert",)), ("embed", _ZE), ("q_latent", _ZE), ("kv_latent", _ZE),
            ("mlp", _ZE), ("expert_mlp", _Z), ("mtp_in", _ZE), ("vocab", _ZE),
            ("heads", ())) + _NEVER,
    activations=(("batch", ("data", "fsdp", "expert")), ("embed", ()), ("heads", ()),
                 ("mlp", ()), ("expert_mlp", ()), ("vocab", ()), ("experts", ()),
                 ("q_latent", ()), ("kv_latent", ()), ("mtp_in", ())) + _NEVER,
)

FSDP_EP_TP = Strategy(
    name="fsdp_ep_tp",
    description="FSDP + EP + tensor parallelism: attention heads, FFN and expert widths and the "
                "vocabulary split over tensor; experts over expert; the rest over fsdp x expert",
    # the latents also take the tensor axis where the model width has claimed fsdp x expert, so
    # the down-projections [D, Q|C] are not replicated over tensor ranks
    params=(("experts", ("expert",)), ("heads", ("tensor",)), ("mlp", ("tensor",)),
            ("expert_mlp", ("tensor",)), ("vocab", ("tensor",)), ("embed", _ZE),
            ("q_latent", _ZET), ("kv_latent", _ZET), ("mtp_in", _ZET)) + _NEVER,
    activations=(("batch", ("data", "fsdp", "expert")), ("heads", ("tensor",)),
                 ("mlp", ("tensor",)), ("expert_mlp", ("tensor",)), ("vocab", ("tensor",)),
                 ("embed", ()), ("experts", ()), ("q_latent", ()), ("kv_latent", ()),
                 ("mtp_in", ())) + _NEVER,
)

# V3's own layout: the dense weights at rest are split only over the pipeline axis (the executor
# gathers a stage's layers; without pipelining they are whole), so data and expert ranks compute
# with whole dense weights and all-reduce their gradients; the moments and the update are split
# over data x expert x pipeline, claimed greedily (`spec_for(greedy=True)`): the orders below
# split every large V3 leaf 2048 ways at data=2, expert=64, pipeline=16 (7168 = 7 x 1024,
# 1536 = 3 x 512, 128 heads); a [D, 64] leaf (w_kr) stays whole over data there (a few MiB).
_ZERO1_PARAM = ("embed", "q_latent", "kv_latent", "mlp", "expert_mlp", "mtp_in", "vocab")
_DEP = ("data", "expert", "pipeline")
ZERO1_EP = Strategy(
    name="zero1_ep",
    description="ZeRO-1 + expert parallelism (V3's training layout): routed experts split over "
                "expert; dense weights whole per stage (split over pipeline at rest), gradients "
                "all-reduced; optimizer moments and the update split over data x expert x "
                "pipeline; batch over data x expert",
    params=((("experts", ("expert",)),) + tuple((n, ("pipeline",)) for n in _ZERO1_PARAM)
            + (("heads", ()),) + _NEVER),
    activations=(("batch", ("data", "expert")), ("embed", ()), ("heads", ()), ("mlp", ()),
                 ("expert_mlp", ()), ("vocab", ()), ("experts", ()), ("q_latent", ()),
                 ("kv_latent", ()), ("mtp_in", ())) + _NEVER,
    optimizer=(("experts", ("expert",)), ("heads", _DEP),
               ("q_latent", ("pipeline", "data", "expert")),
               ("kv_latent", ("pipeline", "data", "expert")), ("mlp", _DEP), ("expert_mlp", _DEP),
               ("mtp_in", _DEP), ("vocab", _DEP), ("embed", ("expert", "pipeline", "data")))
    + _NEVER,
)

STRATEGIES = {s.name: s for s in (FSDP, FSDP_EP, FSDP_EP_TP, ZERO1_EP)}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def spec_for(names: tuple[str | None, ...], shape: tuple[int, ...], table: Table,
             sizes: dict[str, int], what: str, greedy: bool = False) -> P:
    """PartitionSpec for a tensor with logical `names` per dimension (None: never split).

    `greedy` (optimizer tables only): a dimension takes those of its free axes that keep
    dividing its size, in the rule's order, instead of all or an error; a moment left whole
    over an axis costs memory, not correctness, and the plan's optimizer bytes count it."""
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical names {names} for shape {shape}")
    rules = dict(table)
    priority = {name: i for i, (name, _) in enumerate(table)}
    for n in names:
        if n is not None and n not in rules:
            raise ValueError(f"{what}: logical axis {n!r} has no rule in this strategy "
                             f"(rules: {sorted(rules)})")
    claimed: set[str] = set()
    out: list = [None] * len(names)
    order = sorted((i for i, n in enumerate(names) if n is not None), key=lambda i: priority[names[i]])
    for i in order:
        axes = tuple(a for a in rules[names[i]] if a not in claimed and sizes.get(a, 1) > 1)
        if greedy:
            axes = _dividing(axes, shape[i], sizes)
        ways = math.prod(sizes[a] for a in axes)
        if shape[i] % ways:
            raise ValueError(f"{what}: dimension {i} ({names[i]}, size {shape[i]}) is not "
                             f"divisible by mesh axes {axes} ({ways} ways); choose a mesh whose "
                             "axes divide it, or another strategy")
        claimed.update(axes)
        out[i] = axes[0] if len(axes) == 1 else (axes or None)
    return P(*out)


def _dividing(axes: tuple[str, ...], size: int, sizes: dict[str, int]) -> tuple[str, ...]:
    taken, ways = [], 1
    for a in axes:
        if size % (ways * sizes[a]) == 0:
            taken.append(a)
            ways *= sizes[a]
    return tuple(taken)


def tree_specs(shapes, names, table: Table, sizes: dict[str, int], replicated=None,
               greedy: bool = False):
    """PartitionSpec tree for a tree of shapes (anything with `.shape`), a matching tree of
    logical-name tuples and, optionally, a matching tree of bools: leaves marked True there are
    replicated (P()), whole on every device; the caller says which (the model's parameter
    declarations do, `Decl.replicated`), so this table-driven rule knows no leaf by name."""

    def one(path, leaf):
        if replicated is not None and _get(replicated, path):
            return P()
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        return spec_for(_get(names, path), tuple(leaf.shape), table, sizes, where, greedy)

    return jax.tree_util.tree_map_with_path(one, shapes)


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree

"""What a sharded program needs to know: the mesh, the strategy, the expert dispatch.

A `ShardingContext` is a frozen, hashable value passed explicitly to the model functions (and
used as a static jit argument), so a program traced for one mesh is never reused for another.
`constrain` turns logical activation names into a `with_sharding_constraint`; with no context
(one device) it does nothing because there is nothing to shard.
"""

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.ep import DISPATCH_IMPLS
from sharding.rules import Strategy, get_strategy, spec_for, tree_specs


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh  # or an AbstractMesh for plans
    strategy: Strategy
    dispatch: str = "allgather"  # expert-parallel dispatch: see sharding.ep
    capacity_factor: float = 2.0  # the `a2a` dispatch's fast-path buffers (sharding.ep)

    def __post_init__(self):
        if isinstance(self.strategy, str):
            object.__setattr__(self, "strategy", get_strategy(self.strategy))
        sizes = self.sizes
        if self.dispatch not in DISPATCH_IMPLS:
            raise ValueError(f"dispatch={self.dispatch!r} is not one of {DISPATCH_IMPLS}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        for axis in self.strategy.expert_axes:
            if sizes.get(axis, 1) > 1 and axis not in self.strategy.batch_axes:
                raise ValueError(f"strategy {self.strategy.name}: experts are split over {axis!r}, "
                                 "which must also split the batch (tokens travel along it)")
        unused = [a for a, n in sizes.items() if n > 1 and not self._uses(a)]
        if unused:
            raise ValueError(f"mesh axes {unused} have size > 1 but strategy "
                             f"{self.strategy.name} shards nothing over them")

    def _uses(self, axis: str) -> bool:
        tables = self.strategy.params + self.strategy.activations + (self.strategy.optimizer or ())
        return any(axis in axes for _, axes in tables)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Batch axes of size > 1, in mesh order."""
        return tuple(a for a in self.strategy.batch_axes if self.sizes.get(a, 1) > 1)

    @property
    def expert_axis(self) -> str | None:
        axes = [a for a in self.strategy.expert_axes if self.sizes.get(a, 1) > 1]
        if len(axes) > 1:
            raise ValueError(f"experts split over several mesh axes {axes}: not supported")
        return axes[0] if axes else None

    @property
    def pipeline(self) -> int:
        """Pipeline ranks (the `pipeline` axis size; 1 without pipelining)."""
        return self.sizes.get("pipeline", 1)

    def shard_map_mesh(self):
        """The mesh a `shard_map` inside the model takes: ours, or inside the pipeline
        executor's shard_map (manual over `pipeline`) the context's mesh with that axis manual,
        which a nested shard_map must name instead."""
        context = jax.sharding.get_abstract_mesh()
        return context if context.manual_axes else self.mesh

    @property
    def tensor_axis(self) -> str | None:
        return "tensor" if self.sizes.get("tensor", 1) > 1 else None

    def activation_spec(self, names, shape, what: str) -> P:
        return spec_for(tuple(names), tuple(shape), self.strategy.activations, self.sizes, what)

    def param_specs(self, shapes, names, replicated=None):
        return tree_specs(shapes, names, self.strategy.params, self.sizes, replicated)

    def optimizer_specs(self, shapes, names, replicated=None):
        """Specs of the optimizer moments of parameters with these shapes and names (the
        strategy's optimizer table, claimed greedily; the parameters' own table otherwise)."""
        if self.strategy.optimizer is None:
            return self.param_specs(shapes, names, replicated)
        return tree_specs(shapes, names, self.strategy.optimizer, self.sizes, replicated,
                          greedy=True)

    @property
    def zero1(self) -> bool:
        """The optimizer state is split differently from the parameters (ZeRO-1): the step
        moves the gradients to the moments' split for the update, and the weights back."""
        return self.strategy.optimizer is not None

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)


def single_device(ctx: ShardingContext | None) -> bool:
    """No mesh, or a mesh of one device: arrays are whole, so an op needs no shard_map around
    it (e.g. whether `dsv3_jax.fp8.matmul` runs its FP8 GEMMs in one)."""
    return ctx is None or ctx.mesh.size == 1


def constrain(x: jax.Array, names: tuple, ctx: ShardingContext | None, what: str = "activation"):
    """Constrain x's sharding by logical names (None entries: never split). No-op without a mesh."""
    if ctx is None:
        return x
    return jax.lax.with_sharding_constraint(x, ctx.named(ctx.activation_spec(names, x.shape, what)))

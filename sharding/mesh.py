"""Device meshes from spec strings: `pipeline=1,data=2,fsdp=2,expert=2,tensor=1`.

Axes, outermost first: pipeline (layer stages: the axis with the least traffic, point-to-point
activations, so it may cross nodes), data (pure data parallelism: parameters replicated), fsdp (data
parallelism with parameters, gradients and optimizer state sharded, ZeRO-3 style), expert
(expert parallelism; also a data axis for everything outside the experts), tensor (tensor
parallelism of heads and FFN widths). Axes left out have size 1. Inner
axes get the closest devices (jax.make_mesh orders devices by topology), so tensor and expert
traffic stays inside a node where the mesh allows.

A mesh works for one or many processes: it is built over `jax.devices()`, every process's
devices. For plans of meshes larger than the machine (the dump tool's 256- or 2048-device
plans), `abstract_mesh` describes the shape without devices.
"""

import re

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

# pipeline first: besides the topology, XLA requires manual axes in mesh order, and the pipeline
# executor's shard_map (manual over pipeline) holds the MoE's (manual over expert) inside it
MESH_AXES = ("pipeline", "data", "fsdp", "expert", "tensor")
_ITEM = re.compile(r"^\s*([A-Za-z_]+)\s*=\s*(\d+)\s*$")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'fsdp=4,expert=2' -> {'pipeline': 1, 'data': 1, 'fsdp': 4, 'expert': 2, 'tensor': 1}."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec must be a non-empty string like 'fsdp=4,expert=2', got {spec!r}")
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for item in spec.split(","):
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"mesh spec {spec!r}: malformed item {item.strip()!r}; expected "
                             "axis=size, e.g. 'fsdp=4,expert=2'")
        name, size = m.group(1), int(m.group(2))
        if name not in sizes:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}; sizes are >= 1")
        seen.add(name)
        sizes[name] = size
    return sizes


def mesh_size(sizes: dict[str, int]) -> int:
    n = 1
    for v in sizes.values():
        n *= v
    return n


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with Auto axes, so that
    XLA's partitioner propagates shardings from our constraints (GSPMD style)."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    if mesh_size(sizes) != len(devices):
        shown = ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "all axes 1"
        raise ValueError(f"mesh {shown} has {mesh_size(sizes)} devices but {len(devices)} are "
                         f"available ({jax.process_count()} process(es)); the product of the axis "
                         "sizes must equal the device count")
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(spec: str | dict[str, int]) -> AbstractMesh:
    """The mesh's shape without devices: enough to compute every PartitionSpec and byte count."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)

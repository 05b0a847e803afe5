"""Where a jitted step's device time goes: a profile's per-op times, attributed to model parts.

A `jax.profiler.trace` of a few steps records one event per executed HLO op (its `hlo_op` and
`hlo_module` stats); the compiled module's text names each op's source scope in its metadata
(`op_name="jit(step)/.../moe_layers/moe/experts/expert_gemms/dot_general"`, backward and remat
copies included, since JAX keeps the name stack through `jvp`/`transpose`/`checkpoint`). Joining
the two gives time per scope, and `PARTS` folds scopes into the parts a reader asks about. The
model's scopes (`attention_core`, `router`, `dispatch`, `combine`, `expert_gemms`,
`shared_experts`, `ffn`, `optimizer`) exist for this.
"""

import collections
import glob
import os
import re

# (part, scope names that select it), first match wins: the optimizer's scope is checked before
# the model's, expert GEMMs before the dispatch that encloses them on the EP path.
PARTS = (
    ("optimizer", ("optimizer",)),
    ("attention core", ("attention_core",)),
    ("expert GEMMs", ("expert_gemms",)),
    ("MoE route/dispatch/combine", ("router", "dispatch", "combine")),
    ("dense + shared FFN", ("shared_experts", "ffn")),
)
OTHER = "other (projections, norms, embedding, head, loss)"
UNATTRIBUTED = "unattributed (no scope in the HLO)"

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def op_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name (scope path), from a compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def part_of(op_name: str) -> str:
    scopes = set(op_name.split("/"))
    for part, names in PARTS:
        if scopes.intersection(names):
            return part
    return OTHER


def _stats(event) -> dict:
    return {k: v for k, v in event.stats}


def device_op_times(trace_dir: str, module_substring: str) -> dict[str, float]:
    """Total nanoseconds per HLO op of the modules whose name contains `module_substring`, from
    the newest `.xplane.pb` under `trace_dir`. GPU: the device planes' per-op line ("XLA Ops"),
    or their kernel events when a plane has no such line. CPU: the host threads' op events."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no .xplane.pb profile under {trace_dir}")
    data = ProfileData.from_file(paths[-1])
    times: dict[str, float] = collections.defaultdict(float)
    device_planes = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in device_planes or [p for p in data.planes if p.name.startswith("/host:CPU")]:
        lines = list(plane.lines)
        ops_lines = [ln for ln in lines if ln.name == "XLA Ops"]
        for line in ops_lines or [ln for ln in lines if ln.name not in ("XLA Modules", "Steps")]:
            for ev in line.events:
                st = _stats(ev)
                op, module = st.get("hlo_op"), str(st.get("hlo_module", ""))
                if op and module_substring in module:
                    times[str(op)] += float(ev.duration_ns)
    if not times:
        raise ValueError(f"the profile in {trace_dir} has no op events of a module matching "
                         f"{module_substring!r}")
    return dict(times)


def breakdown(op_times: dict[str, float], scopes: dict[str, str]) -> dict[str, float]:
    """Nanoseconds per part (PARTS, OTHER, UNATTRIBUTED), from per-op times and op scopes."""
    out: dict[str, float] = collections.defaultdict(float)
    for op, ns in op_times.items():
        name = scopes.get(op)
        out[UNATTRIBUTED if name is None else part_of(name)] += ns
    return dict(out)

"""Where a jitted step's device time goes: a profile's per-op times, attributed to model parts.

A `jax.profiler.trace` of a few steps records one event per executed HLO op (its `hlo_op` and
`hlo_module` stats); the compiled module's text names each op's source scope in its metadata
(`op_name="jit(step)/.../moe_layers/moe/experts/expert_gemms/dot_general"`, backward and remat
copies included, since JAX keeps the name stack through `jvp`/`transpose`/`checkpoint`). Joining
the two gives time per scope, and `PARTS` folds scopes into the parts a reader asks about. On
GPU, XLA's command buffers (CUDA graphs) report a whole graph of kernels as one op with no scope:
profile with `--xla_gpu_enable_command_buffer=` in XLA_FLAGS (bench_train.py does). The
model's scopes (`attention_core`, `router`, `dispatch`, `combine`, `expert_gemms`,
`shared_experts`, `ffn`, `head`, `mla`, `embedding`, `optimizer`) exist for this.
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
    ("output head + softmax", ("head",)),
    ("MLA projections, norms, RoPE", ("mla",)),
    ("embedding", ("embedding",)),
)
OTHER = "other (residual norms, MTP projection, loss sums, glue)"
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


_WRAPPED = re.compile(r"^[\w.]+\((.*)\)$")


def _scope_names(op_name: str) -> list[str]:
    """The scope names of a path; autodiff wraps the outermost, e.g. `transpose(jvp(head))`."""
    names = []
    for part in op_name.split("/"):
        while (m := _WRAPPED.match(part)) is not None:
            part = m.group(1)
        names.append(part)
    return names


def part_of(op_name: str) -> str:
    scopes = set(_scope_names(op_name))
    for part, names in PARTS:
        if scopes.intersection(names):
            return part
    return OTHER


def _stats(event) -> dict:
    return {k: v for k, v in event.stats}


def device_op_times(trace_dir: str, module_substring: str) -> tuple[dict[str, float], dict[str, str]]:
    """(total nanoseconds per HLO op, the scope path the profiler itself recorded for an op
    where it did: the `name` stat of GPU kernel events) for the modules whose name contains `module_substring`, from
    the newest `.xplane.pb` under `trace_dir`. GPU: the device planes' per-op line ("XLA Ops"),
    or their kernel events when a plane has no such line. CPU: the host threads' op events."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no .xplane.pb profile under {trace_dir}")
    data = ProfileData.from_file(paths[-1])
    times: dict[str, float] = collections.defaultdict(float)
    recorded: dict[str, str] = {}
    device_planes = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in device_planes or [p for p in data.planes if p.name.startswith("/host:CPU")]:
        lines = list(plane.lines)
        ops_lines = [ln for ln in lines if ln.name == "XLA Ops"]
        for line in ops_lines or [ln for ln in lines if ln.name not in ("XLA Modules", "Steps")]:
            for ev in line.events:
                st = _stats(ev)
                op, module = st.get("hlo_op") or (ev.name if ops_lines else None), \
                    str(st.get("hlo_module", ""))
                if op and (module_substring in module or (ops_lines and not module)):
                    times[str(op)] += float(ev.duration_ns)
                    if st.get("name"):  # GPU kernel events carry a scope path (coarse)
                        recorded[str(op)] = str(st["name"])
    if not times:
        raise ValueError(f"the profile in {trace_dir} has no op events of a module matching "
                         f"{module_substring!r}")
    return dict(times), recorded


def kernel_count(trace_dir: str) -> int:
    """GPU kernel events in the newest profile under `trace_dir`, every module together (the
    device planes' lines other than the per-op and per-module summaries); 0 on a CPU."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no .xplane.pb profile under {trace_dir}")
    n = 0
    for plane in ProfileData.from_file(paths[-1]).planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name not in ("XLA Ops", "XLA Modules", "Steps", "Source code"):
                    n += sum(1 for _ in line.events)
    return n


def breakdown(op_times: dict[str, float], scopes: dict[str, str]) -> dict[str, float]:
    """Nanoseconds per part (PARTS, OTHER, UNATTRIBUTED), from per-op times and op scopes."""
    out: dict[str, float] = collections.defaultdict(float)
    for op, ns in op_times.items():
        name = scopes.get(op)
        out[UNATTRIBUTED if name is None else part_of(name)] += ns
    return dict(out)


def unattributed(op_times: dict[str, float], scopes: dict[str, str], n: int = 10) -> list:
    """The n slowest ops with no scope: [(op, ns)], for a reader to see what they are."""
    rest = [(op, ns) for op, ns in op_times.items() if op not in scopes]
    return sorted(rest, key=lambda kv: -kv[1])[:n]


def top_scopes(op_times: dict[str, float], scopes: dict[str, str], part: str, *,
               depth: int = 6, n: int = 12) -> list:
    """Inside one part, the n costliest scope paths cut to `depth` components (autodiff
    wrappers removed): [(path, ns)]. Says what a coarse part such as OTHER is made of."""
    out: dict[str, float] = collections.defaultdict(float)
    for op, ns in op_times.items():
        name = scopes.get(op)
        if name is None or part_of(name) != part:
            continue
        out["/".join(_scope_names(name)[:depth])] += ns
    return sorted(out.items(), key=lambda kv: -kv[1])[:n]

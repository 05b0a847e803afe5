"""Pipeline schedules as data: per-rank task lists, placed into lock-step ticks.

A schedule says, for each pipeline rank, the order of its tasks: F (forward of one stage for one
microbatch), B (its whole backward), Bx (the backward for the stage's input only) and W (the
backward for the stage's weights, after its Bx). Four schedules (reference
training_systems.md §1):

  gpipe        every forward, then every backward (GPipe): M microbatches' activations held
  1f1b         P - 1 - r warm-up forwards on rank r, then one forward and one backward in turn
               (PipeDream-flush): at most P microbatches in flight
  zero_bubble  1f1b with each backward split into Bx and W (ZB-H1, Qi et al. 2023): rank r
               defers r of its W's to fill the cool-down bubble at the end of the step
  dualpipev    two stages per rank in a V (DeepSeek's DualPipeV, the "cut-in-half" DualPipe):
               rank r holds stage r and stage 2P - 1 - r, so the first and the last stage sit on
               rank 0; its eight phases (warm-up forwards, paired forward+backward in the
               middle, zero-bubble Bx/W splits at the ends) follow DualPipe's `dualpipev.py`

Everything runs in one SPMD program, so ranks advance in lock step: `place` puts the ranks'
lists into ticks. In a tick a rank takes its next task if its inputs arrived in an earlier tick
(a neighbour's output crosses the `pipeline` axis between ticks); under dualpipev (`PACKED`)
also the task after it if that one is ready and uses the other lane (a tick has a forward lane,
F, and a backward lane, B, Bx or W): DualPipeV's overlapped F&B pairs. A tick lasts
as long as its busiest rank (F = 1, Bx = W = 1, B = 2 units of one stage's work), so the bubble
reported is the lock-step one, with the published formula beside it.

This module knows nothing of models: stages, microbatches and ticks only. The executor that runs
a placed schedule is `sharding.pipeline`; the plan dump prints `render`.
"""

import dataclasses

SCHEDULES = ("gpipe", "1f1b", "zero_bubble", "dualpipev")
# Schedules whose ticks pair a forward with a backward (DualPipeV's overlapped F&B chunks). The
# others run one task per tick: in lock step a tick lasts as long as its busiest rank, and pairing
# 1F1B's or ZB's tasks makes some ticks cost F + B while neighbours' cost F (measured with
# `place`: ZB-H1 at P 4, M 16 has a 29% bubble paired against its formula's 5.9% unpaired).
PACKED = {"dualpipev"}
COST = {"F": 1, "B": 2, "Bx": 1, "W": 1}  # units of one stage's forward (backward ~ 2 forwards)


@dataclasses.dataclass(frozen=True, order=True)
class Task:
    kind: str  # F, B, Bx or W
    stage: int  # virtual stage 0 .. n_stages - 1
    micro: int  # microbatch 0 .. M - 1

    @property
    def lane(self) -> str:
        return "F" if self.kind == "F" else "B"

    def __str__(self):
        return f"{self.kind}{self.micro}"


def n_stages(schedule: str, ranks: int) -> int:
    """Virtual stages: one per rank, two for dualpipev's V."""
    check(schedule, ranks, None)
    return 2 * ranks if schedule == "dualpipev" else ranks


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "dualpipev" else 1


def home(schedule: str, ranks: int, stage: int) -> tuple[int, int]:
    """(rank, local index v) of a virtual stage: stage s on rank s, or for dualpipev stage s < P
    on rank s (v 0) and stage s >= P on rank 2P - 1 - s (v 1), so the V turns on the last rank."""
    if schedule == "dualpipev" and stage >= ranks:
        return 2 * ranks - 1 - stage, 1
    return stage, 0


def check(schedule: str, ranks: int, micro: int | None) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline_schedule {schedule!r} is not one of {SCHEDULES}")
    if ranks < 1:
        raise ValueError(f"pipeline ranks must be >= 1, got {ranks}")
    if micro is not None and micro < 1:
        raise ValueError(f"microbatches must be >= 1, got {micro}")


# ------------------------------------------------------------------------ per-rank task lists
def rank_orders(schedule: str, ranks: int, micro: int) -> list[list[Task]]:
    """Each rank's tasks in the order it runs them."""
    check(schedule, ranks, micro)
    if schedule == "dualpipev":
        return [_dualpipev(ranks, micro, r) for r in range(ranks)]
    return [_linear(schedule, ranks, micro, r) for r in range(ranks)]


def _linear(schedule: str, p: int, m: int, r: int) -> list[Task]:
    if schedule == "gpipe":
        return [Task("F", r, i) for i in range(m)] + [Task("B", r, i) for i in range(m)]
    warm = min(p - 1 - r, m)
    order = [Task("F", r, i) for i in range(warm)]
    backs = []
    for i in range(m):
        if warm + i < m:
            order.append(Task("F", r, warm + i))
        order.append(Task("B", r, i))
        backs.append(len(order) - 1)
    if schedule == "1f1b":
        return order
    # zero_bubble (ZB-H1): B -> Bx, and the W of microbatch i after the Bx of microbatch i + r,
    # so rank r ends with r deferred W's where 1F1B leaves it idle for r ticks
    out, pending = [], []
    for task in order:
        if task.kind != "B":
            out.append(task)
            continue
        out.append(Task("Bx", r, task.micro))
        pending.append(Task("W", r, task.micro))
        if len(pending) > r:
            out.append(pending.pop(0))
    return out + pending


def _dualpipev(p: int, m: int, r: int) -> list[Task]:
    """DualPipeV's eight phases on rank r (DualPipe `dualpipev.py`, `step`): chunk 0 is stage r,
    chunk 1 stage 2P - 1 - r; "zb" backwards are Bx with their W deferred first-in first-out."""
    s0, s1 = r, 2 * p - 1 - r
    nxt = {"F0": 0, "F1": 0, "B0": 0, "B1": 0}
    out, deferred = [], []

    def f(c):
        i = nxt[f"F{c}"]
        nxt[f"F{c}"] += 1
        if i < m:
            out.append(Task("F", (s0, s1)[c], i))

    def b(c, zb=False):
        i = nxt[f"B{c}"]
        nxt[f"B{c}"] += 1
        if i >= m:
            return
        stage = (s0, s1)[c]
        if zb:
            out.append(Task("Bx", stage, i))
            deferred.append(Task("W", stage, i))
        else:
            out.append(Task("B", stage, i))

    def w():
        if deferred:
            out.append(deferred.pop(0))

    for _ in range((p - r - 1) * 2):  # 1: nF0
        f(0)
    for _ in range(r + 1):  # 2: nF0F1
        f(0), f(1)
    for _ in range(p - r - 1):  # 3: nB1W1F1 (zero bubble)
        b(1, zb=True), w(), f(1)
    for _ in range(max(m - 2 * p + r + 1, 0)):  # 4: nF0B1F1B0 (the main step)
        f(0), b(1), f(1), b(0)
    for _ in range(p - r - 1):  # 5: nB1F1B0
        b(1), f(1), b(0)
    zb = False
    for i in range(r + 1):  # 6: nB1B0, the second half zero bubble
        zb = zb or (i == (r + 1) // 2 and r % 2 == 1)
        b(1, zb)
        zb = zb or (i == (r + 1) // 2 and r % 2 == 0)
        b(0, zb)
    for _ in range(p - r - 1):  # 7: nWB0 (zero bubble)
        w(), b(0, zb=True)
    while deferred:  # 8: nW
        w()
    # DualPipeV asks for M >= 2P; with fewer microbatches its phase counts leave tasks out,
    # which the lock-step placement would then wait for forever: append them in a safe order
    seen = set(out)
    for c, stage in ((0, s0), (1, s1)):
        for i in range(m):
            if Task("F", stage, i) not in seen:
                out.append(Task("F", stage, i))
    for c, stage in ((1, s1), (0, s0)):
        for i in range(m):
            if not ({Task("B", stage, i), Task("Bx", stage, i)} & seen):
                out.append(Task("B", stage, i))
    return _fix_order(out)


def _fix_order(tasks: list[Task]) -> list[Task]:
    """Keep each stage's forwards, and its backwards, in microbatch order (the phase counts of
    DualPipeV assume M >= 2P; the appended tail may otherwise precede what it depends on)."""
    by_key: dict = {}
    for i, t in enumerate(tasks):
        by_key.setdefault((t.kind if t.kind != "Bx" else "B", t.stage), []).append(i)
    out = list(tasks)
    for idx in by_key.values():
        ordered = sorted((tasks[i] for i in idx), key=lambda t: t.micro)
        for i, t in zip(idx, ordered):
            out[i] = t
    return out


# ------------------------------------------------------------------------------- placement
@dataclasses.dataclass(frozen=True)
class Timeline:
    """A schedule placed into lock-step ticks.

    ticks[t][r] = (forward-lane task or None, backward-lane task or None). slot[(r, v, m)]: the
    buffer slot rank r keeps microbatch m's stage-v state in (its input, saved activations and
    incoming gradient), live from the tick its input arrives to its last backward task; slots
    are reused once free, so `n_slots` is the most any (rank, v) holds at once."""
    schedule: str
    ranks: int
    micro: int
    ticks: tuple
    slot: dict
    n_slots: int

    @property
    def stages(self) -> int:
        return n_stages(self.schedule, self.ranks)

    @property
    def per_rank(self) -> int:
        return stages_per_rank(self.schedule)

    def tick_cost(self, t: int) -> int:
        return max(sum(COST[x.kind] for x in lanes if x is not None) for lanes in self.ticks[t])

    def summary(self) -> dict:
        """Lock-step time, busy time and bubble per rank, in units of one forward of a rank's
        whole share of the layers for one microbatch (a dualpipev stage is half a share), and
        the peak number of microbatches whose activations a rank holds."""
        scale = 1.0 / self.per_rank
        total = sum(self.tick_cost(t) for t in range(len(self.ticks))) * scale
        busy = [sum(COST[x.kind] for lanes in [tk[r] for tk in self.ticks] for x in lanes
                    if x is not None) * scale for r in range(self.ranks)]
        ideal = self.micro * (COST["F"] + COST["B"])
        held = self.in_flight()
        return {"schedule": self.schedule, "ranks": self.ranks, "microbatches": self.micro,
                "stages": self.stages, "ticks": len(self.ticks), "time": total,
                "ideal_time": ideal, "busy": busy,
                "bubble_fraction": 1.0 - sum(busy) / (self.ranks * total),
                "theory_bubble": theory_bubble(self.schedule, self.ranks, self.micro),
                "activations_in_flight": held,
                "theory_activations": theory_activations(self.schedule, self.ranks, self.micro),
                "buffer_slots": self.n_slots}

    def in_flight(self) -> list[float]:
        """Peak microbatch activations held per rank (from a forward to its last backward), in
        units of the rank's whole share of layers (a dualpipev stage counts 1/2)."""
        live = [[0] * len(self.ticks) for _ in range(self.ranks)]
        first, last = {}, {}
        for t, tick in enumerate(self.ticks):
            for r, lanes in enumerate(tick):
                for x in lanes:
                    if x is None:
                        continue
                    key = (r, x.stage, x.micro)
                    if x.kind == "F":
                        first[key] = t
                    last[key] = t
        for key, t0 in first.items():
            for t in range(t0, last[key] + 1):
                live[key[0]][t] += 1
        return [max(row) / self.per_rank if row else 0.0 for row in live]


def theory_bubble(schedule: str, p: int, m: int) -> float:
    """The published bubble as a fraction of the step (F = 1, B = 2, W = 1 units of a rank's
    forward; DualPipe README's table, with F&B counted as F + B): gpipe and 1f1b (P-1)(F+B),
    zero_bubble (P-1)(F+B-2W), dualpipev (P/2-1)(F&B+B-3W) with PP = 2P stages of half size."""
    f, b, w = COST["F"], COST["B"], COST["W"]
    if schedule in ("gpipe", "1f1b"):
        bubble = (p - 1) * (f + b)
    elif schedule == "zero_bubble":
        bubble = (p - 1) * (f + b - 2 * w)
    else:  # PP = 2P stages, each half a rank's share: chunk units halved
        bubble = max(p - 1, 0) * ((f + b) + b - 3 * w) / 2
    return bubble / (bubble + m * (f + b))


def theory_activations(schedule: str, p: int, m: int) -> float:
    """Microbatches' activations per rank the published schedule holds at its peak (rank 0):
    gpipe M, 1f1b and zero_bubble P, dualpipev PP + 1 chunks of half a share = P + 1/2."""
    if schedule == "gpipe":
        return float(m)
    if schedule in ("1f1b", "zero_bubble"):
        return float(min(p, m))
    return min(2 * p + 1, 2 * m) / 2


def _ready(task: Task, done: dict, t: int, last: int) -> bool:
    def before(key):
        return key in done and done[key] < t

    s, i = task.stage, task.micro
    if task.kind == "F":
        return s == 0 or before(("F", s - 1, i))
    if task.kind == "W":
        return before(("B", s, i))
    return before(("F", s, i)) and (s == last or before(("B", s + 1, i)))


def place(schedule: str, ranks: int, micro: int) -> Timeline:
    """Place the ranks' task lists into lock-step ticks (see the module docstring)."""
    orders = rank_orders(schedule, ranks, micro)
    last = n_stages(schedule, ranks) - 1
    done: dict = {}  # (F | B, stage, micro) -> tick; a Bx counts as the B its successors need
    pos = [0] * ranks
    ticks = []
    limit = 4 * sum(len(o) for o in orders) + 8
    while any(pos[r] < len(orders[r]) for r in range(ranks)):
        t = len(ticks)
        if t > limit:
            raise RuntimeError(f"{schedule}: placement of {ranks} ranks x {micro} microbatches "
                               "made no progress (a dependency cycle in the task lists)")
        tick = []
        for r in range(ranks):
            lanes = {"F": None, "B": None}
            for _ in range(2 if schedule in PACKED else 1):
                if pos[r] >= len(orders[r]):
                    break
                task = orders[r][pos[r]]
                if lanes[task.lane] is not None or not _ready(task, done, t, last):
                    break
                lanes[task.lane] = task
                pos[r] += 1
            tick.append((lanes["F"], lanes["B"]))
        for lanes in tick:
            for x in lanes:
                if x is not None:
                    done[("F" if x.kind == "F" else "B" if x.kind != "W" else "W",
                          x.stage, x.micro)] = t
        ticks.append(tuple(tick))
    slot, n_slots = _slots(schedule, ranks, ticks)
    return Timeline(schedule, ranks, micro, tuple(ticks), slot, n_slots)


def _slots(schedule: str, ranks: int, ticks) -> tuple[dict, int]:
    """Buffer slots per (rank, v): microbatch m's stage state lives from the tick its input
    arrives (the previous stage's F; its own F on stage 0) to its last backward task."""
    start, end = {}, {}
    f_tick = {}
    for t, tick in enumerate(ticks):
        for r, lanes in enumerate(tick):
            for x in lanes:
                if x is not None and x.kind == "F":
                    f_tick[(x.stage, x.micro)] = t
    for t, tick in enumerate(ticks):
        for r, lanes in enumerate(tick):
            for x in lanes:
                if x is None:
                    continue
                key = (r, home(schedule, ranks, x.stage)[1], x.micro)
                arrive = f_tick[(x.stage - 1, x.micro)] if x.stage else f_tick[(0, x.micro)]
                start[key] = min(start.get(key, arrive), arrive)
                end[key] = max(end.get(key, t), t)
    slot, n = {}, 0
    for rv in {(r, v) for r, v, _ in start}:
        free_at: list[int] = []  # per slot: the last tick it is busy
        for key in sorted((k for k in start if k[:2] == rv), key=lambda k: start[k]):
            for j, busy in enumerate(free_at):
                if busy < start[key]:
                    free_at[j] = end[key]
                    slot[key] = j
                    break
            else:
                slot[key] = len(free_at)
                free_at.append(end[key])
        n = max(n, len(free_at))
    return slot, n


# --------------------------------------------------------------------------------- printing
def render(tl: Timeline, width: int = 120) -> str:
    """The timeline as text: one row per rank, one column per tick; `F3` forward of microbatch
    3, `B3` its backward, `b3` input-gradient backward, `W3` weight-gradient backward; a
    dualpipev rank's second stage (the V's way back) is marked with `'`; `.` idle."""
    def cell(x):
        if x is None:
            return ""
        mark = "'" if tl.per_rank == 2 and home(tl.schedule, tl.ranks, x.stage)[1] else ""
        return {"Bx": "b"}.get(x.kind, x.kind) + str(x.micro) + mark

    cells = [[("+".join(c for c in map(cell, lanes) if c) or ".") for lanes in
              (tick[r] for tick in tl.ticks)] for r in range(tl.ranks)]
    w = max(len(c) for row in cells for c in row) + 1
    per_line = max(1, (width - 8) // w)
    lines = []
    for lo in range(0, len(tl.ticks), per_line):
        hi = min(lo + per_line, len(tl.ticks))
        lines.append("tick    " + "".join(f"{t:<{w}}" for t in range(lo, hi)))
        for r in range(tl.ranks):
            lines.append(f"rank {r:<3}" + "".join(f"{c:<{w}}" for c in cells[r][lo:hi]))
    return "\n".join(lines)


def describe(tl: Timeline) -> str:
    """A few lines under the timeline: bubble (lock-step and published) and memory."""
    s = tl.summary()
    held = ", ".join(f"{x:g}" for x in s["activations_in_flight"])
    return (f"{tl.schedule}: {tl.ranks} rank(s) x {tl.micro} microbatches, {s['stages']} "
            f"stages, {s['ticks']} ticks\n"
            f"bubble: {s['bubble_fraction']:.1%} of the step in lock step "
            f"(published formula: {s['theory_bubble']:.1%}); time {s['time']:g} against "
            f"{s['ideal_time']:g} without bubbles (units: one forward of a rank's layers for "
            "one microbatch; backward = 2)\n"
            f"activations held at the peak, per rank: {held} microbatches "
            f"(published: {s['theory_activations']:g} on rank 0); buffer slots per stage: "
            f"{s['buffer_slots']}")

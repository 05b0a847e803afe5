"""SIGTERM/SIGINT for a training run: a flag the loop polls at step boundaries, agreed on by
every process, so all of them save the same step and exit together."""

import logging
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger("dsv3_jax.train")


class Signals:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits. A second
    Ctrl-C stops at once."""

    def __init__(self):
        self.received = None
        self._old = {}
        self._in_flight = None  # the last poll's cross-process max (several processes)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def poll(self) -> int | None:
        """The signal number to stop for, the same in every process, or None.

        One process: the flag itself. Several: each call dispatches a max of every process's
        flag over all devices and returns the previous call's result, so the host never waits
        on a collective. The previous result was computed before the step just dispatched, so
        reading it costs nothing more than reading that step's metrics; a signal stops every
        process after the same step, one step later than in a single-process run."""
        mine = 0 if self.received is None else int(self.received)
        if jax.process_count() == 1:
            return mine or None
        previous, self._in_flight = self._in_flight, process_max(mine)
        if previous is None:
            return None
        return int(np.asarray(previous.addressable_data(0))) or None


def process_max(value: int) -> jax.Array:
    """max over processes of `value`, as a replicated device scalar (dispatched, not waited for):
    one int32 per device in a global array, reduced by one jitted max."""
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("p",))
    local = np.full((jax.local_device_count(),), value, np.int32)
    flags = jax.make_array_from_process_local_data(NamedSharding(mesh, P("p")), local)
    return _max_fn(mesh)(flags)


_MAX_FNS: dict = {}


def _max_fn(mesh):
    """One jitted max per mesh (one compile for the run)."""
    if mesh not in _MAX_FNS:
        _MAX_FNS[mesh] = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    return _MAX_FNS[mesh]

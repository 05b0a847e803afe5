"""Kernel timing shared by the benchmarks (experiments/bench_fp8_gemm.py, bench_decode.py) and
the kernel modules' own tuning runs (`python -m pallas_kernels.<module>`).

On a GPU: CUPTI kernel time (jax.experimental.mosaic.gpu.profiler), summed over the kernels of
one call, median over the iterations, with L2 flushed before each iteration by rewriting a
256 MiB buffer (several times an H100/H200's 50-60 MiB L2) whose own kernel is left out of the
sum: what kernels.md §8.2's protocol asks for. Elsewhere (CPU, Pallas interpret mode): wall
clock of the jitted call, after one untimed call. A CUPTI failure is raised, not replaced by
wall clock: the benchmarks record it as that implementation's error.
"""

import statistics
import time

import jax
import jax.numpy as jnp


def kernel_ms(fn, args, iterations: int, *, interpret: bool = False) -> float:
    """Median time in ms of jax.jit(fn)(*args)."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    if interpret or jax.devices()[0].platform != "gpu":
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    from jax.experimental.mosaic.gpu import profiler

    flush_buf = jnp.zeros((64 * 2**20,), jnp.int32)
    flush = jax.jit(lambda b: b + 1)
    _, flush_kernels = profiler.measure(flush, aggregate=False)(flush_buf)
    flush_names = {name for name, _ in flush_kernels}
    both = jax.jit(lambda b, *a: (flush(b), fn(*a)))
    _, per_iter = profiler.measure(both, aggregate=False, iterations=iterations)(flush_buf, *args)
    return statistics.median(sum(t for name, t in it if name not in flush_names)
                             for it in per_iter)

"""GPU kernels (Pallas on Mosaic GPU, jax-triton where Triton serves better), one file per unit:
a pure-jnp reference, the kernel, a validating wrapper, its tuning config and a benchmark
`main()` (../DESIGN.md convention 8).

The model reaches kernels through single switches (e.g. `dsv3_jax.grouped.grouped_matmul`'s
`impl`); the XLA path is always there and is what CPU runs use. The FP8 block-scaled GEMMs and
the MLA decode kernel arrive with their issues (#5, #6).
"""

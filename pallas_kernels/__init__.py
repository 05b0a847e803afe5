"""GPU kernels (Pallas on Mosaic GPU, jax-triton where Triton serves better), one file per unit:
a pure-jnp reference, the kernel, a validating wrapper, its tuning config and a
`python -m pallas_kernels.<kernel>` self-check (../DESIGN.md convention 8):

  grouped_matmul     bf16 grouped matmul of the MoE experts (padded-group layout)
  fp8_gemm           block-scaled FP8 GEMMs, dense and grouped (reference: fp8_quant)
  fp8_quant_kernel   one-pass FP8 quantizers (reference: fp8_quant)
  mla_decode         MLA decode attention over the latent cache
  fp8_triton         the FP8 GEMM in Triton (GPU only)

`_mosaic` holds what the Mosaic GPU kernels share (hardware budget, swizzles, the persistent
launch, K pipeline and epilogue, the self-check harness); `timing` the benchmarks' kernel
timing; `rows` the row gathers of the MoE layouts. The model reaches kernels through single
switches (e.g. `dsv3_jax.grouped.grouped_matmul`'s `impl`); the XLA path is always there and is
what CPU runs use. Design notes and measurements: docs/kernels.md.
"""

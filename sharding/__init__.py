"""Meshes, logical-axis rule tables and expert-parallel collectives: a library below the model.

The model names every parameter dimension with a logical axis (`dsv3_jax.logical_axes_tree`,
from the letters in `dsv3_jax/axes.py`); this package maps those names to mesh axes per
strategy. It knows meshes and collectives, not DeepSeek (../DESIGN.md), and imports nothing of
`dsv3_jax`, except `sharding/dump.py`, the thin entry of the plan tool (`dsv3_jax.plan`).
"""

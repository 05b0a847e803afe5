"""Meshes, logical-axis rule tables, expert-parallel collectives and the sharding-plan dump tool.

The model names every parameter dimension with a logical axis (`dsv3_jax.logical_axes_tree`,
from the letters in `dsv3_jax/axes.py`); this package maps those names to mesh axes per
strategy. It knows meshes and collectives, not DeepSeek (../DESIGN.md). Its contents arrive with
the sharding issue (#3); until then every program runs on one device.
"""

"""Pallas GPU kernels with hand-written backward passes.

Each kernel lives in its own file together with its pure-jnp reference. This package knows
nothing of models; fastft_jax.ops picks between the kernels and the references.
"""

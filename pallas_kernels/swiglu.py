"""SwiGLU activation: silu(gate) * up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def swiglu_reference(gate: Float[Array, "... d"], up: Float[Array, "... d"]) -> Float[Array, "... d"]:
    gate_f32 = gate.astype(jnp.float32)
    return (jax.nn.silu(gate_f32) * up.astype(jnp.float32)).astype(gate.dtype)

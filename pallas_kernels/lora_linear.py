"""LoRA linear: x @ w + scale * (x @ a) @ b, with w frozen."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def lora_linear_reference(
    x: Float[Array, "... d_in"],
    w: Float[Array, "d_in d_out"],
    a: Float[Array, "d_in rank"],
    b: Float[Array, "rank d_out"],
    scale: float,
) -> Float[Array, "... d_out"]:
    base = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    x_a = jnp.dot(x, a.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    lora = jnp.dot(x_a, b.astype(x.dtype), preferred_element_type=jnp.float32)
    return (base + scale * lora).astype(x.dtype)

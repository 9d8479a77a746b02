"""RMSNorm (HF semantics): statistics in float32, output in the input dtype."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def rms_norm_reference(
    x: Float[Array, "... d"], weight: Float[Array, " d"], eps: float = 1e-6
) -> Float[Array, "... d"]:
    x_f32 = x.astype(jnp.float32)
    inv_rms = jnp.reciprocal(jnp.sqrt(jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True) + eps))
    # HF casts the normalised row back to the input dtype before scaling by the weight.
    return (x_f32 * inv_rms).astype(x.dtype) * weight.astype(x.dtype)

"""Fused linear cross-entropy: hidden @ w to the summed token loss, without [n, vocab] logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def fused_linear_cross_entropy_reference(
    hidden: Float[Array, "n d"],
    w: Float[Array, "d vocab"],
    labels: Int[Array, " n"],
    *,
    ignore_index: int = -100,
    normalizer: float | Array | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> Float[Array, ""]:
    logits = jnp.dot(hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    valid = labels != ignore_index
    safe_labels = jnp.where(valid, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, safe_labels[:, None], axis=-1)[:, 0]
    token_loss = jnp.where(valid, lse - label_logit, 0.0)
    if normalizer is None:
        normalizer = jnp.maximum(jnp.sum(valid), 1)
    return jnp.sum(token_loss) / jnp.asarray(normalizer, jnp.float32)

"""Causal grouped-query attention with packed-sequence segment ids."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def attention_mask(
    seq_q: int, seq_k: int, causal: bool, segment_ids_q: Array | None, segment_ids_k: Array | None
) -> Array:
    """Boolean [batch or 1, seq_q, seq_k]. Queries sit at the end of the key range (KV-cache decode)."""
    q_idx = jnp.arange(seq_q)[:, None] + (seq_k - seq_q)
    k_idx = jnp.arange(seq_k)[None, :]
    mask = (q_idx >= k_idx) if causal else jnp.ones((seq_q, seq_k), bool)
    mask = mask[None]
    if segment_ids_q is not None:
        same = segment_ids_q[:, :, None] == segment_ids_k[:, None, :]
        mask = mask & same & (segment_ids_q[:, :, None] != 0)
    return mask


def attention_reference(
    q: Float[Array, "batch seq_q heads_q head_dim"],
    k: Float[Array, "batch seq_k heads_kv head_dim"],
    v: Float[Array, "batch seq_k heads_kv head_dim"],
    *,
    causal: bool = True,
    segment_ids: Int[Array, "batch seq"] | None = None,
    scale: float | None = None,
    kv_segment_ids: Int[Array, "batch seq_k"] | None = None,
) -> Float[Array, "batch seq_q heads_q head_dim"]:
    """Explicit softmax in float32. Fully masked rows (padding, segment 0) give zeros, never NaN."""
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = head_dim**-0.5 if scale is None else scale
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    q_grouped = q.astype(jnp.float32).reshape(batch, seq_q, heads_kv, group, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q_grouped, k.astype(jnp.float32)) * scale
    mask = attention_mask(seq_q, seq_k, causal, segment_ids, kv_segment_ids)[:, None, None]
    row_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32))
    return out.reshape(batch, seq_q, heads_q, head_dim).astype(q.dtype)

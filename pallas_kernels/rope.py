"""Rotary position embeddings, HF rotate_half convention, with HF rope scaling types."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, computed as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    rope_type = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context_len = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def rope_cos_sin(
    positions: Int[Array, "batch seq"], inv_freq: np.ndarray
) -> tuple[Float[Array, "batch seq half"], Float[Array, "batch seq half"]]:
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def rope_reference(
    x: Float[Array, "batch seq heads head_dim"],
    positions: Int[Array, "batch seq"],
    *,
    theta: float,
    scaling: Mapping[str, Any] | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
    head_dim = x.shape[-1]
    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, theta, scaling))
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_f32 = x.astype(jnp.float32)
    first, second = x_f32[..., : head_dim // 2], x_f32[..., head_dim // 2 :]
    # rotate_half(x) = concat(-second, first); cos/sin repeat over both halves.
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)

"""Rotary position embeddings, HF rotate_half convention, with HF rope scaling types."""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from pallas_kernels._common import cdiv, next_power_of_2, use_interpret

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


# ---------------------------------------------------------------------------------------------
# Pallas-Triton kernel.
#
# The wrapper flattens batch and seq to tokens. A program rotates every head of a block of tokens
# (of q and k together in rope_qk, so the pair costs one launch). The angles pos * inv_freq are
# computed in the kernel from the int32 positions, so no cos/sin table is read or saved. Each head
# is loaded as its two halves, [tokens, heads, half] each, with heads and half padded to powers of
# 2 and masked: a 40- or 48-wide half (head_dim 80 or 96) pads to 64, and the second half starts
# at column `half` of the real row, not at the padded width.
# ---------------------------------------------------------------------------------------------

# Elements (tokens x padded heads x padded head_dim, q and k together) a program holds: one token
# of a 32 + 8 head, 128-dim model is 5k, smaller models get several tokens to a program.
_BLOCK_ELEMENTS = 4096
# Elements of the largest half-head load ([tokens, heads, half]) per thread. 32 (two warps for a
# 32-head, 128-dim token): on an H200 (bench/RESULTS.md, sweep of 2026-11-28) fwd+bwd took 0.196 ms
# at 32 against 0.263 at 16 and 0.343 at 8; more threads per token only add scheduling overhead.
_ELEMENTS_PER_THREAD = 32
# Cache eviction hint for the q/k loads (None, or Triton's "evict_first" / "evict_last"): each
# element is read once. In bench/kernels_memory_bound.py's sweep until a GPU measures it.
_LOAD_EVICTION: str | None = None


def _choose_blocks(tokens: int, heads_pad: tuple[int, ...], half_pad: int) -> tuple[int, int]:
    per_token = sum(heads_pad) * 2 * half_pad
    fitting = max(1, _BLOCK_ELEMENTS // per_token)
    # Round down to a power of 2: the positions block is an array of the kernel.
    tokens_per_block = min(next_power_of_2(tokens), 1 << (fitting.bit_length() - 1))
    largest_load = tokens_per_block * max(heads_pad) * half_pad
    num_warps = min(16, max(1, largest_load // (32 * _ELEMENTS_PER_THREAD)))
    return tokens_per_block, num_warps


def _rotate_kernel(
    positions_ref, inv_freq_ref, *refs, tokens: int, half: int, heads: tuple[int, ...], sin_sign: float
):
    """Rotates every (first, second) half pair by sin_sign * angle. refs: the inputs, then the outputs."""
    in_refs, out_refs = refs[: len(heads)], refs[len(heads) :]
    tokens_per_block = positions_ref.shape[0]
    half_pad = inv_freq_ref.shape[0]
    token_valid = pl.program_id(0) * tokens_per_block + jnp.arange(tokens_per_block) < tokens
    column_valid = jnp.arange(half_pad) < half
    positions = pltriton.load(positions_ref, mask=token_valid, other=0).astype(jnp.float32)
    inv_freq = pltriton.load(inv_freq_ref, mask=column_valid, other=0.0)
    # The same float32 product as rope_cos_sin, so the angles agree bit for bit.
    angles = positions[:, None] * inv_freq[None, :]
    cos = jnp.cos(angles)[:, None, :]
    sin = (sin_sign * jnp.sin(angles))[:, None, :]
    for in_ref, out_ref, num_heads in zip(in_refs, out_refs, heads):
        heads_pad = in_ref.shape[1]
        head_valid = jnp.arange(heads_pad) < num_heads
        mask = token_valid[:, None, None] & head_valid[None, :, None] & column_valid[None, None, :]
        first_half = (slice(None), slice(None), pl.ds(0, half_pad))
        second_half = (slice(None), slice(None), pl.ds(half, half_pad))
        first = pltriton.load(in_ref.at[first_half], mask=mask, other=0.0,
                              eviction_policy=_LOAD_EVICTION).astype(jnp.float32)
        second = pltriton.load(in_ref.at[second_half], mask=mask, other=0.0,
                               eviction_policy=_LOAD_EVICTION).astype(jnp.float32)
        pltriton.store(out_ref.at[first_half], (first * cos - second * sin).astype(out_ref.dtype), mask=mask)
        pltriton.store(out_ref.at[second_half], (second * cos + first * sin).astype(out_ref.dtype), mask=mask)


def _rotate(tensors, positions, inv_freq: tuple[float, ...], sin_sign: float):
    """One launch rotating each [batch, seq, heads, head_dim] tensor of `tensors` (same head_dim)."""
    batch, seq, _, head_dim = tensors[0].shape
    tokens, half = batch * seq, head_dim // 2
    half_pad = next_power_of_2(half)
    heads = tuple(tensor.shape[2] for tensor in tensors)
    heads_pad = tuple(next_power_of_2(num_heads) for num_heads in heads)
    tokens_per_block, num_warps = _choose_blocks(tokens, heads_pad, half_pad)
    # The block's last dim is 2 * half_pad so that the second-half window [half, half + half_pad)
    # lies inside it (the interpreter pads each block to its block shape).
    tensor_specs = [
        pl.BlockSpec((tokens_per_block, num_heads_pad, 2 * half_pad), lambda i: (i, 0, 0))
        for num_heads_pad in heads_pad
    ]
    outputs = pl.pallas_call(
        functools.partial(_rotate_kernel, tokens=tokens, half=half, heads=heads, sin_sign=sin_sign),
        out_shape=[jax.ShapeDtypeStruct((tokens, tensor.shape[2], head_dim), tensor.dtype) for tensor in tensors],
        grid=(cdiv(tokens, tokens_per_block),),
        in_specs=[
            pl.BlockSpec((tokens_per_block,), lambda i: (i,)),
            pl.BlockSpec((half_pad,), lambda i: (0,)),
            *tensor_specs,
        ],
        out_specs=tensor_specs,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=use_interpret(),
    )(
        positions.reshape(tokens).astype(jnp.int32),
        jnp.asarray(np.asarray(inv_freq, np.float32)),
        *(tensor.reshape(tokens, tensor.shape[2], head_dim) for tensor in tensors),
    )
    return tuple(out.reshape(tensor.shape) for out, tensor in zip(outputs, tensors))


# Gradient. Per frequency the pair (first, second) is multiplied by the rotation
# R = [[cos, -sin], [sin, cos]], which is orthogonal, so the cotangent maps back through
# R^T = R(-angle): the backward is the forward kernel with sin negated. Only positions are saved
# (the angles are recomputed); positions are integers and get no cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rope_many(tensors, positions, inv_freq):
    return _rotate(tensors, positions, inv_freq, 1.0)


def _rope_many_fwd(tensors, positions, inv_freq):
    return _rotate(tensors, positions, inv_freq, 1.0), positions


def _rope_many_bwd(inv_freq, positions, d_rotated):
    return _rotate(d_rotated, positions, inv_freq, -1.0), None


_rope_many.defvjp(_rope_many_fwd, _rope_many_bwd)


def _inv_freq_tuple(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> tuple[float, ...]:
    # A tuple of floats is hashable (a static argument of the custom_vjp) and round-trips float32.
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {head_dim}")
    return tuple(float(value) for value in rope_inv_freq(head_dim, theta, scaling))


def rope(
    x: Float[Array, "batch seq heads head_dim"],
    positions: Int[Array, "batch seq"],
    *,
    theta: float,
    scaling: Mapping[str, Any] | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
    """rope_reference as a Pallas-Triton kernel; the backward is the inverse rotation."""
    if positions.shape != x.shape[:2]:
        raise ValueError(f"rope: positions shape {positions.shape} does not match x's [batch, seq] {x.shape[:2]}")
    (rotated,) = _rope_many((x,), positions, _inv_freq_tuple(x.shape[-1], theta, scaling))
    return rotated


def rope_qk(
    q: Float[Array, "batch seq heads_q head_dim"],
    k: Float[Array, "batch seq heads_kv head_dim"],
    positions: Int[Array, "batch seq"],
    *,
    theta: float,
    scaling: Mapping[str, Any] | None = None,
) -> tuple[Float[Array, "batch seq heads_q head_dim"], Float[Array, "batch seq heads_kv head_dim"]]:
    """(rope(q), rope(k)) in one kernel launch, forward and backward alike."""
    if q.shape[:2] != positions.shape or k.shape[:2] != positions.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"rope_qk: q {q.shape} and k {k.shape} must share [batch, seq] = positions {positions.shape} "
            "and head_dim"
        )
    q_rotated, k_rotated = _rope_many((q, k), positions, _inv_freq_tuple(q.shape[-1], theta, scaling))
    return q_rotated, k_rotated

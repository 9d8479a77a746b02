"""Causal grouped-query attention with packed-sequence segment ids."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from pallas_kernels._common import cdiv, next_power_of_2, use_interpret


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


# ---------------------------------------------------------------------------------------------
# Flash attention (Pallas, Triton lowering)
#
# Layout is [batch, seq, heads, head_dim] throughout, as the model produces it. The wrapper pads
# head_dim to a power of 2 and both sequences to a multiple of the largest block (Triton wants
# power-of-2 tiles); padded keys are masked, padded query rows are sliced off and their zero
# cotangent keeps them out of the gradients.
#
# Logits are kept in base 2 (exp2 is one instruction): s = q.k * scale * log2(e), and the saved
# logsumexp is base 2 as well. Masked logits are -inf; the running max starts at a finite
# _ROW_MAX_INIT so a row that has seen only masked keys keeps max -1e30, p = exp2(-inf) = 0 and
# l = 0, which the epilogue turns into output 0 and lse = +1e30 (never NaN).
#
# Which key blocks a query block visits (and which of those need the causal / padding mask) is
# computed in the wrapper as small int32 tables, one (lo, mid, hi) triple per block, read with
# scalar loads in the kernels. Causal attention skips the blocks above the diagonal; with segment
# ids every block outside the span of the segments present is skipped as well, so a packed row
# costs about what its sequences cost separately.
# ---------------------------------------------------------------------------------------------


_LOG2_E = math.log2(math.e)
_ROW_MAX_INIT = -1e30
# lse of a row that saw no key: any probability recomputed from it, exp2(s - 1e30), is 0, so
# the backward never meets inf * 0 even where a larger backward tile sweeps over that row.
_EMPTY_ROW_LSE = 1e30
_MIN_BLOCK = 16  # tl.dot needs every matmul dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch parameters of the three kernels (forward, dK/dV, dQ)."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    block_q_dkv: int
    block_k_dkv: int
    num_warps_dkv: int
    num_stages_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps_dq: int
    num_stages_dq: int


def choose_block_sizes(seq_q: int, seq_k: int, head_dim_padded: int, interpret: bool, itemsize: int = 2) -> BlockSizes:
    """Tiles for a GPU launch. In interpret mode (CPU tests) 32-token tiles give the short test
    sequences several blocks each, so the block skipping and the range tables are exercised."""
    if interpret:
        blocks = BlockSizes(32, 32, 4, 2, 32, 32, 4, 2, 32, 32, 4, 2)
    elif head_dim_padded <= 64:
        blocks = BlockSizes(128, 64, 4, 3, 64, 128, 4, 2, 128, 64, 4, 2)
    elif itemsize > 2:
        # float32 tiles take twice the shared memory: the 16-bit forward's 128x128 on 3 stages asked
        # an H200 for 385 KiB of the 227 KiB it has. 64x64 tiles on one stage fit, and ran the GQA
        # 1-7 packed-row gradient checks at 2048 tokens within 1.4e-6 of the reference (H200).
        blocks = BlockSizes(64, 64, 4, 1, 64, 64, 4, 1, 64, 64, 4, 1)
    else:
        # The best of bench/attention.py's sweep at Llama-3-8B 8k on an H200 (2026-11-28): forward
        # 128x128 on 8 warps (395 TF/s against 380 for FlashAttention-2's 128x64), backward 64x64
        # tiles on 4 warps for both dK/dV and dQ (fwd+bwd 355 TF/s against 330 for 64x128 / 128x64
        # on 8 warps).
        blocks = BlockSizes(128, 128, 8, 3, 64, 64, 4, 2, 64, 64, 4, 2)
    return _fit_blocks(blocks, seq_q, seq_k)


def _fit_blocks(blocks: BlockSizes, seq_q: int, seq_k: int) -> BlockSizes:
    """Shrink tiles to the (power-of-2 rounded) sequence so short inputs are not padded to 128."""
    fit_q = max(_MIN_BLOCK, next_power_of_2(seq_q))
    fit_k = max(_MIN_BLOCK, next_power_of_2(seq_k))
    return dataclasses.replace(
        blocks,
        block_q=min(blocks.block_q, fit_q),
        block_k=min(blocks.block_k, fit_k),
        block_q_dkv=min(blocks.block_q_dkv, fit_q),
        block_k_dkv=min(blocks.block_k_dkv, fit_k),
        block_q_dq=min(blocks.block_q_dq, fit_q),
        block_k_dq=min(blocks.block_k_dq, fit_k),
    )


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need that is known at trace time (hashable: custom_vjp nondiff arg)."""

    causal: bool
    scale: float
    seq_q: int  # real lengths; the arrays the kernels see are padded
    seq_k: int
    group: int  # query heads per kv head
    has_segments: bool
    blocks: BlockSizes

    @property
    def offset(self) -> int:
        """Queries sit at the end of the key range: query i has position i + offset."""
        return self.seq_k - self.seq_q


def _compiler_params(num_warps: int, num_stages: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _scores(a, b):
    """a @ b.T in float32 (contracting the last axis of both tiles)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tile_mask(static: _Static, q_pos, k_pos, seg_q, seg_k, boundary: bool, keys_major: bool = False):
    """Mask for a [queries, keys] tile ([keys, queries] if keys_major), or None. `boundary` adds the
    causal / key-padding part, needed only on the tiles the range tables flag as crossing the
    diagonal or the end of the keys."""
    if keys_major:
        shape = (k_pos.shape[0], q_pos.shape[0])
        along_q, along_k = (lambda x: x[None, :]), (lambda x: x[:, None])
    else:
        shape = (q_pos.shape[0], k_pos.shape[0])
        along_q, along_k = (lambda x: x[:, None]), (lambda x: x[None, :])
    mask = None
    if seg_q is not None:
        mask = (along_q(seg_q) == along_k(seg_k)) & (along_q(seg_q) != 0)
    if boundary:
        if static.causal:
            edge = along_q(q_pos) >= along_k(k_pos)
        else:
            edge = jnp.broadcast_to(along_k(k_pos) < static.seq_k, shape)
        mask = edge if mask is None else mask & edge
    return mask


def _forward_kernel(ranges_ref, *refs, static: _Static, num_q_blocks: int):
    if static.has_segments:
        segment_ref, q_ref, k_ref, v_ref, out_ref, lse_ref = refs
    else:
        segment_ref = None
        q_ref, k_ref, v_ref, out_ref, lse_ref = refs
    block_q, block_k = static.blocks.block_q, static.blocks.block_k
    q_block = _q_block_index(static, num_q_blocks)
    lo, mid, hi = ranges_ref[0, q_block], ranges_ref[1, q_block], ranges_ref[2, q_block]

    q = q_ref[...]
    q_pos = q_block * block_q + jnp.arange(block_q) + static.offset
    seg_q = None if segment_ref is None else segment_ref[pl.ds(q_block * block_q, block_q)]
    qk_scale = static.scale * _LOG2_E

    def step(k_block, carry, boundary):
        acc, row_max, row_sum = carry
        keys = pl.ds(k_block * block_k, block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        logits = _scores(q, k) * qk_scale
        seg_k = None if segment_ref is None else segment_ref[keys]
        mask = _tile_mask(static, q_pos, k_block * block_k + jnp.arange(block_k), seg_q, seg_k, boundary)
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        rescale = jnp.exp2(row_max - new_max)
        probs = jnp.exp2(logits - new_max[:, None])
        row_sum = row_sum * rescale + jnp.sum(probs, axis=1)
        acc = acc * rescale[:, None] + jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, new_max, row_sum

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q,), _ROW_MAX_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = lax.fori_loop(lo, mid, functools.partial(step, boundary=False), carry)
    carry = lax.fori_loop(mid, hi, functools.partial(step, boundary=True), carry)
    acc, row_max, row_sum = carry
    empty_row = row_sum == 0.0
    safe_sum = jnp.where(empty_row, 1.0, row_sum)
    out_ref[...] = (acc / safe_sum[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(empty_row, _EMPTY_ROW_LSE, row_max + jnp.log2(safe_sum))


def _q_block_index(static: _Static, num_q_blocks: int):
    """Causal: launch the longest query blocks (the last ones) first so the tail of the grid is short."""
    program = pl.program_id(0)
    return num_q_blocks - 1 - program if static.causal else program


def _q_block_map(static: _Static, num_q_blocks: int):
    return (lambda i: num_q_blocks - 1 - i) if static.causal else (lambda i: i)


def _forward(static: _Static, q, k, v, segment_ids, ranges):
    batch, seq_q_padded, heads_q, head_dim_padded = q.shape
    seq_k_padded = k.shape[1]
    blocks = static.blocks
    num_q_blocks = seq_q_padded // blocks.block_q
    q_map = _q_block_map(static, num_q_blocks)
    group = static.group
    per_batch_ranges = ranges.shape[0] > 1
    in_specs = [pl.BlockSpec((None, *ranges.shape[1:]), lambda i, b, h: (b if per_batch_ranges else 0, 0, 0))]
    operands = [ranges]
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, seq_q_padded), lambda i, b, h: (b, 0)))
        operands.append(segment_ids)
    in_specs += [
        pl.BlockSpec((None, blocks.block_q, None, head_dim_padded), lambda i, b, h: (b, q_map(i), h, 0)),
        pl.BlockSpec((None, seq_k_padded, None, head_dim_padded), lambda i, b, h: (b, 0, h // group, 0)),
        pl.BlockSpec((None, seq_k_padded, None, head_dim_padded), lambda i, b, h: (b, 0, h // group, 0)),
    ]
    operands += [q, k, v]
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, static=static, num_q_blocks=num_q_blocks),
        grid=(num_q_blocks, batch, heads_q),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, blocks.block_q, None, head_dim_padded), lambda i, b, h: (b, q_map(i), h, 0)),
            pl.BlockSpec((None, None, blocks.block_q), lambda i, b, h: (b, h, q_map(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads_q, seq_q_padded), jnp.float32),
        ],
        compiler_params=_compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=use_interpret(),
        name="flash_attention_forward",
    )(*operands)
    return out, lse


# Backward. With P = softmax(S), S = scale * Q K^T (masked), O = P V and cotangent dO:
#   dV = P^T dO
#   dP = dO V^T
#   dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
#   dQ = scale * dS K,      dK = scale * dS^T Q
# P is recomputed tile by tile from the saved (base-2) logsumexp: P = exp2(S * log2(e) - lse).
# dK/dV: one program per key block and kv head, looping over the group's query heads and the
# query blocks that can see the key block. dQ: one program per query block and head, looping over
# the key blocks it sees. No [T, T] array exists anywhere; extra memory is O(T) per head.


def _dkv_kernel(ranges_ref, *refs, static: _Static):
    if static.has_segments:
        segment_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        segment_ref = None
        q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    block_q, block_k = static.blocks.block_q_dkv, static.blocks.block_k_dkv
    k_block = pl.program_id(0)
    lo, mid, hi = ranges_ref[0, k_block], ranges_ref[1, k_block], ranges_ref[2, k_block]

    k = k_ref[...]
    v = v_ref[...]
    k_pos = k_block * block_k + jnp.arange(block_k)
    seg_k = None if segment_ref is None else segment_ref[pl.ds(k_block * block_k, block_k)]
    qk_scale = static.scale * _LOG2_E

    def step(q_block, carry, head, boundary):
        dk, dv = carry
        rows = pl.ds(q_block * block_q, block_q)
        q = q_ref[rows, head, :]
        d_out = d_out_ref[rows, head, :]
        lse = lse_ref[head, rows]
        delta = delta_ref[head, rows]
        # Transposed tiles ([keys, queries]) so the accumulations are plain matmuls.
        logits_t = _scores(k, q) * qk_scale
        seg_q = None if segment_ref is None else segment_ref[rows]
        q_pos = q_block * block_q + jnp.arange(block_q) + static.offset
        mask = _tile_mask(static, q_pos, k_pos, seg_q, seg_k, boundary, keys_major=True)
        if mask is not None:
            logits_t = jnp.where(mask, logits_t, -jnp.inf)
        probs_t = jnp.exp2(logits_t - lse[None, :])
        dv = dv + jnp.dot(probs_t.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
        d_probs_t = _scores(v, d_out)
        d_logits_t = probs_t * (d_probs_t - delta[None, :])
        dk = dk + jnp.dot(d_logits_t.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    def head_step(head, carry):
        carry = lax.fori_loop(lo, mid, functools.partial(step, head=head, boundary=True), carry)
        return lax.fori_loop(mid, hi, functools.partial(step, head=head, boundary=False), carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if static.group == 1:
        dk, dv = head_step(0, carry)
    else:
        dk, dv = lax.fori_loop(0, static.group, head_step, carry)
    dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(ranges_ref, *refs, static: _Static, num_q_blocks: int):
    if static.has_segments:
        segment_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        segment_ref = None
        q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref = refs
    block_q, block_k = static.blocks.block_q_dq, static.blocks.block_k_dq
    q_block = _q_block_index(static, num_q_blocks)
    lo, mid, hi = ranges_ref[0, q_block], ranges_ref[1, q_block], ranges_ref[2, q_block]

    q = q_ref[...]
    d_out = d_out_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = q_block * block_q + jnp.arange(block_q) + static.offset
    seg_q = None if segment_ref is None else segment_ref[pl.ds(q_block * block_q, block_q)]
    qk_scale = static.scale * _LOG2_E

    def step(k_block, dq, boundary):
        keys = pl.ds(k_block * block_k, block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        logits = _scores(q, k) * qk_scale
        seg_k = None if segment_ref is None else segment_ref[keys]
        mask = _tile_mask(static, q_pos, k_block * block_k + jnp.arange(block_k), seg_q, seg_k, boundary)
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        probs = jnp.exp2(logits - lse[:, None])
        d_logits = probs * (_scores(d_out, v) - delta[:, None])
        return dq + jnp.dot(d_logits.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(lo, mid, functools.partial(step, boundary=False), dq)
    dq = lax.fori_loop(mid, hi, functools.partial(step, boundary=True), dq)
    dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _backward_dkv(static: _Static, q, k, v, segment_ids, d_out, lse, delta, ranges):
    batch, seq_q_padded, heads_q, head_dim_padded = q.shape
    seq_k_padded, heads_kv = k.shape[1], k.shape[2]
    group = static.group
    blocks = static.blocks
    # Query heads of one kv head are adjacent (head = kv_head * group + g): a free reshape gives
    # the kernel all of them, so K/V are never repeated and dK/dV sum the group in registers.
    q_grouped = q.reshape(batch, seq_q_padded, heads_kv, group, head_dim_padded)
    d_out_grouped = d_out.reshape(q_grouped.shape)
    lse_grouped = lse.reshape(batch, heads_kv, group, seq_q_padded)
    delta_grouped = delta.reshape(lse_grouped.shape)
    per_batch_ranges = ranges.shape[0] > 1
    in_specs = [pl.BlockSpec((None, *ranges.shape[1:]), lambda j, b, h: (b if per_batch_ranges else 0, 0, 0))]
    operands = [ranges]
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, seq_q_padded), lambda j, b, h: (b, 0)))
        operands.append(segment_ids)
    q_spec = pl.BlockSpec((None, seq_q_padded, None, group, head_dim_padded), lambda j, b, h: (b, 0, h, 0, 0))
    kv_spec = pl.BlockSpec((None, blocks.block_k_dkv, None, head_dim_padded), lambda j, b, h: (b, j, h, 0))
    row_spec = pl.BlockSpec((None, None, group, seq_q_padded), lambda j, b, h: (b, h, 0, 0))
    in_specs += [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    operands += [q_grouped, k, v, d_out_grouped, lse_grouped, delta_grouped]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, static=static),
        grid=(seq_k_padded // blocks.block_k_dkv, batch, heads_kv),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(blocks.num_warps_dkv, blocks.num_stages_dkv),
        interpret=use_interpret(),
        name="flash_attention_dkv",
    )(*operands)


def _backward_dq(static: _Static, q, k, v, segment_ids, d_out, lse, delta, ranges):
    batch, seq_q_padded, heads_q, head_dim_padded = q.shape
    seq_k_padded = k.shape[1]
    group = static.group
    blocks = static.blocks
    num_q_blocks = seq_q_padded // blocks.block_q_dq
    q_map = _q_block_map(static, num_q_blocks)
    per_batch_ranges = ranges.shape[0] > 1
    in_specs = [pl.BlockSpec((None, *ranges.shape[1:]), lambda i, b, h: (b if per_batch_ranges else 0, 0, 0))]
    operands = [ranges]
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, seq_q_padded), lambda i, b, h: (b, 0)))
        operands.append(segment_ids)
    q_spec = pl.BlockSpec((None, blocks.block_q_dq, None, head_dim_padded), lambda i, b, h: (b, q_map(i), h, 0))
    kv_spec = pl.BlockSpec((None, seq_k_padded, None, head_dim_padded), lambda i, b, h: (b, 0, h // group, 0))
    row_spec = pl.BlockSpec((None, None, blocks.block_q_dq), lambda i, b, h: (b, h, q_map(i)))
    in_specs += [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    operands += [q, k, v, d_out, lse, delta]
    return pl.pallas_call(
        functools.partial(_dq_kernel, static=static, num_q_blocks=num_q_blocks),
        grid=(num_q_blocks, batch, heads_q),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(blocks.num_warps_dq, blocks.num_stages_dq),
        interpret=use_interpret(),
        name="flash_attention_dq",
    )(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, segment_ids, fwd_ranges, dkv_ranges, dq_ranges):
    return _forward(static, q, k, v, segment_ids, fwd_ranges)[0]


def _flash_fwd(static: _Static, q, k, v, segment_ids, fwd_ranges, dkv_ranges, dq_ranges):
    out, lse = _forward(static, q, k, v, segment_ids, fwd_ranges)
    return out, (q, k, v, segment_ids, dkv_ranges, dq_ranges, out, lse)


def _flash_bwd(static: _Static, residuals, d_out):
    q, k, v, segment_ids, dkv_ranges, dq_ranges, out, lse = residuals
    # delta = rowsum(dO * O): one fused XLA reduction reads O and dO once, as a kernel would.
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dk, dv = _backward_dkv(static, q, k, v, segment_ids, d_out, lse, delta, dkv_ranges)
    dq = _backward_dq(static, q, k, v, segment_ids, d_out, lse, delta, dq_ranges)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _segment_spans(segment_ids: Array) -> tuple[Array, Array]:
    """First and last position of each token's segment (segments need not be contiguous).
    Padding tokens (id 0) get an empty span (first = len, last = -1) so they widen nothing."""
    batch, seq = segment_ids.shape
    order = jnp.argsort(segment_ids, axis=1, stable=True)
    sorted_ids = jnp.take_along_axis(segment_ids, order, axis=1)
    pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    changes = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), changes], axis=1)
    ends = jnp.concatenate([changes, jnp.ones((batch, 1), bool)], axis=1)
    start_at = lax.cummax(jnp.where(starts, pos, 0), axis=1)
    end_at = lax.cummin(jnp.where(ends, pos, seq - 1), axis=1, reverse=True)
    # Stable sort: within a segment the original positions ascend, so the run's ends are its span.
    first_sorted = jnp.take_along_axis(order, start_at, axis=1)
    last_sorted = jnp.take_along_axis(order, end_at, axis=1)
    rows = jnp.arange(batch)[:, None]
    first = jnp.zeros_like(order).at[rows, order].set(first_sorted)
    last = jnp.zeros_like(order).at[rows, order].set(last_sorted)
    is_token = segment_ids != 0
    return jnp.where(is_token, first, seq), jnp.where(is_token, last, -1)


def _visit_ranges(
    num_blocks: int,
    block: int,
    other_block: int,
    *,
    rows_are_queries: bool,
    static: _Static,
    spans: tuple[Array, Array] | None,
) -> Array:
    """int32 [1 or batch, 3, num_blocks]: per block of rows, the (lo, mid, hi) blocks of the other
    axis it visits. Forward/dQ (rows are queries): [lo, mid) unmasked, [mid, hi) need the boundary
    mask. dK/dV (rows are keys): [lo, mid) need the boundary mask, [mid, hi) unmasked."""
    idx = jnp.arange(num_blocks)
    offset = static.offset
    if rows_are_queries:
        rows_real = static.seq_q
        other_real_blocks = cdiv(static.seq_k, other_block)
        lo = jnp.zeros_like(idx)
        if static.causal:
            hi = jnp.clip(-((-((idx + 1) * block + offset)) // other_block), 0, other_real_blocks)
            mid = jnp.clip((idx * block + offset + 1) // other_block, 0, hi)
        else:
            hi = jnp.full_like(idx, other_real_blocks)
            mid = jnp.minimum(jnp.full_like(idx, static.seq_k // other_block), hi)
    else:
        rows_real = static.seq_k
        other_real_blocks = cdiv(static.seq_q, other_block)
        hi = jnp.full_like(idx, other_real_blocks)
        if static.causal:
            lo = jnp.clip((idx * block - offset) // other_block, 0, other_real_blocks)
            mid = jnp.clip(-((-((idx + 1) * block - 1 - offset)) // other_block), lo, hi)
        else:
            lo = jnp.zeros_like(idx)
            mid = jnp.where((idx + 1) * block > static.seq_k, hi, lo)
    empty = idx * block >= rows_real
    lo, mid, hi = (jnp.where(empty, 0, x)[None] for x in (lo, mid, hi))
    if spans is not None:
        first, last = spans
        batch = first.shape[0]
        span_lo = jnp.min(first.reshape(batch, num_blocks, block), axis=2) // other_block
        span_hi = -((-(jnp.max(last.reshape(batch, num_blocks, block), axis=2) + 1)) // other_block)
        lo = jnp.maximum(lo, span_lo)
        hi = jnp.maximum(jnp.minimum(hi, span_hi), lo)
        mid = jnp.clip(mid, lo, hi)
    return jnp.stack([lo, mid, hi], axis=1).astype(jnp.int32)


def pad_and_plan(qkv, segment_ids, *, static, head_dim_padded: int, q_multiple: int, k_multiple: int, tiles):
    """What every flash kernel's wrapper does before its launch (this file's and attention_hopper's):
    pad q, k, v along the sequence to the tile multiples (one length for both when segment ids label
    queries and keys alike) and along head_dim to head_dim_padded; give padding tokens segment id 0;
    and build one visit table per (row block, other block, rows_are_queries) of `tiles`.
    Returns ((q, k, v), segment_ids, tables)."""
    q, k, v = qkv
    seq_q, seq_k, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if segment_ids is not None:
        q_multiple = k_multiple = max(q_multiple, k_multiple)
    seq_q_padded = cdiv(seq_q, q_multiple) * q_multiple
    seq_k_padded = cdiv(seq_k, k_multiple) * k_multiple

    def pad(x, seq_padded):
        widths = ((0, 0), (0, seq_padded - x.shape[1]), (0, 0), (0, head_dim_padded - head_dim))
        return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)

    spans = None
    if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, seq_q_padded - seq_q)))
        spans = lax.stop_gradient(_segment_spans(segment_ids))
    tables = tuple(
        _visit_ranges((seq_q_padded if rows_are_queries else seq_k_padded) // block, block, other_block,
                      rows_are_queries=rows_are_queries, static=static, spans=spans)
        for block, other_block, rows_are_queries in tiles
    )
    return (pad(q, seq_q_padded), pad(k, seq_k_padded), pad(v, seq_k_padded)), segment_ids, tables


def flash_attention(
    q: Float[Array, "batch seq_q heads_q head_dim"],
    k: Float[Array, "batch seq_k heads_kv head_dim"],
    v: Float[Array, "batch seq_k heads_kv head_dim"],
    *,
    causal: bool = True,
    segment_ids: Int[Array, "batch seq"] | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "batch seq_q heads_q head_dim"]:
    """Flash attention with grouped-query heads and packed-row segment ids; same semantics as
    `attention_reference`. Float32 accumulation, output in q.dtype, differentiable in q, k, v."""
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} must be [batch, seq_k, heads_kv, {head_dim}]")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them first")
    if heads_q % heads_kv != 0:
        raise ValueError(f"flash_attention: heads_q={heads_q} is not a multiple of heads_kv={heads_kv}")
    if segment_ids is not None and (seq_q != seq_k or segment_ids.shape != (batch, seq_q)):
        raise ValueError(
            f"flash_attention: segment_ids {segment_ids.shape} need seq_q == seq_k and shape {(batch, seq_q)}"
        )
    scale = head_dim**-0.5 if scale is None else float(scale)
    head_dim_padded = max(_MIN_BLOCK, next_power_of_2(head_dim))
    if block_sizes is None:
        block_sizes = choose_block_sizes(seq_q, seq_k, head_dim_padded, use_interpret(), jnp.dtype(q.dtype).itemsize)
    blocks = block_sizes
    static = _Static(
        causal=causal,
        scale=scale,
        seq_q=seq_q,
        seq_k=seq_k,
        group=heads_q // heads_kv,
        has_segments=segment_ids is not None,
        blocks=blocks,
    )
    q_multiple = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
    k_multiple = max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
    (q, k, v), segment_ids, (fwd_ranges, dkv_ranges, dq_ranges) = pad_and_plan(
        (q, k, v), segment_ids, static=static, head_dim_padded=head_dim_padded, q_multiple=q_multiple,
        k_multiple=k_multiple, tiles=((blocks.block_q, blocks.block_k, True), (blocks.block_k_dkv, blocks.block_q_dkv, False),
                                      (blocks.block_q_dq, blocks.block_k_dq, True)))
    out = _flash(static, q, k, v, segment_ids, fwd_ranges, dkv_ranges, dq_ranges)
    return out[:, :seq_q, :, :head_dim]

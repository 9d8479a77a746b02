"""Causal grouped-query flash attention with packed-row segment ids for Hopper (sm90), through
Pallas' Mosaic GPU backend: TMA copies, wgmma and warp specialization (FlashAttention-3's
structure). Same semantics as `pallas_kernels.attention.flash_attention` / `attention_reference`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels._common import is_sm90_gpu
from pallas_kernels.attention import _EMPTY_ROW_LSE, _LOG2_E, _ROW_MAX_INIT, pad_and_plan

# --- jax version shim (0.10.2 here, 0.11.2 on the GPU machine) ---------------------------------
# 0.10 requires an index in plgpu.load(ref, (), layout=...); 0.11 made it optional (and documents
# plgpu.load(ref, layout=...)). Transposed smem views are ref.transpose((1, 0)) in both versions
# (0.10's plgpu.transpose_ref only forwarded to it and 0.11 deprecates it).
if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:

    def _load(ref, layout):
        return plgpu.load(ref, (), layout=layout)

else:

    def _load(ref, layout):
        return plgpu.load(ref, layout=layout)


def _t(ref):
    return ref.transpose((1, 0))


# -----------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MAX_HEAD_DIM = 128
_COMPUTE_WGS = 2  # consumer warpgroups per CTA; a third one (the producer) issues the TMA copies
_ROWS = plgpu.Layout.WGMMA.reduce(1)  # a vector along the rows of a WGMMA tile
_COLS = plgpu.Layout.WGMMA.reduce(0)  # a vector along its columns
_RCP_LN2 = 1.0 / math.log(2.0)


def hopper_attention_available() -> bool:
    """True when the default backend is an sm90 GPU (H100/H200/GH200); never raises."""
    return is_sm90_gpu()


@dataclasses.dataclass(frozen=True)
class HopperBlocks:
    """Tiles of the three kernels. block_q (forward, dQ) and block_kv_dkv (dK/dV) are per consumer
    warpgroup: a CTA owns two such blocks. Every tile is a multiple of 64 (the wgmma M of a
    warpgroup; the 128-byte swizzle spans 64 16-bit elements)."""

    block_q: int
    block_kv: int
    stages: int
    block_q_dq: int
    block_kv_dq: int
    stages_dq: int
    block_q_dkv: int
    block_kv_dkv: int
    stages_dkv: int

    @property
    def q_multiple(self) -> int:
        return max(_COMPUTE_WGS * self.block_q, _COMPUTE_WGS * self.block_q_dq, self.block_q_dkv)

    @property
    def kv_multiple(self) -> int:
        return max(self.block_kv, self.block_kv_dq, _COMPUTE_WGS * self.block_kv_dkv)


def choose_block_sizes(head_dim_padded: int) -> HopperBlocks:
    """Tiles and ring depths (stages = K/V or Q/dO slots in flight) per head_dim.

    Forward: 64 queries per consumer warpgroup (128 per CTA, FlashAttention-3's M for d<=128):
    the f32 accumulator (64 x d) and the logits tile (64 x block_kv) must fit the 232 registers a
    consumer thread gets. block_kv = 128 is what attention_mgpu's autotuning settles on at d=128.
    Shared memory (227 KiB): Q/O 2 x 64 x d, plus stages x (K + V) of block_kv x d, 16-bit: at
    d=128 two stages take 160 KiB and a third would not fit; at d=64 three stages take 120 KiB.
    Backward: dQ holds dQ (64 x d) plus S and dP (64 x block_kv) in registers, so block_kv_dq
    is 64 at d=128 and 128 at d=64. dK/dV holds dK and dV (2 x 64 x d) plus the transposed
    S and dP tiles, so 64 keys per warpgroup and 64-query steps. These are starting points for
    the H200 measurement (bench/attention_hopper_check.py), not yet measured choices.
    """
    if head_dim_padded <= 64:
        return HopperBlocks(64, 128, 3, 64, 128, 3, 64, 64, 3)
    return HopperBlocks(64, 128, 2, 64, 64, 2, 64, 64, 2)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Trace-time facts (hashable: custom_vjp nondiff arg). causal / seq_q / seq_k / offset are
    the fields `_visit_ranges` reads from the Triton kernel's own _Static."""

    causal: bool
    scale: float
    seq_q: int  # real lengths; the arrays the kernels see are padded
    seq_k: int
    group: int
    has_segments: bool
    blocks: HopperBlocks
    fused_dq: bool = False  # the dK/dV kernel also reduce-adds dQ (see _dkv_body); no dQ kernel

    @property
    def offset(self) -> int:
        """Queries sit at the end of the key range: query i has position i + offset."""
        return self.seq_k - self.seq_q


def _smem_tile(shape, dtype):
    """A 16-bit smem tile in the layout wgmma and TMA want: 8 x 64 tiles, 128-byte swizzle."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _tile_mask(static: _Static, shape, q_start, k_start, seg_q, seg_k, boundary: bool, keys_major: bool):
    """Mask of a [queries, keys] wgmma tile ([keys, queries] if keys_major), or None, built in the
    WGMMA register layout. seg_q / seg_k are the segment-id vectors of the tile's rows and columns
    (in the matching reduced layouts). `boundary` adds the causal / key-padding part, needed only
    on the tiles the range tables flag."""
    q_dim, k_dim = (1, 0) if keys_major else (0, 1)
    mask = None
    if seg_q is not None:
        seg_q_tile = lax.broadcast_in_dim(seg_q, shape, [q_dim])
        seg_k_tile = lax.broadcast_in_dim(seg_k, shape, [k_dim])
        mask = (seg_q_tile == seg_k_tile) & (seg_q_tile != 0)
    if boundary:
        k_pos = _iota(shape, k_dim) + k_start
        if static.causal:
            edge = (_iota(shape, q_dim) + (q_start + static.offset)) >= k_pos
        else:
            edge = k_pos < static.seq_k
        mask = edge if mask is None else mask & edge
    return mask


def _cta_ranges(table_ref, table_row, first_block):
    """The (lo, mid, hi) of the two consumer blocks first_block, first_block + 1 and the union
    [lo_cta, hi_cta) the producer streams (an empty block widens nothing). Each warpgroup's own
    range is clipped into the union so that [lo_cta, lo) and [hi, hi_cta) are the steps it skips."""
    ranges = []
    for w in range(_COMPUTE_WGS):
        ranges.append(tuple(table_ref[table_row, i, first_block + w] for i in range(3)))
    big = jnp.int32(2**30)
    lo_cta = big
    hi_cta = jnp.int32(0)
    for lo, _, hi in ranges:
        lo_cta = jnp.minimum(lo_cta, jnp.where(lo < hi, lo, big))
        hi_cta = jnp.maximum(hi_cta, jnp.where(lo < hi, hi, 0))
    lo_cta = jnp.minimum(lo_cta, hi_cta)
    return ranges, lo_cta, hi_cta


def _own_range(ranges, wg, lo_cta):
    """This warpgroup's (lo, mid, hi), selected by the traced warpgroup index; empty -> lo_cta."""
    lo0, mid0, hi0 = ranges[0]
    lo1, mid1, hi1 = ranges[1]
    first = wg == 0
    lo, mid, hi = (jnp.where(first, a, b) for a, b in ((lo0, lo1), (mid0, mid1), (hi0, hi1)))
    empty = lo >= hi
    return tuple(jnp.where(empty, lo_cta, x) for x in (lo, mid, hi))


def _slot(step, stages):
    return lax.rem(step, jnp.array(stages, step.dtype))


def _produce(num_steps, stages, groups):
    """Producer warpgroup: stream num_steps steps through a ring of `stages` smem slots. groups is
    a list of (consumed barriers, [(source(step) -> gmem view, smem ring, full barriers)]): a slot
    is refilled once both consumers arrived on its consumed barrier (waited once per group, as
    every wait flips the waiter's parity)."""

    @pl.loop(0, num_steps)
    def _(step):
        slot = _slot(step, stages)
        for consumed, copies in groups:

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(consumed.at[slot])

            for source, ring, full in copies:
                plgpu.copy_gmem_to_smem(source(step), ring.at[slot], full.at[slot])


def _skip_loop(start, stop, body_skip, carry):
    return lax.fori_loop(start, stop, lambda s, c: (body_skip(s), c)[1], carry)


# ---------------------------------------------------------------------------------------------
# Forward. CTA = (query head, pair of query blocks, batch row); warpgroups 0 and 1 each own a
# block of block_q queries, warpgroup 2 streams K/V (and the key segment ids) through the ring.
# Both consumers step through the union of their kv ranges so that every barrier phase is waited
# exactly once by each of them; a step outside a consumer's own range only waits and releases.
# Logits stay in base 2 (s * scale * log2 e), and the running max starts at a finite
# _ROW_MAX_INIT, as in the Triton kernel, so a fully masked row ends with l = 0, output 0 and
# lse = _EMPTY_ROW_LSE, never NaN. The two consumers alternate their wgmma and softmax phases
# through a two-party schedule barrier (FlashAttention-3's ping-pong): two rendezvous per step.
# ---------------------------------------------------------------------------------------------


def _forward_body(table_ref, *refs, static: _Static, num_tiles: int, head_dim: int, dtype):
    if static.has_segments:
        seg_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scratch = refs
    else:
        seg_ref = None
        q_ref, k_ref, v_ref, out_ref, lse_ref, scratch = refs
    blocks = static.blocks
    block_q, block_kv, stages = blocks.block_q, blocks.block_kv, blocks.stages
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("q_seq")
    if static.causal:  # the longest query tiles (the last ones) first, so the tail of the grid is short
        tile = num_tiles - 1 - tile
    table_row = batch if table_ref.shape[0] > 1 else 0
    ranges, lo_cta, hi_cta = _cta_ranges(table_ref, table_row, tile * _COMPUTE_WGS)
    num_steps = hi_cta - lo_cta
    qk_scale = static.scale * _LOG2_E
    schedule = scratch["schedule"]

    def rendezvous():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    def wait_keys(step):
        slot = _slot(step - lo_cta, stages)
        plgpu.barrier_wait(scratch["k_full"].at[slot])
        if seg_ref is not None:
            plgpu.barrier_wait(scratch["segk_full"].at[slot])

    @pl.when(wg < _COMPUTE_WGS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        lo, mid, hi = _own_range(ranges, wg, lo_cta)
        q_start = (tile * _COMPUTE_WGS + wg) * block_q
        qo_smem = scratch["qo"].at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, block_q), head], qo_smem, scratch["q_full"].at[wg])
        seg_q = None
        if seg_ref is not None:
            plgpu.copy_gmem_to_smem(
                seg_ref.at[batch, pl.ds(q_start, block_q)], scratch["segq"].at[wg], scratch["segq_full"].at[wg]
            )
            plgpu.barrier_wait(scratch["segq_full"].at[wg])
            seg_q = _load(scratch["segq"].at[wg], _ROWS)
        plgpu.barrier_wait(scratch["q_full"].at[wg])

        acc = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        row_max = plgpu.layout_cast(jnp.full((block_q,), _ROW_MAX_INIT, jnp.float32), _ROWS)
        row_sum = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), _ROWS)

        @pl.when(num_steps > 0)
        def _():
            wait_keys(lo_cta)

        pl.when(wg == 1)(rendezvous)

        def wait_next_keys(step):
            @pl.when(step + 1 < hi_cta)
            def _():
                wait_keys(step + 1)

        def step_fn(step, carry, boundary: bool):
            acc, row_max, row_sum = carry
            slot = _slot(step - lo_cta, stages)

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, _t(scratch["k"].at[slot]))
                rendezvous()
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            seg_k = None if seg_ref is None else _load(scratch["segk"].at[slot], _COLS)
            plgpu.barrier_arrive(scratch["k_consumed"].at[slot])
            mask = _tile_mask(static, qk.shape, q_start, step * block_kv, seg_q, seg_k, boundary, keys_major=False)
            if mask is not None:
                qk = jnp.where(mask, qk, -jnp.inf)
            new_max = jnp.maximum(row_max, qk.max(axis=1) * qk_scale)
            rescale = jnp.exp2(row_max - new_max)
            probs = jnp.exp2(qk * qk_scale - lax.broadcast_in_dim(new_max, qk.shape, [0]))
            acc *= lax.broadcast_in_dim(rescale, acc.shape, [0])
            row_sum = row_sum * rescale + probs.sum(axis=1)
            probs_low = probs.astype(dtype)  # P in the input dtype (bf16 or fp16), as the wgmma takes it
            acc, row_sum, new_max, probs_low = lax.optimization_barrier((acc, row_sum, new_max, probs_low))
            plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(scratch["v_full"].at[slot])
            plgpu.barrier_wait(schedule)  # the other warpgroup's wgmma has been issued

            def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, probs_low, scratch["v"].at[slot])
                wait_next_keys(step)  # overlaps the PV wgmma

            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(scratch["v_consumed"].at[slot])
            return acc, new_max, row_sum

        def skip_fn(step):
            slot = _slot(step - lo_cta, stages)
            rendezvous()
            plgpu.barrier_arrive(scratch["k_consumed"].at[slot])
            plgpu.barrier_wait(scratch["v_full"].at[slot])
            rendezvous()
            plgpu.barrier_arrive(scratch["v_consumed"].at[slot])
            wait_next_keys(step)

        carry = (acc, row_max, row_sum)
        carry = _skip_loop(lo_cta, lo, skip_fn, carry)
        carry = lax.fori_loop(lo, mid, functools.partial(step_fn, boundary=False), carry)
        carry = lax.fori_loop(mid, hi, functools.partial(step_fn, boundary=True), carry)
        acc, row_max, row_sum = _skip_loop(hi, hi_cta, skip_fn, carry)
        pl.when(wg == 0)(rendezvous)

        empty_row = row_sum == 0.0
        safe_sum = jnp.where(empty_row, 1.0, row_sum)
        acc *= lax.broadcast_in_dim(1.0 / safe_sum, acc.shape, [0])
        qo_smem[...] = acc.astype(dtype)
        lse_smem = scratch["lse"].at[wg]
        lse_smem[...] = jnp.where(empty_row, _EMPTY_ROW_LSE, row_max + jnp.log(safe_sum) * _RCP_LN2)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_start, block_q), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_start, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(static.group, head.dtype))

        def keys(ref):
            return lambda j: ref.at[batch, pl.ds((lo_cta + j) * block_kv, block_kv), kv_head]

        k_copies = [(keys(k_ref), scratch["k"], scratch["k_full"])]
        if seg_ref is not None:
            k_copies.append(
                (lambda j: seg_ref.at[batch, pl.ds((lo_cta + j) * block_kv, block_kv)], scratch["segk"], scratch["segk_full"])
            )
        _produce(
            num_steps,
            stages,
            [(scratch["k_consumed"], k_copies), (scratch["v_consumed"], [(keys(v_ref), scratch["v"], scratch["v_full"])])],
        )


def _forward(static: _Static, q, k, v, segment_ids, table):
    batch, seq_q_padded, heads_q, head_dim = q.shape
    blocks = static.blocks
    num_tiles = seq_q_padded // (_COMPUTE_WGS * blocks.block_q)
    dtype = q.dtype
    scratch = {
        "qo": _smem_tile((_COMPUTE_WGS, blocks.block_q, head_dim), dtype),
        "k": _smem_tile((blocks.stages, blocks.block_kv, head_dim), dtype),
        "v": _smem_tile((blocks.stages, blocks.block_kv, head_dim), dtype),
        "lse": plgpu.SMEM((_COMPUTE_WGS, blocks.block_q), jnp.float32),
        "q_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        "k_full": plgpu.Barrier(num_barriers=blocks.stages),
        "v_full": plgpu.Barrier(num_barriers=blocks.stages),
        "k_consumed": plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=blocks.stages),
        "v_consumed": plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=blocks.stages),
        "schedule": plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
    }
    operands = [table]
    if static.has_segments:
        scratch |= {
            "segq": plgpu.SMEM((_COMPUTE_WGS, blocks.block_q), jnp.int32),
            "segk": plgpu.SMEM((blocks.stages, blocks.block_kv), jnp.int32),
            "segq_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
            "segk_full": plgpu.Barrier(num_barriers=blocks.stages),
        }
        operands.append(segment_ids)
    operands += [q, k, v]
    out, lse = plgpu.kernel(
        functools.partial(_forward_body, static=static, num_tiles=num_tiles, head_dim=head_dim, dtype=dtype),
        out_type=[
            jax.ShapeDtypeStruct(q.shape, dtype),
            # seq minor, so each consumer's lse is one 1-D TMA of block_q floats
            jax.ShapeDtypeStruct((batch, heads_q, seq_q_padded), jnp.float32),
        ],
        scratch_types=[scratch],
        grid=(heads_q, num_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_attention_hopper_forward",
    )(*operands)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Backward. With P = softmax(S), S = scale * Q K^T (masked), O = P V and cotangent dO:
#   dV = P^T dO
#   dP = dO V^T
#   dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
#   dQ = scale * dS K,      dK = scale * dS^T Q
# P is recomputed tile by tile from the saved base-2 logsumexp: P = exp2(S * log2(e) - lse);
# an empty row's lse is _EMPTY_ROW_LSE, so its P is exactly 0 and so are its gradients.
# dQ: a CTA per (query head, pair of query blocks, batch row), the producer streams K/V blocks.
# dK/dV: a CTA per (kv head, pair of key blocks, batch row); the producer streams Q, dO, lse,
# delta (and query segment ids) over the group's query heads, so dK/dV sum the group in
# registers and K/V are never repeated.
# fused_dq (optional): the dK/dV kernel also forms scale * dS K per step and TMA-reduce-adds it
# into a float32 dQ (FlashAttention-3), so the dQ kernel and its recomputed S and dP go; dQ is then
# nondeterministic at rounding level (float32 adds in arrival order). See _backward_dkv_fused_dq.
# ---------------------------------------------------------------------------------------------


def _dq_body(table_ref, *refs, static: _Static, num_tiles: int, head_dim: int, dtype):
    if static.has_segments:
        seg_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref, scratch = refs
    else:
        seg_ref = None
        q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref, scratch = refs
    blocks = static.blocks
    block_q, block_kv, stages = blocks.block_q_dq, blocks.block_kv_dq, blocks.stages_dq
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("q_seq")
    if static.causal:
        tile = num_tiles - 1 - tile
    table_row = batch if table_ref.shape[0] > 1 else 0
    ranges, lo_cta, hi_cta = _cta_ranges(table_ref, table_row, tile * _COMPUTE_WGS)
    qk_scale = static.scale * _LOG2_E

    def wait_inputs(step):
        slot = _slot(step - lo_cta, stages)
        plgpu.barrier_wait(scratch["k_full"].at[slot])
        plgpu.barrier_wait(scratch["v_full"].at[slot])
        if seg_ref is not None:
            plgpu.barrier_wait(scratch["segk_full"].at[slot])
        return slot

    @pl.when(wg < _COMPUTE_WGS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        lo, mid, hi = _own_range(ranges, wg, lo_cta)
        q_start = (tile * _COMPUTE_WGS + wg) * block_q
        rows = pl.ds(q_start, block_q)
        q_smem, d_out_smem = scratch["q"].at[wg], scratch["d_out"].at[wg]
        copies = [
            (q_ref.at[batch, rows, head], q_smem, "q_full"),
            (d_out_ref.at[batch, rows, head], d_out_smem, "d_out_full"),
            (lse_ref.at[batch, head, rows], scratch["lse"].at[wg], "lse_full"),
            (delta_ref.at[batch, head, rows], scratch["delta"].at[wg], "delta_full"),
        ]
        if seg_ref is not None:
            copies.append((seg_ref.at[batch, rows], scratch["segq"].at[wg], "segq_full"))
        for source, target, barrier in copies:
            plgpu.copy_gmem_to_smem(source, target, scratch[barrier].at[wg])
        for _, _, barrier in copies:
            plgpu.barrier_wait(scratch[barrier].at[wg])
        lse = _load(scratch["lse"].at[wg], _ROWS)
        delta = _load(scratch["delta"].at[wg], _ROWS)
        seg_q = None if seg_ref is None else _load(scratch["segq"].at[wg], _ROWS)

        def step_fn(step, dq, boundary: bool):
            slot = wait_inputs(step)

            def compute_s(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, _t(scratch["k"].at[slot]))
                return acc_ref[...]

            logits = pl.run_scoped(compute_s, plgpu.ACC((block_q, block_kv), jnp.float32))
            seg_k = None if seg_ref is None else _load(scratch["segk"].at[slot], _COLS)
            mask = _tile_mask(static, logits.shape, q_start, step * block_kv, seg_q, seg_k, boundary, keys_major=False)
            if mask is not None:
                logits = jnp.where(mask, logits, -jnp.inf)
            probs = jnp.exp2(logits * qk_scale - lax.broadcast_in_dim(lse, logits.shape, [0]))

            def compute_dp(acc_ref):
                plgpu.wgmma(acc_ref, d_out_smem, _t(scratch["v"].at[slot]))
                return acc_ref[...]

            d_probs = pl.run_scoped(compute_dp, plgpu.ACC((block_q, block_kv), jnp.float32))
            d_logits = probs * (d_probs - lax.broadcast_in_dim(delta, logits.shape, [0]))

            def compute_dq(acc_ref):
                plgpu.wgmma(acc_ref, d_logits.astype(dtype), scratch["k"].at[slot])

            dq = pl.run_state(compute_dq)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(scratch["consumed"].at[slot])
            return dq

        def skip_fn(step):
            slot = wait_inputs(step)
            plgpu.barrier_arrive(scratch["consumed"].at[slot])

        dq = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        dq = _skip_loop(lo_cta, lo, skip_fn, dq)
        dq = lax.fori_loop(lo, mid, functools.partial(step_fn, boundary=False), dq)
        dq = lax.fori_loop(mid, hi, functools.partial(step_fn, boundary=True), dq)
        dq = _skip_loop(hi, hi_cta, skip_fn, dq)
        q_smem[...] = (dq * static.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(static.group, head.dtype))

        def keys(ref):
            return lambda j: ref.at[batch, pl.ds((lo_cta + j) * block_kv, block_kv), kv_head]

        copies = [(keys(k_ref), scratch["k"], scratch["k_full"]), (keys(v_ref), scratch["v"], scratch["v_full"])]
        if seg_ref is not None:
            copies.append(
                (lambda j: seg_ref.at[batch, pl.ds((lo_cta + j) * block_kv, block_kv)], scratch["segk"], scratch["segk_full"])
            )
        _produce(hi_cta - lo_cta, stages, [(scratch["consumed"], copies)])


def _backward_dq(static: _Static, q, k, v, segment_ids, d_out, lse, delta, table):
    batch, seq_q_padded, heads_q, head_dim = q.shape
    blocks = static.blocks
    block_q, block_kv, stages = blocks.block_q_dq, blocks.block_kv_dq, blocks.stages_dq
    num_tiles = seq_q_padded // (_COMPUTE_WGS * block_q)
    dtype = q.dtype
    scratch = {
        "q": _smem_tile((_COMPUTE_WGS, block_q, head_dim), dtype),
        "d_out": _smem_tile((_COMPUTE_WGS, block_q, head_dim), dtype),
        "lse": plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
        "delta": plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
        "k": _smem_tile((stages, block_kv, head_dim), dtype),
        "v": _smem_tile((stages, block_kv, head_dim), dtype),
        "q_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        "d_out_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        "lse_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        "delta_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        "k_full": plgpu.Barrier(num_barriers=stages),
        "v_full": plgpu.Barrier(num_barriers=stages),
        "consumed": plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
    }
    operands = [table]
    if static.has_segments:
        scratch |= {
            "segq": plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.int32),
            "segk": plgpu.SMEM((stages, block_kv), jnp.int32),
            "segq_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
            "segk_full": plgpu.Barrier(num_barriers=stages),
        }
        operands.append(segment_ids)
    operands += [q, k, v, d_out, lse, delta]
    return plgpu.kernel(
        functools.partial(_dq_body, static=static, num_tiles=num_tiles, head_dim=head_dim, dtype=dtype),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[scratch],
        grid=(heads_q, num_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_attention_hopper_dq",
    )(*operands)


def _dkv_body(table_ref, *refs, static: _Static, head_dim: int, dtype):
    dq_acc_ref = None
    if static.fused_dq:  # the float32 dQ accumulator (an aliased input Ref) sits before dk, dv
        dq_acc_ref = refs[-4]
        refs = refs[:-4] + refs[-3:]
    if static.has_segments:
        seg_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref, scratch = refs
    else:
        seg_ref = None
        q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref, scratch = refs
    blocks = static.blocks
    block_q, block_kv, stages = blocks.block_q_dkv, blocks.block_kv_dkv, blocks.stages_dkv
    group = static.group
    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("kv_seq")
    table_row = batch if table_ref.shape[0] > 1 else 0
    ranges, lo_cta, hi_cta = _cta_ranges(table_ref, table_row, tile * _COMPUTE_WGS)
    steps_per_head = hi_cta - lo_cta
    qk_scale = static.scale * _LOG2_E
    ring = ("q", "d_out", "lse", "delta") + (("segq",) if seg_ref is not None else ())

    def wait_inputs(step_index):
        slot = _slot(step_index, stages)
        for name in ring:
            plgpu.barrier_wait(scratch[name + "_full"].at[slot])
        return slot

    @pl.when(wg < _COMPUTE_WGS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        lo, mid, hi = _own_range(ranges, wg, lo_cta)
        k_start = (tile * _COMPUTE_WGS + wg) * block_kv
        keys = pl.ds(k_start, block_kv)
        k_smem, v_smem = scratch["k"].at[wg], scratch["v"].at[wg]
        copies = [(k_ref.at[batch, keys, kv_head], k_smem, "k_full"), (v_ref.at[batch, keys, kv_head], v_smem, "v_full")]
        if seg_ref is not None:
            copies.append((seg_ref.at[batch, keys], scratch["segk"].at[wg], "segk_full"))
        for source, target, barrier in copies:
            plgpu.copy_gmem_to_smem(source, target, scratch[barrier].at[wg])
        for _, _, barrier in copies:
            plgpu.barrier_wait(scratch[barrier].at[wg])
        seg_k = None if seg_ref is None else _load(scratch["segk"].at[wg], _ROWS)

        def step_fn(step, carry, g, boundary: bool):
            dk, dv = carry
            slot = wait_inputs(g * steps_per_head + step - lo_cta)
            q_smem, d_out_smem = scratch["q"].at[slot], scratch["d_out"].at[slot]

            def compute_s_t(acc_ref):
                plgpu.wgmma(acc_ref, k_smem, _t(q_smem))
                return acc_ref[...]

            logits_t = pl.run_scoped(compute_s_t, plgpu.ACC((block_kv, block_q), jnp.float32))
            lse = _load(scratch["lse"].at[slot], _COLS)
            seg_q = None if seg_ref is None else _load(scratch["segq"].at[slot], _COLS)
            mask = _tile_mask(static, logits_t.shape, step * block_q, k_start, seg_q, seg_k, boundary, keys_major=True)
            if mask is not None:
                logits_t = jnp.where(mask, logits_t, -jnp.inf)
            probs_t = jnp.exp2(logits_t * qk_scale - lax.broadcast_in_dim(lse, logits_t.shape, [1]))

            def compute_dv_dp(refs):
                # Both wgmmas in one scope: one wait for the pair instead of two.
                dv_ref, d_probs_ref = refs
                plgpu.wgmma(dv_ref, probs_t.astype(dtype), d_out_smem)
                plgpu.wgmma(d_probs_ref, v_smem, _t(d_out_smem))

            zeros = plgpu.layout_cast(jnp.zeros((block_kv, block_q), jnp.float32), plgpu.Layout.WGMMA)
            dv, d_probs_t = pl.run_state(compute_dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
            delta = _load(scratch["delta"].at[slot], _COLS)
            d_logits_t = probs_t * (d_probs_t - lax.broadcast_in_dim(delta, logits_t.shape, [1]))

            def compute_dk(acc_ref):
                plgpu.wgmma(acc_ref, d_logits_t.astype(dtype), q_smem)

            dk = pl.run_state(compute_dk)(plgpu.ACC.init(dk))
            plgpu.barrier_arrive(scratch["consumed"].at[slot])
            if dq_acc_ref is not None:
                _reduce_dq_partial(static, scratch, wg, k_smem, d_logits_t.astype(dtype),
                                   dq_acc_ref.at[batch, pl.ds(step * block_q, block_q), kv_head * group + g])
            return dk, dv

        def skip_fn(step, g):
            slot = wait_inputs(g * steps_per_head + step - lo_cta)
            plgpu.barrier_arrive(scratch["consumed"].at[slot])

        def head_fn(g, carry):
            skip = functools.partial(skip_fn, g=g)
            carry = _skip_loop(lo_cta, lo, skip, carry)
            carry = lax.fori_loop(lo, mid, functools.partial(step_fn, g=g, boundary=True), carry)
            carry = lax.fori_loop(mid, hi, functools.partial(step_fn, g=g, boundary=False), carry)
            return _skip_loop(hi, hi_cta, skip, carry)

        zeros = plgpu.layout_cast(jnp.zeros((block_kv, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        dk, dv = lax.fori_loop(0, group, head_fn, (zeros, zeros))
        k_smem[...] = (dk * static.scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, keys, kv_head], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, keys, kv_head], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        per_head = jnp.maximum(steps_per_head, 1)

        def head_and_rows(j):
            g = lax.div(j, per_head)
            q_block = lo_cta + j - g * per_head
            return kv_head * group + g, pl.ds(q_block * block_q, block_q)

        def rows_of(ref):
            def source(j):
                q_head, rows = head_and_rows(j)
                return ref.at[batch, rows, q_head]

            return source

        def row_vector(ref):
            def source(j):
                q_head, rows = head_and_rows(j)
                return ref.at[batch, q_head, rows]

            return source

        copies = [
            (rows_of(q_ref), scratch["q"], scratch["q_full"]),
            (rows_of(d_out_ref), scratch["d_out"], scratch["d_out_full"]),
            (row_vector(lse_ref), scratch["lse"], scratch["lse_full"]),
            (row_vector(delta_ref), scratch["delta"], scratch["delta_full"]),
        ]
        if seg_ref is not None:
            copies.append((lambda j: seg_ref.at[batch, head_and_rows(j)[1]], scratch["segq"], scratch["segq_full"]))
        _produce(group * steps_per_head, stages, [(scratch["consumed"], copies)])


def _reduce_dq_partial(static: _Static, scratch, wg, k_smem, d_logits_t, dq_acc_target):
    """fused_dq: dQ_partial = scale * dS K for this warpgroup's keys and the step's queries, added
    into the float32 dQ accumulator in global memory by a TMA reduce-add (FlashAttention-3's dQ).
    dS^T sits in registers as [keys, queries] (the A operand of dK = dS^T Q); dQ needs dS as
    [queries, keys], so it goes through smem and the wgmma reads its transposed view."""
    ds_smem, dq_smem = scratch["ds"].at[wg], scratch["dq"].at[wg]
    ds_smem[...] = d_logits_t  # the previous step's dQ wgmma has completed (its result was read)
    plgpu.commit_smem()

    def compute_dq(acc_ref):
        plgpu.wgmma(acc_ref, _t(ds_smem), k_smem)
        return acc_ref[...]

    block_q, head_dim = dq_smem.shape
    dq_partial = pl.run_scoped(compute_dq, plgpu.ACC((block_q, head_dim), jnp.float32))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous reduce-add has read dq_smem
    dq_smem[...] = dq_partial * static.scale
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_acc_target, reduction_op="add")


def _run_mgpu_kernel(body, operands, *, out_type, scratch, grid, grid_names, kernel_name):
    """plgpu.kernel without its custom_vmap wrapper, which rejects Ref operands (jax 0.10.2):
    pl.kernel aliases a Ref operand in and out of the kernel (input_output_aliases), which is how
    the fused-dQ accumulator starts at zero. Same mesh, scratch scoping and compiler params."""
    thread_name = "wg"

    def kernel_body(*refs):
        pl.run_scoped(functools.partial(body, *refs), scratch, collective_axes=thread_name)

    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=_COMPUTE_WGS + 1, thread_name=thread_name,
                      kernel_name=kernel_name)
    return pl.kernel(kernel_body, out_type=out_type, mesh=mesh, compiler_params=plgpu.CompilerParams(approx_math=True),
                     name=kernel_name)(*operands)


def _backward_dkv(static: _Static, q, k, v, segment_ids, d_out, lse, delta, table):
    batch, seq_k_padded, heads_kv, head_dim = k.shape
    blocks = static.blocks
    block_q, block_kv, stages = blocks.block_q_dkv, blocks.block_kv_dkv, blocks.stages_dkv
    num_tiles = seq_k_padded // (_COMPUTE_WGS * block_kv)
    dtype = q.dtype
    scratch = {
        "k": _smem_tile((_COMPUTE_WGS, block_kv, head_dim), dtype),
        "v": _smem_tile((_COMPUTE_WGS, block_kv, head_dim), dtype),
        "q": _smem_tile((stages, block_q, head_dim), dtype),
        "d_out": _smem_tile((stages, block_q, head_dim), dtype),
        "lse": plgpu.SMEM((stages, block_q), jnp.float32),
        "delta": plgpu.SMEM((stages, block_q), jnp.float32),
        "k_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        "v_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        "q_full": plgpu.Barrier(num_barriers=stages),
        "d_out_full": plgpu.Barrier(num_barriers=stages),
        "lse_full": plgpu.Barrier(num_barriers=stages),
        "delta_full": plgpu.Barrier(num_barriers=stages),
        "consumed": plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
    }
    operands = [table]
    if static.has_segments:
        scratch |= {
            "segk": plgpu.SMEM((_COMPUTE_WGS, block_kv), jnp.int32),
            "segq": plgpu.SMEM((stages, block_q), jnp.int32),
            "segk_full": plgpu.Barrier(num_barriers=_COMPUTE_WGS),
            "segq_full": plgpu.Barrier(num_barriers=stages),
        }
        operands.append(segment_ids)
    operands += [q, k, v, d_out, lse, delta]
    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    if static.fused_dq:
        return _backward_dkv_fused_dq(static, q, operands, scratch, kv_type, num_tiles)
    return plgpu.kernel(
        functools.partial(_dkv_body, static=static, head_dim=head_dim, dtype=dtype),
        out_type=[kv_type, kv_type],
        scratch_types=[scratch],
        grid=(heads_kv, num_tiles, batch),
        grid_names=("heads", "kv_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_attention_hopper_dkv",
    )(*operands)


def _backward_dkv_fused_dq(static: _Static, q, operands, scratch, kv_type, num_tiles):
    """The dK/dV kernel that also accumulates dQ: returns (dq in q.dtype, dk, dv).

    Zeroing: kernel outputs are not initialised and no CTA can zero rows another CTA may already
    be adding into, so the accumulator is a zeros array passed in as a Ref, which pl.kernel aliases
    to an output (XLA's input_output_aliases): it is zero before the kernel starts.
    Nondeterminism: the TMA reduce-adds of the CTAs (kv tiles, and both warpgroups of a CTA) reach
    each dQ row in whatever order they complete, and float32 addition is not associative, so dQ
    differs run to run at rounding level. That is why this is an option and not the default.
    Shared memory on top of the dK/dV kernel: per consumer warpgroup a 16-bit dS tile
    (block_kv x block_q) and a float32 dQ staging tile (block_q x d). At d=128 with the default
    tiles: K, V 64 KiB + Q, dO ring 64 KiB + dS 16 KiB + dQ 64 KiB + lse/delta/ids ~2 KiB = 210 KiB
    of the 227 KiB."""
    batch, seq_q_padded, heads_q, head_dim = q.shape
    blocks = static.blocks
    block_q, block_kv = blocks.block_q_dkv, blocks.block_kv_dkv
    scratch = scratch | {
        "ds": _smem_tile((_COMPUTE_WGS, block_kv, block_q), q.dtype),
        # float32 rows of 32 elements are 128 bytes: the 128-byte swizzle with (8, 32) tiles
        "dq": plgpu.SMEM((_COMPUTE_WGS, block_q, head_dim), jnp.float32,
                         transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
    }
    dq_acc = jax.new_ref(jnp.zeros((batch, seq_q_padded, heads_q, head_dim), jnp.float32))
    dk, dv = _run_mgpu_kernel(
        functools.partial(_dkv_body, static=static, head_dim=head_dim, dtype=q.dtype),
        [*operands, dq_acc],
        out_type=[kv_type, kv_type],
        scratch=scratch,
        grid=(kv_type.shape[2], num_tiles, batch),
        grid_names=("heads", "kv_seq", "batch"),
        kernel_name="flash_attention_hopper_dkv_fused_dq",
    )
    return jax.freeze(dq_acc).astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, segment_ids, fwd_table, dkv_table, dq_table):
    return _forward(static, q, k, v, segment_ids, fwd_table)[0]


def _flash_fwd(static: _Static, q, k, v, segment_ids, fwd_table, dkv_table, dq_table):
    out, lse = _forward(static, q, k, v, segment_ids, fwd_table)
    return out, (q, k, v, segment_ids, dkv_table, dq_table, out, lse)


def _flash_bwd(static: _Static, residuals, d_out):
    q, k, v, segment_ids, dkv_table, dq_table, out, lse = residuals
    # delta = rowsum(dO * O): one fused XLA reduction reads O and dO once, as a kernel would.
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if static.fused_dq:
        dq, dk, dv = _backward_dkv(static, q, k, v, segment_ids, d_out, lse, delta, dkv_table)
        return dq, dk, dv, None, None, None, None
    dk, dv = _backward_dkv(static, q, k, v, segment_ids, d_out, lse, delta, dkv_table)
    dq = _backward_dq(static, q, k, v, segment_ids, d_out, lse, delta, dq_table)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_inputs(q, k, v, segment_ids) -> None:
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"flash_attention_hopper: k {k.shape} and v {v.shape} must be [batch, seq_k, heads_kv, {head_dim}]"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"flash_attention_hopper: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them first"
        )
    if jnp.dtype(q.dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"flash_attention_hopper: dtype {q.dtype} is not supported (wgmma here takes bfloat16 or float16); "
            "cast q, k, v to bfloat16, or use pallas_kernels.attention.flash_attention, which takes float32"
        )
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(
            f"flash_attention_hopper: head_dim={head_dim} > {_MAX_HEAD_DIM} does not fit the kernel's registers "
            "and shared memory; use pallas_kernels.attention.flash_attention for it"
        )
    if heads_q % heads_kv != 0:
        raise ValueError(f"flash_attention_hopper: heads_q={heads_q} is not a multiple of heads_kv={heads_kv}")
    if segment_ids is not None and (seq_q != seq_k or segment_ids.shape != (batch, seq_q)):
        raise ValueError(
            f"flash_attention_hopper: segment_ids {segment_ids.shape} need seq_q == seq_k and shape {(batch, seq_q)}"
        )


def flash_attention_hopper(
    q: Float[Array, "batch seq_q heads_q head_dim"],
    k: Float[Array, "batch seq_k heads_kv head_dim"],
    v: Float[Array, "batch seq_k heads_kv head_dim"],
    *,
    causal: bool = True,
    segment_ids: Int[Array, "batch seq"] | None = None,
    scale: float | None = None,
    block_sizes: HopperBlocks | None = None,
    fused_dq: bool = False,
) -> Float[Array, "batch seq_q heads_q head_dim"]:
    """Flash attention for sm90 GPUs with grouped-query heads and packed-row segment ids; same
    semantics as `attention_reference`. bfloat16 / float16 inputs, float32 accumulation, output in
    q.dtype, differentiable in q, k, v. head_dim <= 128 (padded to 64 or 128).

    fused_dq=True: the backward has no separate dQ kernel (which recomputes S and dP: 7 matmuls
    instead of 5); the dK/dV kernel reduce-adds dQ into a float32 buffer instead. dQ is then
    nondeterministic at float32 rounding level (the order of the adds varies run to run)."""
    _check_inputs(q, k, v, segment_ids)
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else float(scale)
    head_dim_padded = 64 if head_dim <= 64 else 128
    blocks = choose_block_sizes(head_dim_padded) if block_sizes is None else block_sizes
    static = _Static(
        causal=causal,
        scale=scale,
        seq_q=seq_q,
        seq_k=seq_k,
        group=heads_q // heads_kv,
        has_segments=segment_ids is not None,
        blocks=blocks,
        fused_dq=fused_dq,
    )
    (q, k, v), segment_ids, (fwd_table, dkv_table, dq_table) = pad_and_plan(
        (q, k, v), segment_ids, static=static, head_dim_padded=head_dim_padded, q_multiple=blocks.q_multiple,
        k_multiple=blocks.kv_multiple, tiles=((blocks.block_q, blocks.block_kv, True),
                                              (blocks.block_kv_dkv, blocks.block_q_dkv, False),
                                              (blocks.block_q_dq, blocks.block_kv_dq, True)))
    out = _flash(static, q, k, v, segment_ids, fwd_table, dkv_table, dq_table)
    return out[:, :seq_q, :, :head_dim]

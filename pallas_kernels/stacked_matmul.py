"""A few rows times one layer's matrix of a stacked weight, [L, in, out], read in place.

A decoder scanned over stacked layer weights slices layer l's [in, out] matrix out of the stack on
every step. When the matmul is a library call that needs its operand in a buffer of its own, XLA
copies the slice first, so a decode step reads every weight, writes a copy and reads that again:
three times the bytes of the matrix-vector products it exists for. This kernel takes the whole stack
and the layer index as operands and reads layer l's tiles where they lie, so no slice is ever
materialised. stacked_matmul_group does the same for several stacks that multiply the same x (a
layer's q/k/v, or gate/up) in one launch, its grid's column blocks running over the stacks in turn.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from pallas_kernels._common import cdiv, next_power_of_2, use_interpret


def stacked_matmul_reference(
    x: Float[Array, "m d_in"], w_stacked: Float[Array, "layers d_in d_out"], layer: Int[Array, ""] | int
) -> Float[Array, "m d_out"]:
    """x @ w_stacked[layer] in x.dtype, float32 accumulation: ops.linear on the sliced weight."""
    return jnp.dot(x, w_stacked[layer].astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def stacked_lora_matmul_reference(
    x: Float[Array, "m d_in"],
    w_stacked: Float[Array, "layers d_in d_out"],
    layer: Int[Array, ""] | int,
    lora_a: Float[Array, "d_in rank"],
    lora_b: Float[Array, "rank d_out"],
    scale: float,
) -> Float[Array, "m d_out"]:
    """x @ w[layer] + scale * (x @ a) @ b with pallas_kernels.lora_linear's roundings (x @ a rounded to
    x.dtype, both products and their sum in float32, one rounding at the end)."""
    base = jnp.dot(x, w_stacked[layer].astype(x.dtype), preferred_element_type=jnp.float32)
    x_a = jnp.dot(x, lora_a.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    low_rank = jnp.dot(x_a, lora_b.astype(x.dtype), preferred_element_type=jnp.float32)
    return (base + scale * low_rank).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Pallas-Triton kernel.
#
#   partial[s, m, n] = x[m, K_s] @ w[layer, K_s, n]       (K_s: split s of the in axis)
#   out[m, n]        = sum_s partial[s, m, n]
#
# A decode step multiplies one to a few dozen rows by each weight matrix: the work is reading the
# matrix once, at full bandwidth, so what matters is enough programs, each with enough loads in
# flight, to keep every SM busy. The grid is (column blocks, k splits, row blocks). Column blocks
# narrow from 128 down to 32 until there are about as many programs as SMs (Llama-3-8B's q/o and
# down projections: 128 blocks of 32 columns, each row of a tile still 64 contiguous bytes), and the
# k tile grows as the column tile narrows, so that a weight tile stays 32 KiB. Where even that
# leaves SMs idle (k/v: 1024 columns) the in axis is split into k_splits ranges, whose float32
# partial sums a small jnp reduction adds ([k_splits, m, out]: KiBs against the matrix's MiBs).
# With one split the kernel writes the output in its own dtype and nothing follows it.
#
# No BlockSpecs: every operand is the whole array, the layer index a one-element operand the kernel
# reads, clamps to the stack and uses as the first index of every weight load, so the offsets of
# layer l's tiles are plain pointer arithmetic. A row tile is a power of 2 of at least 16 rows (the
# smallest tensor-core dot); x is read as it is, its rows past m and columns past d_in masked to
# zero, like the weight's ragged edges (out not a multiple of block_n, in not a multiple of the
# splits' blocks), and stores are masked to the real rows and columns. So the kernel is the only
# op of a projection without k splits: a decode step makes seven of them a layer, and a pad or an
# index clamp of its own beside each would be a launch that moves a few KiB.
# ---------------------------------------------------------------------------------------------

# About one program per SM of an H100 (132 SMs).
_TARGET_PROGRAMS = 128
# Bytes of one weight tile: with three pipeline stages, 96 KiB of loads in flight per program.
_WEIGHT_TILE_BYTES = 32 * 1024
# A split runs at least this many block_k steps, so that Triton's software pipeline has a loop to
# overlap.
_MIN_K_BLOCKS_PER_SPLIT = 2


@dataclasses.dataclass(frozen=True)
class StackedMatmulBlocks:
    """Tile sizes and launch parameters (block sizes powers of 2; k_splits any positive count)."""

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def choose_blocks(m: int, d_in: int, d_out: int, dtype: Any) -> StackedMatmulBlocks:
    """Tiles for a bandwidth-bound product of a few rows (dtype: the weight's): all rows in one row
    block up to 64, column blocks of 128 narrowed to 32 while the grid has fewer than
    _TARGET_PROGRAMS programs, k tiles of _WEIGHT_TILE_BYTES, then power-of-2 k splits up to the
    target. Powers of 2 throughout, as Triton needs; bench/decode.py is the judge of the numbers."""
    block_m = max(16, min(64, next_power_of_2(m)))
    row_blocks = cdiv(m, block_m)
    block_n = max(16, min(128, next_power_of_2(d_out)))
    while block_n > 32 and row_blocks * cdiv(d_out, block_n) < _TARGET_PROGRAMS:
        block_n //= 2
    tile_rows = _WEIGHT_TILE_BYTES // (block_n * jnp.dtype(dtype).itemsize)
    block_k = max(16, min(tile_rows, next_power_of_2(d_in)))
    programs = row_blocks * cdiv(d_out, block_n)
    k_blocks = cdiv(d_in, block_k)
    k_splits = 1
    while programs * k_splits < _TARGET_PROGRAMS and k_blocks >= 2 * k_splits * _MIN_K_BLOCKS_PER_SPLIT:
        k_splits *= 2
    return StackedMatmulBlocks(block_m=block_m, block_n=block_n, block_k=block_k, k_splits=k_splits)


def _split_layout(d_in: int, blocks: StackedMatmulBlocks) -> tuple[int, int]:
    """(k blocks per split, splits): splits that would start past d_in are dropped."""
    k_blocks = cdiv(d_in, blocks.block_k)
    per_split = cdiv(k_blocks, max(1, min(blocks.k_splits, k_blocks)))
    return per_split, cdiv(k_blocks, per_split)


def _stacked_matmul_kernel(
    layer_ref, x_ref, *refs, m: int, d_in: int, d_outs: tuple[int, ...], k_blocks_per_split: int,
    weight_dtype: Any, blocks: StackedMatmulBlocks,
):
    """refs: the group's weight stacks, then their outputs. Column block c of the grid belongs to
    the first stack while c < cdiv(d_outs[0], block_n), to the second after that, and so on."""
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    w_refs, out_refs = refs[: len(d_outs)], refs[len(d_outs) :]
    column_block, split, row_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # An index outside [0, layers) would read past the stack: clamp it, as XLA's dynamic slice does.
    layer = jnp.clip(layer_ref[0], 0, w_refs[0].shape[0] - 1)
    rows = pl.ds(pl.multiple_of(row_block * bm, bm), bm)
    split_start = split * (k_blocks_per_split * bk)
    covers_exactly = d_in % bk == 0 and cdiv(d_in, bk) % k_blocks_per_split == 0
    row_valid = row_block * bm + jnp.arange(bm) < m
    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def one_tile(w_ref, out_ref, d_out: int, local_block):
        cols = pl.ds(pl.multiple_of(local_block * bn, bn), bn)
        col_valid = None if d_out % bn == 0 else local_block * bn + jnp.arange(bn) < d_out

        def accumulate(step, acc):
            k_start = split_start + step * bk
            ks = pl.ds(pl.multiple_of(k_start, bk), bk)
            k_valid = None if covers_exactly else k_start + jnp.arange(bk) < d_in
            x_mask = row_valid[:, None] & (jnp.ones((bk,), jnp.bool_) if k_valid is None else k_valid)[None, :]
            x_tile = pltriton.load(x_ref.at[rows, ks], mask=x_mask, other=0)
            if k_valid is None and col_valid is None:
                w_tile = w_ref[layer, ks, cols]
            else:
                mask = (
                    (jnp.ones((bk,), jnp.bool_) if k_valid is None else k_valid)[:, None]
                    & (jnp.ones((bn,), jnp.bool_) if col_valid is None else col_valid)[None, :]
                )
                w_tile = pltriton.load(w_ref.at[layer, ks, cols], mask=mask, other=0)
            if w_tile.dtype != weight_dtype:  # the interpreter's 16-bit weights come as their bits
                w_tile = jax.lax.bitcast_convert_type(w_tile, weight_dtype)
            return acc + jnp.dot(x_tile, w_tile.astype(x_tile.dtype), precision=precision,
                                 preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, k_blocks_per_split, accumulate, jnp.zeros((bm, bn), jnp.float32))
        mask = row_valid[:, None] & (jnp.ones((bn,), jnp.bool_) if col_valid is None else col_valid)[None, :]
        pltriton.store(out_ref.at[split, rows, cols], acc.astype(out_ref.dtype), mask=mask)

    if len(d_outs) == 1:
        one_tile(w_refs[0], out_refs[0], d_outs[0], column_block)
        return
    first = 0
    for w_ref, out_ref, d_out in zip(w_refs, out_refs, d_outs):
        count = cdiv(d_out, bn)
        pl.when((column_block >= first) & (column_block < first + count))(
            functools.partial(one_tile, w_ref, out_ref, d_out, column_block - first))
        first += count


def _stacked_matmul_2d(x2d, w_stacks: tuple, layer, blocks: StackedMatmulBlocks, out_dtype) -> tuple:
    """x2d @ w[layer] for each stack of the group, in out_dtype, accumulated in float32: one launch."""
    m, d_in = x2d.shape
    d_outs = tuple(w.shape[2] for w in w_stacks)
    bm, bn = blocks.block_m, blocks.block_n
    k_blocks_per_split, k_splits = _split_layout(d_in, blocks)
    row_blocks = cdiv(m, bm)
    layer_operand = jnp.asarray(layer, jnp.int32).reshape(1)
    weights = w_stacks
    if use_interpret() and w_stacks[0].dtype.itemsize == 2:
        # The interpreter pads the whole stack on every load and relies on XLA fusing that pad with
        # the tile's slice. XLA:CPU pads 16-bit floats through float32, which does not fuse: a float32
        # copy of the stack per program. Their bits (uint16) pad and fuse like any integer.
        weights = tuple(jax.lax.bitcast_convert_type(w, jnp.uint16) for w in w_stacks)
    partial_dtype = out_dtype if k_splits == 1 else jnp.float32
    kernel = functools.partial(
        _stacked_matmul_kernel, m=m, d_in=d_in, d_outs=d_outs, k_blocks_per_split=k_blocks_per_split,
        weight_dtype=w_stacks[0].dtype, blocks=blocks,
    )
    partials = pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((k_splits, m, d_out), partial_dtype) for d_out in d_outs),
        grid=(sum(cdiv(d_out, bn) for d_out in d_outs), k_splits, row_blocks),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=use_interpret(),
    )(layer_operand, x2d, *weights)
    if k_splits == 1:
        return tuple(partial[0] for partial in partials)
    return tuple(jnp.sum(partial, axis=0).astype(out_dtype) for partial in partials)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _stacked_matmul_vjp(x2d, w_stacks, layer, blocks, out_dtype):
    return _stacked_matmul_2d(x2d, w_stacks, layer, blocks, out_dtype)


def _stacked_matmul_vjp_fwd(x2d, w_stacks, layer, blocks, out_dtype):
    return _stacked_matmul_2d(x2d, w_stacks, layer, blocks, out_dtype), (x2d, w_stacks, layer)


# Gradient. With y_i = x W_i (W_i = stack i at layer l) and g_i = dy_i:  dx = sum_i g_i W_i^T. The
# slice of W_i the backward takes is the one copy the forward avoids; a backward runs in training,
# never in decode. The stacks are frozen and the layer index is an integer: their cotangents are
# None (symbolic zeros), so no [L, in, out] gradient is ever formed.
def _stacked_matmul_vjp_bwd(blocks, out_dtype, saved, gs):
    x2d, w_stacks, layer = saved
    dx = jnp.zeros(x2d.shape, jnp.float32)
    for w_stacked, g in zip(w_stacks, gs):
        weight = jax.lax.dynamic_index_in_dim(w_stacked, layer, axis=0, keepdims=False).astype(x2d.dtype)
        dx = dx + jnp.dot(g.astype(x2d.dtype), weight.T, preferred_element_type=jnp.float32)
    return dx.astype(x2d.dtype), None, None


_stacked_matmul_vjp.defvjp(_stacked_matmul_vjp_fwd, _stacked_matmul_vjp_bwd)


def _checked(x, w_stacked, name: str):
    if w_stacked.ndim != 3 or x.shape[-1] != w_stacked.shape[1]:
        raise ValueError(f"{name}: x {list(x.shape)} does not chain with a stacked [layers, in, out] weight "
                         f"{list(w_stacked.shape)}")
    return x.reshape(-1, x.shape[-1])


def stacked_matmul(
    x: Float[Array, "... d_in"],
    w_stacked: Float[Array, "layers d_in d_out"],
    layer: Int[Array, ""] | int,
    *,
    blocks: StackedMatmulBlocks | None = None,
) -> Float[Array, "... d_out"]:
    """x @ w_stacked[layer] in x.dtype with float32 accumulation, as stacked_matmul_reference, reading
    layer `layer`'s tiles in place (layer may be traced: a scan over layer indices is the use). Made
    for a few rows (decode: 1 to 64); more rows are correct but re-read the matrix per 64 rows.
    jax.grad reaches x only (dx = g w[layer]^T): the stack is frozen, the index is an integer."""
    x2d = _checked(x, w_stacked, "stacked_matmul")
    m, d_in = x2d.shape
    d_out = w_stacked.shape[2]
    blocks = blocks or choose_blocks(m, d_in, d_out, w_stacked.dtype)
    (out,) = _stacked_matmul_vjp(x2d, (w_stacked,), jnp.asarray(layer, jnp.int32), blocks, jnp.dtype(x.dtype))
    return out.reshape(*x.shape[:-1], d_out)


def stacked_lora_matmul(
    x: Float[Array, "... d_in"],
    w_stacked: Float[Array, "layers d_in d_out"],
    layer: Int[Array, ""] | int,
    lora_a: Float[Array, "d_in rank"],
    lora_b: Float[Array, "rank d_out"],
    scale: float,
    *,
    blocks: StackedMatmulBlocks | None = None,
) -> Float[Array, "... d_out"]:
    """stacked_lora_matmul_reference: x @ w[layer] + scale * (x @ a) @ b, with the un-merged adapter of
    layer `layer` (a, b: that layer's factors, a few hundred KiB, so slicing them is cheap). The big
    product is the kernel's float32 result; the rank-r term is two small jnp dots added before the one
    rounding. Gradients reach x, a and b; the stack is frozen."""
    x2d = _checked(x, w_stacked, "stacked_lora_matmul")
    m, d_in = x2d.shape
    d_out = w_stacked.shape[2]
    blocks = blocks or choose_blocks(m, d_in, d_out, w_stacked.dtype)
    (base,) = _stacked_matmul_vjp(x2d, (w_stacked,), jnp.asarray(layer, jnp.int32), blocks, jnp.dtype(jnp.float32))
    return _plus_low_rank(x2d, base, lora_a, lora_b, scale).reshape(*x.shape[:-1], d_out)


def _plus_low_rank(x2d, base, lora_a, lora_b, scale: float):
    """base (the float32 product) + scale * (x @ a) @ b, rounded once to x's dtype, with
    lora_linear's roundings (x @ a rounded to x's dtype)."""
    dtype = x2d.dtype
    x_a = jnp.dot(x2d, lora_a.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    low_rank = jnp.dot(x_a, lora_b.astype(dtype), preferred_element_type=jnp.float32)
    return (base + scale * low_rank).astype(dtype)


def stacked_matmul_group(
    x: Float[Array, "... d_in"],
    w_stacks: Sequence[Float[Array, "layers d_in _"]],
    layer: Int[Array, ""] | int,
    *,
    adapters: Sequence[tuple[Array, Array, float] | None] | None = None,
    blocks: StackedMatmulBlocks | None = None,
) -> tuple[Array, ...]:
    """x times layer `layer` of each stack (q, k and v; or gate and up: the same x), in ONE launch:
    each output is stacked_matmul's (or, with its adapter (a, b, scale), stacked_lora_matmul's) up
    to the float32 summation order the group's shared tiles give. A decode step makes seven
    projections a layer; grouped, q/k/v and gate/up are two launches instead of five (and the k/v
    weights, too narrow alone to fill the GPU without k splits, need no partial-sum reduction)."""
    x2d = _checked(x, w_stacks[0], "stacked_matmul_group")
    for w_stacked in w_stacks[1:]:
        if w_stacked.shape[:2] != w_stacks[0].shape[:2] or w_stacked.dtype != w_stacks[0].dtype:
            raise ValueError("stacked_matmul_group: the stacks must share layers, in size and dtype, got "
                             f"{[(list(w.shape), str(w.dtype)) for w in w_stacks]}")
    adapters = tuple(adapters) if adapters is not None else (None,) * len(w_stacks)
    if len(adapters) != len(w_stacks):
        raise ValueError(f"stacked_matmul_group: {len(adapters)} adapters for {len(w_stacks)} stacks")
    m, d_in = x2d.shape
    blocks = blocks or choose_blocks(m, d_in, sum(w.shape[2] for w in w_stacks), w_stacks[0].dtype)
    # Without any adapter the kernel rounds to x's dtype itself, as stacked_matmul does.
    out_dtype = jnp.dtype(x.dtype) if all(adapter is None for adapter in adapters) else jnp.dtype(jnp.float32)
    outs = _stacked_matmul_vjp(x2d, tuple(w_stacks), jnp.asarray(layer, jnp.int32), blocks, out_dtype)
    results = []
    for out, adapter in zip(outs, adapters):
        if adapter is not None:
            out = _plus_low_rank(x2d, out, *adapter)
        results.append(out.astype(x.dtype).reshape(*x.shape[:-1], out.shape[-1]))
    return tuple(results)

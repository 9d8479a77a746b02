"""A few rows times one layer's matrix of a stacked weight, [L, in, out], read in place.

A decoder scanned over stacked layer weights slices layer l's [in, out] matrix out of the stack on
every step. When the matmul is a library call that needs its operand in a buffer of its own, XLA
copies the slice first, so a decode step reads every weight, writes a copy and reads that again:
three times the bytes of the matrix-vector products it exists for. This kernel takes the whole stack
and the layer index as operands and reads layer l's tiles where they lie, so no slice is ever
materialised.
"""

from __future__ import annotations

import dataclasses
import functools
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
    layer_ref, x_ref, w_ref, out_ref, *, m: int, d_in: int, d_out: int, k_blocks_per_split: int,
    weight_dtype: Any, blocks: StackedMatmulBlocks,
):
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    column_block, split, row_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # An index outside [0, layers) would read past the stack: clamp it, as XLA's dynamic slice does.
    layer = jnp.clip(layer_ref[0], 0, w_ref.shape[0] - 1)
    rows = pl.ds(pl.multiple_of(row_block * bm, bm), bm)
    cols = pl.ds(pl.multiple_of(column_block * bn, bn), bn)
    split_start = split * (k_blocks_per_split * bk)
    covers_exactly = d_in % bk == 0 and cdiv(d_in, bk) % k_blocks_per_split == 0
    col_valid = None if d_out % bn == 0 else column_block * bn + jnp.arange(bn) < d_out
    row_valid = row_block * bm + jnp.arange(bm) < m
    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

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


def _stacked_matmul_2d(x2d, w_stacked, layer, blocks: StackedMatmulBlocks, out_dtype):
    """x2d @ w_stacked[layer] in out_dtype, accumulated in float32."""
    m, d_in = x2d.shape
    d_out = w_stacked.shape[2]
    bm, bn = blocks.block_m, blocks.block_n
    k_blocks_per_split, k_splits = _split_layout(d_in, blocks)
    row_blocks = cdiv(m, bm)
    layer_operand = jnp.asarray(layer, jnp.int32).reshape(1)
    weights = w_stacked
    if use_interpret() and w_stacked.dtype.itemsize == 2:
        # The interpreter pads the whole stack on every load and relies on XLA fusing that pad with
        # the tile's slice. XLA:CPU pads 16-bit floats through float32, which does not fuse: a float32
        # copy of the stack per program. Their bits (uint16) pad and fuse like any integer.
        weights = jax.lax.bitcast_convert_type(w_stacked, jnp.uint16)
    partial_dtype = out_dtype if k_splits == 1 else jnp.float32
    kernel = functools.partial(
        _stacked_matmul_kernel, m=m, d_in=d_in, d_out=d_out, k_blocks_per_split=k_blocks_per_split,
        weight_dtype=w_stacked.dtype, blocks=blocks,
    )
    partials = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((k_splits, m, d_out), partial_dtype),
        grid=(cdiv(d_out, bn), k_splits, row_blocks),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=use_interpret(),
    )(layer_operand, x2d, weights)
    if k_splits == 1:
        return partials[0]
    return jnp.sum(partials, axis=0).astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _stacked_matmul_vjp(x2d, w_stacked, layer, blocks, out_dtype):
    return _stacked_matmul_2d(x2d, w_stacked, layer, blocks, out_dtype)


def _stacked_matmul_vjp_fwd(x2d, w_stacked, layer, blocks, out_dtype):
    return _stacked_matmul_2d(x2d, w_stacked, layer, blocks, out_dtype), (x2d, w_stacked, layer)


# Gradient. With y = x W_l (W_l = w_stacked[layer]) and g = dy:  dx = g W_l^T. The slice of W_l
# the backward takes is the one copy the forward avoids; a backward runs in training, never in
# decode. The stack is frozen and the layer index is an integer: their cotangents are None
# (symbolic zeros), so no [L, in, out] gradient is ever formed.
def _stacked_matmul_vjp_bwd(blocks, out_dtype, saved, g):
    x2d, w_stacked, layer = saved
    weight = jax.lax.dynamic_index_in_dim(w_stacked, layer, axis=0, keepdims=False).astype(x2d.dtype)
    dx = jnp.dot(g.astype(x2d.dtype), weight.T, preferred_element_type=jnp.float32)
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
    out = _stacked_matmul_vjp(x2d, w_stacked, jnp.asarray(layer, jnp.int32), blocks, jnp.dtype(x.dtype))
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
    dtype = x.dtype
    blocks = blocks or choose_blocks(m, d_in, d_out, w_stacked.dtype)
    base = _stacked_matmul_vjp(x2d, w_stacked, jnp.asarray(layer, jnp.int32), blocks, jnp.dtype(jnp.float32))
    x_a = jnp.dot(x2d, lora_a.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    low_rank = jnp.dot(x_a, lora_b.astype(dtype), preferred_element_type=jnp.float32)
    return (base + scale * low_rank).astype(dtype).reshape(*x.shape[:-1], d_out)

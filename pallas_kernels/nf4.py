"""4-bit blockwise dequantization (NF4, or any 16-entry code book) and a fused dequant-matmul.

The format is bitsandbytes': a weight of n elements, flattened row-major, is cut into blocks of
`blocksize`; each element is a 4-bit index into a 16-value code book, two to a byte with the
first element in the high nibble; element i is code_book[index[i]] * absmax[i // blocksize],
computed in float32 and rounded once to the output dtype. The code book arrives as a static tuple
of floats, so this file knows no format constants. absmax arrives either as float32, or
double-quantized (dequantize_4bit_nested): a uint8 code per block into a 256-entry float32 map
(an input array), a float32 scale per nested_blocksize blocks and one float32 offset, decoded in
the kernel as map[code] * scale, rounded to float32, then + offset, rounded again (bitsandbytes'
two separate kernels).

Neither op has a gradient: they read frozen weights (integer codes), so there is no custom_vjp.
Callers that sit under jax.grad put the result behind stop_gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, UInt8

from pallas_kernels._common import cdiv, masked_load, next_power_of_2, unfused, use_interpret


def _check(code_book: Sequence[float], blocksize: int) -> tuple[float, ...]:
    code_book = tuple(float(value) for value in code_book)
    if len(code_book) != 16:
        raise ValueError(f"a 4-bit code book has 16 values, got {len(code_book)}")
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of 2 of at least 2, got {blocksize}")
    return code_book


def dequantize_4bit_reference(
    codes: UInt8[Array, " bytes"],
    absmax: Float[Array, " blocks"],
    *,
    code_book: Sequence[float],
    n: int,
    blocksize: int,
    dtype: Any,
) -> Float[Array, " n"]:
    code_book = _check(code_book, blocksize)
    codes = codes.astype(jnp.int32)
    indices = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1)[:n]
    values = jnp.asarray(code_book, jnp.float32)[indices]
    scale = jnp.repeat(absmax.astype(jnp.float32), blocksize)[:n]
    return (values * scale).astype(dtype)


def decode_nested_absmax_reference(
    absmax_codes: UInt8[Array, " blocks"],
    absmax_map: Float[Array, " 256"],
    nested_absmax: Float[Array, " nested"],
    nested_offset: Float[Array, ""],
    *,
    nested_blocksize: int,
) -> Float[Array, " blocks"]:
    """The float32 absmax of each block: map[code] * nested_absmax[block // nested_blocksize],
    rounded, then + offset, rounded (no fused multiply-add)."""
    blocks = absmax_codes.shape[0]
    scale = jnp.repeat(nested_absmax.astype(jnp.float32), nested_blocksize)[:blocks]
    product = unfused(absmax_map.astype(jnp.float32)[absmax_codes.astype(jnp.int32)] * scale, scale)
    return product + jnp.asarray(nested_offset, jnp.float32)


def dequantize_4bit_nested_reference(
    codes: UInt8[Array, " bytes"],
    absmax_codes: UInt8[Array, " blocks"],
    absmax_map: Float[Array, " 256"],
    nested_absmax: Float[Array, " nested"],
    nested_offset: Float[Array, ""],
    *,
    code_book: Sequence[float],
    n: int,
    blocksize: int,
    nested_blocksize: int,
    dtype: Any,
) -> Float[Array, " n"]:
    absmax = decode_nested_absmax_reference(
        absmax_codes, absmax_map, nested_absmax, nested_offset, nested_blocksize=nested_blocksize
    )
    return dequantize_4bit_reference(codes, absmax, code_book=code_book, n=n, blocksize=blocksize, dtype=dtype)


def dequantize_4bit_matmul_reference(
    x: Float[Array, "m k"],
    codes: UInt8[Array, " bytes"],
    absmax: Float[Array, " blocks"],
    *,
    code_book: Sequence[float],
    n_out: int,
    blocksize: int,
) -> Float[Array, "m n_out"]:
    """x @ W^T with W [n_out, k] the dequantized weight (bitsandbytes' / HF's orientation)."""
    k = x.shape[-1]
    weight = dequantize_4bit_reference(
        codes, absmax, code_book=code_book, n=n_out * k, blocksize=blocksize, dtype=x.dtype
    ).reshape(n_out, k)
    return jnp.dot(x, weight.T, preferred_element_type=jnp.float32).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# The code-book lookup inside a kernel: a select tree on the index bits (15 selects of constants,
# depth 4). A Triton program cannot index a tensor it holds by a vector of indices, only gather
# from memory (as the nested absmax's 256-entry map is, below); 16 constants need no loads.
# ---------------------------------------------------------------------------------------------


def _lookup(index, code_book: tuple[float, ...]):
    level = [jnp.float32(value) for value in code_book]
    for bit in range(4):
        taken = (index & (1 << bit)) != 0
        level = [jnp.where(taken, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _unpack(packed, code_book: tuple[float, ...], lookup=None):
    """uint8 [rows, cols] to float32 [rows, 2 * cols]: high nibble first, interleaved. lookup maps
    an int32 index array to its values (default: the select tree over code_book)."""
    lookup = lookup or functools.partial(_lookup, code_book=code_book)
    packed = packed.astype(jnp.int32)
    high = lookup(packed >> 4)
    low = lookup(packed & 15)
    rows, cols = packed.shape
    return jax.lax.stack([high, low], axis=-1).reshape(rows, 2 * cols)


# ---------------------------------------------------------------------------------------------
# Dequantization kernel. The codes are viewed as [blocks, blocksize / 2] bytes and the output as
# [blocks, blocksize]; a program converts block_rows quantization blocks (a few thousand elements)
# per step, `steps` consecutive steps: one masked load of bytes and absmax, the select tree, one
# multiply, one store. It is memory bound: half a byte in and two bytes out per element (bf16).
#
# The variants (DequantBlocks) only change how Triton moves the same values, never a rounding:
#   layout "interleave": the two nibbles' values joined and reshaped to [rows, blocksize], one 2-D
#     store (tl.interleave's join + reshape; the reshape may cost Triton a layout conversion).
#   layout "join": the output viewed as [blocks, blocksize / 2, 2] and the joined values stored
#     as they are, with no reshape.
#   layout "strided": the same [blocks, blocksize / 2, 2] view, the high and low nibbles' values
#     stored separately at stride 2, each in the layout its bytes were loaded in.
#   steps > 1: a loop over consecutive row blocks in one program (fewer, longer programs); with
#     num_stages > 1 Triton's pipeliner may prefetch the next step's bytes during this one's store.
# A double-quantized absmax (dequantize_4bit_nested) is decoded per step from a block_rows gather
# into the 256-entry map (Triton loads from a vector of pointers) and one nested scale per step
# (a gather when a step straddles nested blocks).
# ---------------------------------------------------------------------------------------------

LAYOUTS = ("interleave", "join", "strided")
# "select": the select tree of _lookup (15 selects of constants per value, no memory access);
# "gather": one load per value from the 16-entry code book passed as a 64-byte input, which stays
# in L1 and spans 16 distinct banks, so a warp's loads never conflict. The select tree costs about
# as many ALU cycles as the kernel's memory time on a Hopper card; the gather trades them for one
# L1 load. Same values either way (the same float32 constants).
LOOKUPS = ("select", "gather")


@dataclasses.dataclass(frozen=True)
class DequantBlocks:
    block_rows: int = 64  # quantization blocks per step
    num_warps: int = 2
    num_stages: int = 1
    steps: int = 1  # consecutive steps of block_rows per program
    layout: str = "interleave"  # how the values are written: one of LAYOUTS
    # "gather": the [4096, 14336] weight took 49-51 us against 76-93 us with "select" in every
    # block shape of the 2026-11-28 H200 sweep (session 4, bench/RESULTS.md), bit-identical.
    lookup: str = "gather"  # how a 4-bit index becomes its code-book value: one of LOOKUPS


def _choose_dequant_blocks(blocks: int, blocksize: int) -> DequantBlocks:
    # About 4096 elements a program (8 KiB of bf16 out) on two warps, fewer for small weights: on an
    # H200 the [4096, 14336] weight took 74 us so, against 82-88 us at 2048-8192 elements or more
    # warps (sweep of 2026-11-28, bench/RESULTS.md).
    target = max(1, 4096 // blocksize)
    return DequantBlocks(block_rows=min(next_power_of_2(target), next_power_of_2(blocks)), num_warps=2)


def _check_blocks(blocks: DequantBlocks) -> None:
    if blocks.layout not in LAYOUTS:
        raise ValueError(f"DequantBlocks.layout={blocks.layout!r} is not one of {', '.join(LAYOUTS)}")
    if blocks.lookup not in LOOKUPS:
        raise ValueError(f"DequantBlocks.lookup={blocks.lookup!r} is not one of {', '.join(LOOKUPS)}")
    if blocks.steps < 1 or blocks.block_rows < 1 or blocks.block_rows & (blocks.block_rows - 1):
        raise ValueError(f"DequantBlocks: block_rows must be a power of 2 and steps >= 1, got {blocks}")


def _load_rows(ref, rows, valid):
    """ref[rows, ...] with zeros where valid is False (None: every row is in bounds)."""
    if valid is None:
        return ref[rows] if ref.ndim == 1 else ref[rows, :]
    if ref.ndim == 1:
        return pltriton.load(ref.at[rows], mask=valid, other=0)
    return pltriton.load(ref.at[rows, :], mask=valid[:, None], other=0)


def _store_rows(ref, index, values, valid):
    if valid is None:
        ref[index] = values
    else:
        pltriton.store(ref.at[index], values, mask=valid[(slice(None),) + (None,) * (values.ndim - 1)])


def _decode_nested(absmax_codes, map_ref, nested_ref, offset_ref, first, *, blocks, block_rows, nested_blocksize):
    """decode_nested_absmax_reference for the block_rows blocks from `first`."""
    table = map_ref[absmax_codes.astype(jnp.int32)]  # a gather: one pointer per block
    if nested_blocksize % block_rows == 0:  # the step lies inside one nested block: one scale
        scale = nested_ref[jnp.minimum(first, blocks - 1) // nested_blocksize]
    else:
        row_ids = jnp.minimum(first + jnp.arange(block_rows), blocks - 1)
        scale = nested_ref[row_ids // nested_blocksize]
    scale = jnp.broadcast_to(scale, (block_rows,))
    return unfused(table * scale, scale) + offset_ref[0]


def _dequant_kernel(
    codes_ref, absmax_ref, *refs, blocks: int, block_rows: int, steps: int, layout: str, lookup: str,
    nested_blocksize: int, code_book,
):
    if lookup == "gather":  # the code book as a 16-entry input, read by index
        book_ref, *refs = refs
        lookup_values = lambda index: book_ref[index]  # noqa: E731
    else:
        lookup_values = functools.partial(_lookup, code_book=code_book)
    if nested_blocksize:
        map_ref, nested_ref, offset_ref, out_ref = refs
    else:
        (out_ref,) = refs
    program_first = pl.program_id(0) * (block_rows * steps)
    masked = blocks % (block_rows * steps) != 0

    def step(index, carry):
        first = program_first if steps == 1 else program_first + index * block_rows
        rows = pl.ds(pl.multiple_of(first, block_rows), block_rows)
        valid = first + jnp.arange(block_rows) < blocks if masked else None
        packed = _load_rows(codes_ref, rows, valid)
        absmax = _load_rows(absmax_ref, rows, valid)
        if nested_blocksize:
            absmax = _decode_nested(absmax, map_ref, nested_ref, offset_ref, first, blocks=blocks,
                                    block_rows=block_rows, nested_blocksize=nested_blocksize)
        if layout == "interleave":
            values = (_unpack(packed, code_book, lookup_values) * absmax[:, None]).astype(out_ref.dtype)
            _store_rows(out_ref, (rows, slice(None)), values, valid)
            return carry
        packed = packed.astype(jnp.int32)
        high = (lookup_values(packed >> 4) * absmax[:, None]).astype(out_ref.dtype)
        low = (lookup_values(packed & 15) * absmax[:, None]).astype(out_ref.dtype)
        if layout == "join":
            _store_rows(out_ref, (rows, slice(None), slice(None)), jax.lax.stack([high, low], axis=-1), valid)
        else:  # an array index (not a Python int), which the interpreter's masked store takes
            _store_rows(out_ref, (rows, slice(None), jnp.int32(0)), high, valid)
            _store_rows(out_ref, (rows, slice(None), jnp.int32(1)), low, valid)
        return carry

    if steps == 1:
        step(0, 0)
    else:
        jax.lax.fori_loop(0, steps, step, 0)


def _dequantize(codes, absmax, nested, *, code_book, n, blocksize, nested_blocksize, dtype, blocks):
    code_book = _check(code_book, blocksize)
    num_blocks = cdiv(n, blocksize)
    if absmax.shape != (num_blocks,) or codes.shape != (cdiv(n, 2),):
        raise ValueError(
            f"dequantize_4bit: {n} elements in blocks of {blocksize} need {cdiv(n, 2)} bytes and {num_blocks} "
            f"absmax values, got codes {list(codes.shape)} and absmax {list(absmax.shape)}"
        )
    half = blocksize // 2
    if codes.shape[0] != num_blocks * half:  # a partial last block: pad it to a whole one
        codes = jnp.pad(codes, (0, num_blocks * half - codes.shape[0]))
    blocks = blocks or _choose_dequant_blocks(num_blocks, blocksize)
    _check_blocks(blocks)
    kernel = functools.partial(
        _dequant_kernel, blocks=num_blocks, block_rows=blocks.block_rows, steps=blocks.steps, layout=blocks.layout,
        lookup=blocks.lookup, nested_blocksize=nested_blocksize, code_book=code_book,
    )
    book = (jnp.asarray(code_book, jnp.float32),) if blocks.lookup == "gather" else ()
    out_shape = (num_blocks, blocksize) if blocks.layout == "interleave" else (num_blocks, half, 2)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, dtype),
        grid=(cdiv(num_blocks, blocks.block_rows * blocks.steps),),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=use_interpret(),
    )(codes.reshape(num_blocks, half), absmax, *book, *nested)
    out = out.reshape(-1)
    return out if out.shape[0] == n else out[:n]


def dequantize_4bit(
    codes: UInt8[Array, " bytes"],
    absmax: Float[Array, " blocks"],
    *,
    code_book: Sequence[float],
    n: int,
    blocksize: int,
    dtype: Any,
    blocks: DequantBlocks | None = None,
) -> Float[Array, " n"]:
    """dequantize_4bit_reference as a Pallas-Triton kernel; bit-identical to it."""
    return _dequantize(codes, absmax.astype(jnp.float32), (), code_book=code_book, n=n, blocksize=blocksize,
                       nested_blocksize=0, dtype=dtype, blocks=blocks)


def dequantize_4bit_nested(
    codes: UInt8[Array, " bytes"],
    absmax_codes: UInt8[Array, " blocks"],
    absmax_map: Float[Array, " 256"],
    nested_absmax: Float[Array, " nested"],
    nested_offset: Float[Array, ""],
    *,
    code_book: Sequence[float],
    n: int,
    blocksize: int,
    nested_blocksize: int,
    dtype: Any,
    blocks: DequantBlocks | None = None,
) -> Float[Array, " n"]:
    """dequantize_4bit_nested_reference as one Pallas-Triton kernel (the absmax decoded inside it);
    bit-identical to it."""
    num_blocks = cdiv(n, blocksize)
    if (absmax_codes.dtype != jnp.uint8 or absmax_map.shape != (256,) or nested_blocksize < 1
            or nested_absmax.shape != (cdiv(num_blocks, nested_blocksize),)):
        raise ValueError(
            f"dequantize_4bit_nested: {num_blocks} blocks need uint8 absmax codes, a 256-value map and "
            f"{cdiv(num_blocks, max(nested_blocksize, 1))} nested scales (nested_blocksize {nested_blocksize}), got "
            f"{absmax_codes.dtype} codes, map {list(absmax_map.shape)}, nested {list(nested_absmax.shape)}"
        )
    nested = (absmax_map.astype(jnp.float32), nested_absmax.astype(jnp.float32),
              jnp.asarray(nested_offset, jnp.float32).reshape(1))
    return _dequantize(codes, absmax_codes, nested, code_book=code_book, n=n, blocksize=blocksize,
                       nested_blocksize=nested_blocksize, dtype=dtype, blocks=blocks)


# ---------------------------------------------------------------------------------------------
# Fused dequant-matmul for a few rows (decode): out[m, n_out] = x[m, k] @ W[n_out, k]^T, W never
# written to memory. A program owns block_n output features and walks k in block_k steps: it
# loads block_n x block_k/2 bytes and block_n x block_k/blocksize absmax values, dequantizes them
# in registers to x's dtype (the same rounding as dequantize-then-matmul) and accumulates
# x_tile @ W_tile^T in float32. Each quantization block lies inside one row of W, so k must be a
# multiple of blocksize (true of every real model; callers fall back otherwise).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatmulBlocks:
    block_n: int = 64
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3


def _choose_matmul_blocks(n_out: int, k: int, blocksize: int) -> MatmulBlocks:
    return MatmulBlocks(
        block_n=max(16, min(64, next_power_of_2(n_out))),
        block_k=max(blocksize, min(256, next_power_of_2(k))),
    )


def _dequant_matmul_kernel(
    x_ref, codes_ref, absmax_ref, out_ref, *, m: int, n_out: int, k: int, block_m: int, blocksize: int,
    blocks: MatmulBlocks, code_book,
):
    bn, bk = blocks.block_n, blocks.block_k
    n_block = pl.program_id(0)
    cols = pl.ds(pl.multiple_of(n_block * bn, bn), bn)
    n_valid = None if n_out % bn == 0 else n_block * bn + jnp.arange(bn) < n_out
    m_valid = None if m == block_m else jnp.arange(block_m) < m
    scales_per_tile = bk // blocksize
    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def accumulate(k_block, acc):
        k_start = k_block * bk
        k_valid = None if k % bk == 0 else k_start + jnp.arange(bk) < k
        byte_valid = None if k % bk == 0 else k_start // 2 + jnp.arange(bk // 2) < k // 2
        scale_valid = None if k % bk == 0 else k_start // blocksize + jnp.arange(scales_per_tile) < k // blocksize
        packed = masked_load(codes_ref, cols, pl.ds(pl.multiple_of(k_start // 2, bk // 2), bk // 2), n_valid, byte_valid)
        absmax = masked_load(absmax_ref, cols, pl.ds(pl.multiple_of(k_start // blocksize, scales_per_tile), scales_per_tile),
                      n_valid, scale_valid)
        scale = jnp.broadcast_to(absmax[:, :, None], (bn, scales_per_tile, blocksize)).reshape(bn, bk)
        weight = (_unpack(packed, code_book) * scale).astype(x_ref.dtype)
        x = masked_load(x_ref, pl.ds(0, block_m), pl.ds(pl.multiple_of(k_start, bk), bk), m_valid, k_valid)
        return acc + jax.lax.dot_general(
            x, weight, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, cdiv(k, bk), accumulate, jnp.zeros((block_m, bn), jnp.float32))
    out = acc.astype(out_ref.dtype)
    rows = pl.ds(0, block_m)
    if m_valid is None and n_valid is None:
        out_ref[rows, cols] = out
    else:
        mask = (
            (jnp.ones((block_m,), jnp.bool_) if m_valid is None else m_valid)[:, None]
            & (jnp.ones((bn,), jnp.bool_) if n_valid is None else n_valid)[None, :]
        )
        pltriton.store(out_ref.at[rows, cols], out, mask=mask)


def dequantize_4bit_matmul(
    x: Float[Array, "m k"],
    codes: UInt8[Array, " bytes"],
    absmax: Float[Array, " blocks"],
    *,
    code_book: Sequence[float],
    n_out: int,
    blocksize: int,
    blocks: MatmulBlocks | None = None,
) -> Float[Array, "m n_out"]:
    """dequantize_4bit_matmul_reference as one Pallas-Triton kernel, for m <= 64 rows."""
    code_book = _check(code_book, blocksize)
    m, k = x.shape
    if k % blocksize or m > 64:
        raise ValueError(
            f"dequantize_4bit_matmul: k={k} must be a multiple of blocksize {blocksize} and m={m} at most 64"
        )
    if codes.shape != (n_out * k // 2,) or absmax.shape != (n_out * k // blocksize,):
        raise ValueError(
            f"dequantize_4bit_matmul: a [{n_out}, {k}] weight needs {n_out * k // 2} bytes and "
            f"{n_out * k // blocksize} absmax values, got {list(codes.shape)} and {list(absmax.shape)}"
        )
    blocks = blocks or _choose_matmul_blocks(n_out, k, blocksize)
    block_m = max(16, next_power_of_2(m))
    kernel = functools.partial(
        _dequant_matmul_kernel, m=m, n_out=n_out, k=k, block_m=block_m, blocksize=blocksize, blocks=blocks,
        code_book=code_book,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n_out), x.dtype),
        grid=(cdiv(n_out, blocks.block_n),),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=use_interpret(),
    )(x, codes.reshape(n_out, k // 2), absmax.astype(jnp.float32).reshape(n_out, k // blocksize))

"""4-bit blockwise dequantization (NF4, or any 16-entry code book) and a fused dequant-matmul.

The format is bitsandbytes': a weight of n elements, flattened row-major, is cut into blocks of
`blocksize`; each element is a 4-bit index into a 16-value code book, two to a byte with the
first element in the high nibble; element i is code_book[index[i]] * absmax[i // blocksize],
computed in float32 and rounded once to the output dtype. The code book arrives as a static tuple
of floats, so this file knows no format constants; absmax arrives as float32 (a double-quantized
absmax is resolved by the caller: it is 1/blocksize of the elements).

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

from pallas_kernels._common import cdiv, masked_load, next_power_of_2, use_interpret


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
# depth 4), since a Triton program cannot index a table by a vector of indices.
# ---------------------------------------------------------------------------------------------


def _lookup(index, code_book: tuple[float, ...]):
    level = [jnp.float32(value) for value in code_book]
    for bit in range(4):
        taken = (index & (1 << bit)) != 0
        level = [jnp.where(taken, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _unpack(packed, code_book: tuple[float, ...]):
    """uint8 [rows, cols] to float32 [rows, 2 * cols]: high nibble first, interleaved."""
    packed = packed.astype(jnp.int32)
    high = _lookup(packed >> 4, code_book)
    low = _lookup(packed & 15, code_book)
    rows, cols = packed.shape
    return jax.lax.stack([high, low], axis=-1).reshape(rows, 2 * cols)


# ---------------------------------------------------------------------------------------------
# Dequantization kernel. The codes are viewed as [blocks, blocksize / 2] bytes and the output as
# [blocks, blocksize]; a program converts block_rows quantization blocks (a few thousand elements):
# one masked load of bytes and absmax, the select tree, one multiply, one store. It is memory
# bound: half a byte in and two bytes out per element (bf16).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DequantBlocks:
    block_rows: int = 64  # quantization blocks per program
    num_warps: int = 2
    num_stages: int = 1


def _choose_dequant_blocks(blocks: int, blocksize: int) -> DequantBlocks:
    # About 4096 elements a program (8 KiB of bf16 out) on two warps, fewer for small weights: on an
    # H200 the [4096, 14336] weight took 74 us so, against 82-88 us at 2048-8192 elements or more
    # warps (sweep of 2026-11-28, bench/RESULTS.md).
    target = max(1, 4096 // blocksize)
    return DequantBlocks(block_rows=min(next_power_of_2(target), next_power_of_2(blocks)), num_warps=2)


def _dequant_kernel(codes_ref, absmax_ref, out_ref, *, blocks: int, block_rows: int, code_book):
    first = pl.program_id(0) * block_rows
    rows = pl.ds(pl.multiple_of(first, block_rows), block_rows)
    if blocks % block_rows == 0:
        packed = codes_ref[rows, :]
        absmax = absmax_ref[rows]
    else:
        valid = first + jnp.arange(block_rows) < blocks
        packed = pltriton.load(codes_ref.at[rows, :], mask=valid[:, None], other=0)
        absmax = pltriton.load(absmax_ref.at[rows], mask=valid, other=0)
    values = (_unpack(packed, code_book) * absmax[:, None]).astype(out_ref.dtype)
    if blocks % block_rows == 0:
        out_ref[rows, :] = values
    else:
        pltriton.store(out_ref.at[rows, :], values, mask=valid[:, None])


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
    kernel = functools.partial(_dequant_kernel, blocks=num_blocks, block_rows=blocks.block_rows, code_book=code_book)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_blocks, blocksize), dtype),
        grid=(cdiv(num_blocks, blocks.block_rows),),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=use_interpret(),
    )(codes.reshape(num_blocks, half), absmax.astype(jnp.float32))
    out = out.reshape(-1)
    return out if out.shape[0] == n else out[:n]


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

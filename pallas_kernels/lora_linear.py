"""LoRA linear: x @ w + scale * (x @ a) @ b, with w frozen."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float

from pallas_kernels._common import cdiv, masked_load, next_power_of_2, use_interpret


def lora_linear_reference(
    x: Float[Array, "... d_in"],
    w: Float[Array, "d_in d_out"],
    a: Float[Array, "d_in rank"],
    b: Float[Array, "rank d_out"],
    scale: float,
) -> Float[Array, "... d_out"]:
    base = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    x_a = jnp.dot(x, a.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    lora = jnp.dot(x_a, b.astype(x.dtype), preferred_element_type=jnp.float32)
    return (base + scale * lora).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Pallas-Triton kernel: one blocked matmul with the rank-r path fused into its epilogue.
#
#   out[m, n] = lhs[m, k] @ rhs[k, n] + scale * low_lhs[m, r] @ low_rhs[r, n]
#
# The forward is (lhs, rhs, low_lhs, low_rhs) = (x, w, x@a, b); the dx of the backward is the same
# kernel on (g, w^T, d(xa), a^T), with w read transposed in place. A program owns one
# [block_m, block_n] float32 accumulator, walks k in block_k steps, then adds the low-rank product
# (r padded to a power of 2 of at least 16, the smallest tensor-core dot) before the single store,
# so the adapter costs no extra pass over the [m, n] output. x@a ([m, r]) is a small jnp.dot.
# Programs are ordered in groups of group_m row blocks so that neighbours share rhs tiles in L2.
# Edges that do not divide the blocks are masked (zeros in, nothing out); dims that divide them
# load unmasked.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatmulBlocks:
    """Tile sizes and launch parameters of the fused matmul (all block sizes powers of 2)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def _choose_blocks(m: int, n: int, k: int, dtype) -> MatmulBlocks:
    # A few rows (decode, tests) take the smallest tensor-core tile instead of a mostly empty one.
    block_m = max(16, min(128, next_power_of_2(m)))
    block_n = max(16, min(128, next_power_of_2(n)))
    # float32 tiles are twice the bytes: halve k to keep the software pipeline in shared memory.
    block_k = max(16, min(32 if jnp.dtype(dtype).itemsize == 4 else 64, next_power_of_2(k)))
    return MatmulBlocks(block_m=block_m, block_n=block_n, block_k=block_k)




def _fused_matmul_kernel(
    lhs_ref, rhs_ref, low_lhs_ref, low_rhs_ref, out_ref,
    *, m: int, n: int, k: int, rank_pad: int, scale: float, rhs_transposed: bool, blocks: MatmulBlocks,
):
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    num_m_blocks, num_n_blocks = cdiv(m, bm), cdiv(n, bn)
    pid = pl.program_id(0)
    programs_per_group = blocks.group_m * num_n_blocks
    first_m_block = (pid // programs_per_group) * blocks.group_m
    group_rows = jnp.minimum(num_m_blocks - first_m_block, blocks.group_m)
    m_block = first_m_block + (pid % programs_per_group) % group_rows
    n_block = (pid % programs_per_group) // group_rows

    rows = pl.ds(pl.multiple_of(m_block * bm, bm), bm)
    cols = pl.ds(pl.multiple_of(n_block * bn, bn), bn)
    row_valid = None if m % bm == 0 else m_block * bm + jnp.arange(bm) < m
    col_valid = None if n % bn == 0 else n_block * bn + jnp.arange(bn) < n
    precision = jax.lax.Precision.HIGHEST if lhs_ref.dtype == jnp.float32 else None

    def accumulate(k_block, acc):
        ks = pl.ds(pl.multiple_of(k_block * bk, bk), bk)
        k_valid = None if k % bk == 0 else k_block * bk + jnp.arange(bk) < k
        lhs = masked_load(lhs_ref, rows, ks, row_valid, k_valid)
        if rhs_transposed:
            rhs = masked_load(rhs_ref, cols, ks, col_valid, k_valid).astype(lhs.dtype)
            contract = ((1,), (1,))
        else:
            rhs = masked_load(rhs_ref, ks, cols, k_valid, col_valid).astype(lhs.dtype)
            contract = ((1,), (0,))
        return acc + jax.lax.dot_general(
            lhs, rhs, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, cdiv(k, bk), accumulate, jnp.zeros((bm, bn), jnp.float32))
    low_lhs = masked_load(low_lhs_ref, rows, pl.ds(0, rank_pad), row_valid, None)
    low_rhs = masked_load(low_rhs_ref, pl.ds(0, rank_pad), cols, None, col_valid).astype(low_lhs.dtype)
    acc = acc + scale * jnp.dot(low_lhs, low_rhs, precision=precision, preferred_element_type=jnp.float32)
    out = acc.astype(out_ref.dtype)
    if row_valid is None and col_valid is None:
        out_ref[rows, cols] = out
    else:
        mask = (
            (jnp.ones((bm,), jnp.bool_) if row_valid is None else row_valid)[:, None]
            & (jnp.ones((bn,), jnp.bool_) if col_valid is None else col_valid)[None, :]
        )
        pltriton.store(out_ref.at[rows, cols], out, mask=mask)


def _fused_matmul(lhs, rhs, low_lhs, low_rhs, scale: float, *, rhs_transposed: bool, blocks: MatmulBlocks | None):
    """lhs @ (rhs^T if rhs_transposed else rhs) + scale * low_lhs @ low_rhs, in lhs.dtype."""
    m, k = lhs.shape
    n = rhs.shape[0] if rhs_transposed else rhs.shape[1]
    rank = low_lhs.shape[1]
    rank_pad = max(16, next_power_of_2(rank))
    # The rank-r factors are a few KiB: padding them beats masking a dim that small.
    low_lhs = jnp.pad(low_lhs, ((0, 0), (0, rank_pad - rank)))
    low_rhs = jnp.pad(low_rhs, ((0, rank_pad - rank), (0, 0)))
    blocks = blocks or _choose_blocks(m, n, k, lhs.dtype)
    kernel = functools.partial(
        _fused_matmul_kernel, m=m, n=n, k=k, rank_pad=rank_pad, scale=float(scale),
        rhs_transposed=rhs_transposed, blocks=blocks,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        grid=(cdiv(m, blocks.block_m) * cdiv(n, blocks.block_n),),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=use_interpret(),
    )(lhs, rhs, low_lhs, low_rhs)


def base_plus_low_rank(
    lhs: Float[Array, "m k"], rhs: Float[Array, "k n"], low_lhs: Float[Array, "m r"], low_rhs: Float[Array, "r n"],
    scale: float, *, round_base: bool = False,
) -> Float[Array, "m n"]:
    """lhs @ rhs + scale * low_lhs @ low_rhs in lhs.dtype, as cuBLAS calls (impl="xla").

    Both products are float32 and their sum is rounded once, as lora_linear_reference rounds. In
    16-bit that matters: a young adapter's term is far below half a bf16 ulp of the base product, and
    adding it to an already rounded base (round_base=True, PEFT's and Unsloth's order: base_layer(x)
    in 16-bit plus the adapter's 16-bit output) returns the base unchanged, so the forward does not
    see the update at all. On an H200 that rounding alone took a qwen2.5-1.5b run's loss 0.16 above
    the float32 run's by step 5 and kept it ~0.007 above, where the bf16 reference stays within
    0.002 (bench/loss_parity.py --bisect, 2026-11-28)."""
    dtype = lhs.dtype
    low = scale * jnp.dot(low_lhs, low_rhs, preferred_element_type=jnp.float32)
    if round_base and dtype != jnp.float32:
        return jnp.dot(lhs, rhs, preferred_element_type=dtype) + low.astype(dtype)
    return (jnp.dot(lhs, rhs, preferred_element_type=jnp.float32) + low).astype(dtype)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.
# ---------------------------------------------------------------------------------------------


def _x_a(x2d, a):
    # Rounded to the activation dtype, as the reference does before the second product.
    return jnp.dot(x2d, a.astype(x2d.dtype), preferred_element_type=jnp.float32).astype(x2d.dtype)


def _forward(x2d, w, a, b, scale: float, impl: str, blocks: MatmulBlocks | None):
    x_a = _x_a(x2d, a)
    if impl == "pallas":
        out = _fused_matmul(x2d, w, x_a, b.astype(x2d.dtype), scale, rhs_transposed=False, blocks=blocks)
    else:
        out = base_plus_low_rank(x2d, w.astype(x2d.dtype), x_a, b.astype(x2d.dtype), scale,
                                 round_base=impl == "xla_rounded_base")
    return out, x_a


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lora_linear_2d(x2d, w, a, b, scale, impl, blocks):
    return _forward(x2d, w, a, b, scale, impl, blocks)[0]


def _lora_linear_2d_fwd(x2d, w, a, b, scale, impl, blocks):
    out, x_a = _forward(x2d, w, a, b, scale, impl, blocks)
    return out, (x2d, x_a, w, a, b)


# Gradient. With y = x w + s (x a) b, xa = x a and g = dy:
#   db    = s xa^T g                      [r, out]
#   d(xa) = s g b^T                       [m, r]
#   da    = x^T d(xa)                     [in, r]
#   dx    = g w^T + d(xa) a^T             [m, in]
# Every product has r on one side except g w^T, so going through d(xa) keeps the adapter's cost at
# O(m r (in + out)); g w^T and d(xa) a^T share one pass over dx (the same fused kernel, w read
# transposed). w is frozen: its cotangent is None, a symbolic zero, so no [in, out] gradient is
# ever computed and jax.grad with respect to w returns zeros.
def _lora_linear_2d_bwd(scale, impl, blocks, saved, g):
    x2d, x_a, w, a, b = saved
    dtype = x2d.dtype
    g = g.astype(dtype)
    contract_rows = (((0,), (0,)), ((), ()))
    db = scale * jax.lax.dot_general(x_a, g, contract_rows, preferred_element_type=jnp.float32)
    d_x_a = (scale * jnp.dot(g, b.astype(dtype).T, preferred_element_type=jnp.float32)).astype(dtype)
    da = jax.lax.dot_general(x2d, d_x_a, contract_rows, preferred_element_type=jnp.float32)
    a_t = a.astype(dtype).T
    if impl == "pallas":
        dx = _fused_matmul(g, w, d_x_a, a_t, 1.0, rhs_transposed=True, blocks=blocks)
    else:
        dx = base_plus_low_rank(g, w.astype(dtype).T, d_x_a, a_t, 1.0, round_base=impl == "xla_rounded_base")
    return dx, None, da.astype(a.dtype), db.astype(b.dtype)


_lora_linear_2d.defvjp(_lora_linear_2d_fwd, _lora_linear_2d_bwd)

# "xla_rounded_base": the "xla" formulas with the base product rounded to 16-bit before the
# adapter's term is added (PEFT's rounding; see base_plus_low_rank for what it costs in accuracy).
IMPLS = ("pallas", "xla", "xla_rounded_base")


def lora_linear(
    x: Float[Array, "... d_in"],
    w: Float[Array, "d_in d_out"],
    a: Float[Array, "d_in rank"],
    b: Float[Array, "rank d_out"],
    scale: float,
    *,
    impl: str = "pallas",
    blocks: MatmulBlocks | None = None,
) -> Float[Array, "... d_out"]:
    """lora_linear_reference with a hand-written backward; w is frozen (its gradient is zero).

    impl="pallas" runs the base matmul as a Pallas-Triton kernel with the adapter fused into its
    epilogue (forward, and dx in the backward); impl="xla" runs the same formulas as jnp.dot calls;
    "xla_rounded_base" rounds the base product before adding the adapter's (PEFT's order, less exact).
    Matmuls accumulate in float32; x may be float32, bfloat16 or float16. scale is a Python float.
    """
    if impl not in IMPLS:
        raise ValueError(f"lora_linear: impl={impl!r} is not one of {', '.join(IMPLS)}")
    d_in, d_out = w.shape
    rank = a.shape[1]
    if x.shape[-1] != d_in or a.shape[0] != d_in or b.shape != (rank, d_out):
        raise ValueError(
            f"lora_linear: shapes do not chain: x {list(x.shape)}, w {list(w.shape)}, a {list(a.shape)},"
            f" b {list(b.shape)}"
        )
    out = _lora_linear_2d(x.reshape(-1, d_in), w, a, b, float(scale), impl, blocks)
    return out.reshape(*x.shape[:-1], d_out)

"""RMSNorm (HF semantics): statistics in float32, output in the input dtype."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float

from pallas_kernels._common import cdiv, next_power_of_2, use_interpret


def rms_norm_reference(
    x: Float[Array, "... d"], weight: Float[Array, " d"], eps: float = 1e-6
) -> Float[Array, "... d"]:
    x_f32 = x.astype(jnp.float32)
    inv_rms = jnp.reciprocal(jnp.sqrt(jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True) + eps))
    # HF casts the normalised row back to the input dtype before scaling by the weight.
    return (x_f32 * inv_rms).astype(x.dtype) * weight.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Pallas-Triton kernel.
#
# Rows are the flattened leading dims. A forward program normalises a block of rows held whole in
# registers (hidden padded to a power of 2, loads and stores masked), so every element is read
# once and written once. A backward program walks a longer run of rows so that it can sum its
# share of dweight in registers; XLA then adds the per-program partial sums ([programs, hidden]
# float32, a few MiB at most), which keeps dweight deterministic (no atomics).
# ---------------------------------------------------------------------------------------------

# Elements (rows x padded hidden) one program holds at a time: a 4096-wide row is a block of its
# own, narrower rows are packed several to a program.
_BLOCK_ELEMENTS = 4096
# The backward aims at about this many programs: a few per SM of an H100/H200's 132, few enough
# that the dweight partial sums stay small. Alone, 256 and 512 are within the sweeps' noise
# (0.202 / 0.201 ms fwd+bwd on the 2026-11-28 H200 session-4 sweep); with the prefetching loop
# below, 512 gave the fastest backward measured (0.124 ms against 0.154 for 256 without it).
_BACKWARD_PROGRAMS = 512
# Whether a backward program issues the loads of its next rows before reducing the current ones
# (a hand-pipelined loop): the backward took 0.124-0.136 ms with it against 0.137-0.155 without it
# in the same H200 sweep (bench/RESULTS.md, fourth session), so it is on.
_BACKWARD_PREFETCH = True
# Forward programs: 0 launches one program per row block (the default; 72 % of copy on the H200,
# 0.088 ms for [16384, 4096] against torch.compile's 0.078). A positive count makes each program walk
# a run of rows like the backward, issuing the next block's loads before normalising the current one,
# so the load latency overlaps the arithmetic and the stores; in the sweep until a GPU measures it.
_FORWARD_PROGRAMS = 0
# Elements of a row block per thread: 16 bf16 values are two 16-byte vector loads, and the float32
# copy of the block stays in registers.
_ELEMENTS_PER_THREAD = 16
# Cache eviction hint for the forward's row loads (None, or Triton's "evict_first" / "evict_last"):
# each row is read once, so "evict_first" keeps it from displacing the weight in L2, as Inductor's
# RMSNorm does (torch.compile's forward is 0.078 ms against our 0.086 at [16384, 4096] on an H200).
# In the sweep until a GPU measures it.
_FORWARD_LOAD_EVICTION: str | None = None


@dataclasses.dataclass(frozen=True)
class _Blocks:
    hidden_pad: int  # hidden rounded up to a power of 2
    rows_per_block: int  # rows one program holds at a time
    rows_per_program: int  # rows one backward program walks, a multiple of rows_per_block
    num_warps: int
    forward_rows_per_program: int  # rows one forward program walks (rows_per_block: one block each)


def _choose_blocks(rows: int, hidden: int) -> _Blocks:
    hidden_pad = next_power_of_2(hidden)
    rows_per_block = max(1, min(next_power_of_2(rows), _BLOCK_ELEMENTS // hidden_pad))
    rows_per_program = max(rows_per_block, next_power_of_2(cdiv(rows, _BACKWARD_PROGRAMS)))
    num_warps = min(16, max(4, rows_per_block * hidden_pad // (32 * _ELEMENTS_PER_THREAD)))
    forward_rows_per_program = rows_per_block
    if _FORWARD_PROGRAMS:
        forward_rows_per_program = max(rows_per_block, next_power_of_2(cdiv(rows, _FORWARD_PROGRAMS)))
    return _Blocks(hidden_pad, rows_per_block, rows_per_program, num_warps, forward_rows_per_program)


def _block_masks(first_row, rows_per_block: int, hidden_pad: int, rows: int, hidden: int):
    row_valid = first_row + jnp.arange(rows_per_block) < rows
    column_valid = jnp.arange(hidden_pad) < hidden
    return row_valid[:, None] & column_valid[None, :], row_valid


def _forward_kernel(*refs, rows: int, hidden: int, eps: float, has_residual: bool, rows_per_block: int):
    if has_residual:
        x_ref, residual_ref, weight_ref, normed_ref, summed_ref, inv_rms_ref = refs
    else:
        x_ref, weight_ref, normed_ref, inv_rms_ref = refs
    rows_per_program, hidden_pad = x_ref.shape
    program_first_row = pl.program_id(0) * rows_per_program
    num_steps = rows_per_program // rows_per_block
    dtype = normed_ref.dtype
    weight = pltriton.load(weight_ref, mask=jnp.arange(hidden_pad) < hidden, other=0.0).astype(dtype).astype(jnp.float32)

    def load_block(step, may_pass_run: bool = False):
        """The step's rows (x, and the residual when there is one) and their masks. may_pass_run:
        the step can lie past the program's run (the prefetch after the last), whose loads are
        then masked off."""
        block = pl.ds(step * rows_per_block, rows_per_block)
        mask, row_valid = _block_masks(program_first_row + step * rows_per_block, rows_per_block, hidden_pad,
                                       rows, hidden)
        if may_pass_run:
            in_run = step < num_steps
            mask, row_valid = mask & in_run, row_valid & in_run
        x = pltriton.load(x_ref.at[block, :], mask=mask, other=0.0, eviction_policy=_FORWARD_LOAD_EVICTION)
        residual = (pltriton.load(residual_ref.at[block, :], mask=mask, other=0.0, eviction_policy=_FORWARD_LOAD_EVICTION)
                    if has_residual else x)
        return x, residual, mask, row_valid

    def normalize_block(step, x, residual, mask, row_valid):
        block = pl.ds(step * rows_per_block, rows_per_block)
        if has_residual:
            # The add rounds to the stream dtype, as HF's `hidden = residual + hidden` does.
            x = (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(dtype)
            pltriton.store(summed_ref.at[block, :], x, mask=mask)
        x_f32 = x.astype(jnp.float32)
        inv_rms = 1.0 / jnp.sqrt(jnp.sum(x_f32 * x_f32, axis=1) / hidden + eps)
        # HF rounds the normalised row to the input dtype and scales it by the weight in that dtype; a
        # product of two half-precision numbers is exact in float32, so one rounding reproduces it.
        normed = (x_f32 * inv_rms[:, None]).astype(dtype).astype(jnp.float32)
        pltriton.store(normed_ref.at[block, :], (normed * weight[None, :]).astype(dtype), mask=mask)
        pltriton.store(inv_rms_ref.at[block], inv_rms, mask=row_valid)

    if num_steps == 1:
        normalize_block(0, *load_block(0))
    else:
        def prefetching_step(step, loaded):
            upcoming = load_block(step + 1, may_pass_run=True)
            normalize_block(step, *loaded)
            return upcoming

        jax.lax.fori_loop(0, num_steps, prefetching_step, load_block(0))


# Gradient. With r = (mean_i x_i^2 + eps)^(-1/2), n = x r and y = n w, let g = dy w. Since
# dr/dx_j = -r^3 x_j / d,
#   dx_j = r g_j - (r^3 / d) x_j sum_i g_i x_i = r (g_j - n_j mean_i(g_i n_i)),
#   dw   = sum over rows of dy n.
# All of it in float32 from the stored inputs: the forward's roundings to the input dtype (of n,
# and of w when it is wider than x) are treated as the identity, so this is the gradient of RMSNorm
# itself, rounded once; the bfloat16 reference's autodiff also rounds g and every product of dw.
# With the residual add, s = x + residual is what gets normalised, and x and residual both receive
# ds = d(summed) + (the dx above, evaluated at s).
def _backward_kernel(*refs, rows: int, hidden: int, rows_per_block: int, has_residual: bool):
    if has_residual:
        d_normed_ref, d_summed_ref, x_ref, weight_ref, inv_rms_ref, dx_ref, dweight_partial_ref = refs
    else:
        d_normed_ref, x_ref, weight_ref, inv_rms_ref, dx_ref, dweight_partial_ref = refs
    rows_per_program, hidden_pad = x_ref.shape
    program_first_row = pl.program_id(0) * rows_per_program
    column_valid = jnp.arange(hidden_pad) < hidden
    weight = pltriton.load(weight_ref, mask=column_valid, other=0.0).astype(jnp.float32)

    num_steps = rows_per_program // rows_per_block

    def load_block(step, may_pass_run: bool = False):
        """x, d_normed (float32) and inv_rms of the step's rows, and their mask. may_pass_run: the
        step can lie past the program's run (the prefetch of the step after the last), whose
        loads are then masked off."""
        block = pl.ds(step * rows_per_block, rows_per_block)
        mask, row_valid = _block_masks(
            program_first_row + step * rows_per_block, rows_per_block, hidden_pad, rows, hidden
        )
        if may_pass_run:
            in_run = step < num_steps
            mask, row_valid = mask & in_run, row_valid & in_run
        x = pltriton.load(x_ref.at[block, :], mask=mask, other=0.0).astype(jnp.float32)
        d_normed = pltriton.load(d_normed_ref.at[block, :], mask=mask, other=0.0).astype(jnp.float32)
        inv_rms = pltriton.load(inv_rms_ref.at[block], mask=row_valid, other=0.0)
        return x, d_normed, inv_rms, mask

    def block_grads(step, x, d_normed, inv_rms, mask):
        """Stores the step's dx; returns its rows' share of dweight."""
        block = pl.ds(step * rows_per_block, rows_per_block)
        normed = x * inv_rms[:, None]
        grad_normed = d_normed * weight[None, :]
        mean_grad_dot_normed = jnp.sum(grad_normed * normed, axis=1) / hidden
        dx = inv_rms[:, None] * (grad_normed - normed * mean_grad_dot_normed[:, None])
        if has_residual:
            dx = dx + pltriton.load(d_summed_ref.at[block, :], mask=mask, other=0.0).astype(jnp.float32)
        pltriton.store(dx_ref.at[block, :], dx.astype(dx_ref.dtype), mask=mask)
        return jnp.sum(d_normed * normed, axis=0)

    zeros = jnp.zeros((hidden_pad,), jnp.float32)
    if _BACKWARD_PREFETCH:
        # The next rows' loads are issued before this row's reductions, so their latency overlaps
        # the arithmetic (a program walks its rows one after another).
        def prefetching_step(step, carry):
            dweight_acc, loaded = carry
            upcoming = load_block(step + 1, may_pass_run=True)
            return dweight_acc + block_grads(step, *loaded), upcoming

        dweight, _ = jax.lax.fori_loop(0, num_steps, prefetching_step, (zeros, load_block(0)))
    else:
        dweight = jax.lax.fori_loop(
            0, num_steps, lambda step, dweight_acc: dweight_acc + block_grads(step, *load_block(step)), zeros
        )
    pltriton.store(dweight_partial_ref, dweight[None, :])


def _forward(x2d, residual2d, weight, eps: float):
    rows, hidden = x2d.shape
    blocks = _choose_blocks(rows, hidden)
    has_residual = residual2d is not None
    program_rows = blocks.forward_rows_per_program
    row_block = pl.BlockSpec((program_rows, blocks.hidden_pad), lambda i: (i, 0))
    weight_block = pl.BlockSpec((blocks.hidden_pad,), lambda i: (0,))
    stream = jax.ShapeDtypeStruct((rows, hidden), x2d.dtype)
    out_shape = [stream, stream] if has_residual else [stream]
    out_specs = [row_block, row_block] if has_residual else [row_block]
    outputs = pl.pallas_call(
        functools.partial(_forward_kernel, rows=rows, hidden=hidden, eps=eps, has_residual=has_residual,
                          rows_per_block=blocks.rows_per_block),
        out_shape=[*out_shape, jax.ShapeDtypeStruct((rows,), jnp.float32)],
        grid=(cdiv(rows, program_rows),),
        in_specs=[row_block, row_block, weight_block] if has_residual else [row_block, weight_block],
        out_specs=[*out_specs, pl.BlockSpec((program_rows,), lambda i: (i,))],
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
        interpret=use_interpret(),
    )(*((x2d, residual2d, weight) if has_residual else (x2d, weight)))
    return outputs  # normed, [summed,] inv_rms


def _backward(d_normed2d, d_summed2d, x2d, weight, inv_rms):
    rows, hidden = x2d.shape
    blocks = _choose_blocks(rows, hidden)
    has_residual = d_summed2d is not None
    num_programs = cdiv(rows, blocks.rows_per_program)
    row_run = pl.BlockSpec((blocks.rows_per_program, blocks.hidden_pad), lambda i: (i, 0))
    inputs = (d_normed2d, d_summed2d, x2d, weight, inv_rms) if has_residual else (d_normed2d, x2d, weight, inv_rms)
    in_specs = [row_run] * (3 if has_residual else 2) + [
        pl.BlockSpec((blocks.hidden_pad,), lambda i: (0,)),
        pl.BlockSpec((blocks.rows_per_program,), lambda i: (i,)),
    ]
    dx, dweight_partial = pl.pallas_call(
        functools.partial(
            _backward_kernel, rows=rows, hidden=hidden, rows_per_block=blocks.rows_per_block,
            has_residual=has_residual,
        ),
        out_shape=[
            jax.ShapeDtypeStruct((rows, hidden), x2d.dtype),
            jax.ShapeDtypeStruct((num_programs, blocks.hidden_pad), jnp.float32),
        ],
        grid=(num_programs,),
        in_specs=in_specs,
        out_specs=[row_run, pl.BlockSpec((1, blocks.hidden_pad), lambda i: (i, 0))],
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=use_interpret(),
    )(*inputs)
    dweight = jnp.sum(dweight_partial[:, :hidden], axis=0).astype(weight.dtype)
    return dx, dweight


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, weight, eps):
    normed, _ = _forward(x.reshape(-1, x.shape[-1]), None, weight, eps)
    return normed.reshape(x.shape)


def _rms_norm_fwd(x, weight, eps):
    normed, inv_rms = _forward(x.reshape(-1, x.shape[-1]), None, weight, eps)
    return normed.reshape(x.shape), (x, weight, inv_rms)


def _rms_norm_bwd(eps, saved, d_normed):
    x, weight, inv_rms = saved
    hidden = x.shape[-1]
    dx, dweight = _backward(d_normed.reshape(-1, hidden), None, x.reshape(-1, hidden), weight, inv_rms)
    return dx.reshape(x.shape), dweight


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rms_norm_residual(x, residual, weight, eps):
    return _rms_norm_residual_fwd(x, residual, weight, eps)[0]


def _rms_norm_residual_fwd(x, residual, weight, eps):
    hidden = x.shape[-1]
    normed, summed, inv_rms = _forward(x.reshape(-1, hidden), residual.reshape(-1, hidden), weight, eps)
    # The summed stream is an output the caller keeps for the next residual add anyway, so saving
    # it costs no memory of its own.
    return (normed.reshape(x.shape), summed.reshape(x.shape)), (summed, weight, inv_rms)


def _rms_norm_residual_bwd(eps, saved, cotangents):
    summed, weight, inv_rms = saved
    d_normed, d_summed = cotangents
    hidden = summed.shape[-1]
    d_stream, dweight = _backward(
        d_normed.reshape(-1, hidden), d_summed.reshape(-1, hidden), summed.reshape(-1, hidden), weight, inv_rms
    )
    d_stream = d_stream.reshape(summed.shape)
    return d_stream, d_stream, dweight


_rms_norm_residual.defvjp(_rms_norm_residual_fwd, _rms_norm_residual_bwd)


def rms_norm(
    x: Float[Array, "... d"],
    weight: Float[Array, " d"],
    eps: float = 1e-6,
    *,
    residual: Float[Array, "... d"] | None = None,
) -> Float[Array, "... d"] | tuple[Float[Array, "... d"], Float[Array, "... d"]]:
    """RMSNorm as rms_norm_reference, as a Pallas-Triton kernel with a hand-written backward.

    With `residual`, returns (rms_norm(x + residual), x + residual): the add is fused into the
    norm, and gradients reach both x and residual.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {weight.shape} does not match hidden size {x.shape[-1]}")
    if residual is None:
        return _rms_norm(x, weight, float(eps))
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"rms_norm: residual {residual.dtype}{list(residual.shape)} must match x {x.dtype}{list(x.shape)}"
        )
    return _rms_norm_residual(x, residual, weight, float(eps))

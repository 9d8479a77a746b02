"""Fused linear cross-entropy: hidden @ w to the summed token loss, without [n, vocab] logits."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from pallas_kernels._common import cdiv, next_power_of_2, use_interpret


def fused_linear_cross_entropy_reference(
    hidden: Float[Array, "n d"],
    w: Float[Array, "d vocab"],
    labels: Int[Array, " n"],
    *,
    ignore_index: int = -100,
    normalizer: float | Array | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> Float[Array, ""]:
    logits = jnp.dot(hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    valid = labels != ignore_index
    safe_labels = jnp.where(valid, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, safe_labels[:, None], axis=-1)[:, 0]
    token_loss = jnp.where(valid, lse - label_logit, 0.0)
    if normalizer is None:
        normalizer = jnp.maximum(jnp.sum(valid), 1)
    return jnp.sum(token_loss) / jnp.asarray(normalizer, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Two implementations, both exact and both bounded in memory by a chunk of rows, never [n, vocab]:
#
# impl="chunked" (XLA): a lax.scan over token chunks. Each step takes the chunk's float32 logits
#   with one jnp.dot, reduces them to the loss and, when differentiating, turns them straight into
#   d(logits) and the chunk's dh = d(logits) @ w^T and its share of dw = h^T @ d(logits). The loss
#   is a scalar, so its gradient is known up to the factor g = d(loss) already in the forward:
#   the backward only scales the saved dh and dw by g. Three matmuls in all (two when w is frozen),
#   against four for any scheme that recomputes logits in the backward.
#
# impl="pallas": the forward is a Pallas-Triton kernel that never writes logits at all. A program
#   owns a block of rows and a run of vocab tiles; per tile it forms h_blk @ w_tile in a float32
#   accumulator (blocked over d) and folds it into a running max, sum of exponentials (online
#   logsumexp) and the label's logit. The runs of vocab (splits) are merged by a logsumexp in jnp.
#   The backward scans token chunks: a second kernel recomputes each logits tile and writes
#   d(logits) for the chunk in the activation dtype, and jnp.dot forms dh and dw from it.
#
# Either way dw accumulates over chunks in float32 (one [d, vocab] float32 buffer) and only when w
# is being differentiated (custom_vjp symbolic zeros tell which inputs are).
# ---------------------------------------------------------------------------------------------

IMPLS = ("chunked", "pallas")

# Rows per chunk are chosen so that a chunk's [rows, vocab] float32 logits hold about this many
# elements (256 MiB): 512 rows at Llama-3's 128256 vocab. The loss head's transient memory is a few
# times this, and it sets the step's peak once the layers' activations are offloaded (1 GiB chunks
# put llama3-8b at 18.5 GiB where Unsloth needs 16.7; XLA's GEMM autotuner also allocates one chunk's
# operands at compile time). 512 rows still keep the [512, d] x [d, vocab] matmuls at full speed.
_CHUNK_ELEMENTS = 1 << 26


@dataclasses.dataclass(frozen=True)
class _Options:
    ignore_index: int
    logit_scale: float | None
    softcap: float | None
    impl: str
    chunk_size: int | None


@dataclasses.dataclass(frozen=True)
class _Blocks:
    block_rows: int
    block_vocab: int
    block_k: int
    num_warps: int
    num_stages: int


def _choose_blocks(rows: int, d: int, dtype) -> _Blocks:
    block_rows = max(16, min(128, next_power_of_2(rows)))
    block_k = max(16, min(32 if jnp.dtype(dtype).itemsize == 4 else 64, next_power_of_2(d)))
    return _Blocks(block_rows=block_rows, block_vocab=128, block_k=block_k, num_warps=8, num_stages=3)


def _chunking(n: int, vocab: int, chunk_size: int | None) -> tuple[int, int]:
    """(rows per chunk, number of chunks): chunks of near-equal size, so the padding is < chunks."""
    limit = chunk_size or max(1, _CHUNK_ELEMENTS // vocab)
    num_chunks = cdiv(n, limit)
    return cdiv(n, num_chunks), num_chunks


def _transform_logits(raw, logit_scale, softcap):
    """Raw float32 logits -> the logits the loss sees, and the factor d(seen)/d(raw) (None for 1)."""
    logits = raw if logit_scale is None else raw * logit_scale
    if softcap is None:
        return logits, (None if logit_scale is None else logit_scale)
    tanh = jnp.tanh(logits / softcap)
    slope = 1.0 - tanh * tanh
    return softcap * tanh, (slope if logit_scale is None else slope * logit_scale)


# Gradient. With y the (scaled, capped) logits of a row, lse = log sum_v exp(y_v) and loss =
# sum over valid rows of (lse - y_label) / normalizer:
#   dL/dy_v = (softmax(y)_v - [v == label]) * valid / normalizer,
# and through y = c tanh(s z / c): dy/dz = s (1 - tanh^2). Then dh = d(logits) @ w^T and
# dw = h^T @ d(logits). The normalizer is treated as a constant (no gradient).
def _logits_grad(seen, slope, lse, labels, columns, row_coef):
    onehot = (columns[None, :] == labels[:, None]).astype(jnp.float32)
    d_seen = (jnp.exp(seen - lse[:, None]) - onehot) * row_coef[:, None]
    return d_seen if slope is None else d_seen * slope


# ---------------------------------------------------------------------------------------------
# impl="chunked".
# ---------------------------------------------------------------------------------------------


def _pad_rows(hidden, labels, rows: int, ignore_index: int):
    pad = rows - hidden.shape[0]
    if pad == 0:
        return hidden, labels
    return jnp.pad(hidden, ((0, pad), (0, 0))), jnp.pad(labels, (0, pad), constant_values=ignore_index)


def _chunked(hidden, w, labels, normalizer, opts: _Options, want_dh: bool, want_dw: bool):
    """(loss, dh or None, dw or None), with the gradients of loss itself (g = 1)."""
    n, d = hidden.shape
    vocab = w.shape[1]
    dtype = hidden.dtype
    chunk, num_chunks = _chunking(n, vocab, opts.chunk_size)
    hidden_p, labels_p = _pad_rows(hidden, labels, chunk * num_chunks, opts.ignore_index)
    w_c = w.astype(dtype)
    inv_normalizer = 1.0 / normalizer
    columns = jnp.arange(vocab)

    def step(carry, chunk_inputs):
        loss_sum, dw_acc = carry
        hidden_chunk, label_chunk = chunk_inputs
        valid = label_chunk != opts.ignore_index
        safe_labels = jnp.where(valid, label_chunk, 0)
        raw = jnp.dot(hidden_chunk, w_c, preferred_element_type=jnp.float32)
        seen, slope = _transform_logits(raw, opts.logit_scale, opts.softcap)
        lse = jax.nn.logsumexp(seen, axis=-1)
        label_logit = jnp.take_along_axis(seen, safe_labels[:, None], axis=-1)[:, 0]
        loss_sum = loss_sum + jnp.sum(jnp.where(valid, lse - label_logit, 0.0))
        dh_chunk = None
        if want_dh or want_dw:
            row_coef = jnp.where(valid, inv_normalizer, 0.0)
            d_raw = _logits_grad(seen, slope, lse, label_chunk, columns, row_coef).astype(dtype)
            if want_dh:
                dh_chunk = jnp.dot(d_raw, w_c.T, preferred_element_type=jnp.float32).astype(dtype)
            if want_dw:
                dw_acc = dw_acc + jax.lax.dot_general(
                    hidden_chunk, d_raw, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
                )
        return (loss_sum, dw_acc), dh_chunk

    dw0 = jnp.zeros((d, vocab), jnp.float32) if want_dw else None
    (loss_sum, dw), dh_chunks = jax.lax.scan(
        step,
        (jnp.zeros((), jnp.float32), dw0),
        (hidden_p.reshape(num_chunks, chunk, d), labels_p.reshape(num_chunks, chunk)),
    )
    dh = dh_chunks.reshape(-1, d)[:n] if want_dh else None
    return loss_sum * inv_normalizer, dh, (dw.astype(w.dtype) if want_dw else None)


# ---------------------------------------------------------------------------------------------
# impl="pallas": kernels.
# ---------------------------------------------------------------------------------------------


def _masked_load(ref, index, mask, other):
    return ref[index] if mask is None else pltriton.load(ref.at[index], mask=mask, other=other)


def _and_masks(row_valid, col_valid):
    if row_valid is None and col_valid is None:
        return None
    if row_valid is None:
        return col_valid[None, :]
    if col_valid is None:
        return row_valid[:, None]
    return row_valid[:, None] & col_valid[None, :]


def _interpret_carrier(x):
    """In the interpreter, half-precision operands travel as (exact) float32.

    The interpreter writes every ref back at each grid step, and XLA:CPU converts a whole bf16 or
    f16 buffer to float32 and back to do that, which makes a vocab-sized grid quadratic. The kernels
    round every tile back to the compute dtype, so the numbers are those of the GPU run.
    """
    if use_interpret() and jnp.dtype(x.dtype).itemsize < 4 and jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.float32)
    return x


def _tile_logits(h_ref, w_ref, row_valid, first_col, col_valid, *, d: int, dtype, blocks: _Blocks):
    """Raw float32 logits of the row block h_ref [rows, d] against w_ref[:, first_col:+block_vocab],
    blocked over d, with both operands in dtype."""
    bk, bv = blocks.block_k, blocks.block_vocab
    rows = pl.ds(0, blocks.block_rows)
    cols = pl.ds(first_col, bv)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def accumulate(k_block, acc):
        ks = pl.ds(pl.multiple_of(k_block * bk, bk), bk)
        k_valid = None if d % bk == 0 else k_block * bk + jnp.arange(bk) < d
        h_tile = _masked_load(h_ref, (rows, ks), _and_masks(row_valid, k_valid), 0).astype(dtype)
        w_tile = _masked_load(w_ref, (ks, cols), _and_masks(k_valid, col_valid), 0).astype(dtype)
        return acc + jnp.dot(h_tile, w_tile, precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, cdiv(d, bk), accumulate, jnp.zeros((blocks.block_rows, bv), jnp.float32))


def _row_block_masks(n: int, bm: int):
    row_block = pl.program_id(0)
    return None if n % bm == 0 else row_block * bm + jnp.arange(bm) < n


# Refs are blocks: h_ref [block_rows, d], w_ref [d, tiles_per_split * block_vocab] (the split's run
# of vocab), labels_ref [block_rows]; the outputs are [1, block_rows] rows of [splits, n].
def _lse_kernel(
    h_ref, w_ref, labels_ref, lse_ref, label_logit_ref,
    *, n: int, d: int, vocab: int, tiles_per_split: int, dtype, opts: _Options, blocks: _Blocks,
):
    bm, bv = blocks.block_rows, blocks.block_vocab
    split = pl.program_id(1)
    row_valid = _row_block_masks(n, bm)
    # Padding rows get a label no column matches.
    labels = _masked_load(labels_ref, (pl.ds(0, bm),), row_valid, -1)
    first_tile = split * tiles_per_split
    num_tiles = jnp.minimum(tiles_per_split, cdiv(vocab, bv) - first_tile)

    def fold_tile(t, carry):
        running_max, running_sum, label_logit = carry
        columns = (first_tile + t) * bv + jnp.arange(bv)
        col_valid = None if vocab % bv == 0 else columns < vocab
        first_col = pl.multiple_of(t * bv, bv)
        raw = _tile_logits(h_ref, w_ref, row_valid, first_col, col_valid, d=d, dtype=dtype, blocks=blocks)
        seen, _ = _transform_logits(raw, opts.logit_scale, opts.softcap)
        if col_valid is not None:
            # Every tile holds at least one real column, so the row max below stays finite.
            seen = jnp.where(col_valid[None, :], seen, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(seen, axis=1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(seen - new_max[:, None]), axis=1
        )
        label_logit = label_logit + jnp.sum(jnp.where(columns[None, :] == labels[:, None], seen, 0.0), axis=1)
        return new_max, running_sum, label_logit

    init = (jnp.full((bm,), -jnp.inf, jnp.float32), jnp.zeros((bm,), jnp.float32), jnp.zeros((bm,), jnp.float32))
    running_max, running_sum, label_logit = jax.lax.fori_loop(0, num_tiles, fold_tile, init)
    lse = (running_max + jnp.log(running_sum))[None, :]
    label_logit = label_logit[None, :]
    if row_valid is None:
        lse_ref[...] = lse
        label_logit_ref[...] = label_logit
    else:
        pltriton.store(lse_ref, lse, mask=row_valid[None, :])
        pltriton.store(label_logit_ref, label_logit, mask=row_valid[None, :])


# About this many programs fill an H100 (132 SMs) a few times over; the vocab is split into as
# many runs as it takes to reach it when there are few row blocks.
_TARGET_PROGRAMS = 528


def _pallas_lse(hidden, w, labels, opts: _Options):
    """Per-row logsumexp of the logits and the label's logit (0 for ignored rows), float32 [n]."""
    n, d = hidden.shape
    vocab = w.shape[1]
    blocks = _choose_blocks(n, d, hidden.dtype)
    bm = blocks.block_rows
    row_blocks = cdiv(n, bm)
    vocab_tiles = cdiv(vocab, blocks.block_vocab)
    tiles_per_split = cdiv(vocab_tiles, min(vocab_tiles, max(1, _TARGET_PROGRAMS // row_blocks)))
    splits = cdiv(vocab_tiles, tiles_per_split)
    kernel = functools.partial(
        _lse_kernel, n=n, d=d, vocab=vocab, tiles_per_split=tiles_per_split, dtype=hidden.dtype, opts=opts,
        blocks=blocks,
    )
    part = jax.ShapeDtypeStruct((splits, n), jnp.float32)
    part_block = pl.BlockSpec((1, bm), lambda i, s: (s, i))
    lse_parts, label_parts = pl.pallas_call(
        kernel,
        out_shape=[part, part],
        grid=(row_blocks, splits),
        in_specs=[
            pl.BlockSpec((bm, d), lambda i, s: (i, 0)),
            pl.BlockSpec((d, tiles_per_split * blocks.block_vocab), lambda i, s: (0, s)),
            pl.BlockSpec((bm,), lambda i, s: (i,)),
        ],
        out_specs=[part_block, part_block],
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=use_interpret(),
    )(_interpret_carrier(hidden), _interpret_carrier(w), labels.astype(jnp.int32))
    return jax.nn.logsumexp(lse_parts, axis=0), jnp.sum(label_parts, axis=0)


# Refs are blocks: h_ref [block_rows, d], w_ref [d, block_vocab], labels/lse/row_coef
# [block_rows], d_raw_ref [block_rows, block_vocab].
def _dlogits_kernel(
    h_ref, w_ref, labels_ref, lse_ref, row_coef_ref, d_raw_ref,
    *, n: int, d: int, vocab: int, dtype, opts: _Options, blocks: _Blocks,
):
    bm, bv = blocks.block_rows, blocks.block_vocab
    row_valid = _row_block_masks(n, bm)
    columns = pl.program_id(1) * bv + jnp.arange(bv)
    col_valid = None if vocab % bv == 0 else columns < vocab
    rows = (pl.ds(0, bm),)
    labels = _masked_load(labels_ref, rows, row_valid, -1)
    lse = _masked_load(lse_ref, rows, row_valid, 0.0)
    row_coef = _masked_load(row_coef_ref, rows, row_valid, 0.0)
    raw = _tile_logits(h_ref, w_ref, row_valid, 0, col_valid, d=d, dtype=dtype, blocks=blocks)
    seen, slope = _transform_logits(raw, opts.logit_scale, opts.softcap)
    d_raw = _logits_grad(seen, slope, lse, labels, columns, row_coef).astype(dtype).astype(d_raw_ref.dtype)
    mask = _and_masks(row_valid, col_valid)
    if mask is None:
        d_raw_ref[...] = d_raw
    else:
        pltriton.store(d_raw_ref, d_raw, mask=mask)


def _pallas_dlogits(hidden, w, labels, lse, row_coef, dtype, opts: _Options):
    """d(loss)/d(raw logits) for a chunk of rows, in dtype (the activations'): [rows, vocab]."""
    n, d = hidden.shape
    vocab = w.shape[1]
    blocks = _choose_blocks(n, d, hidden.dtype)
    bm, bv = blocks.block_rows, blocks.block_vocab
    kernel = functools.partial(_dlogits_kernel, n=n, d=d, vocab=vocab, dtype=dtype, opts=opts, blocks=blocks)
    row_block = pl.BlockSpec((bm,), lambda i, j: (i,))
    d_raw = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, vocab), hidden.dtype),
        grid=(cdiv(n, bm), cdiv(vocab, bv)),
        in_specs=[
            pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
            row_block,
            row_block,
            row_block,
        ],
        out_specs=pl.BlockSpec((bm, bv), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=use_interpret(),
    )(hidden, w, labels.astype(jnp.int32), lse, row_coef)
    return d_raw.astype(dtype)


def _pallas_loss(hidden, w, labels, normalizer, opts: _Options):
    lse, label_logit = _pallas_lse(hidden, w, labels, opts)
    valid = labels != opts.ignore_index
    return jnp.sum(jnp.where(valid, lse - label_logit, 0.0)) / normalizer, lse


def _pallas_grads(hidden, w, labels, lse, row_coef, opts: _Options, want_dh: bool, want_dw: bool):
    n, d = hidden.shape
    vocab = w.shape[1]
    dtype = hidden.dtype
    # d(logits) is written in the activation dtype, so a chunk may hold twice the rows of the
    # float32 chunks of impl="chunked".
    chunk, num_chunks = _chunking(n, vocab, opts.chunk_size or 2 * max(1, _CHUNK_ELEMENTS // vocab))
    hidden_p, labels_p = _pad_rows(hidden, labels, chunk * num_chunks, opts.ignore_index)
    pad = chunk * num_chunks - n
    lse_p = jnp.pad(lse, (0, pad))
    row_coef_p = jnp.pad(row_coef, (0, pad))
    w_c = w.astype(dtype)
    w_carrier = _interpret_carrier(w)

    def step(dw_acc, chunk_inputs):
        hidden_chunk, label_chunk, lse_chunk, coef_chunk = chunk_inputs
        d_raw = _pallas_dlogits(
            _interpret_carrier(hidden_chunk), w_carrier, label_chunk, lse_chunk, coef_chunk, dtype, opts
        )
        dh_chunk = None
        if want_dh:
            dh_chunk = jnp.dot(d_raw, w_c.T, preferred_element_type=jnp.float32).astype(dtype)
        if want_dw:
            dw_acc = dw_acc + jax.lax.dot_general(
                hidden_chunk, d_raw, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
        return dw_acc, dh_chunk

    dw, dh_chunks = jax.lax.scan(
        step,
        jnp.zeros((d, vocab), jnp.float32) if want_dw else None,
        (
            hidden_p.reshape(num_chunks, chunk, d),
            labels_p.reshape(num_chunks, chunk),
            lse_p.reshape(num_chunks, chunk),
            row_coef_p.reshape(num_chunks, chunk),
        ),
    )
    dh = dh_chunks.reshape(-1, d)[:n] if want_dh else None
    return dh, (dw.astype(w.dtype) if want_dw else None)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_ce(hidden, w, labels, normalizer, opts: _Options):
    if opts.impl == "pallas":
        return _pallas_loss(hidden, w, labels, normalizer, opts)[0]
    return _chunked(hidden, w, labels, normalizer, opts, want_dh=False, want_dw=False)[0]


def _fused_ce_fwd(hidden, w, labels, normalizer, opts: _Options):
    want_dh, want_dw = hidden.perturbed, w.perturbed
    hidden, w, labels, normalizer = hidden.value, w.value, labels.value, normalizer.value
    # None-or-array markers carry the static "which gradients" choice through the residuals.
    wants = (jnp.zeros(()) if want_dh else None, jnp.zeros(()) if want_dw else None)
    if opts.impl == "pallas":
        loss, lse = _pallas_loss(hidden, w, labels, normalizer, opts)
        return loss, (wants, hidden, w, labels, lse, normalizer)
    loss, dh, dw = _chunked(hidden, w, labels, normalizer, opts, want_dh, want_dw)
    return loss, (wants, dh, dw)


def _fused_ce_bwd(opts: _Options, saved, g):
    wants = saved[0]
    want_dh, want_dw = wants[0] is not None, wants[1] is not None
    if isinstance(g, SymbolicZero) or not (want_dh or want_dw):
        return None, None, None, None
    if opts.impl == "pallas":
        _, hidden, w, labels, lse, normalizer = saved
        row_coef = jnp.where(labels != opts.ignore_index, g / normalizer, 0.0).astype(jnp.float32)
        dh, dw = _pallas_grads(hidden, w, labels, lse, row_coef, opts, want_dh, want_dw)
    else:
        _, dh, dw = saved
        # The saved gradients are those of the loss itself; scale them by g (1 in training).
        dh = None if dh is None else (dh * g).astype(dh.dtype)
        dw = None if dw is None else (dw * g).astype(dw.dtype)
    return dh, dw, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)


def fused_linear_cross_entropy(
    hidden: Float[Array, "n d"],
    w: Float[Array, "d vocab"],
    labels: Int[Array, " n"],
    *,
    ignore_index: int = -100,
    normalizer: float | Array | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    impl: str = "chunked",
    chunk_size: int | None = None,
) -> Float[Array, ""]:
    """fused_linear_cross_entropy_reference without materialising [n, vocab] logits.

    Gradients reach hidden and w (w may be trainable or frozen); the normalizer (None: the number
    of labels != ignore_index, at least 1) may be traced and gets no gradient. impl="chunked"
    scans token chunks in XLA, impl="pallas" computes the loss in a Pallas-Triton kernel; see the
    comment at the top of this file. chunk_size: rows per chunk (default: about 2^28 logits).
    """
    if impl not in IMPLS:
        raise ValueError(f"fused_linear_cross_entropy: impl={impl!r} is not one of {', '.join(IMPLS)}")
    if hidden.ndim != 2 or w.ndim != 2 or hidden.shape[1] != w.shape[0] or labels.shape != hidden.shape[:1]:
        raise ValueError(
            "fused_linear_cross_entropy: expected hidden [n, d], w [d, vocab], labels [n]; got"
            f" hidden {list(hidden.shape)}, w {list(w.shape)}, labels {list(labels.shape)}"
        )
    if normalizer is None:
        normalizer = jnp.maximum(jnp.sum(labels != ignore_index), 1)
    normalizer = jax.lax.stop_gradient(jnp.asarray(normalizer, jnp.float32))
    opts = _Options(
        ignore_index=int(ignore_index),
        logit_scale=None if logit_scale is None else float(logit_scale),
        softcap=None if softcap is None else float(softcap),
        impl=impl,
        chunk_size=None if chunk_size is None else int(chunk_size),
    )
    return _fused_ce(hidden, w, labels, normalizer, opts)

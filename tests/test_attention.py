"""Flash attention (Pallas, interpret mode on CPU) against the explicit-softmax reference."""

from __future__ import annotations

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import BlockSizes, attention_reference, flash_attention

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}


def fresh_key():
    seed = secrets.randbits(31)
    print(f"seed={seed}")
    return jax.random.PRNGKey(seed)


def random_inputs(key, batch, seq_q, seq_k, heads_q, heads_kv, head_dim, dtype):
    keys = jax.random.split(key, 4)
    q = jax.random.normal(keys[0], (batch, seq_q, heads_q, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, seq_k, heads_kv, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, seq_k, heads_kv, head_dim), jnp.float32).astype(dtype)
    d_out = jax.random.normal(keys[3], (batch, seq_q, heads_q, head_dim), jnp.float32).astype(dtype)
    return q, k, v, d_out


def value_and_grads(fn, q, k, v, d_out):
    """Output and (dq, dk, dv) for cotangent d_out, compiled as one program (compiling dominates)."""

    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run)(q, k, v, d_out)


def relative_error(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def assert_close(got, want, dtype, names=("out", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name} has non-finite values"
        err = relative_error(g, w)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


# (batch, seq_q, seq_k, heads_q, heads_kv, head_dim, dtype, causal)
CASES = [
    (2, 17, 17, 2, 2, 64, jnp.float32, True),
    (1, 1, 1, 4, 2, 64, jnp.float32, True),
    (1, 70, 70, 4, 2, 80, jnp.float32, True),
    (1, 40, 40, 8, 2, 96, jnp.float32, False),
    (1, 50, 50, 7, 1, 128, jnp.float32, True),
    (2, 64, 64, 4, 1, 128, jnp.bfloat16, True),
    (1, 45, 45, 14, 2, 80, jnp.float16, False),
]


@pytest.mark.parametrize("batch,seq_q,seq_k,heads_q,heads_kv,head_dim,dtype,causal", CASES)
def test_matches_reference(batch, seq_q, seq_k, heads_q, heads_kv, head_dim, dtype, causal):
    q, k, v, d_out = random_inputs(fresh_key(), batch, seq_q, seq_k, heads_q, heads_kv, head_dim, dtype)
    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v, d_out)
    want = value_and_grads(lambda q, k, v: attention_reference(q, k, v, causal=causal), q, k, v, d_out)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
    if seq_k > 1:
        assert_close(got, want, dtype)
        return
    # One key: the softmax is the constant 1, so dq = scale * p * (d_out.v - delta) * k is zero in
    # exact arithmetic, and both sides hold only the rounding of d_out.v - delta (an H200 gave 4.7e23
    # "relative" error against the reference's ~1e-30). Its yardstick is the size of the terms that
    # cancel: |dq| <= tolerance * scale * max|d_out.v| * max|k|.
    assert_close(got[:1] + got[2:], want[:1] + want[2:], dtype, names=("out", "dk", "dv"))
    d_out_dot_v = np.einsum("bqhd,bkhd->bhqk", np.asarray(d_out, np.float32),
                            np.repeat(np.asarray(v, np.float32), heads_q // heads_kv, axis=2))
    cancelled = float(np.max(np.abs(d_out_dot_v)) * np.max(np.abs(np.asarray(k, np.float32)))) / np.sqrt(head_dim)
    for name, dq in (("dq", got[1]), ("reference dq", want[1])):
        worst = float(np.max(np.abs(np.asarray(dq, np.float32))))
        assert worst <= TOLERANCE[dtype] * cancelled, f"{name}: {worst:.2e} > {TOLERANCE[dtype]:.0e} x {cancelled:.2e}"


def test_long_odd_sequence():
    q, k, v, d_out = random_inputs(fresh_key(), 1, 1000, 1000, 2, 1, 64, jnp.float32)
    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v), q, k, v, d_out)
    want = value_and_grads(lambda q, k, v: attention_reference(q, k, v), q, k, v, d_out)
    assert_close(got, want, jnp.float32)


def test_uneven_tiles_longer_keys_explicit_scale():
    """Different tiles per kernel and queries at the end of a longer key range exercise the
    block-range tables beyond the square case."""
    blocks = BlockSizes(16, 32, 4, 2, 32, 16, 4, 2, 16, 16, 4, 2)
    q, k, v, d_out = random_inputs(fresh_key(), 1, 45, 77, 4, 2, 64, jnp.float32)
    scale = 0.3
    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, scale=scale, block_sizes=blocks), q, k, v, d_out)
    want = value_and_grads(lambda q, k, v: attention_reference(q, k, v, scale=scale), q, k, v, d_out)
    assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_segments_match_reference(causal):
    # Row 0: three packed sequences, one of them split in two pieces, then padding.
    # Row 1: leading padding, one sequence. Spans cross several 32-token tiles.
    row0 = [1] * 20 + [2] * 30 + [3] * 15 + [2] * 10 + [0] * 5
    row1 = [0] * 7 + [5] * 73
    segment_ids = jnp.array([row0, row1], jnp.int32)
    q, k, v, d_out = random_inputs(fresh_key(), 2, 80, 80, 4, 2, 64, jnp.float32)
    got = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=segment_ids), q, k, v, d_out
    )
    want = value_and_grads(
        lambda q, k, v: attention_reference(q, k, v, causal=causal, segment_ids=segment_ids), q, k, v, d_out
    )
    assert_close(got, want, jnp.float32)


def test_packed_rows_equal_separate_sequences():
    """Three 20-token sequences and 5 padding tokens packed in one row match the three sequences
    run as a batch of their own (no segment ids)."""
    num_seqs, length, padding = 3, 20, 5
    total = num_seqs * length
    q, k, v, d_out = random_inputs(fresh_key(), 1, total + padding, total + padding, 4, 2, 96, jnp.float32)
    segment_ids = jnp.array([sum(([i + 1] * length for i in range(num_seqs)), []) + [0] * padding], jnp.int32)
    packed = value_and_grads(lambda q, k, v: flash_attention(q, k, v, segment_ids=segment_ids), q, k, v, d_out)

    def unpack(x):
        return x[:, :total].reshape(num_seqs, length, *x.shape[2:])

    alone = value_and_grads(flash_attention, *(unpack(x) for x in (q, k, v, d_out)))
    assert_close([unpack(x) for x in packed], alone, jnp.float32)
    for name, x in zip(("out", "dq", "dk", "dv"), packed):
        assert np.all(np.asarray(x[:, total:]) == 0.0), f"padding rows of {name} are not zero"


def test_padding_rows_give_zeros_never_nan():
    segment_ids = jnp.array([[0] * 40, [0] * 10 + [1] * 20 + [0] * 10], jnp.int32)
    q, k, v, d_out = random_inputs(fresh_key(), 2, 40, 40, 4, 1, 64, jnp.bfloat16)
    out, dq, dk, dv = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, segment_ids=segment_ids), q, k, v, d_out
    )
    padding = np.asarray(segment_ids == 0)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        x = np.asarray(x, np.float32)
        assert np.all(np.isfinite(x)), f"{name} has non-finite values"
        assert np.all(x[padding] == 0.0), f"{name} is not zero on padding tokens"
    assert np.any(np.asarray(out, np.float32)[~padding] != 0.0)


def test_rejects_bad_head_grouping():
    q = jnp.zeros((1, 8, 6, 64))
    k = jnp.zeros((1, 8, 4, 64))
    with pytest.raises(ValueError, match="heads_q"):
        flash_attention(q, k, k)

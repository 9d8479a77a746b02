"""RoPE kernels (interpreted on CPU) against jax.vjp of rope_reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rope import rope, rope_qk, rope_reference

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LINEAR_SCALING = {"type": "linear", "factor": 4.0}
THETA = {None: 1_000_000.0, "linear": 10_000.0, "llama3": 500_000.0}
SCALING = {None: None, "linear": LINEAR_SCALING, "llama3": LLAMA3_SCALING}


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def packed_positions(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """Rows packed with several documents: positions restart at 0 at each document start; the
    first document of a row may continue one cut off earlier, so it starts anywhere below 16k."""
    rows = []
    for _ in range(batch):
        starts = np.sort(rng.choice(np.arange(1, seq), size=rng.integers(0, 3), replace=False))
        segment_ids = np.zeros(seq, np.int64)
        segment_ids[starts] = 1
        segment_ids = np.cumsum(segment_ids)
        first_index = np.array([np.flatnonzero(segment_ids == s)[0] for s in segment_ids])
        positions = np.arange(seq) - first_index
        positions[segment_ids == 0] += rng.integers(0, 16384)
        rows.append(positions)
    return np.stack(rows).astype(np.int32)


def random_case(head_dim: int, heads_q: int, heads_kv: int, seq: int, dtype):
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    batch = 2
    q = jnp.asarray(rng.standard_normal((batch, seq, heads_q, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, seq, heads_kv, head_dim)), dtype)
    d_q = jnp.asarray(rng.standard_normal(q.shape), dtype)
    d_k = jnp.asarray(rng.standard_normal(k.shape), dtype)
    return seed, q, k, d_q, d_k, jnp.asarray(packed_positions(rng, batch, seq))


def assert_close(name, actual, expected, dtype, seed):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g} > {TOLERANCE[dtype]} (seed {seed})"


# Head dims 64/80/96/128 (80 and 96 pad their 40/48-wide halves), the 28/4 (Qwen2.5-7B) and 32/8
# (Llama-3-8B) head counts, odd sequence lengths, each scaling type, each dtype.
CASES = [
    (64, 28, 4, 7, None, jnp.float32),
    (80, 32, 8, 17, "linear", jnp.bfloat16),
    (96, 28, 4, 17, "llama3", jnp.float32),
    (128, 32, 8, 7, "llama3", jnp.bfloat16),
    (80, 28, 4, 7, None, jnp.float32),
    (128, 28, 4, 17, "linear", jnp.float32),
    # 4 + 2 heads: 384 elements a token, several (a power of 2 of) tokens to a program.
    (64, 4, 2, 17, None, jnp.float32),
]


@pytest.mark.parametrize("head_dim,heads_q,heads_kv,seq,scaling,dtype", CASES)
def test_rope_qk_matches_reference(head_dim, heads_q, heads_kv, seq, scaling, dtype):
    seed, q, k, d_q, d_k, positions = random_case(head_dim, heads_q, heads_kv, seq, dtype)
    rotate_options = dict(theta=THETA[scaling], scaling=SCALING[scaling])

    @jax.jit
    def kernel_vjp(q, k, positions, d_q, d_k):
        outputs, vjp = jax.vjp(lambda q, k: rope_qk(q, k, positions, **rotate_options), q, k)
        return outputs, vjp((d_q, d_k))

    @jax.jit
    def reference_vjp(q, k, positions, d_q, d_k):
        rotate = lambda x: rope_reference(x, positions, **rotate_options)  # noqa: E731
        (q_rot, q_vjp), (k_rot, k_vjp) = jax.vjp(rotate, q), jax.vjp(rotate, k)
        return (q_rot, k_rot), (q_vjp(d_q)[0], k_vjp(d_k)[0])

    (q_rot, k_rot), (dq, dk) = kernel_vjp(q, k, positions, d_q, d_k)
    (q_expected, k_expected), (dq_expected, dk_expected) = reference_vjp(q, k, positions, d_q, d_k)
    assert_close("q_rot", q_rot, q_expected, dtype, seed)
    assert_close("k_rot", k_rot, k_expected, dtype, seed)
    assert_close("dq", dq, dq_expected, dtype, seed)
    assert_close("dk", dk, dk_expected, dtype, seed)


@pytest.mark.parametrize(
    "head_dim,heads,seq,scaling,dtype", [(96, 4, 17, "llama3", jnp.bfloat16), (64, 8, 17, "linear", jnp.float32)]
)
def test_rope_single_tensor_matches_reference(head_dim, heads, seq, scaling, dtype):
    # Few heads, so several tokens share a program and the last token block is partly masked.
    seed, _, x, _, d_x, positions = random_case(head_dim, 1, heads, seq, dtype)
    rotate_options = dict(theta=THETA[scaling], scaling=SCALING[scaling])

    def output_and_gradient(fn):
        @jax.jit
        def run(x, positions, d_x):
            out, vjp = jax.vjp(lambda x: fn(x, positions, **rotate_options), x)
            return out, vjp(d_x)[0]

        return run

    out, dx = output_and_gradient(rope)(x, positions, d_x)
    out_expected, dx_expected = output_and_gradient(rope_reference)(x, positions, d_x)
    assert_close("rotated", out, out_expected, dtype, seed)
    assert_close("dx", dx, dx_expected, dtype, seed)


def test_rope_backward_is_the_inverse_rotation():
    seed, _, x, _, _, positions = random_case(128, 1, 8, 7, jnp.float32)
    rotated, vjp = jax.vjp(lambda x: rope(x, positions, theta=500_000.0), x)
    # The backward rotates by -angle, so applying it to the rotated tensor recovers the input.
    assert_close("inverse", vjp(rotated)[0], x, jnp.float32, seed)

"""SwiGLU kernel (interpreted on CPU) against jax.vjp of swiglu_reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.swiglu import swiglu, swiglu_reference

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def output_and_gradients(fn):
    @jax.jit
    def run(gate, up, d_out):
        out, vjp = jax.vjp(fn, gate, up)
        return (out, *vjp(d_out))

    return run


# Intermediate sizes of real models (Qwen2.5-1.5B, Qwen2.5-14B, Llama-3-8B, Qwen2.5-7B), few and
# odd row counts: the flattened length is not a multiple of the block, so the tail is masked.
@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((3, 8960), jnp.float32),
        ((1, 5, 13824), jnp.float32),
        ((5, 14336), jnp.bfloat16),
        ((3, 18944), jnp.bfloat16),
        ((3, 8960), jnp.float16),
        ((2, 3, 7), jnp.float32),
    ],
)
def test_swiglu_matches_reference(shape, dtype):
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    # Gates spread over [-12, 12] reach both tails of the sigmoid.
    gate = jnp.asarray(4.0 * rng.standard_normal(shape), dtype)
    up = jnp.asarray(rng.standard_normal(shape), dtype)
    d_out = jnp.asarray(rng.standard_normal(shape), dtype)
    results = output_and_gradients(swiglu)(gate, up, d_out)
    expected = output_and_gradients(swiglu_reference)(gate, up, d_out)
    tolerance = TOLERANCE[dtype]
    for name, actual, wanted in zip(("out", "d_gate", "d_up"), results, expected):
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, name
        error = relative_error(actual, wanted)
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance} (seed {seed})"

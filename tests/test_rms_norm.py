"""RMSNorm kernel (interpreted on CPU) against jax.vjp of rms_norm_reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import rms_norm as rms_norm_module
from pallas_kernels.rms_norm import rms_norm, rms_norm_reference

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
EPS = 1e-6


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_inputs(seed: int, leading: tuple[int, ...], hidden: int, dtype, weight_dtype=None):
    rng = np.random.default_rng(seed)
    shape = (*leading, hidden)
    # Rows of different scales, so that the per-row statistics matter.
    row_scale = rng.uniform(0.1, 10.0, size=(*leading, 1))
    x = jnp.asarray(rng.standard_normal(shape) * row_scale, dtype)
    residual = jnp.asarray(rng.standard_normal(shape), dtype)
    weight = jnp.asarray(1.0 + 0.5 * rng.standard_normal(hidden), weight_dtype or dtype)
    cotangents = [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2)]
    return x, residual, weight, cotangents


def gradient_reference(fn, *args):
    # The bfloat16 reference rounds dy * weight and every product of dweight's row sum to bfloat16,
    # which alone costs it up to ~0.8% against the exact gradient, most of the 1e-2 budget. The
    # kernel is held to the same reference evaluated in float32 on the very same (bf16-exact)
    # values; its result rounded to the input dtype is the exact gradient of that input.
    *inputs, cotangent = args
    upcast = jax.tree.map(lambda a: a.astype(jnp.float32), (inputs, cotangent))
    grads = jax.jit(lambda inputs, cotangent: jax.vjp(fn, *inputs)[1](cotangent))(*upcast)
    return [g.astype(a.dtype) for g, a in zip(grads, inputs)]


# Hidden sizes of real models (Qwen2.5-1.5B/7B, Llama-3-8B, Qwen2.5-14B), odd row counts. Each
# case costs a compile of the interpreted kernels, so the grid is sparse rather than a product.
CASES = [
    ((3,), 1536, jnp.float32),
    ((1, 5), 5120, jnp.float32),
    ((5,), 3584, jnp.bfloat16),
    ((1, 3), 4096, jnp.bfloat16),
    ((3,), 5120, jnp.bfloat16),
    ((5,), 1536, jnp.float16),
]


@pytest.mark.parametrize("leading,hidden,dtype", CASES)
def test_rms_norm_matches_reference(leading, hidden, dtype):
    seed = int(np.random.default_rng().integers(2**31))
    x, _, weight, (d_normed, _) = random_inputs(seed, leading, hidden, dtype)

    @jax.jit
    def kernel_vjp(x, weight, d_normed):
        normed, vjp = jax.vjp(lambda x, weight: rms_norm(x, weight, EPS), x, weight)
        return normed, vjp(d_normed)

    normed, (dx, dweight) = kernel_vjp(x, weight, d_normed)
    expected_normed = rms_norm_reference(x, weight, EPS)
    expected_dx, expected_dweight = gradient_reference(
        lambda x, weight: rms_norm_reference(x, weight, EPS), x, weight, d_normed
    )
    assert normed.dtype == x.dtype and dx.dtype == x.dtype and dweight.dtype == weight.dtype
    tolerance = TOLERANCE[dtype]
    for name, actual, expected in [
        ("normed", normed, expected_normed), ("dx", dx, expected_dx), ("dweight", dweight, expected_dweight)
    ]:
        error = relative_error(actual, expected)
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance} (seed {seed})"


@pytest.mark.parametrize("leading,hidden,dtype", [((3,), 4096, jnp.float32), ((5,), 1536, jnp.bfloat16)])
def test_rms_norm_with_residual_matches_reference(leading, hidden, dtype):
    seed = int(np.random.default_rng().integers(2**31))
    x, residual, weight, (d_normed, d_summed) = random_inputs(seed, leading, hidden, dtype)

    def reference(x, residual, weight):
        summed = (x + residual).astype(x.dtype)
        return rms_norm_reference(summed, weight, EPS), summed

    @jax.jit
    def kernel_vjp(x, residual, weight, d_normed, d_summed):
        outputs, vjp = jax.vjp(lambda *a: rms_norm(a[0], a[2], EPS, residual=a[1]), x, residual, weight)
        return outputs, vjp((d_normed, d_summed))

    (normed, summed), grads = kernel_vjp(x, residual, weight, d_normed, d_summed)
    expected_normed, expected_summed = reference(x, residual, weight)
    expected_grads = gradient_reference(reference, x, residual, weight, (d_normed, d_summed))
    tolerance = TOLERANCE[dtype]
    checks = [("normed", normed, expected_normed), ("summed", summed, expected_summed)]
    checks += list(zip(("dx", "dresidual", "dweight"), grads, expected_grads))
    for name, actual, expected in checks:
        error = relative_error(actual, expected)
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance} (seed {seed})"


def test_rms_norm_float32_weight_with_bfloat16_activations():
    seed = int(np.random.default_rng().integers(2**31))
    x, _, weight, (d_normed, _) = random_inputs(seed, (3,), 1536, jnp.bfloat16, weight_dtype=jnp.float32)
    normed, vjp = jax.vjp(lambda x, weight: rms_norm(x, weight, EPS), x, weight)
    dx, dweight = vjp(d_normed)
    expected_dx, expected_dweight = gradient_reference(
        lambda x, weight: rms_norm_reference(x, weight, EPS), x, weight, d_normed
    )
    assert dweight.dtype == jnp.float32
    for name, actual, expected in [
        ("normed", normed, rms_norm_reference(x, weight, EPS)), ("dx", dx, expected_dx),
        ("dweight", dweight, expected_dweight),
    ]:
        error = relative_error(actual, expected)
        assert error <= 1e-2, f"{name}: relative error {error:.3g} > 1e-2 (seed {seed})"


@pytest.mark.parametrize("prefetch", [False, True])
def test_rms_norm_backward_walks_several_row_blocks(monkeypatch, prefetch):
    # Two backward programs, each looping over several two-row blocks, the last one partly masked:
    # the dweight partial sums and the row masks of the loop are what this checks, with the loop
    # as it is and with the next block's loads issued one step ahead (_BACKWARD_PREFETCH).
    monkeypatch.setattr(rms_norm_module, "_BACKWARD_PROGRAMS", 2)
    monkeypatch.setattr(rms_norm_module, "_BACKWARD_PREFETCH", prefetch)
    blocks = rms_norm_module._choose_blocks(13, 1536)
    assert blocks.rows_per_program // blocks.rows_per_block > 1
    seed = int(np.random.default_rng().integers(2**31))
    x, _, weight, (d_normed, _) = random_inputs(seed, (13,), 1536, jnp.float32)
    # Traces are cached by function and shapes: drop them before and after, so that the patched
    # block choice is what runs here and nothing traced under it is reused by another test.
    jax.clear_caches()
    try:
        _, vjp = jax.vjp(lambda x, weight: rms_norm(x, weight, EPS), x, weight)
        grads = vjp(d_normed)
    finally:
        jax.clear_caches()
    _, expected_vjp = jax.vjp(lambda x, weight: rms_norm_reference(x, weight, EPS), x, weight)
    for name, actual, expected in zip(("dx", "dweight"), grads, expected_vjp(d_normed)):
        error = relative_error(actual, expected)
        assert error <= 1e-5, f"{name}: relative error {error:.3g} > 1e-5 (seed {seed})"


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_forward_walks_several_row_blocks(monkeypatch, with_residual):
    # Two forward programs (_FORWARD_PROGRAMS), each walking several two-row blocks with the next
    # block's loads issued one step ahead, the last block partly masked: outputs, the saved inverse
    # RMS (through the backward) and the residual sum must be those of the reference.
    monkeypatch.setattr(rms_norm_module, "_FORWARD_PROGRAMS", 2)
    blocks = rms_norm_module._choose_blocks(13, 1536)
    assert blocks.forward_rows_per_program // blocks.rows_per_block > 1
    seed = int(np.random.default_rng().integers(2**31))
    x, residual, weight, (d_normed, d_summed) = random_inputs(seed, (13,), 1536, jnp.float32)
    residual = residual if with_residual else None

    def ours(x, weight, residual):
        return rms_norm(x, weight, EPS, residual=residual) if with_residual else rms_norm(x, weight, EPS)

    def reference(x, weight, residual):
        if not with_residual:
            return rms_norm_reference(x, weight, EPS)
        summed = x + residual
        return rms_norm_reference(summed, weight, EPS), summed

    cotangent = (d_normed, d_summed) if with_residual else d_normed
    jax.clear_caches()  # the patched block choice must be what runs, and nothing traced under it reused
    try:
        outputs, vjp = jax.vjp(ours, x, weight, residual)
        grads = vjp(cotangent)
    finally:
        jax.clear_caches()
    expected_outputs, expected_vjp = jax.vjp(reference, x, weight, residual)
    expected_grads = expected_vjp(cotangent)
    pairs = list(zip(jax.tree.leaves(outputs), jax.tree.leaves(expected_outputs)))
    pairs += list(zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)))
    for index, (actual, expected) in enumerate(pairs):
        error = relative_error(actual, expected)
        assert error <= 1e-5, f"output/gradient {index}: relative error {error:.3g} > 1e-5 (seed {seed})"

"""fused_linear_cross_entropy against the pure-jnp reference: the loss and the gradients of hidden
and w, for both implementations, and its memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

# max|diff| / max|ref|.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
IGNORE = -100


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _fresh_seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def _random_inputs(seed: int, n: int, d: int, vocab: int, dtype, ignored_rows=()):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(keys[0], (n, d), jnp.float32).astype(dtype)
    # Logits of order a few units, as a trained head gives.
    w = (2.0 * jax.random.normal(keys[1], (d, vocab), jnp.float32) / np.sqrt(d)).astype(dtype)
    labels = jax.random.randint(keys[2], (n,), 0, vocab, jnp.int32)
    for row in ignored_rows:
        labels = labels.at[row].set(IGNORE)
    cotangent = jax.random.uniform(keys[3], (), jnp.float32, 0.5, 2.0)
    return hidden, w, labels, cotangent


def _check_against_reference(seed, hidden, w, labels, cotangent, dtype, normalizer=None, **options):
    """Loss, dhidden and dw of the kernel and of jax.vjp of the reference, under one jit."""
    reference_options = {k: v for k, v in options.items() if k not in ("impl", "chunk_size")}

    @jax.jit
    def run(hidden, w, labels, cotangent, normalizer):
        loss, vjp = jax.vjp(
            lambda h, w: fused_linear_cross_entropy(h, w, labels, normalizer=normalizer, **options), hidden, w
        )
        ref_loss, ref_vjp = jax.vjp(
            lambda h, w: fused_linear_cross_entropy_reference(
                h, w, labels, normalizer=normalizer, **reference_options
            ),
            hidden,
            w,
        )
        return (loss, *vjp(cotangent)), (ref_loss, *ref_vjp(cotangent))

    got, want = run(hidden, w, labels, cotangent, normalizer)
    for name, g, r in zip(("loss", "dhidden", "dw"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, g.dtype, r.shape, r.dtype)
        error = _relative_error(g, r)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g} (seed {seed}, {options})"


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize(
    "n, vocab, dtype",
    [
        (5, 128256, jnp.float32),  # Llama-3
        (3, 151936, jnp.bfloat16),  # Qwen2.5 <= 3B, Qwen3
        (4, 152064, jnp.float32),  # Qwen2.5 7B
    ],
)
def test_real_vocab_sizes(impl, n, vocab, dtype):
    seed = _fresh_seed()
    hidden, w, labels, cotangent = _random_inputs(seed, n, 64, vocab, dtype, ignored_rows=(1,))
    _check_against_reference(seed, hidden, w, labels, cotangent, dtype, impl=impl)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize(
    "n, d, vocab, dtype, options",
    [
        (7, 3584, 1000, jnp.bfloat16, {}),  # real hidden size; no dim divides a block
        (3, 1536, 256, jnp.float32, {}),
        (9, 96, 333, jnp.bfloat16, dict(logit_scale=0.7, softcap=4.0)),
        (6, 40, 200, jnp.float32, dict(logit_scale=1.3, softcap=3.0)),
        (13, 64, 300, jnp.float32, dict(chunk_size=4)),  # several chunks, the last one padded
    ],
)
def test_shapes_and_options(impl, n, d, vocab, dtype, options):
    seed = _fresh_seed()
    hidden, w, labels, cotangent = _random_inputs(seed, n, d, vocab, dtype, ignored_rows=(0, n - 2))
    _check_against_reference(seed, hidden, w, labels, cotangent, dtype, impl=impl, **options)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_traced_normalizer(impl):
    seed = _fresh_seed()
    hidden, w, labels, cotangent = _random_inputs(seed, 11, 64, 500, jnp.float32, ignored_rows=(3,))
    normalizer = jnp.float32(np.random.default_rng(seed).uniform(1.0, 50.0))
    _check_against_reference(seed, hidden, w, labels, cotangent, jnp.float32, normalizer=normalizer, impl=impl)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_all_rows_ignored(impl):
    seed = _fresh_seed()
    hidden, w, _, _ = _random_inputs(seed, 5, 32, 300, jnp.float32)
    labels = jnp.full((5,), IGNORE, jnp.int32)
    loss_and_grad = jax.jit(
        jax.value_and_grad(
            lambda h, w, normalizer: fused_linear_cross_entropy(h, w, labels, normalizer=normalizer, impl=impl),
            argnums=(0, 1),
        )
    )
    loss, (dhidden, dw) = loss_and_grad(hidden, w, jnp.float32(4.0))
    assert float(loss) == 0.0 and not np.any(np.asarray(dhidden)) and not np.any(np.asarray(dw)), f"seed {seed}"
    loss = jax.jit(lambda h, w: fused_linear_cross_entropy(h, w, labels, impl=impl))(hidden, w)
    assert float(loss) == 0.0


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_frozen_head(impl):
    """Only hidden is differentiated (w is a frozen lm_head): dw is never formed, dhidden is right."""
    seed = _fresh_seed()
    hidden, w, labels, _ = _random_inputs(seed, 6, 48, 700, jnp.float32, ignored_rows=(2,))
    dhidden = jax.jit(jax.grad(lambda h: fused_linear_cross_entropy(h, w, labels, impl=impl)))(hidden)
    ref_dhidden = jax.grad(lambda h: fused_linear_cross_entropy_reference(h, w, labels))(hidden)
    error = _relative_error(dhidden, ref_dhidden)
    assert error <= TOLERANCE[jnp.float32], f"relative error {error:.3g} (seed {seed})"


def _temp_bytes(loss_fn, n: int, d: int, vocab: int) -> int:
    shapes = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, vocab), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    compiled = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_memory_is_bounded_by_the_chunk(impl):
    d, vocab = 64, 4096
    fused = lambda h, w, labels: fused_linear_cross_entropy(h, w, labels, impl=impl, chunk_size=256)
    # 8192 tokens: the [n, vocab] logits (128 MiB) then dwarf what a GPU's temp holds whatever n is
    # (XLA:GPU counts cuBLAS's 32 MiB workspace in it: 38 MiB at 2048 tokens on an H200).
    small, large = _temp_bytes(fused, 2048, d, vocab), _temp_bytes(fused, 8192, d, vocab)
    ref_large = _temp_bytes(fused_linear_cross_entropy_reference, 8192, d, vocab)
    logits_bytes = 8192 * vocab * 4
    # The reference holds [n, vocab] logits, so the bound below tells the two apart. (How much the
    # reference's temp grows from n=512 to 2048 depends on the backend's fusion: 4x on the CPU, 1.6x
    # under XLA:GPU, so only its absolute size is checked.)
    assert ref_large >= logits_bytes
    assert large <= 1.25 * small, (small, large)
    assert large < logits_bytes, (large, logits_bytes)


def test_rejects_bad_arguments():
    hidden, w, labels, _ = _random_inputs(0, 3, 8, 16, jnp.float32)
    with pytest.raises(ValueError, match="impl"):
        fused_linear_cross_entropy(hidden, w, labels, impl="liger")
    with pytest.raises(ValueError, match="expected hidden"):
        fused_linear_cross_entropy(hidden, w.T, labels)

"""Tests for pallas_kernels/stacked_matmul.py (interpret mode on the CPU): the forward at the real
projection sizes of Llama-3-8B and Qwen2.5 against the reference for every layer of the stack, dx
against jax.grad of the reference, a traced layer index under jit and lax.scan, ragged edges and
uneven k splits, the LoRA variant; and its use in fastft_jax/generate.py's decode step, where greedy
tokens with decode_matmul="pallas" equal those of the sliced reference path."""

from __future__ import annotations

import functools
import random

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels._common import cdiv
from pallas_kernels.stacked_matmul import (
    StackedMatmulBlocks,
    choose_blocks,
    stacked_lora_matmul,
    stacked_lora_matmul_reference,
    stacked_matmul,
    stacked_matmul_group,
    stacked_matmul_reference,
)
from tests.conftest import relative_error

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def random_operands(seed: int, layers: int, d_in: int, d_out: int, rows: int, dtype: str):
    """x [rows, d_in] and a stack [layers, d_in, d_out] scaled so that outputs are O(1)."""
    key_x, key_w = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(key_x, (rows, d_in), jnp.float32).astype(dtype)
    w = (jax.random.normal(key_w, (layers, d_in, d_out), jnp.float32) * d_in**-0.5).astype(dtype)
    return x, w


# (d_in, d_out, rows, dtype, layers): Llama-3-8B's k/v, gate/up and down projections, Qwen2.5-7B's
# MLP (3584 -> 18944) and Qwen2.5-1.5B's (1536 <-> 8960), every row count of the issue in each dtype.
REAL_SIZES = [
    (4096, 1024, 1, "float32", 3),
    (4096, 1024, 32, "bfloat16", 2),
    (4096, 14336, 3, "bfloat16", 2),
    (14336, 4096, 17, "bfloat16", 2),
    (3584, 18944, 1, "bfloat16", 2),
    (1536, 8960, 17, "float32", 2),
    (8960, 1536, 32, "float32", 2),
]


@pytest.mark.parametrize("d_in,d_out,rows,dtype,layers", REAL_SIZES)
def test_forward_matches_reference_for_every_layer(d_in, d_out, rows, dtype, layers):
    seed = fresh_seed()
    x, w = random_operands(seed, layers, d_in, d_out, rows, dtype)
    kernel = jax.jit(stacked_matmul)
    for layer in range(layers):
        out = kernel(x, w, jnp.int32(layer))
        assert out.shape == (rows, d_out) and out.dtype == x.dtype
        error = relative_error(out, stacked_matmul_reference(x, w, layer))
        assert error <= TOLERANCE[dtype], f"layer {layer}: relative error {error:.2e}, seed {seed}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 17])
def test_dx_matches_grad_of_reference(rows, dtype):
    seed = fresh_seed()
    x, w = random_operands(seed, 2, 4096, 1024, rows, dtype)
    cotangent = jax.random.normal(jax.random.PRNGKey(seed + 1), (rows, 1024), jnp.float32).astype(dtype)

    def loss(fn, x, layer):
        return jnp.sum(fn(x, w, layer).astype(jnp.float32) * cotangent.astype(jnp.float32))

    layer = jnp.int32(1)
    dx = jax.jit(jax.grad(functools.partial(loss, stacked_matmul)))(x, layer)
    expected = jax.grad(functools.partial(loss, stacked_matmul_reference))(x, layer)
    assert dx.dtype == x.dtype
    error = relative_error(dx, expected)
    assert error <= TOLERANCE[dtype], f"dx relative error {error:.2e}, seed {seed}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_traced_layer_index_in_a_scan(dtype):
    """A residual stream through a scan over layer indices, as the decode step runs it: the outputs and
    the gradient with respect to the stream's input follow the reference layer by layer."""
    seed = fresh_seed()
    layers, width = 3, 384
    hidden, w = random_operands(seed, layers, width, width, 3, dtype)

    def stream(fn, hidden):
        def body(hidden, layer):
            out = fn(hidden, w, layer)
            return hidden + out, out

        return jax.lax.scan(body, hidden, jnp.arange(layers, dtype=jnp.int32))

    final, per_layer = jax.jit(functools.partial(stream, stacked_matmul))(hidden)
    final_ref, per_layer_ref = stream(stacked_matmul_reference, hidden)
    for name, out, ref in (("final", final, final_ref), ("per layer", per_layer, per_layer_ref)):
        error = relative_error(out, ref)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}, seed {seed}"

    def summed(fn, hidden):
        return jnp.sum(stream(fn, hidden)[0].astype(jnp.float32))

    grad = jax.jit(jax.grad(functools.partial(summed, stacked_matmul)))(hidden)
    error = relative_error(grad, jax.grad(functools.partial(summed, stacked_matmul_reference))(hidden))
    assert error <= TOLERANCE[dtype], f"gradient through the scan: relative error {error:.2e}, seed {seed}"


@pytest.mark.parametrize(
    "d_in,d_out,rows,blocks",
    [
        # 200 = 6 whole blocks of 32 and a ragged one: splits of 3, 3 and 1 blocks; 300 columns end mid-block.
        (200, 300, 3, StackedMatmulBlocks(block_m=16, block_n=64, block_k=32, k_splits=3)),
        # Five row blocks, the last one partly filled; one split wider than d_in.
        (96, 50, 70, StackedMatmulBlocks(block_m=16, block_n=32, block_k=128, k_splits=1)),
        # More splits asked for than there are k blocks.
        (64, 128, 5, StackedMatmulBlocks(block_m=16, block_n=128, block_k=32, k_splits=8)),
    ],
)
def test_ragged_edges_and_uneven_splits(d_in, d_out, rows, blocks):
    seed = fresh_seed()
    x, w = random_operands(seed, 3, d_in, d_out, rows, "float32")
    kernel = jax.jit(functools.partial(stacked_matmul, blocks=blocks))
    for layer in range(3):
        error = relative_error(kernel(x, w, jnp.int32(layer)), stacked_matmul_reference(x, w, layer))
        assert error <= 1e-5, f"layer {layer}: relative error {error:.2e}, seed {seed}"


@pytest.mark.parametrize("rows", [1, 3, 17, 32, 64])
@pytest.mark.parametrize("d_in,d_out", [(4096, 1024), (4096, 4096), (4096, 14336), (14336, 4096), (3584, 18944)])
def test_block_choice(d_in, d_out, rows):
    """Power-of-2 tiles, every row in one row block up to 64 rows, and at batch 1 about one program
    per SM of an H100 (132) without splits of fewer than two k blocks."""
    blocks = choose_blocks(rows, d_in, d_out, jnp.bfloat16)
    for size in (blocks.block_m, blocks.block_n, blocks.block_k):
        assert size >= 16 and size & (size - 1) == 0
    assert blocks.block_m >= rows
    k_blocks = cdiv(d_in, blocks.block_k)
    assert k_blocks >= 2 * blocks.k_splits or blocks.k_splits == 1
    if rows == 1:
        assert cdiv(d_out, blocks.block_n) * blocks.k_splits >= 128


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_variant_matches_reference_with_gradients(dtype):
    seed = fresh_seed()
    layers, d_in, d_out, rank, scale = 2, 4096, 1024, 16, 2.0
    x, w = random_operands(seed, layers, d_in, d_out, 3, dtype)
    key_a, key_b = jax.random.split(jax.random.PRNGKey(seed + 1))
    lora_a = jax.random.normal(key_a, (layers, d_in, rank), jnp.float32) * d_in**-0.5
    lora_b = jax.random.normal(key_b, (layers, rank, d_out), jnp.float32) * 0.1
    layer = jnp.int32(1)

    def loss(fn, x, a, b):
        return jnp.sum(fn(x, w, layer, a[layer], b[layer], scale).astype(jnp.float32) ** 2)

    out = jax.jit(stacked_lora_matmul, static_argnums=5)(x, w, layer, lora_a[1], lora_b[1], scale)
    expected = stacked_lora_matmul_reference(x, w, layer, lora_a[1], lora_b[1], scale)
    error = relative_error(out, expected)
    assert error <= TOLERANCE[dtype], f"forward: relative error {error:.2e}, seed {seed}"
    grads = jax.jit(jax.grad(functools.partial(loss, stacked_lora_matmul), argnums=(0, 1, 2)))(x, lora_a, lora_b)
    reference_grad = jax.grad(functools.partial(loss, stacked_lora_matmul_reference), argnums=(0, 1, 2))
    expected_grads = reference_grad(x, lora_a, lora_b)
    for name, grad, ref in zip(("dx", "da", "db"), grads, expected_grads):
        error = relative_error(grad, ref)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}, seed {seed}"


# Llama-3-8B's q/k/v (4096 -> 4096, 1024, 1024), Qwen2.5-1.5B's gate/up (1536 -> 8960 x 2), and a
# ragged group.
GROUPS = [
    ((4096, 1024, 1024), 4096, 1, "bfloat16"),
    ((8960, 8960), 1536, 3, "bfloat16"),
    ((300, 17, 129), 1000, 5, "float32"),
]


@pytest.mark.parametrize("d_outs,d_in,rows,dtype", GROUPS)
def test_group_matches_each_reference_with_gradients(d_outs, d_in, rows, dtype):
    """One launch for several stacks: each output against its own reference (one member with an
    un-merged adapter), and dx of a loss over all of them against jax.grad of the references."""
    seed = fresh_seed()
    layers, rank, scale = 2, 8, 2.0
    stacks = [random_operands(seed + i, layers, d_in, d_out, rows, dtype) for i, d_out in enumerate(d_outs)]
    x, w_stacks = stacks[0][0], [w for _, w in stacks]
    key_a, key_b = jax.random.split(jax.random.PRNGKey(seed + 99))
    lora_a = jax.random.normal(key_a, (d_in, rank), jnp.float32) * d_in**-0.5
    lora_b = jax.random.normal(key_b, (rank, d_outs[-1]), jnp.float32) * 0.1
    adapters = [None] * (len(d_outs) - 1) + [(lora_a, lora_b, scale)]
    layer = jnp.int32(1)

    def references(x):
        outs = [stacked_matmul_reference(x, w, layer) for w in w_stacks[:-1]]
        return outs + [stacked_lora_matmul_reference(x, w_stacks[-1], layer, lora_a, lora_b, scale)]

    group = jax.jit(lambda x: stacked_matmul_group(x, w_stacks, layer, adapters=adapters))
    for index, (out, expected) in enumerate(zip(group(x), references(x), strict=True)):
        assert out.dtype == x.dtype and out.shape == expected.shape
        error = relative_error(out, expected)
        assert error <= TOLERANCE[dtype], f"output {index}: relative error {error:.2e}, seed {seed}"

    def loss(outs):
        return sum(jnp.sum(out.astype(jnp.float32) ** 2) for out in outs)

    dx = jax.jit(jax.grad(lambda x: loss(group(x))))(x)
    expected_dx = jax.grad(lambda x: loss(references(x)))(x)
    error = relative_error(dx, expected_dx)
    assert error <= TOLERANCE[dtype], f"dx: relative error {error:.2e}, seed {seed}"


def test_group_refuses_stacks_that_do_not_share_x():
    x, w = random_operands(fresh_seed(), 2, 64, 32, 1, "float32")
    _, other = random_operands(fresh_seed(), 2, 48, 32, 1, "float32")
    with pytest.raises(ValueError, match="share layers, in size and dtype"):
        stacked_matmul_group(x, [w, other], 0)

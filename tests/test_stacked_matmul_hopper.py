"""Hopper (Mosaic GPU) GEMM that reads one layer of a weight stack in place: what a CPU can check.
The kernel cannot run here (jax's Mosaic GPU interpret mode does not run wgmma), so these tests
export it for CUDA, which runs the whole Mosaic GPU lowering in Python (an over-budget smem plan or
a wgmma shape mistake fails here), inside a lax.scan over layers with the layer index from the
scan, forward and gradient; and they check the input validation, the tiles and the reference.
The numerics are checked on an H200 by bench/stacked_matmul_hopper_check.py."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.stacked_matmul_hopper import (
    _SMEM_BYTES,
    available,
    choose_tiles,
    stacked_matmul_hopper,
    stacked_matmul_reference,
)

KERNEL_CALL = "stablehlo.custom_call @mosaic_gpu"

# (name, tokens, d_in, d_out, dtype): real projection sizes (Llama-3-8B, Qwen2.5-7B/1.5B) with few
# token rows (the lowering does not depend on the token count beyond the padding), some of them
# not a multiple of the 128-row tile.
CASES = [
    ("llama3_8b_k_proj_bf16", 256, 4096, 1024, jnp.bfloat16),
    ("llama3_8b_down_proj_fp16", 200, 14336, 4096, jnp.float16),
    ("qwen25_7b_up_proj_bf16", 130, 3584, 18944, jnp.bfloat16),
    ("qwen25_15b_v_proj_fp16", 128, 1536, 256, jnp.float16),
    ("qwen25_15b_gate_proj_bf16", 77, 1536, 8960, jnp.bfloat16),
    ("d_out_384_takes_64_wide_tiles_bf16", 128, 512, 384, jnp.bfloat16),
]
LAYERS = 3


def _stack_type(d_in, d_out, dtype) -> str:
    element = {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "f16"}[jnp.dtype(dtype)]
    return f"tensor<{LAYERS}x{d_in}x{d_out}x{element}>"


def _export(fn, *args) -> jax.export.Exported:
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


def _assert_reads_the_stack_in_place(mlir: str, d_in, d_out, dtype, kernels: int):
    """The kernel is called `kernels` times, on the whole stack, and XLA neither slices the stack
    nor does a matmul of its own."""
    calls = [line for line in mlir.splitlines() if KERNEL_CALL in line]
    assert len(calls) == kernels
    stack = _stack_type(d_in, d_out, dtype)
    for call in calls:
        assert stack in call
    assert "dot_general" not in mlir
    for line in mlir.splitlines():
        if "dynamic_slice" in line or "stablehlo.slice" in line:
            assert stack not in line.split("->")[0], line


def _scan_over_layers(transpose_w: bool):
    """A scalar loss summed over x @ w_stack[i] for every layer i, the index coming from the scan
    (a tracer, as in the model's layer scan); x is the same for every layer so that any d_in,
    d_out pair works."""

    def run(x, w_stack):
        def body(carry, layer):
            y = stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w)
            return carry + jnp.sum(jnp.square(y.astype(jnp.float32))), None

        total, _ = jax.lax.scan(body, jnp.float32(0), jnp.arange(w_stack.shape[0], dtype=jnp.int32))
        return total

    return run


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_lowers_with_a_traced_layer(case, transpose_w):
    _, tokens, d_in, d_out, dtype = case
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)

    def forward(x, w_stack, layer):
        return stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w)

    exported = _export(
        forward,
        jax.ShapeDtypeStruct((tokens, d_x), dtype),
        jax.ShapeDtypeStruct((LAYERS, d_in, d_out), dtype),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    assert exported.out_avals[0].shape == (tokens, d_y)
    assert exported.out_avals[0].dtype == dtype
    _assert_reads_the_stack_in_place(exported.mlir_module(), d_in, d_out, dtype, kernels=1)


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[4:], ids=[c[0] for c in CASES[:2] + CASES[4:]])
def test_gradient_through_a_layer_scan_lowers_to_the_flipped_kernel(case, transpose_w):
    """jax.grad through x inside a lax.scan: the forward kernel and the dx kernel (the other
    orientation, so its output is x-shaped), both on the whole stack."""
    _, tokens, d_in, d_out, dtype = case
    d_x = d_out if transpose_w else d_in
    exported = _export(
        jax.grad(_scan_over_layers(transpose_w)),
        jax.ShapeDtypeStruct((tokens, d_x), dtype),
        jax.ShapeDtypeStruct((LAYERS, d_in, d_out), dtype),
    )
    assert exported.out_avals[0].shape == (tokens, d_x)
    mlir = exported.mlir_module()
    _assert_reads_the_stack_in_place(mlir, d_in, d_out, dtype, kernels=2)
    names = set(re.findall(r"stacked_matmul_hopper(?:_t)?(?=_mosaic_gpu)", mlir))
    assert names == {"stacked_matmul_hopper", "stacked_matmul_hopper_t"}


def test_the_frozen_stack_gets_zeros_and_no_kernel_runs_for_it():
    """Asked for anyway, the stack's gradient is zeros (it is frozen) and costs no product: with
    dx not asked for, the whole kernel is dropped, so this even runs on a CPU."""
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((128, 1024)), jnp.bfloat16)
    w_stack = jnp.asarray(rng.standard_normal((LAYERS, 1024, 256)), jnp.bfloat16)

    def loss(x, w_stack):
        y = stacked_matmul_hopper(x, w_stack, jnp.int32(1))
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    stack_grad = jax.grad(loss, argnums=1)
    mlir = _export(stack_grad, x, w_stack).mlir_module()
    assert KERNEL_CALL not in mlir
    d_stack = jax.jit(stack_grad)(x, w_stack)
    assert d_stack.shape == w_stack.shape and not np.any(np.asarray(d_stack, np.float32))


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
def test_reference_is_the_layers_product(transpose_w):
    """The reference matches a float64 numpy product of the chosen layer (and not another)."""
    rng = np.random.default_rng()
    layers, d_in, d_out, tokens = 4, 48, 40, 9
    w_stack = rng.standard_normal((layers, d_in, d_out)).astype(np.float32)
    layer = int(rng.integers(layers))
    x = rng.standard_normal((tokens, d_out if transpose_w else d_in)).astype(np.float32)
    weight = w_stack[layer].astype(np.float64)
    expected = x.astype(np.float64) @ (weight.T if transpose_w else weight)
    got = np.asarray(stacked_matmul_reference(jnp.asarray(x), jnp.asarray(w_stack), jnp.int32(layer), transpose_w))
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-5


def test_tiles_fit_in_smem_and_divide_every_real_weight_dimension():
    real = [256, 512, 1024, 1536, 3584, 4096, 8960, 14336, 18944]
    for d_k in real:
        for d_n in real:
            tiles = choose_tiles(4096, d_k, d_n)
            assert d_k % tiles.tile_k == 0 and d_n % tiles.cta_tile_n == 0
            assert tiles.smem_bytes(2) <= _SMEM_BYTES


def test_float32_is_refused_with_a_pointer_to_the_reference():
    x = jnp.zeros((128, 256), jnp.float32)
    w_stack = jnp.zeros((2, 256, 256), jnp.float32)
    with pytest.raises(ValueError, match=r"float32.*stacked_matmul_reference"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0))


def test_mixed_dtypes_are_refused():
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w_stack = jnp.zeros((2, 256, 256), jnp.float16)
    with pytest.raises(ValueError, match=r"both bfloat16 or both float16"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0))


def test_weight_dimensions_off_the_tile_are_refused():
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w_stack = jnp.zeros((2, 256, 200), jnp.bfloat16)  # d_out 200: not a multiple of 128
    with pytest.raises(ValueError, match=r"multiple of 128.*200.*stacked_matmul_reference"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0))
    x_t = jnp.zeros((128, 200), jnp.bfloat16)  # transposed: 200 is now contracted (needs 64)
    with pytest.raises(ValueError, match=r"multiple of 64.*200"):
        stacked_matmul_hopper(x_t, w_stack, jnp.int32(0), transpose_w=True)


def test_feature_mismatch_names_the_orientation():
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w_stack = jnp.zeros((2, 256, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"transpose_w=True contracts over 512"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), transpose_w=True)


def test_not_available_on_cpu():
    assert jax.default_backend() == "cpu"
    assert available() is False

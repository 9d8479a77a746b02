"""Hopper (Mosaic GPU) GEMM that reads one layer of a weight stack in place: what a CPU can check.
The kernel cannot run here (jax's Mosaic GPU interpret mode does not run wgmma), so these tests
export it for CUDA, which runs the whole Mosaic GPU lowering in Python (an over-budget smem plan or
a wgmma shape mistake fails here), inside a lax.scan over layers with the layer index from the
scan, forward and gradient, with and without an addend or a low-rank term (low_lhs @ low_rhs in the
same accumulator); and they check the input validation, the tiles (and the low-rank tiles' place
in the epilogue slots), the reference (with its one rounding of x @ W + addend or + low_lhs @
low_rhs) and the gradient wiring (with the kernel swapped for the reference, so it runs here). The
numerics are checked on an H200 by bench/stacked_matmul_hopper_check.py."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import stacked_matmul_hopper as hopper
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


def _kernel_calls(mlir: str) -> list[str]:
    return [line for line in mlir.splitlines() if KERNEL_CALL in line]


def _assert_reads_the_stack_in_place(mlir: str, d_in, d_out, dtype, kernels: int):
    """The kernel is called `kernels` times, on the whole stack, and XLA neither slices the stack
    nor does a matmul of its own."""
    calls = _kernel_calls(mlir)
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


@pytest.mark.parametrize("with_addend", [False, True], ids=["plain", "addend"])
@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
def test_reference_is_the_layers_product(transpose_w, with_addend):
    """The reference matches a float64 numpy product of the chosen layer (and not another), plus
    the addend when there is one."""
    rng = np.random.default_rng()
    layers, d_in, d_out, tokens = 4, 48, 40, 9
    w_stack = rng.standard_normal((layers, d_in, d_out)).astype(np.float32)
    layer = int(rng.integers(layers))
    x = rng.standard_normal((tokens, d_out if transpose_w else d_in)).astype(np.float32)
    weight = w_stack[layer].astype(np.float64)
    expected = x.astype(np.float64) @ (weight.T if transpose_w else weight)
    addend = None
    if with_addend:
        addend = rng.standard_normal(expected.shape).astype(np.float32)
        expected = expected + addend
    got = np.asarray(stacked_matmul_reference(jnp.asarray(x), jnp.asarray(w_stack), jnp.int32(layer), transpose_w,
                                              addend=None if addend is None else jnp.asarray(addend)))
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-5


def test_tiles_fit_in_smem_and_divide_every_real_weight_dimension():
    real = [256, 512, 1024, 1536, 3584, 4096, 8960, 14336, 18944]
    for d_k in real:
        for d_n in real:
            tiles = choose_tiles(4096, d_k, d_n)
            assert d_k % tiles.tile_k == 0 and d_n % tiles.cta_tile_n == 0
            assert tiles.smem_bytes(2) <= _SMEM_BYTES
            assert tiles.smem_bytes(2) < tiles.smem_bytes(2, addend=True) <= _SMEM_BYTES


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


# --- the addend: x @ W + addend, rounded once ---------------------------------------------------

ADDEND_CASES = [CASES[0], CASES[2], CASES[4], CASES[5]]  # both dtypes' paths, padded tokens, 64-wide tiles


def _element(dtype) -> str:
    return {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "f16"}[jnp.dtype(dtype)]


def _operand_types(call: str) -> str:
    """The operand types of a custom_call line: `(...) -> ...` after the last ' : '."""
    return call.rsplit(" : ", 1)[1].split("->")[0]


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
@pytest.mark.parametrize("case", ADDEND_CASES, ids=[c[0] for c in ADDEND_CASES])
def test_forward_with_addend_lowers_with_a_traced_layer(case, transpose_w):
    """The addend goes into the one kernel call (padded to the 128-row tile like x), and XLA adds
    nothing in float32 after it: no dot, no add, no convert of a [tokens, d_y] product."""
    _, tokens, d_in, d_out, dtype = case
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)

    def forward(x, w_stack, layer, addend):
        return stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w, addend=addend)

    exported = _export(
        forward,
        jax.ShapeDtypeStruct((tokens, d_x), dtype),
        jax.ShapeDtypeStruct((LAYERS, d_in, d_out), dtype),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((tokens, d_y), dtype),
    )
    assert exported.out_avals[0].shape == (tokens, d_y)
    assert exported.out_avals[0].dtype == dtype
    mlir = exported.mlir_module()
    _assert_reads_the_stack_in_place(mlir, d_in, d_out, dtype, kernels=1)
    (call,) = _kernel_calls(mlir)
    tokens_padded = -(-tokens // 128) * 128
    assert f"tensor<{tokens_padded}x{d_y}x{_element(dtype)}>" in _operand_types(call)
    assert _operand_types(call).count("tensor<") == 4  # layer, x, the stack, the addend
    assert re.search(r"stacked_matmul_hopper(_t)?_addend_mosaic_gpu", mlir)
    outside_the_kernel = re.sub(r'module = "[^"]*"', "", mlir)  # the kernel's serialized MLIR dropped
    assert "stablehlo.add" not in outside_the_kernel and "f32" not in outside_the_kernel


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
def test_gradient_with_addend_through_a_layer_scan_lowers_to_the_flipped_kernel(transpose_w):
    """jax.grad through x and the addend inside a lax.scan: the forward kernel with the addend, and
    dx as without one (the flipped kernel, three operands: no addend); the addend's gradient is the
    cotangent itself, so it adds no kernel."""
    _, tokens, d_in, d_out, dtype = CASES[4]  # 77 tokens: the padded path
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)

    def run(x, addend, w_stack):
        def body(carry, layer):
            y = stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w, addend=addend)
            return carry + jnp.sum(jnp.square(y.astype(jnp.float32))), None

        total, _ = jax.lax.scan(body, jnp.float32(0), jnp.arange(w_stack.shape[0], dtype=jnp.int32))
        return total

    exported = _export(
        jax.grad(run, argnums=(0, 1)),
        jax.ShapeDtypeStruct((tokens, d_x), dtype),
        jax.ShapeDtypeStruct((tokens, d_y), dtype),
        jax.ShapeDtypeStruct((LAYERS, d_in, d_out), dtype),
    )
    assert [aval.shape for aval in exported.out_avals] == [(tokens, d_x), (tokens, d_y)]
    assert [aval.dtype for aval in exported.out_avals] == [dtype, dtype]
    mlir = exported.mlir_module()
    _assert_reads_the_stack_in_place(mlir, d_in, d_out, dtype, kernels=2)
    forward_name = "stacked_matmul_hopper_t_addend" if transpose_w else "stacked_matmul_hopper_addend"
    dx_name = "stacked_matmul_hopper" if transpose_w else "stacked_matmul_hopper_t"
    names = set(re.findall(r"(stacked_matmul_hopper\w*?)_mosaic_gpu", mlir))
    assert names == {forward_name, dx_name}
    operand_counts = sorted(_operand_types(call).count("tensor<") for call in _kernel_calls(mlir))
    assert operand_counts == [3, 4]


def test_addend_gradient_is_the_cotangent_and_no_kernel_runs_for_it():
    """Asked for the addend's gradient alone of a loss linear in the output, no product is needed:
    the kernels are dropped (so this runs on a CPU), and the gradient is the cotangent, exactly."""
    rng = np.random.default_rng()
    tokens, d_in, d_out = 77, 512, 384
    x = jnp.asarray(rng.standard_normal((tokens, d_in)), jnp.bfloat16)
    w_stack = jnp.asarray(rng.standard_normal((LAYERS, d_in, d_out)), jnp.bfloat16)
    addend = jnp.asarray(rng.standard_normal((tokens, d_out)), jnp.bfloat16)
    probe = jnp.asarray(rng.standard_normal((tokens, d_out)), jnp.float32)

    def loss(addend):
        y = stacked_matmul_hopper(x, w_stack, jnp.int32(1), addend=addend)
        return jnp.sum(y.astype(jnp.float32) * probe)

    addend_grad = jax.grad(loss)
    assert KERNEL_CALL not in _export(addend_grad, addend).mlir_module()
    got = jax.jit(addend_grad)(addend)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(probe.astype(jnp.bfloat16), np.float32))


def _reference_as_kernel(x, w_stack, layer, addend, transpose_w):
    """What the Mosaic kernel computes, in XLA, so that the custom_vjp around it runs on a CPU."""
    return stacked_matmul_reference(x, w_stack, layer, transpose_w, addend=addend)


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
def test_custom_vjp_matches_the_references_gradients(monkeypatch, transpose_w):
    """With the kernel call swapped for the reference, the custom_vjp's dx matches jax.grad of the
    reference and d_addend equals it (a wrong orientation, argument order or a missing addend
    cotangent fails), and dx is the same with an addend as without one."""
    monkeypatch.setattr(hopper, "_stacked_matmul_kernel", _reference_as_kernel)
    rng = np.random.default_rng()
    tokens, d_in, d_out = 5, 256, 128
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)
    x = jnp.asarray(rng.standard_normal((tokens, d_x)), jnp.bfloat16)
    w_stack = jnp.asarray(rng.standard_normal((LAYERS, d_in, d_out)) / np.sqrt(d_x), jnp.bfloat16)
    addend = jnp.asarray(rng.standard_normal((tokens, d_y)), jnp.bfloat16)
    probe = jnp.asarray(rng.standard_normal((tokens, d_y)), jnp.float32)
    layer = jnp.int32(2)

    def loss(matmul, x, addend):
        return jnp.sum(jnp.square(matmul(x, addend).astype(jnp.float32)) * probe)

    ours = functools.partial(loss, lambda x, addend: stacked_matmul_hopper(
        x, w_stack, layer, transpose_w=transpose_w, addend=addend))
    reference = functools.partial(loss, lambda x, addend: stacked_matmul_reference(
        x, w_stack, layer, transpose_w, addend=addend))
    dx, d_addend = jax.grad(ours, argnums=(0, 1))(x, addend)
    dx_ref, d_addend_ref = jax.grad(reference, argnums=(0, 1))(x, addend)
    dx, dx_ref = np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32)
    # bf16 tolerance: the reference's transposed dot takes a float32 cotangent, the kernel a 16-bit one
    assert np.max(np.abs(dx - dx_ref)) / np.max(np.abs(dx_ref)) <= 1e-2
    np.testing.assert_array_equal(np.asarray(d_addend, np.float32), np.asarray(d_addend_ref, np.float32))
    assert d_addend.dtype == addend.dtype

    # dx given the same output cotangent does not depend on whether an addend was added
    cotangent = jnp.asarray(rng.standard_normal((tokens, d_y)), jnp.bfloat16)
    _, vjp_with = jax.vjp(lambda x: stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w,
                                                          addend=addend), x)
    _, vjp_without = jax.vjp(lambda x: stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w), x)
    np.testing.assert_array_equal(np.asarray(vjp_with(cotangent)[0], np.float32),
                                  np.asarray(vjp_without(cotangent)[0], np.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_reference_rounds_product_plus_addend_once(dtype):
    """16-bit: small integer x and W make x @ W exact in float32 (and often not representable in
    16 bits), so the reference must equal float32 x @ W + addend (numpy) rounded once, exactly;
    rounding x @ W first and adding after gives a different answer somewhere (e.g. 257 + 0.5:
    258 rounded once, 256 + 0.5 -> 256 rounded twice), so the test tells the two apart."""
    rng = np.random.default_rng()
    layers, d_in, d_out, tokens = 3, 64, 48, 33
    scale = 2048.0 if dtype == jnp.float16 else 256.0  # products around 16 bits' ulp of 1 or 2
    w_stack = rng.integers(-8, 9, (layers, d_in, d_out)).astype(np.float32)
    x = rng.integers(-8, 9, (tokens, d_in)).astype(np.float32)
    x[:, 0] = scale  # pushes every product into the range where 16 bits cannot hold an integer exactly
    w_stack[:, 0, :] = 1.0
    addend = np.asarray(jnp.asarray(rng.uniform(-1.5, 1.5, (tokens, d_out)), dtype), np.float32)
    layer = int(rng.integers(layers))
    product = x @ w_stack[layer]  # exact: integers below 2**24
    once = np.asarray(jnp.asarray(product + addend, dtype), np.float32)
    twice = np.asarray(jnp.asarray(np.asarray(jnp.asarray(product, dtype), np.float32) + addend, dtype), np.float32)
    assert np.any(once != twice)
    got = stacked_matmul_reference(jnp.asarray(x, dtype), jnp.asarray(w_stack, dtype), jnp.int32(layer),
                                   addend=jnp.asarray(addend, dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), once)


def test_addend_of_the_wrong_shape_is_refused():
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w_stack = jnp.zeros((2, 256, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"addend must have the output's shape.*\(128, 512\).*got \(128, 256\)"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), addend=jnp.zeros((128, 256), jnp.bfloat16))
    x_t = jnp.zeros((100, 512), jnp.bfloat16)  # transposed: the output is [100, 256]
    with pytest.raises(ValueError, match=r"\(100, 256\).*transpose_w=True.*got \(100, 512\)"):
        stacked_matmul_hopper(x_t, w_stack, jnp.int32(0), transpose_w=True, addend=jnp.zeros((100, 512), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"addend must have the output's shape"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), addend=jnp.zeros((1, 128, 512), jnp.bfloat16))


def test_addend_of_another_dtype_is_refused():
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w_stack = jnp.zeros((2, 256, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"addend must have x's dtype bfloat16.*got float32.*astype"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), addend=jnp.zeros((128, 512), jnp.float32))
    with pytest.raises(ValueError, match=r"addend must have x's dtype bfloat16.*got float16"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), addend=jnp.zeros((128, 512), jnp.float16))


# --- the low-rank term: x @ W + low_lhs @ low_rhs in one float32 accumulator, rounded once ------

# (case, rank): r = 16 (the usual LoRA rank, padded to one 32-wide chunk), 8, 48 (two chunks, the
# second padded) and 64; both dtypes, padded tokens and the 64-wide tiles of d_out 384.
LOW_CASES = [(CASES[0], 16), (CASES[1], 64), (CASES[4], 8), (CASES[5], 48)]


def _low_id(case_and_rank) -> str:
    case, rank = case_and_rank
    return f"{case[0]}_r{rank}"


def _low_shapes(tokens, d_in, d_out, dtype, rank, transpose_w):
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)
    return (jax.ShapeDtypeStruct((tokens, d_x), dtype), jax.ShapeDtypeStruct((LAYERS, d_in, d_out), dtype),
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((tokens, rank), dtype),
            jax.ShapeDtypeStruct((rank, d_y), dtype))


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
@pytest.mark.parametrize("case_and_rank", LOW_CASES, ids=[_low_id(c) for c in LOW_CASES])
def test_forward_with_low_lowers_with_a_traced_layer(case_and_rank, transpose_w):
    """The rank-r product goes into the one kernel call as its two thin operands (low_lhs padded to
    the 128-row tile and to whole 32-wide rank chunks, low_rhs transposed and padded the same way),
    and XLA neither multiplies them nor adds anything: no [tokens, d_y] term is built outside."""
    (_, tokens, d_in, d_out, dtype), rank = case_and_rank
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)

    def forward(x, w_stack, layer, low_lhs, low_rhs):
        return stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w, low=(low_lhs, low_rhs))

    exported = _export(forward, *_low_shapes(tokens, d_in, d_out, dtype, rank, transpose_w))
    assert exported.out_avals[0].shape == (tokens, d_y)
    assert exported.out_avals[0].dtype == dtype
    mlir = exported.mlir_module()
    _assert_reads_the_stack_in_place(mlir, d_in, d_out, dtype, kernels=1)  # also: no dot_general in XLA
    (call,) = _kernel_calls(mlir)
    tokens_padded, rank_padded = -(-tokens // 128) * 128, -(-rank // 32) * 32
    element = _element(dtype)
    assert re.findall(r"tensor<([^>]*)>", _operand_types(call)) == [  # layer, x, the stack, low_lhs, low_rhs^T
        "1xi32", f"{tokens_padded}x{d_x}x{element}", f"{LAYERS}x{d_in}x{d_out}x{element}",
        f"{tokens_padded}x{rank_padded}x{element}", f"{d_y}x{rank_padded}x{element}"]
    name = "stacked_matmul_hopper" + ("_t" if transpose_w else "") + f"_low_rank{rank_padded}"
    assert set(re.findall(r"(stacked_matmul_hopper\w*?)_mosaic_gpu", mlir)) == {name}
    outside_the_kernel = re.sub(r'module = "[^"]*"', "", mlir)
    assert "stablehlo.add" not in outside_the_kernel and "f32" not in outside_the_kernel


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
def test_gradient_with_low_through_a_layer_scan_lowers_to_the_flipped_kernel(transpose_w):
    """jax.grad through x, low_lhs and low_rhs inside a lax.scan: the forward kernel with the low
    operands and dx as without them (the flipped kernel, three operands); low's gradients are two
    thin XLA dots that never touch the stack."""
    (_, tokens, d_in, d_out, dtype), rank = LOW_CASES[2]  # 77 tokens: the padded path
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)

    def run(x, low_lhs, low_rhs, w_stack):
        def body(carry, layer):
            y = stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w, low=(low_lhs, low_rhs))
            return carry + jnp.sum(jnp.square(y.astype(jnp.float32))), None

        total, _ = jax.lax.scan(body, jnp.float32(0), jnp.arange(w_stack.shape[0], dtype=jnp.int32))
        return total

    x, w_stack, _, low_lhs, low_rhs = _low_shapes(tokens, d_in, d_out, dtype, rank, transpose_w)
    exported = _export(jax.grad(run, argnums=(0, 1, 2)), x, low_lhs, low_rhs, w_stack)
    assert [aval.shape for aval in exported.out_avals] == [(tokens, d_x), (tokens, rank), (rank, d_y)]
    assert [aval.dtype for aval in exported.out_avals] == [dtype] * 3
    mlir = exported.mlir_module()
    calls = _kernel_calls(mlir)
    assert len(calls) == 2
    stack = _stack_type(d_in, d_out, dtype)
    assert all(stack in call for call in calls)
    for line in mlir.splitlines():
        if "dot_general" in line or "dynamic_slice" in line or "stablehlo.slice" in line:
            assert stack not in line.split("->")[0], line
    forward_name = "stacked_matmul_hopper" + ("_t" if transpose_w else "") + "_low_rank32"
    dx_name = "stacked_matmul_hopper" if transpose_w else "stacked_matmul_hopper_t"
    assert set(re.findall(r"(stacked_matmul_hopper\w*?)_mosaic_gpu", mlir)) == {forward_name, dx_name}
    assert sorted(_operand_types(call).count("tensor<") for call in calls) == [3, 5]


def test_low_gradients_are_the_thin_products_and_no_kernel_runs_for_them():
    """Asked for low's gradients alone of a loss linear in the output, the backward needs no
    product with the stack: the kernels are dropped (so this runs on a CPU), and d(low_lhs) =
    dy low_rhs^T, d(low_rhs) = low_lhs^T dy (float64 numpy, bf16 tolerance), in the operands' dtype."""
    rng = np.random.default_rng()
    tokens, d_in, d_out, rank = 77, 512, 384, 16
    x = jnp.asarray(rng.standard_normal((tokens, d_in)), jnp.bfloat16)
    w_stack = jnp.asarray(rng.standard_normal((LAYERS, d_in, d_out)), jnp.bfloat16)
    low_lhs = jnp.asarray(rng.standard_normal((tokens, rank)), jnp.bfloat16)
    low_rhs = jnp.asarray(rng.standard_normal((rank, d_out)), jnp.bfloat16)
    probe = jnp.asarray(rng.standard_normal((tokens, d_out)), jnp.float32)

    def loss(low_lhs, low_rhs):
        y = stacked_matmul_hopper(x, w_stack, jnp.int32(1), low=(low_lhs, low_rhs))
        return jnp.sum(y.astype(jnp.float32) * probe)

    low_grads = jax.grad(loss, argnums=(0, 1))
    assert KERNEL_CALL not in _export(low_grads, low_lhs, low_rhs).mlir_module()
    d_low_lhs, d_low_rhs = jax.jit(low_grads)(low_lhs, low_rhs)
    assert d_low_lhs.dtype == d_low_rhs.dtype == jnp.bfloat16
    cotangent = np.asarray(probe.astype(jnp.bfloat16), np.float64)  # dy arrives in the output's dtype
    expected = (cotangent @ np.asarray(low_rhs, np.float64).T, np.asarray(low_lhs, np.float64).T @ cotangent)
    for got, want in zip((d_low_lhs, d_low_rhs), expected):
        got = np.asarray(got, np.float64)
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-2


def _reference_as_low_kernel(x, w_stack, layer, addend, transpose_w, low=None):
    """What the Mosaic kernel computes, in XLA, so that the custom_vjp around it runs on a CPU."""
    return stacked_matmul_reference(x, w_stack, layer, transpose_w, addend=addend, low=low)


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
def test_custom_vjp_with_low_matches_the_references_gradients(monkeypatch, transpose_w):
    """With the kernel call swapped for the reference, the custom_vjp's dx, d(low_lhs) and
    d(low_rhs) match jax.grad of the reference (a swapped operand, a missing transpose or a wrong
    orientation fails), and dx is the same with the low-rank term as without it."""
    monkeypatch.setattr(hopper, "_stacked_matmul_kernel", _reference_as_low_kernel)
    rng = np.random.default_rng()
    tokens, d_in, d_out, rank = 5, 256, 128, 12
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)
    x = jnp.asarray(rng.standard_normal((tokens, d_x)), jnp.bfloat16)
    w_stack = jnp.asarray(rng.standard_normal((LAYERS, d_in, d_out)) / np.sqrt(d_x), jnp.bfloat16)
    low_lhs = jnp.asarray(rng.standard_normal((tokens, rank)), jnp.bfloat16)
    low_rhs = jnp.asarray(rng.standard_normal((rank, d_y)) / np.sqrt(rank), jnp.bfloat16)
    probe = jnp.asarray(rng.standard_normal((tokens, d_y)), jnp.float32)
    layer = jnp.int32(2)

    def loss(matmul, x, low_lhs, low_rhs):
        return jnp.sum(jnp.square(matmul(x, (low_lhs, low_rhs)).astype(jnp.float32)) * probe)

    ours = functools.partial(loss, lambda x, low: stacked_matmul_hopper(
        x, w_stack, layer, transpose_w=transpose_w, low=low))
    reference = functools.partial(loss, lambda x, low: stacked_matmul_reference(
        x, w_stack, layer, transpose_w, low=low))
    got = jax.grad(ours, argnums=(0, 1, 2))(x, low_lhs, low_rhs)
    want = jax.grad(reference, argnums=(0, 1, 2))(x, low_lhs, low_rhs)
    for name, mine, theirs, operand in zip(("dx", "d_low_lhs", "d_low_rhs"), got, want, (x, low_lhs, low_rhs)):
        assert mine.shape == operand.shape and mine.dtype == operand.dtype, name
        mine, theirs = np.asarray(mine, np.float32), np.asarray(theirs, np.float32)
        # bf16 tolerance: the reference's transposed dots take a float32 cotangent, ours a 16-bit one
        assert np.max(np.abs(mine - theirs)) / np.max(np.abs(theirs)) <= 1e-2, name

    cotangent = jnp.asarray(rng.standard_normal((tokens, d_y)), jnp.bfloat16)
    _, vjp_with = jax.vjp(lambda x: stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w,
                                                          low=(low_lhs, low_rhs)), x)
    _, vjp_without = jax.vjp(lambda x: stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w), x)
    np.testing.assert_array_equal(np.asarray(vjp_with(cotangent)[0], np.float32),
                                  np.asarray(vjp_without(cotangent)[0], np.float32))


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x_w", "x_wT"])
def test_reference_with_low_is_the_layers_product_plus_the_low_rank_product(transpose_w):
    rng = np.random.default_rng()
    layers, d_in, d_out, tokens, rank = 4, 48, 40, 9, 5
    w_stack = rng.standard_normal((layers, d_in, d_out)).astype(np.float32)
    layer = int(rng.integers(layers))
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)
    x = rng.standard_normal((tokens, d_x)).astype(np.float32)
    low_lhs = rng.standard_normal((tokens, rank)).astype(np.float32)
    low_rhs = rng.standard_normal((rank, d_y)).astype(np.float32)
    weight = w_stack[layer].astype(np.float64)
    expected = x.astype(np.float64) @ (weight.T if transpose_w else weight) + low_lhs.astype(np.float64) @ low_rhs
    got = np.asarray(stacked_matmul_reference(jnp.asarray(x), jnp.asarray(w_stack), jnp.int32(layer), transpose_w,
                                              low=(jnp.asarray(low_lhs), jnp.asarray(low_rhs))))
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_reference_rounds_product_plus_low_rank_product_once(dtype):
    """As for the addend: x @ W and low_lhs @ low_rhs exact in float32 (small integers, sixteenths),
    so the reference must equal their float32 sum rounded once, exactly, and the test tells that
    apart from rounding x @ W first."""
    rng = np.random.default_rng()
    layers, d_in, d_out, tokens, rank = 3, 64, 48, 33, 16
    scale = 2048.0 if dtype == jnp.float16 else 256.0
    w_stack = rng.integers(-8, 9, (layers, d_in, d_out)).astype(np.float32)
    x = rng.integers(-8, 9, (tokens, d_in)).astype(np.float32)
    x[:, 0] = scale
    w_stack[:, 0, :] = 1.0
    low_lhs = rng.integers(-2, 3, (tokens, rank)).astype(np.float32)
    low_rhs = (rng.integers(-3, 4, (rank, d_out)) / 16).astype(np.float32)
    layer = int(rng.integers(layers))
    product, low_product = x @ w_stack[layer], low_lhs @ low_rhs  # both exact
    once = np.asarray(jnp.asarray(product + low_product, dtype), np.float32)
    twice = np.asarray(jnp.asarray(np.asarray(jnp.asarray(product, dtype), np.float32) + low_product, dtype), np.float32)
    assert np.any(once != twice)
    got = stacked_matmul_reference(jnp.asarray(x, dtype), jnp.asarray(w_stack, dtype), jnp.int32(layer),
                                   low=(jnp.asarray(low_lhs, dtype), jnp.asarray(low_rhs, dtype)))
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), once)


def test_low_rank_tiles_alias_each_warpgroups_own_epilogue_slots():
    """The low-rank operand tiles of one consumer warpgroup take exactly its epilogue slots' bytes
    (so the RefUnion never puts them in the other warpgroup's slots), every real weight size's
    tiles pass the kernel's own layout check, and the rank pads to whole 32-wide chunks."""
    real = [256, 512, 1024, 1536, 3584, 4096, 8960, 14336, 18944, 384]
    for d_n in real:
        tiles = choose_tiles(4096, 4096, d_n)
        assert tiles.low_rank_chunk == 32
        per_wg_epilogue = tiles.out_slots * tiles.epilogue_m * tiles.epilogue_n
        assert 2 * tiles.tile_m * tiles.low_rank_chunk == per_wg_epilogue
        hopper._check_low_rank_fits(tiles, 2)
        assert tiles.smem_bytes(2) < tiles.smem_bytes(2, low=True) <= _SMEM_BYTES
    tiles = choose_tiles(4096, 4096, 4096)
    assert [tiles.low_rank_padded(rank) for rank in (1, 8, 16, 32, 33, 48, 64)] == [32, 32, 32, 32, 64, 64, 64]


def test_addend_and_low_together_are_refused():
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w_stack = jnp.zeros((2, 256, 512), jnp.bfloat16)
    low = (jnp.zeros((128, 16), jnp.bfloat16), jnp.zeros((16, 512), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"either addend or low, not both"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), addend=jnp.zeros((128, 512), jnp.bfloat16), low=low)


def test_low_of_the_wrong_shape_is_refused():
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w_stack = jnp.zeros((2, 256, 512), jnp.bfloat16)
    lhs, rhs = jnp.zeros((128, 16), jnp.bfloat16), jnp.zeros((16, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"low must be a pair"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), low=(lhs, rhs, rhs))
    with pytest.raises(ValueError, match=r"low must be a pair"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), low=lhs)
    with pytest.raises(ValueError, match=r"low_lhs must be \[tokens, r\] = \[128, r\].*got \(100, 16\)"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), low=(jnp.zeros((100, 16), jnp.bfloat16), rhs))
    with pytest.raises(ValueError, match=r"low_lhs must be .*got \(128,\)"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), low=(jnp.zeros((128,), jnp.bfloat16), rhs))
    with pytest.raises(ValueError, match=r"low_rhs must be \[r, d_y\] = \(16, 512\).*got \(8, 512\)"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), low=(lhs, jnp.zeros((8, 512), jnp.bfloat16)))
    x_t = jnp.zeros((128, 512), jnp.bfloat16)  # transposed: the output is [128, 256]
    with pytest.raises(ValueError, match=r"low_rhs must be \[r, d_y\] = \(16, 256\).*transpose_w=True.*got \(16, 512\)"):
        stacked_matmul_hopper(x_t, w_stack, jnp.int32(0), transpose_w=True, low=(lhs, rhs))


def test_low_of_another_dtype_is_refused():
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w_stack = jnp.zeros((2, 256, 512), jnp.bfloat16)
    lhs, rhs = jnp.zeros((128, 16), jnp.bfloat16), jnp.zeros((16, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"low_rhs must have x's dtype bfloat16.*got float32.*low_rhs.astype"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), low=(lhs, rhs.astype(jnp.float32)))
    with pytest.raises(ValueError, match=r"low_lhs must have x's dtype bfloat16.*got float16"):
        stacked_matmul_hopper(x, w_stack, jnp.int32(0), low=(lhs.astype(jnp.float16), rhs))

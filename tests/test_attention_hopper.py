"""Hopper (Mosaic GPU) flash attention: what a CPU can check. The kernels cannot run here (jax's
Mosaic GPU interpret mode does not run wgmma), so these tests export forward and gradient for
CUDA, which runs the whole Mosaic GPU lowering of the three kernels in Python, and check the
input validation. The numerics are checked on the H200 by bench/attention_hopper_check.py."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.attention_hopper import flash_attention_hopper, hopper_attention_available

KERNELS = {"flash_attention_hopper_forward", "flash_attention_hopper_dq", "flash_attention_hopper_dkv"}
FUSED_KERNELS = {"flash_attention_hopper_forward", "flash_attention_hopper_dkv_fused_dq"}
REDUCE_ADD = "cp.reduce.async.bulk.tensor"  # the PTX of a TMA reduce-add copy smem -> gmem

# (name, batch, seq, heads_q, heads_kv, head_dim, dtype, causal, segments)
CASES = [
    ("llama3_8b_2k_causal", 1, 2048, 32, 8, 128, jnp.bfloat16, True, False),
    ("llama3_8b_2k_packed", 1, 2048, 32, 8, 128, jnp.bfloat16, True, True),
    ("qwen25_7b_1000_packed", 1, 1000, 28, 4, 128, jnp.bfloat16, True, True),
    ("d64_mha_noncausal_fp16", 2, 300, 4, 4, 64, jnp.float16, False, False),
    ("d80_gqa6_17_packed_fp16", 1, 17, 6, 1, 80, jnp.float16, True, True),
]


def exported_mlir(batch, seq, heads_q, heads_kv, head_dim, dtype, causal, segments, fused_dq=False) -> str:
    """Output and gradients of a scalar loss, exported for CUDA (ShapeDtypeStructs: nothing runs)."""

    def attend(q, k, v, segment_ids):
        return flash_attention_hopper(
            q, k, v, causal=causal, segment_ids=segment_ids if segments else None, fused_dq=fused_dq
        )

    def loss(q, k, v, segment_ids):
        return jnp.sum(jnp.square(attend(q, k, v, segment_ids).astype(jnp.float32)))

    def output_and_grads(q, k, v, segment_ids):
        return attend(q, k, v, segment_ids), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, segment_ids)

    args = [
        jax.ShapeDtypeStruct((batch, seq, heads_q, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, seq, heads_kv, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, seq, heads_kv, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    ]
    return jax.export.export(jax.jit(output_and_grads), platforms=["cuda"])(*args).mlir_module()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_lower_to_mosaic_gpu(case):
    _, *shape = case
    mlir = exported_mlir(*shape)
    assert "stablehlo.custom_call @mosaic_gpu" in mlir
    assert set(re.findall(r"flash_attention_hopper_(?:forward|dq|dkv)\b", mlir)) == KERNELS
    assert REDUCE_ADD not in mlir  # the default dQ is written once per tile, not reduce-added


# fused_dq: causal, packed rows, GQA ratio 1 and 4, head_dim 64 and 128 (small: lowering only)
FUSED_CASES = [
    ("fused_gqa4_d128_packed", 1, 300, 8, 2, 128, jnp.bfloat16, True, True),
    ("fused_gqa1_d64_packed_fp16", 2, 200, 2, 2, 64, jnp.float16, True, True),
    ("fused_gqa4_d64_causal", 1, 130, 4, 1, 64, jnp.bfloat16, True, False),
    ("fused_gqa1_d128_packed", 1, 257, 2, 2, 128, jnp.bfloat16, True, True),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
def test_fused_dq_backward_lowers_without_the_dq_kernel(case):
    """fused_dq=True: the dK/dV kernel reduce-adds dQ into a zero-initialised float32 buffer
    (aliased in and out of the kernel), and no separate dQ kernel is emitted."""
    _, *shape = case
    mlir = exported_mlir(*shape, fused_dq=True)
    assert "stablehlo.custom_call @mosaic_gpu" in mlir
    assert set(re.findall(r"flash_attention_hopper_(?:forward|dq|dkv|dkv_fused_dq)\b", mlir)) == FUSED_KERNELS
    assert re.search(REDUCE_ADD + r"\.\dd\.global\.shared::cta\.add\b", mlir)
    assert "output_operand_alias" in mlir  # the accumulator starts as the zeros passed in


def test_float32_is_refused_with_a_pointer_to_the_triton_kernel():
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"float32.*bfloat16.*pallas_kernels\.attention\.flash_attention"):
        flash_attention_hopper(q, q, q)


def test_head_dim_over_128_is_refused():
    q = jnp.zeros((1, 64, 2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim=256"):
        flash_attention_hopper(q, q, q)


def test_not_available_on_cpu():
    assert jax.default_backend() == "cpu"
    assert hopper_attention_available() is False


def test_the_op_seam_refuses_hopper_without_an_sm90_gpu():
    """kernels.attention="hopper" is opt-in; on a machine without an H100/H200 the config is refused
    before any work, with what to use instead."""
    from convert.errors import ConfigError
    from fastft_jax import ops

    with pytest.raises(ConfigError, match="sm90 GPU.*use auto or pallas"):
        ops.OpsConfig(attention="hopper").validated()

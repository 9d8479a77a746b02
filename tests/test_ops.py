"""fastft_jax.ops' choices: FASTFT_KERNELS parsing and the automatic attention choice."""

import jax
import jax.numpy as jnp
import pytest

from convert.errors import ConfigError
from fastft_jax import ops
from pallas_kernels import _common


def test_fastft_kernels_takes_a_mode_and_per_op_items(monkeypatch):
    monkeypatch.setenv("FASTFT_KERNELS", "reference, lora_linear=xla ,attention=cudnn")
    config = ops.OpsConfig.from_env()
    assert config.lora_linear == "xla" and config.attention == "cudnn"
    assert all(getattr(config, op) == "reference" for op in ops.OP_NAMES if op not in ("lora_linear", "attention"))
    monkeypatch.setenv("FASTFT_KERNELS", "rope=pallas")  # items alone: every other op stays "auto"
    config = ops.OpsConfig.from_env()
    assert config.rope == "pallas" and config.rms_norm == "auto"
    # What the YAML names wins over the environment.
    assert ops.OpsConfig.from_env(rope="reference").rope == "reference"


@pytest.mark.parametrize("value, message", [
    ("fast", "'fast' is not one of auto, reference, pallas"),
    ("auto,lora=xla", "'lora' is not an op"),
    ("rms_norm=xla", r"'xla' is not one of auto, reference, pallas \(for rms_norm\)"),
])
def test_fastft_kernels_names_what_is_wrong(monkeypatch, value, message):
    monkeypatch.setenv("FASTFT_KERNELS", value)
    with pytest.raises(ConfigError, match=message):
        ops.OpsConfig.from_env()


@pytest.mark.parametrize("enabled, sm90, dtype, packed, expected", [
    (True, True, jnp.bfloat16, True, "hopper"),
    (True, True, jnp.float16, True, "hopper"),
    (True, True, jnp.float32, True, "pallas"),  # the Mosaic kernel takes 16-bit only
    (True, False, jnp.bfloat16, True, "pallas"),  # an A100 or older: Triton
    (False, True, jnp.bfloat16, True, "pallas"),  # not yet in auto
    (True, True, jnp.bfloat16, False, "cudnn"),  # no segment ids: cuDNN
])
def test_auto_attention(monkeypatch, enabled, sm90, dtype, packed, expected):
    monkeypatch.setattr(ops, "HOPPER_ATTENTION_IN_AUTO", enabled)
    monkeypatch.setattr(_common, "is_sm90_gpu", lambda: sm90)
    assert ops._auto_attention(packed, dtype) == expected


@pytest.mark.parametrize("enabled, sm90, expected", [(True, True, "hopper"), (True, False, "slice"),
                                                      (False, True, "slice")])
def test_auto_layer_matmul(monkeypatch, enabled, sm90, expected):
    monkeypatch.setattr(ops, "HOPPER_LAYER_MATMUL_IN_AUTO", enabled)
    monkeypatch.setattr(_common, "is_sm90_gpu", lambda: sm90)
    assert ops.OpsConfig().layer_matmul_mode() == expected
    assert ops.OpsConfig(layer_matmul="reference").layer_matmul_mode() == "reference"  # explicit choices stay
    assert ops.OpsConfig(lora_linear="reference").layer_matmul_mode() == "slice"  # kernels off: no Mosaic GEMM
    monkeypatch.setattr(ops, "HOPPER_LOW_RANK_IN_KERNEL", True)
    assert ops.OpsConfig().layer_matmul_mode() == expected.replace("hopper", "hopper_low_rank")


def test_float32_in_place_layer_matmul_takes_the_slice():
    """The Mosaic GEMM is 16-bit only: a float32 run with layer_matmul="hopper" (what "auto" picks on
    an sm90 GPU) traces through the sliced product instead of raising."""
    stack = jax.ShapeDtypeStruct((2, 256, 128), jnp.float32)
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    a, b = jax.ShapeDtypeStruct((256, 8), jnp.float32), jax.ShapeDtypeStruct((8, 128), jnp.float32)
    cfg = ops.OpsConfig(layer_matmul="hopper")
    out = jax.eval_shape(lambda stack, x, a, b: ops.lora_linear(x, ops.StackedKernel(stack, jnp.int32(1)), a, b, 2.0, cfg),
                         stack, x, a, b)
    assert out.shape == (64, 128) and out.dtype == jnp.float32

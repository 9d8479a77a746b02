"""QLoRA end to end: load_in_4bit / load_in_8bit models against the plain model whose weights are
the dequantized ones, no 16-bit copy of a frozen weight saved for the backward, a 4-bit training
run from YAML and its exports (adapter, merged 16-bit checkpoint)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from convert import quant
from convert.hf import PROJECTIONS
from fastft_jax import FastLanguageModel, ops
from fastft_jax.lora import LoRAConfig, init_lora_params
from fastft_jax.model import CausalLM, decoder_hidden
from tests.conftest import relative_error

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES})


def _adapters(config, seed):
    """LoRA factors with a non-zero B, so the adapter shows in logits and gradients."""
    lora_config = LoRAConfig(r=4, alpha=8.0)
    lora = init_lora_params(config, lora_config, seed)
    rng = np.random.default_rng(seed)
    for name in PROJECTIONS:
        b = lora["layers"][name]["lora_b"]
        lora["layers"][name]["lora_b"] = jnp.asarray(0.05 * rng.standard_normal(b.shape), jnp.float32)
    return lora_config, lora


def test_qlora_forward_and_gradients_equal_the_dequantized_model(tiny_checkpoints):
    # The forward takes the Pallas dequant kernel; the gradients, whose kernel path
    # test_quantized_lora_linear_* covers, take the jnp reference: the interpreter is slow.
    kind = "nf4"
    quantized, _ = FastLanguageModel.from_pretrained(
        tiny_checkpoints["llama"], dtype="float32", load_in_4bit=True,
        kernels=dataclasses.asdict(REFERENCE) | {"dequant": "pallas"},
    )
    params = quantized.base_params()
    for name in PROJECTIONS:
        kernel = params["layers"][name]["kernel"]
        assert quant.is_quantized(kernel) and kernel.kind == kind
    assert not quant.is_quantized(params["embed"])
    assert not quant.is_quantized(params.get("lm_head", params["embed"]))
    config = quantized.config
    plain = CausalLM(config, quant.dequantized_tree(params, jnp.float32), dtype=jnp.float32, max_seq_length=64,
                     ops_config=REFERENCE)
    lora_config, lora = _adapters(config, int(np.random.default_rng().integers(1 << 20)))
    quantized.attach_lora(lora_config, lora)
    plain.attach_lora(lora_config, lora)
    ids = np.random.default_rng().integers(0, config.vocab_size, (2, 11))
    assert relative_error(quantized(ids), plain(ids)) <= 1e-5
    assert quantized.num_parameters() == plain.num_parameters()

    def loss(lora_params, base_params, ops_config):
        hidden = decoder_hidden(base_params, lora_params, jnp.asarray(ids, jnp.int32), None, None, config=config,
                                lora_config=lora_config, ops_config=ops_config, compute_dtype=jnp.float32,
                                gradient_checkpointing=True)
        return jnp.mean(hidden ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    grads = grad(lora, params, REFERENCE)
    expected = grad(lora, plain.base_params(), REFERENCE)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("rows, kind", [(3, "nf4"), (40, "nf4"), (40, "int8")])
def test_quantized_lora_linear_matches_lora_linear_on_the_dequantized_kernel(rows, kind):
    """The op itself: few rows take the fused dequant-matmul kernel, more rows dequantize first;
    dropout (a separate adapter input) included."""
    rng = np.random.default_rng()
    kernel = quant.quantize(jnp.asarray(rng.standard_normal((128, 192)), jnp.float32), kind)  # [in=192, out=128]
    weight = quant.dequantize_reference(kernel, jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, 192)), jnp.float32)
    x_dropped = x * jnp.asarray(rng.random(x.shape) > 0.3, jnp.float32)
    a = jnp.asarray(rng.standard_normal((192, 8)) * 0.1, jnp.float32)
    b = jnp.asarray(rng.standard_normal((8, 128)) * 0.1, jnp.float32)
    cfg = dataclasses.replace(REFERENCE, dequant="pallas")

    def quantized(x, x_dropped, a, b):
        return jnp.sum(jnp.sin(ops.lora_linear(x, kernel, a, b, 2.0, cfg, x_for_lora=x_dropped)))

    def reference(x, x_dropped, a, b):
        base = jnp.dot(x, weight)
        return jnp.sum(jnp.sin(base + 2.0 * jnp.dot(jnp.dot(x_dropped, a), b)))

    assert relative_error(quantized(x, x_dropped, a, b), reference(x, x_dropped, a, b)) <= 1e-5
    for got, want in zip(jax.grad(quantized, argnums=(0, 1, 2, 3))(x, x_dropped, a, b),
                         jax.grad(reference, argnums=(0, 1, 2, 3))(x, x_dropped, a, b)):
        assert relative_error(got, want) <= 1e-5
    plain = jax.grad(lambda x: jnp.sum(jnp.sin(ops.linear(x, kernel, cfg))))(x)
    assert relative_error(plain, jax.grad(lambda x: jnp.sum(jnp.sin(jnp.dot(x, weight))))(x)) <= 1e-5


# HF [out, in] shapes: a real one with few rows (Qwen2.5-7B's hidden size as out) and an odd one
# (a padded nibble, a partial last block, in not a multiple of 64).
OPS_SHAPES = [(3584, 64), (37, 61)]


@pytest.mark.parametrize("double_quant, nested_in_kernel", [(True, True), (True, False), (False, True)])
def test_ops_dequantize_is_the_reference_bit_for_bit(monkeypatch, double_quant, nested_in_kernel):
    """ops.dequantize_hf (HF's [out, in], what the training path multiplies by) and ops.dequantize
    ([in, out]) through the Pallas kernel, the double-quantized absmax decoded in the kernel or by
    XLA before it, equal convert.quant's references bit for bit, under jit."""
    monkeypatch.setattr(ops, "DEQUANT_NESTED_IN_KERNEL", nested_in_kernel)
    rng = np.random.default_rng()
    cfg = dataclasses.replace(REFERENCE, dequant="pallas")
    for shape in OPS_SHAPES:
        kernel = quant.quantize_nf4(jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.01, 2.0), jnp.float32),
                                    double_quant=double_quant)
        weight_hf = jax.jit(lambda kernel: ops.dequantize_hf(kernel, jnp.bfloat16, cfg))(kernel)
        assert weight_hf.shape == shape
        assert np.array_equal(np.asarray(weight_hf), np.asarray(quant.dequantize_hf_reference(kernel, jnp.bfloat16)))
        weight = jax.jit(lambda kernel: ops.dequantize(kernel, jnp.float32, cfg))(kernel)
        assert np.array_equal(np.asarray(weight), np.asarray(quant.dequantize_reference(kernel, jnp.float32)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_qlora_layer_is_the_16bit_lora_op_on_the_dequantized_weight_bit_for_bit(dtype):
    """A QLoRA layer (the HF-layout weight, GEMMs contracting its in axis) computes exactly what the
    16-bit LoRA op (impl="xla") computes on the dequantized [in, out] kernel: the forward and the
    gradients of x, A and B equal bit for bit, both jitted so that XLA sees the same GEMMs."""
    from pallas_kernels.lora_linear import lora_linear

    rng = np.random.default_rng()
    cfg = dataclasses.replace(REFERENCE, dequant="pallas")
    for out_features, in_features in OPS_SHAPES:
        kernel = quant.quantize_nf4(jnp.asarray(rng.standard_normal((out_features, in_features)), jnp.float32))
        x = jnp.asarray(rng.standard_normal((24, in_features)), dtype)
        a = jnp.asarray(rng.standard_normal((in_features, 8)) * 0.1, jnp.float32)
        b = jnp.asarray(rng.standard_normal((8, out_features)) * 0.1, jnp.float32)
        cotangent = jnp.asarray(rng.standard_normal((24, out_features)), dtype)

        def quantized(kernel, x, a, b, cotangent):
            out, vjp = jax.vjp(lambda x, a, b: ops.lora_linear(x, kernel, a, b, 2.0, cfg), x, a, b)
            return out, vjp(cotangent)

        def sixteen_bit(kernel, x, a, b, cotangent):
            weight = jax.lax.stop_gradient(quant.dequantize_reference(kernel, dtype))
            out, vjp = jax.vjp(lambda x, a, b: lora_linear(x, weight, a, b, 2.0, impl="xla"), x, a, b)
            return out, vjp(cotangent)

        got = jax.tree.leaves(jax.jit(quantized)(kernel, x, a, b, cotangent))
        want = jax.tree.leaves(jax.jit(sixteen_bit)(kernel, x, a, b, cotangent))
        assert len(got) == len(want) == 4
        for got_leaf, want_leaf in zip(got, want):
            assert got_leaf.dtype == want_leaf.dtype and np.array_equal(np.asarray(got_leaf), np.asarray(want_leaf))


def test_training_path_writes_no_in_out_copy_of_the_weight():
    """The forward (x W_hf^T) and backward (g W_hf) GEMMs take the dequantized weight in HF's
    [out, in] layout: XLA folds the forward's transpose into the GEMM, so the compiled program
    holds no [in, out] array and no [out, in] array in transposed layout (what a materialised
    transpose becomes after layout assignment)."""
    import re

    rng = np.random.default_rng()
    out_features, in_features = OPS_SHAPES[0]
    kernel = quant.quantize_nf4(jnp.asarray(rng.standard_normal((out_features, in_features)), jnp.float32))
    cfg = dataclasses.replace(REFERENCE, dequant="pallas")
    x = jnp.asarray(rng.standard_normal((24, in_features)), jnp.bfloat16)
    a = jnp.zeros((in_features, 8), jnp.float32)
    b = jnp.zeros((8, out_features), jnp.float32)

    def loss(x, a, b, kernel):
        out = ops.lora_linear(x, kernel, a, b, 2.0, cfg) + ops.lora_linear(x, kernel, a, b, 2.0, cfg, x_for_lora=x * 0.5)
        return jnp.sum((out + ops.linear(x, kernel, cfg)).astype(jnp.float32))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, a, b, kernel).compile().as_text()
    transposed = re.compile(rf"\[{in_features},{out_features}\]|\[{out_features},{in_features}\]\{{0,1\}}")
    assert not [line for line in hlo.splitlines() if transposed.search(line)]
    # The pattern does catch a materialised [in, out] weight.
    weight_sized = jnp.asarray(rng.standard_normal((in_features, out_features)), jnp.float32)
    copy_hlo = jax.jit(lambda kernel, other: ops.dequantize(kernel, jnp.float32, cfg) * other).lower(
        kernel, weight_sized).compile().as_text()
    assert any(transposed.search(line) for line in copy_hlo.splitlines())


def test_qlora_gemms_lower_to_the_hopper_kernel_with_layer_matmul_hopper():
    """kernels.layer_matmul="hopper" also serves QLoRA: the dequantized [out, in] weight, as a stack
    of one layer, meets x in the Mosaic GPU GEMM's transposed orientation in the forward and g in
    its plain one in the backward, each with the adapter's term as the epilogue addend (the CUDA
    export, read on the CPU); below ops.MOSAIC_LAYER_MATMUL_MIN_ROWS rows, XLA's GEMM."""
    import collections
    import re

    kernel = quant.quantize_nf4(jnp.asarray(np.random.default_rng(0).standard_normal((256, 512)), jnp.float32))
    cfg = dataclasses.replace(REFERENCE, dequant="reference", layer_matmul="hopper")
    a, b = jax.ShapeDtypeStruct((512, 8), jnp.float32), jax.ShapeDtypeStruct((8, 256), jnp.float32)

    def loss(x, a, b, kernel):
        return jnp.sum(ops.lora_linear(x, kernel, a, b, 2.0, cfg).astype(jnp.float32) ** 2)

    def mosaic_gemms(rows):
        x = jax.ShapeDtypeStruct((rows, 512), jnp.bfloat16)
        export = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"])(x, a, b, kernel)
        return collections.Counter(re.findall(r"stacked_matmul_hopper\w*_mosaic_gpu", export.mlir_module()))

    assert mosaic_gemms(ops.MOSAIC_LAYER_MATMUL_MIN_ROWS) == {
        "stacked_matmul_hopper_t_addend_mosaic_gpu": 1, "stacked_matmul_hopper_addend_mosaic_gpu": 1}
    # A few rows (decode with an unmerged adapter) keep XLA's GEMM on the dequantized weight.
    assert not mosaic_gemms(ops.MOSAIC_LAYER_MATMUL_MIN_ROWS - 1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_16bit_copy_of_a_frozen_weight_is_saved(tiny_checkpoints, checkpointing):
    """Whatever the backward keeps of the base is the quantized arrays, never a dequantized kernel."""
    # jax.ad_checkpoint.print_saved_residuals prints this list; the list itself is not public.
    from jax._src.ad_checkpoint import saved_residuals

    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoints["llama"], dtype="float32", load_in_4bit=True,
                                                 kernels=dataclasses.asdict(REFERENCE))
    config = model.config
    lora_config, lora = _adapters(config, 0)
    params = model.base_params()
    ids = jnp.asarray(np.random.default_rng().integers(0, config.vocab_size, (2, 9)), jnp.int32)

    def loss(lora_params):
        hidden = decoder_hidden(params, lora_params, ids, None, None, config=config, lora_config=lora_config,
                                ops_config=REFERENCE, compute_dtype=jnp.float32, gradient_checkpointing=checkpointing)
        return jnp.mean(hidden ** 2)

    kernel_shapes = set()
    for name in PROJECTIONS:
        d_in, d_out = config.projection_shape(name)
        kernel_shapes |= {(d_in, d_out), (d_out, d_in), (d_in * d_out,)}
    residuals = saved_residuals(loss, lora)
    assert residuals
    for aval, _source in residuals:
        if jnp.issubdtype(aval.dtype, jnp.floating):
            assert tuple(aval.shape[-2:]) not in kernel_shapes and tuple(aval.shape[-1:]) not in kernel_shapes, aval


def test_4bit_training_run_from_yaml_exports_adapter_and_merged_16bit(tmp_path):
    from convert.safetensors_io import CheckpointReader
    from convert.tiny import write_tiny_checkpoint
    from fastft_jax.train import main

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny-qwen2", arch="qwen2")
    out = tmp_path / "out"
    code = main(["--config", str(ROOT / "examples/quickstart.yaml"), "--set", f"model.name={checkpoint}",
                 "--set", "model.load_in_4bit=true", "--set", "model.dtype=bfloat16",
                 "--set", f"training.output_dir={out}", "--set", "training.max_steps=3",
                 "--set", "training.save_steps=100", "--set", "data.packing=false",
                 "--set", f"data.path={ROOT / 'examples/data/reasoning.jsonl'}", "--set", "export.merged=true"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    adapter = out / "lora_model"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()

    merged = out / "merged_model"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    # The merged kernel is bf16(dequantized float32 W + scale * A @ B): the 4-bit base was dequantized,
    # never re-quantized.
    model, _ = FastLanguageModel.from_pretrained(checkpoint, dtype="bfloat16", load_in_4bit=True)
    model.load_adapter(adapter)
    scale = model.lora_config.scale("down_proj")
    lora = model.lora_params()["layers"]["down_proj"]
    kernel = model.base_params()["layers"]["down_proj"]["kernel"]
    with CheckpointReader(merged) as reader:
        for layer in range(model.config.num_layers):
            written = reader.get(f"model.layers.{layer}.mlp.down_proj.weight")
            assert written.dtype == np.dtype(ml_dtypes.bfloat16)
            base = np.asarray(quant.dequantize_reference(kernel.layer(layer), jnp.float32))
            delta = np.asarray(lora["lora_a"][layer], np.float32) @ np.asarray(lora["lora_b"][layer], np.float32)
            expected = (base + np.float32(scale) * delta).astype(ml_dtypes.bfloat16)
            assert np.array_equal(written.T, expected)

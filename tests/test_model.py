"""The decoder against transformers, packing, sharded loading, and the loader's errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.errors import CheckpointError, ConfigError, UnsupportedModelError
from convert.safetensors_io import CheckpointReader, save_file
from fastft_jax import FastLanguageModel
from tests.conftest import relative_error, torch_logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers(tiny_checkpoints, name):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoints[name], dtype="float32")
    rng = np.random.default_rng()
    # 40 positions run past the llama3 scaling's original 16, so its smoothing band is exercised.
    input_ids = rng.integers(0, model.config.vocab_size, (2, 40))
    ours = np.asarray(model(input_ids))
    ref = torch_logits(tiny_checkpoints[name], input_ids)
    assert ours.shape == ref.shape
    assert relative_error(ours, ref) <= 1e-5
    assert len(tokenizer) <= model.config.vocab_size


def test_checkpoints_cover_the_required_shapes(tiny_checkpoints):
    configs = {name: FastLanguageModel.from_pretrained(path, dtype="float32")[0].config
               for name, path in tiny_checkpoints.items()}
    assert {c.tie_word_embeddings for c in configs.values()} == {True, False}
    assert all(c.num_heads // c.num_kv_heads >= 2 for c in configs.values())
    assert configs["qwen3"].head_dim != configs["qwen3"].hidden_size // configs["qwen3"].num_heads
    assert configs["llama"].rope_scaling_dict["rope_type"] == "llama3"


def test_linear_rope_scaling_from_max_seq_length(tmp_path):
    """max_seq_length above max_position_embeddings turns on linear scaling, as in Unsloth; the
    result equals transformers with that linear scaling written into the config."""
    from convert.tiny import write_tiny_checkpoint

    plain = write_tiny_checkpoint(tmp_path / "plain", arch="llama", max_position_embeddings=32)
    scaled = write_tiny_checkpoint(tmp_path / "scaled", arch="llama", max_position_embeddings=32,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0})
    model, _ = FastLanguageModel.from_pretrained(plain, max_seq_length=64, dtype="float32")
    assert model.config.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    input_ids = np.random.default_rng().integers(0, model.config.vocab_size, (1, 50))
    assert relative_error(model(input_ids), torch_logits(scaled, input_ids)) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_packed_row_equals_separate_sequences(tiny_checkpoints, name):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoints[name], dtype="float32")
    rng = np.random.default_rng()
    first = rng.integers(0, model.config.vocab_size, (1, 11))
    second = rng.integers(0, model.config.vocab_size, (1, 6))
    packed = np.concatenate([first, second], axis=1)
    segment_ids = np.array([[1] * 11 + [2] * 6])
    positions = np.array([list(range(11)) + list(range(6))])
    packed_logits = np.asarray(model(packed, positions=positions, segment_ids=segment_ids))
    separate = np.concatenate([np.asarray(model(first)), np.asarray(model(second))], axis=1)
    assert relative_error(packed_logits, separate) <= 1e-5


def test_sharded_checkpoint_gives_the_same_model(tiny_checkpoints, tmp_path):
    from convert.tiny import write_sharded_copy

    sharded = write_sharded_copy(tiny_checkpoints["qwen2"], tmp_path / "sharded", num_shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    single, _ = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen2"], dtype="float32")
    multi, _ = FastLanguageModel.from_pretrained(sharded, dtype="float32")
    leaves_single = jax.tree.leaves(single.base_params())
    leaves_multi = jax.tree.leaves(multi.base_params())
    assert len(leaves_single) == len(leaves_multi)
    for a, b in zip(leaves_single, leaves_multi):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_load_casts_weights(tiny_checkpoints):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen2"], dtype="bfloat16")
    assert model.base_params()["embed"].dtype == jnp.bfloat16
    input_ids = np.random.default_rng().integers(0, model.config.vocab_size, (1, 9))
    reference, _ = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen2"], dtype="float32")
    assert relative_error(model(input_ids), reference(input_ids)) <= 5e-2


# -- errors: one clear message naming the file, key or value, before any long work -------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_error_directory_missing(tmp_path):
    with pytest.raises(CheckpointError, match="not a local directory"):
        FastLanguageModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="hub access"):
        FastLanguageModel.from_pretrained("meta-llama/Llama-3.1-8B")


def test_error_config_missing(tiny_checkpoints, tmp_path):
    directory = _copy(tiny_checkpoints["llama"], tmp_path / "ckpt")
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        FastLanguageModel.from_pretrained(directory)


def test_error_unsupported_model_type(tiny_checkpoints, tmp_path):
    directory = _copy(tiny_checkpoints["llama"], tmp_path / "ckpt")
    _edit_config(directory, model_type="mistral")
    with pytest.raises(UnsupportedModelError, match="'mistral'"):
        FastLanguageModel.from_pretrained(directory)


def test_error_unknown_rope_scaling(tiny_checkpoints, tmp_path):
    directory = _copy(tiny_checkpoints["llama"], tmp_path / "ckpt")
    _edit_config(directory, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        FastLanguageModel.from_pretrained(directory)


def test_error_sliding_window_and_activation(tiny_checkpoints, tmp_path):
    directory = _copy(tiny_checkpoints["qwen2"], tmp_path / "ckpt")
    _edit_config(directory, use_sliding_window=True)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        FastLanguageModel.from_pretrained(directory)
    _edit_config(directory, use_sliding_window=False, hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match="'gelu'"):
        FastLanguageModel.from_pretrained(directory)


def _rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    with CheckpointReader(directory) as reader:
        tensors = {name: np.array(reader.get(name)) for name in reader.keys()}
    edit(tensors)
    save_file(tensors, path)


def test_error_tensor_missing(tiny_checkpoints, tmp_path):
    directory = _copy(tiny_checkpoints["llama"], tmp_path / "ckpt")
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        FastLanguageModel.from_pretrained(directory)


def test_error_tensor_shape_mismatch(tiny_checkpoints, tmp_path):
    directory = _copy(tiny_checkpoints["llama"], tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    _edit_config(directory, intermediate_size=config["intermediate_size"] + 8)
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight' has shape .* implies"):
        FastLanguageModel.from_pretrained(directory)


def test_error_unknown_dtype(tiny_checkpoints):
    with pytest.raises(ConfigError, match="'float8'"):
        FastLanguageModel.from_pretrained(tiny_checkpoints["llama"], dtype="float8")



def test_checkpointing_modes_keep_what_they_promise():
    """The modes differ in what the backward keeps, which equal losses (test_trainer) cannot show.
    Sum the residuals the layer scan stacks for the backward: True keeps only each layer's input;
    "selective" adds the projection outputs but down_proj's, and attention's output; False keeps
    more still (the elementwise intermediates too)."""
    import contextlib
    import dataclasses
    import io
    import math
    import re

    from jax.ad_checkpoint import print_saved_residuals

    from convert.hf import PROJECTIONS, ModelConfig
    from fastft_jax import ops
    from fastft_jax.lora import LoRAConfig, init_lora_params
    from fastft_jax.model import decoder_hidden, random_params

    hidden, kv, intermediate, layers, batch, seq = 256, 128, 704, 2, 2, 16
    config = ModelConfig("llama", 512, hidden, intermediate, layers, 4, 2, 64, 1e-5, 1e4, None, False, False, False, 4096)
    lora_config = LoRAConfig(r=8, alpha=8, target_modules=PROJECTIONS)
    params, lora = random_params(config, 0, jnp.float32), init_lora_params(config, lora_config, 0)
    input_ids = jnp.zeros((batch, seq), jnp.int32)
    ops_config = dataclasses.replace(ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES}), mlp_tile_tokens=0)

    def stacked_residual_floats(mode, memory: str = "") -> int:
        def loss(lora, params, input_ids):
            return jnp.sum(decoder_hidden(params, lora, input_ids, None, None, config=config, lora_config=lora_config,
                                          ops_config=ops_config, compute_dtype=jnp.float32, gradient_checkpointing=mode))

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_saved_residuals(loss, lora, params, input_ids)
        # Stacked per layer: [layers, batch, seq, ...] (the scan's final carry is no per-layer residual).
        shapes = re.findall(rf"f32{memory}\[({layers},{batch},{seq},[\d,]+)\] output of scan", printed.getvalue())
        return sum(math.prod(int(dim) for dim in shape.split(",")) for shape in shapes)

    # "selective": the layer input, q, k, v, attention's output, o, gate and up.
    per_token_layer = {True: hidden, "selective": hidden + hidden + 2 * kv + hidden + hidden + 2 * intermediate}
    for mode, floats in per_token_layer.items():
        assert stacked_residual_floats(mode) == floats * batch * seq * layers, mode
    assert stacked_residual_floats(False) > per_token_layer["selective"] * batch * seq * layers
    from fastft_jax.model import has_pinned_host

    if has_pinned_host():  # "unsloth": the layer inputs live in host memory, nothing stacked on the device
        assert stacked_residual_floats("unsloth") == 0
        assert stacked_residual_floats("unsloth", "<host>") == hidden * batch * seq * layers


def assert_same_loss_and_lora_grads(config, lora_config, checkpointing, want_ops, got_ops):
    """Two OpsConfigs that change how the layers run, not what they compute: the decoder's loss and
    every LoRA gradient agree to 1e-5 (float32), on random weights, random tokens and LoRA B moved off
    its zero init (so that every LoRA gradient is non-trivial), with LoRA dropout's keys when it has any."""
    from fastft_jax.lora import init_lora_params
    from fastft_jax.model import decoder_hidden, random_params

    seed = int(np.random.default_rng().integers(1 << 30))
    params, lora = random_params(config, seed, jnp.float32), init_lora_params(config, lora_config, seed + 1)
    lora = jax.tree.map(lambda leaf: leaf + 0.02 * jax.random.normal(jax.random.key(seed + 2), leaf.shape), lora)
    input_ids = jax.random.randint(jax.random.key(seed + 3), (2, 24), 0, config.vocab_size)

    def loss_and_grads(ops_config):
        def loss(lora):
            hidden = decoder_hidden(params, lora, input_ids, None, None, config=config, lora_config=lora_config,
                                    ops_config=ops_config, compute_dtype=jnp.float32,
                                    gradient_checkpointing=checkpointing,
                                    dropout_rng=jax.random.key(seed + 4) if lora_config.dropout else None)
            return jnp.mean(hidden**2)

        return jax.jit(jax.value_and_grad(loss))(lora)

    want_loss, want_grads = loss_and_grads(want_ops)
    got_loss, got_grads = loss_and_grads(got_ops)
    assert relative_error(np.asarray(got_loss), np.asarray(want_loss)) <= 1e-5, f"seed {seed}"
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert relative_error(np.asarray(got), np.asarray(want)) <= 1e-5, f"seed {seed}"


@pytest.mark.parametrize(("unroll", "backward", "dropout"), [(0, "free", 0.1), (0, "tied", 0.0), (2, "tied", 0.1)])
def test_unrolled_layers_equal_the_scan(unroll, backward, dropout):
    """kernels.layer_unroll changes how XLA loops over the layers, not what they compute: the loss
    and every LoRA gradient equal the one-layer scan's (float32), under checkpointing too (free, or
    with each layer's backward tied to its cotangent), with LoRA dropout's per-layer keys too."""
    import dataclasses

    from convert.hf import PROJECTIONS, ModelConfig
    from fastft_jax import ops
    from fastft_jax.lora import LoRAConfig

    config = ModelConfig("llama", 512, 256, 704, 3, 4, 2, 64, 1e-5, 1e4, None, False, False, False, 4096)
    lora_config = LoRAConfig(r=8, alpha=8, dropout=dropout, target_modules=PROJECTIONS)
    reference = ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES})
    assert_same_loss_and_lora_grads(config, lora_config, "selective", reference,
                                    dataclasses.replace(reference, layer_unroll=unroll, unrolled_backward=backward))


def test_unrolled_backward_must_be_a_mode():
    from fastft_jax import ops

    with pytest.raises(ConfigError, match="unrolled_backward"):
        ops.OpsConfig(unrolled_backward="early").validated()


def test_layer_unroll_must_be_a_count():
    from fastft_jax import ops

    for bad in (-1, 1.5, True, "all"):
        with pytest.raises(ConfigError, match="layer_unroll"):
            ops.OpsConfig(layer_unroll=bad).validated()


def test_layer_unroll_auto_unrolls_only_the_gpu_decode_step(monkeypatch):
    # Training keeps the scan everywhere (unrolled, a GPU step needed 1.8x the temporaries); the
    # decode step is straight-line code on a GPU (bench/RESULTS.md, fifth session).
    from fastft_jax import ops

    config = ops.OpsConfig().validated()
    assert config.layer_unroll == "auto"
    for backend, decode_unroll in (("cpu", 1), ("gpu", 32)):
        monkeypatch.setattr(ops.jax, "default_backend", lambda: backend)
        assert config.scan_unroll(32) == 1
        assert config.scan_unroll(32, decode=True) == decode_unroll
    assert ops.OpsConfig(layer_unroll=0).scan_unroll(32) == 32
    assert ops.OpsConfig(layer_unroll=4).scan_unroll(32, decode=True) == 4


@pytest.mark.parametrize("checkpointing", [False, "selective"])
def test_kernel_path_equals_the_reference_on_packed_rows(checkpointing):
    """The whole training loss with every op on its Pallas kernel (interpret mode here) equals the
    all-reference loss, and so does every LoRA gradient (float32, 1e-5): packed rows with padding,
    response-only labels, GQA (4 query heads on 2 KV heads), a nonzero B. Each kernel has its own
    tests; this one catches what only their composition can break (residual names under
    checkpointing, segment ids reaching attention, the loss head's normalizer)."""
    import dataclasses

    from convert.hf import PROJECTIONS, ModelConfig
    from fastft_jax import ops
    from fastft_jax.lora import LoRAConfig, init_lora_params
    from fastft_jax.model import random_params
    from fastft_jax.trainer import LossSetup, StepInputs, token_loss_sum

    config = ModelConfig("qwen2", 512, 96, 160, 2, 4, 2, 24, 1e-6, 1e6, None, True, True, False, 4096)
    lora_config = LoRAConfig(r=8, alpha=16, target_modules=PROJECTIONS)
    seed = int(np.random.default_rng().integers(1 << 30))
    params, lora = random_params(config, seed, jnp.float32), init_lora_params(config, lora_config, seed + 1)
    lora = jax.tree.map(lambda leaf: leaf + 0.02 * jax.random.normal(jax.random.key(seed + 2), leaf.shape), lora)
    rng = np.random.default_rng(seed)
    seq, lengths = 80, [23, 31, 19]  # three sequences, then 7 padding tokens
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(seq - sum(lengths))])
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(seq - sum(lengths))])
    input_ids = rng.integers(3, config.vocab_size, seq)
    labels = np.where((segment_ids > 0) & (positions >= 5), np.roll(input_ids, -1), -100)  # prompts and pads ignored
    labels[np.cumsum(lengths) - 1] = -100  # no label crosses into the next sequence
    micro = StepInputs(*(jnp.asarray(np.stack([a, a[::-1]]), jnp.int32)
                         for a in (input_ids, labels, positions, segment_ids)))
    # The second row reversed is not a valid packing; keep the first row's layout in both.
    micro = micro._replace(positions=micro.positions.at[1].set(micro.positions[0]),
                           segment_ids=micro.segment_ids.at[1].set(micro.segment_ids[0]),
                           labels=micro.labels.at[1].set(jnp.where(micro.segment_ids[0] > 0, micro.labels[1], -100)))
    normalizer = jnp.sum(micro.labels != -100).astype(jnp.float32)
    reference = ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES})
    kernels = dataclasses.replace(reference, **{name: "pallas" for name in ops.OP_NAMES})

    def loss_and_grads(ops_config):
        setup = LossSetup(config, lora_config, ops_config, jnp.float32, checkpointing, use_segments=True)
        return jax.jit(jax.value_and_grad(token_loss_sum), static_argnums=5)(lora, params, micro, normalizer, None, setup)

    want_loss, want_grads = loss_and_grads(reference)
    got_loss, got_grads = loss_and_grads(kernels)
    assert relative_error(np.asarray(got_loss), np.asarray(want_loss)) <= 1e-5
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads), strict=True):
        error = relative_error(np.asarray(got), np.asarray(want))
        assert error <= 1e-5, f"{jax.tree_util.keystr(path)}: relative error {error:.2e} (seed {seed})"


# With and without LoRA dropout: the in-place path's custom_vjp keeps dx' apart under dropout only.
@pytest.mark.parametrize("checkpointing, dropout", [("selective", 0.1), ("unsloth", 0.0)])
def test_in_place_layer_matmuls_equal_the_sliced_ones(checkpointing, dropout):
    """kernels.layer_matmul changes where each layer's kernels are read from (the stack, in place,
    instead of a slice the scan copies out), not what is computed: the loss and every LoRA gradient
    equal the default path's (float32), with biases (qwen2), GQA, LoRA dropout and the MLP tiled."""
    import dataclasses

    from convert.hf import PROJECTIONS, ModelConfig
    from fastft_jax import ops
    from fastft_jax.lora import LoRAConfig

    config = ModelConfig("qwen2", 512, 128, 256, 3, 4, 2, 32, 1e-6, 1e6, None, True, True, False, 4096)
    lora_config = LoRAConfig(r=8, alpha=16, dropout=dropout, target_modules=PROJECTIONS)
    sliced = dataclasses.replace(ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES}), mlp_tile_tokens=16)
    assert_same_loss_and_lora_grads(config, lora_config, checkpointing, sliced,
                                    dataclasses.replace(sliced, layer_matmul="reference"))


@pytest.mark.parametrize("mode", ["hopper", "hopper_low_rank"])
def test_in_place_layer_matmuls_lower_to_the_hopper_kernel(mode):
    """With kernels.layer_matmul="hopper" the training loss's gradient exports for CUDA with the
    Mosaic GPU GEMM reading the stacked kernels, and no dynamic slice of a kernel stack left."""
    import collections
    import dataclasses
    import re

    from convert.errors import ConfigError
    from convert.hf import PROJECTIONS, ModelConfig
    from fastft_jax import ops
    from fastft_jax.lora import LoRAConfig, init_lora_params
    from fastft_jax.model import decoder_hidden, random_params

    with pytest.raises(ConfigError, match=f"layer_matmul={mode} needs an sm90 GPU"):
        ops.OpsConfig(layer_matmul=mode).validated()
    # Kernel dimensions the Hopper GEMM takes: d_in a multiple of 64, d_out of 128.
    config = ModelConfig("llama", 512, 256, 512, 2, 4, 2, 64, 1e-5, 1e4, None, False, False, False, 4096)
    lora_config = LoRAConfig(r=8, alpha=8, target_modules=PROJECTIONS)
    params = jax.eval_shape(lambda: random_params(config, 0, jnp.bfloat16))
    lora = jax.eval_shape(lambda: init_lora_params(config, lora_config, 0))
    input_ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)  # ops.MOSAIC_LAYER_MATMUL_MIN_ROWS tokens
    ops_config = dataclasses.replace(ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES}), layer_matmul=mode)

    def loss(lora, params, input_ids):
        hidden = decoder_hidden(params, lora, input_ids, None, None, config=config, lora_config=lora_config,
                                ops_config=ops_config, compute_dtype=jnp.bfloat16, gradient_checkpointing="selective")
        return jnp.mean(jnp.square(hidden.astype(jnp.float32)))

    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["cuda"])(lora, params, input_ids)
    text = exported.mlir_module()
    # Each of the 7 projections: one forward GEMM and one transposed dx GEMM, the adapter's term
    # either an addend or the in-kernel rank-r product.
    term = "low_rank32" if mode == "hopper_low_rank" else "addend"
    kernels = collections.Counter(re.findall(r"stacked_matmul_hopper\w*_mosaic_gpu", text))
    assert kernels == {f"stacked_matmul_hopper_{term}_mosaic_gpu": 7, f"stacked_matmul_hopper_t_{term}_mosaic_gpu": 7}
    # every projection kernel stack is [layers, d_in, d_out] bf16; none of them is sliced
    assert not re.search(r"stablehlo.dynamic_slice[^\n]*tensor<2x(256|512)x(128|256|512)xbf16>", text)

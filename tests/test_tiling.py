"""The MLP tiled over the sequence against the untiled MLP: outputs and gradients (hidden, LoRA A/B,
base kernels), a whole model under each checkpointing mode, dropout, the memory bound, the config
field and its auto rule; and the chunked loss head of ops.cross_entropy against full logits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.errors import ConfigError
from convert.hf import MLP_PROJECTIONS, ModelConfig
from fastft_jax import FastLanguageModel, ops, tiling
from fastft_jax.lora import LoRAConfig
from fastft_jax.model import attention_out_mlp, decoder_hidden, lm_head_weight
from pallas_kernels.cross_entropy import fused_linear_cross_entropy_reference

# max|diff| / max|ref|.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# The jnp references everywhere, so that autodiff also gives the base kernels' gradients.
REFERENCE = ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES})


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _fresh_seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def _assert_trees_close(got, want, dtype, seed, what):
    got_leaves, want_leaves = jax.tree.leaves_with_path(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for (path, g), w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, path, g.shape, g.dtype, w.shape, w.dtype)
        assert np.any(np.asarray(w, np.float32)), f"{what}{jax.tree_util.keystr(path)} is all zeros (seed {seed})"
        error = _relative_error(g, w)
        assert error <= TOLERANCE[dtype], f"{what}{jax.tree_util.keystr(path)}: relative error {error:.3g} (seed {seed})"


def _model_config(hidden: int, intermediate: int) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=hidden // 4, rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
        tie_word_embeddings=True, qkv_bias=False, qk_norm=False, max_position_embeddings=4096,
    )


def _random_layer(seed: int, config: ModelConfig, lora_config: LoRAConfig, dtype):
    """One layer's o_proj and MLP kernels, norm, and LoRA adapters with non-zero B (float32 masters)."""
    key = jax.random.PRNGKey(seed)
    layer, layer_lora = {}, {}
    for index, name in enumerate(("o_proj",) + MLP_PROJECTIONS):
        d_in, d_out = config.projection_shape(name)
        keys = jax.random.split(jax.random.fold_in(key, index), 3)
        layer[name] = {"kernel": (jax.random.normal(keys[0], (d_in, d_out)) / np.sqrt(d_in)).astype(dtype)}
        layer_lora[name] = {
            "lora_a": jax.random.normal(keys[1], (d_in, lora_config.r)) / np.sqrt(d_in),
            "lora_b": 0.05 * jax.random.normal(keys[2], (lora_config.r, d_out)),
        }
    layer["post_attn_norm"] = (1.0 + 0.1 * jax.random.normal(jax.random.fold_in(key, 99), (config.hidden_size,))).astype(dtype)
    return layer, layer_lora


@pytest.mark.parametrize(
    "batch, seq, tile_tokens, hidden, intermediate, dtype",
    [
        (1, 12, 4, 1536, 8960, jnp.float32),  # Qwen2.5-1.5B; 3 tiles, no padding
        (2, 7, 6, 1536, 8960, jnp.float32),  # tiles of 3 positions: the last one padded
        (3, 5, 2, 896, 4864, jnp.float32),  # Qwen2.5-0.5B; fewer tile tokens than rows: one position
        (2, 9, 8, 896, 4864, jnp.bfloat16),  # 3 tiles of 4 positions, padded
    ],
)
def test_layer_mlp_matches_untiled(batch, seq, tile_tokens, hidden, intermediate, dtype):
    """attention_out_mlp, tiled and not: the output and the gradients of hidden, attn, every kernel
    (as if the base were trained) and every LoRA factor."""
    seed = _fresh_seed()
    config = _model_config(hidden, intermediate)
    lora_config = LoRAConfig(r=8, alpha=16.0)
    layer, layer_lora = _random_layer(seed, config, lora_config, dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
    hidden_in = jax.random.normal(keys[0], (batch, seq, hidden)).astype(dtype)
    attn = jax.random.normal(keys[1], (batch, seq, config.num_heads, config.head_dim)).astype(dtype)
    cotangent = jax.random.normal(keys[2], (batch, seq, hidden)).astype(dtype)
    tiled_config = dataclasses.replace(REFERENCE, mlp_tile_tokens=tile_tokens)

    @jax.jit
    def run(hidden_in, attn, layer, layer_lora, cotangent):
        results = []
        for ops_config in (tiled_config, REFERENCE):
            out, vjp = jax.vjp(
                lambda *args: attention_out_mlp(*args, config, lora_config, ops_config), hidden_in, attn, layer, layer_lora
            )
            results.append((out, *vjp(cotangent)))
        return results

    got, want = run(hidden_in, attn, layer, layer_lora, cotangent)
    for name, g, w in zip(("out", "d_hidden", "d_attn", "d_layer", "d_lora"), got, want):
        _assert_trees_close(g, w, dtype, seed, name)


def _lora_mlp(weights, normed, rng, dropout=0.3):
    """SwiGLU with LoRA on every projection and, given an rng, dropout on the adapters' input."""

    def project(index, x):
        kernel, lora_a, lora_b = weights[index]
        x_for_lora = None
        if rng is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - dropout, x.shape)
            x_for_lora = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        return ops.lora_linear(x, kernel, lora_a, lora_b, 2.0, REFERENCE, x_for_lora)

    return project(2, ops.swiglu(project(0, normed), project(1, normed), REFERENCE))


def _random_mlp_weights(seed, hidden, intermediate, rank):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 9))
    weights = []
    for d_in, d_out in ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden)):
        weights.append((
            jax.random.normal(next(keys), (d_in, d_out)) / np.sqrt(d_in),
            jax.random.normal(next(keys), (d_in, rank)) / np.sqrt(d_in),
            0.05 * jax.random.normal(next(keys), (rank, d_out)),
        ))
    return weights


def test_dropout_masks_are_per_tile_and_recomputed_alike():
    """With dropout, tile i draws from fold_in(rng, i): the tiled MLP and its gradients equal the MLP
    run tile by tile in Python with those rngs, and two tiles holding the same tokens differ."""
    seed = _fresh_seed()
    batch, seq, hidden, intermediate, tile_tokens = 2, 7, 48, 200, 6
    weights = _random_mlp_weights(seed, hidden, intermediate, rank=4)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
    first_tile = jax.random.normal(keys[0], (batch, 3, hidden))
    normed = jnp.concatenate([first_tile, first_tile, first_tile[:, :1]], axis=1)  # tiles of 3 positions
    cotangent = jax.random.normal(keys[1], (batch, seq, hidden))
    rng = jax.random.key(seed, impl="rbg")  # compiles much faster on the CPU than threefry

    def tile_by_tile(weights, normed):
        num_tiles, positions = tiling.tile_plan(seq, batch, tile_tokens)
        padded = jnp.pad(normed, ((0, 0), (0, num_tiles * positions - seq), (0, 0)))
        outs = [
            _lora_mlp(weights, padded[:, i * positions:(i + 1) * positions], jax.random.fold_in(rng, i))
            for i in range(num_tiles)
        ]
        return jnp.concatenate(outs, axis=1)[:, :seq]

    @jax.jit
    def run(weights, normed):
        out, vjp = jax.vjp(lambda w, x: tiling.tiled_mlp(_lora_mlp, w, x, tile_tokens, rng), weights, normed)
        ref, ref_vjp = jax.vjp(tile_by_tile, weights, normed)
        return (out, *vjp(cotangent)), (ref, *ref_vjp(cotangent))

    got, want = run(weights, normed)
    assert tiling.tile_plan(seq, batch, tile_tokens) == (3, 3)
    for name, g, w in zip(("out", "d_weights", "d_normed"), got, want):
        _assert_trees_close(g, w, jnp.float32, seed, name)
    again = jax.jit(lambda w, x: tiling.tiled_mlp(_lora_mlp, w, x, tile_tokens, rng))(weights, normed)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got[0]))
    assert _relative_error(got[0][:, 3:6], got[0][:, :3]) > 1e-3, f"tiles 0 and 1 drew the same masks (seed {seed})"


@pytest.mark.parametrize("mode, load_in_4bit", [(False, False), (True, False), ("selective", False), (True, True)])
def test_tiny_model_loss_and_grads_match_untiled(tiny_checkpoints, mode, load_in_4bit):
    """The whole model, tiled MLP on and off: the loss and every LoRA gradient, under each
    checkpointing mode, and with 4-bit base kernels (integer leaves among the tiles' weights)."""
    seed = _fresh_seed()
    model, _ = FastLanguageModel.from_pretrained(
        tiny_checkpoints["qwen3"], dtype="float32", kernels=REFERENCE, load_in_4bit=load_in_4bit
    )
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, use_gradient_checkpointing=mode)
    rng = np.random.default_rng(seed)
    lora = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape, np.float32), model.lora_params())
    batch, seq = 2, 19
    input_ids = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, seq)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch * seq,)), jnp.int32)
    params = model.base_params()

    def loss(lora, ops_config):
        hidden = decoder_hidden(
            params, lora, input_ids, None, None, config=model.config, lora_config=model.lora_config,
            ops_config=ops_config, compute_dtype=jnp.float32, gradient_checkpointing=mode,
        )
        return ops.cross_entropy(hidden.reshape(batch * seq, -1), lm_head_weight(params, model.config), labels,
                                 batch * seq, ops_config)

    tiled_config = dataclasses.replace(REFERENCE, mlp_tile_tokens=8)  # 4 positions a tile: 5 tiles, padded
    tiled = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, tiled_config)
    untiled = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, REFERENCE)
    _assert_trees_close(tiled, untiled, jnp.float32, seed, f"mode {mode!r}: ")


def _mlp_temp_bytes(seq: int, tile_tokens: int, hidden: int, intermediate: int) -> int:
    config = _model_config(hidden, intermediate)
    lora_config = LoRAConfig(r=8)
    ops_config = dataclasses.replace(REFERENCE, mlp_tile_tokens=tile_tokens)
    layer, layer_lora = jax.eval_shape(lambda: _random_layer(0, config, lora_config, jnp.float32))
    hidden_in = jax.ShapeDtypeStruct((1, seq, hidden), jnp.float32)
    attn = jax.ShapeDtypeStruct((1, seq, config.num_heads, config.head_dim), jnp.float32)

    def loss(layer_lora, hidden_in, attn, layer):
        out = attention_out_mlp(hidden_in, attn, layer, layer_lora, config, lora_config, ops_config)
        return jnp.sum(out * out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(layer_lora, hidden_in, attn, layer).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_bounded_by_the_tile():
    """Compiled temp memory of a layer's forward+backward: untiled it grows by many [tokens,
    intermediate] activations with the sequence, tiled by a fraction of one (the [tokens, hidden]
    inputs and gradients)."""
    hidden, intermediate, tile = 64, 1024, 256
    short, long = 1024, 4096
    extra_activation = (long - short) * intermediate * 4
    tiled_growth = _mlp_temp_bytes(long, tile, hidden, intermediate) - _mlp_temp_bytes(short, tile, hidden, intermediate)
    untiled_growth = _mlp_temp_bytes(long, 0, hidden, intermediate) - _mlp_temp_bytes(short, 0, hidden, intermediate)
    assert untiled_growth >= extra_activation, (untiled_growth, extra_activation)
    assert tiled_growth <= 0.25 * extra_activation, (tiled_growth, extra_activation)


def test_mlp_tile_tokens_config():
    assert ops.OpsConfig(mlp_tile_tokens="auto").validated().mlp_tile_tokens == "auto"
    # The YAML's model.kernels mapping reaches OpsConfig through from_env.
    assert ops.OpsConfig.from_env(mlp_tile_tokens=8192).mlp_tile_tokens == 8192
    for bad in (-1, True, 1.5, "all"):
        with pytest.raises(ConfigError, match="mlp_tile_tokens"):
            ops.OpsConfig(mlp_tile_tokens=bad).validated()


def test_mlp_tile_for_rule():
    auto = ops.OpsConfig(mlp_tile_tokens="auto")
    # Llama-3-8B (intermediate 14336) in bfloat16: untiled through 37,449 tokens, then 9,362-token tiles.
    assert tiling.mlp_tile_for(8192, 14336, jnp.bfloat16, auto) == 0
    assert tiling.mlp_tile_for(37449, 14336, jnp.bfloat16, auto) == 0
    assert tiling.mlp_tile_for(300_000, 14336, jnp.bfloat16, auto) == 9362
    assert tiling.mlp_tile_for(300_000, 14336, jnp.float32, auto) == 4681
    assert tiling.mlp_tile_for(300_000, 14336, jnp.bfloat16, ops.OpsConfig(mlp_tile_tokens=0)) == 0
    # Under "unsloth" checkpointing tiling costs no matmul, so "auto" tiles from 2048 tokens (56 MiB) on.
    assert tiling.mlp_tile_for(2048, 14336, jnp.bfloat16, auto, "unsloth") == 0
    assert tiling.mlp_tile_for(4096, 14336, jnp.bfloat16, auto, "unsloth") == 2048
    assert tiling.mlp_tile_for(4096, 14336, jnp.bfloat16, auto, True) == 0
    assert tiling.mlp_tile_for(1000, 14336, jnp.bfloat16, ops.OpsConfig(mlp_tile_tokens=4096)) == 0
    assert tiling.mlp_tile_for(5000, 14336, jnp.bfloat16, ops.OpsConfig(mlp_tile_tokens=4096)) == 4096
    # Equal tiles, padding shorter than the tile count, never more tokens than asked.
    for seq, batch, tile_tokens in ((300_000, 1, 9362), (8191, 2, 1000), (17, 3, 2)):
        num_tiles, positions = tiling.tile_plan(seq, batch, tile_tokens)
        assert 0 <= num_tiles * positions - seq < num_tiles
        assert batch * positions <= max(tile_tokens, batch)


# The loss head chunked over tokens: test_cross_entropy.py checks the kernel file's impl="chunked"
# and impl="pallas" against full logits; this checks the ops seam's reference path (token chunks of
# OpsConfig.loss_chunk_tokens under jax.checkpoint), which the trainer runs on the CPU.
@pytest.mark.parametrize("n, chunk", [(13, 4), (16, 8), (5, 4096)])
def test_chunked_loss_head_matches_full_logits(n, chunk):
    seed = _fresh_seed()
    d, vocab = 896, 1000
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(keys[0], (n, d))
    w = 2.0 * jax.random.normal(keys[1], (d, vocab)) / np.sqrt(d)
    labels = jax.random.randint(keys[2], (n,), 0, vocab, jnp.int32).at[1].set(-100)
    normalizer = jnp.float32(n - 1)
    cotangent = jax.random.uniform(keys[3], (), jnp.float32, 0.5, 2.0)
    chunked_config = dataclasses.replace(REFERENCE, loss_chunk_tokens=chunk)

    @jax.jit
    def run(hidden, w):
        loss, vjp = jax.vjp(lambda h, w: ops.cross_entropy(h, w, labels, normalizer, chunked_config), hidden, w)
        ref, ref_vjp = jax.vjp(
            lambda h, w: fused_linear_cross_entropy_reference(h, w, labels, normalizer=normalizer), hidden, w
        )
        return (loss, *vjp(cotangent)), (ref, *ref_vjp(cotangent))

    got, want = run(hidden, w)
    for name, g, r in zip(("loss", "d_hidden", "d_w"), got, want):
        _assert_trees_close(g, r, jnp.float32, seed, name)

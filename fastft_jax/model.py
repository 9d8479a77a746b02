"""The Llama/Qwen decoder.

The math is a handful of plain functions over the stacked parameter tree (convert/hf.py documents
it), scanned over layers so that compile time does not grow with depth. `CausalLM` is the Flax NNX
module users hold: it owns the frozen base weights and the LoRA adapters as NNX variables and calls
these functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from convert.errors import ConfigError
from convert.hf import PROJECTIONS, ModelConfig
from convert.quant import is_quantized
from fastft_jax import ops, sharding, tiling
from fastft_jax.lora import LoRAConfig

# The name under which the "unsloth" checkpointing mode offloads each layer's input to host memory.
LAYER_INPUT = "layer_input"
# The name of the matmul outputs the backward needs (every projection but down_proj) and of
# attention's output: what the "selective" checkpointing mode keeps, so that the backward recomputes
# only norms, RoPE, SwiGLU and the rank-r x·A products, never a full matmul.
MATMUL_OUTPUT = "matmul_output"
# The name of one layer's weights as FSDP gathers them whole for the layer: never kept for the
# backward, which gathers them again.
LAYER_WEIGHTS = "layer_weights"
CHECKPOINT_MODES = (False, True, "unsloth", "selective")
# use_gradient_checkpointing="auto" (get_peft_model's default) is a request, not a mode the layers
# run: SFTTrainer resolves it to the fastest mode predicted to fit its memory limit
# (fastft_jax/plan.py, choose_checkpointing) before it builds its step. Until then it runs as full
# recomputation (True), the middle ground in speed and memory.
AUTO_CHECKPOINTING = "auto"
UNRESOLVED_AUTO_MODE = True
CHECKPOINT_SETTINGS = CHECKPOINT_MODES + (AUTO_CHECKPOINTING,)


class BaseWeight(nnx.Variable):
    """A frozen base-model weight: never trained, never in the optimiser state."""


def _dropout(x: Array, rate: float, rng: Array) -> Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _project(
    name: str,
    x: Array,
    layer: dict,
    layer_lora: dict | None,
    lora_config: LoRAConfig | None,
    ops_config: ops.OpsConfig,
    dropout_rng: Array | None,
) -> Array:
    weights = layer[name]
    adapter = (layer_lora or {}).get(name)
    if adapter is None:
        out = ops.linear(x, weights["kernel"], ops_config)
    else:
        x_for_lora = None
        if dropout_rng is not None and lora_config.dropout > 0:
            x_for_lora = _dropout(x, lora_config.dropout, jax.random.fold_in(dropout_rng, PROJECTIONS.index(name)))
        out = ops.lora_linear(
            x, weights["kernel"], adapter["lora_a"], adapter["lora_b"], lora_config.scale(name), ops_config, x_for_lora
        )
    if "bias" in weights:
        out = out + weights["bias"].astype(out.dtype)
    # down_proj's output only feeds the residual add, whose backward needs neither operand.
    return out if name == "down_proj" else checkpoint_name(out, MATMUL_OUTPUT)


def attention_qkv(
    hidden: Float[Array, "batch seq hidden"],
    layer: dict,
    layer_lora: dict | None,
    positions: Int[Array, "batch seq"],
    config: ModelConfig,
    lora_config: LoRAConfig | None,
    ops_config: ops.OpsConfig,
    dropout_rng: Array | None = None,
    project: Callable[[str, Array], Array] | None = None,
) -> tuple[Array, Array, Array]:
    """The layer up to attention: q and k (normed for qwen3, rotated) and v, [batch, seq, heads, head_dim].
    Split out so that generation can put k and v into its cache between the two halves. `project`
    (name, x) -> x @ W_name (+ adapter, bias) replaces `_project`: the decode step reads its weights
    from the stacked arrays in place."""
    batch, seq, _ = hidden.shape
    project = project or functools.partial(
        _project, layer=layer, layer_lora=layer_lora, lora_config=lora_config, ops_config=ops_config, dropout_rng=dropout_rng
    )
    normed = ops.rms_norm(hidden, layer["input_norm"], config.rms_norm_eps, ops_config)
    q = project("q_proj", normed).reshape(batch, seq, config.num_heads, config.head_dim)
    k = project("k_proj", normed).reshape(batch, seq, config.num_kv_heads, config.head_dim)
    v = project("v_proj", normed).reshape(batch, seq, config.num_kv_heads, config.head_dim)
    if config.qk_norm:
        q = ops.rms_norm(q, layer["q_norm"], config.rms_norm_eps, ops_config)
        k = ops.rms_norm(k, layer["k_norm"], config.rms_norm_eps, ops_config)
    return (*ops.rope_qk(q, k, positions, config.rope_theta, config.rope_scaling_dict, ops_config), v)


def attention_out_mlp(
    hidden: Float[Array, "batch seq hidden"],
    attn: Float[Array, "batch seq heads head_dim"],
    layer: dict,
    layer_lora: dict | None,
    config: ModelConfig,
    lora_config: LoRAConfig | None,
    ops_config: ops.OpsConfig,
    dropout_rng: Array | None = None,
    project: Callable[[str, Array], Array] | None = None,
) -> Float[Array, "batch seq hidden"]:
    """The layer after attention: output projection, residual, MLP, residual. `project` as in
    attention_qkv; with it the MLP runs untiled (a decode step's few rows)."""
    batch, seq, _ = hidden.shape
    custom_project = project
    project = project or functools.partial(
        _project, layer=layer, layer_lora=layer_lora, lora_config=lora_config, ops_config=ops_config, dropout_rng=dropout_rng
    )
    hidden = hidden + project("o_proj", attn.reshape(batch, seq, config.num_heads * config.head_dim))
    normed = ops.rms_norm(hidden, layer["post_attn_norm"], config.rms_norm_eps, ops_config)
    if custom_project is not None:
        return hidden + project("down_proj", ops.swiglu(project("gate_proj", normed), project("up_proj", normed), ops_config))
    # Tiled over the sequence (fastft_jax/tiling.py), the MLP never holds [tokens, intermediate]
    # for the whole batch. Its weights go in as an argument, so that their gradients sum over tiles.
    mlp_names = ("gate_proj", "up_proj", "down_proj")
    mlp_weights = (
        {name: layer[name] for name in mlp_names},
        {name: adapter for name, adapter in (layer_lora or {}).items() if name in mlp_names},
    )

    def mlp(weights, normed, mlp_rng):
        mlp_project = functools.partial(
            _project, layer=weights[0], layer_lora=weights[1], lora_config=lora_config, ops_config=ops_config,
            dropout_rng=mlp_rng,
        )
        gated = ops.swiglu(mlp_project("gate_proj", normed), mlp_project("up_proj", normed), ops_config)
        return mlp_project("down_proj", gated)

    tile_tokens = tiling.mlp_tile_for(batch * seq, config.intermediate_size, normed.dtype, ops_config)
    return hidden + tiling.tiled_mlp(mlp, mlp_weights, normed, tile_tokens, dropout_rng)


def decoder_layer(
    hidden: Float[Array, "batch seq hidden"],
    layer: dict,
    layer_lora: dict | None,
    positions: Int[Array, "batch seq"],
    segment_ids: Int[Array, "batch seq"] | None,
    config: ModelConfig,
    lora_config: LoRAConfig | None,
    ops_config: ops.OpsConfig,
    dropout_rng: Array | None,
) -> Float[Array, "batch seq hidden"]:
    hidden = checkpoint_name(hidden, LAYER_INPUT)
    q, k, v = attention_qkv(hidden, layer, layer_lora, positions, config, lora_config, ops_config, dropout_rng)
    attn = checkpoint_name(ops.attention(q, k, v, segment_ids, ops_config), MATMUL_OUTPUT)
    return attention_out_mlp(hidden, attn, layer, layer_lora, config, lora_config, ops_config, dropout_rng)


def embed_tokens(params: dict, input_ids: Int[Array, "batch seq"], compute_dtype: Any) -> Float[Array, "batch seq hidden"]:
    return jnp.take(params["embed"], input_ids, axis=0).astype(compute_dtype)


def validate_checkpoint_setting(setting: Any, where: str = "use_gradient_checkpointing") -> bool | str:
    """A user's use_gradient_checkpointing: one of CHECKPOINT_SETTINGS, else a ConfigError that lists them."""
    if setting not in CHECKPOINT_SETTINGS:
        raise ConfigError(
            f"{where}={setting!r}; use \"auto\" (the default: the fastest mode that fits the memory limit), False, "
            "True, \"unsloth\" (layer inputs offloaded to host) or \"selective\" (matmul outputs kept, the rest "
            "recomputed)"
        )
    return setting


def layer_checkpoint_mode(setting: bool | str) -> bool | str:
    """The mode the layers run for a setting: "auto" not yet resolved by a trainer runs as
    UNRESOLVED_AUTO_MODE (full recomputation); a mode is itself."""
    return UNRESOLVED_AUTO_MODE if setting == AUTO_CHECKPOINTING else setting


def _checkpoint_policy(mode):
    if mode == "selective":
        return jax.checkpoint_policies.save_only_these_names(MATMUL_OUTPUT)
    if mode == "unsloth":
        if not has_pinned_host():
            warnings.warn(
                'use_gradient_checkpointing="unsloth" offloads layer inputs to pinned host memory, which this '
                "backend lacks; keeping them on the device instead",
                stacklevel=3,
            )
            return jax.checkpoint_policies.save_only_these_names(LAYER_INPUT)
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device",
            offload_dst="pinned_host",
        )
    return jax.checkpoint_policies.nothing_saveable


def _keep_all_but_gathered_weights(primitive, *_, **params) -> bool:
    """The checkpoint policy of FSDP without recomputation: the backward keeps every value it would
    keep without jax.checkpoint except one layer's gathered weights (the whole model on every
    device, over the layers), which it gathers again from the shards. The all-gather's output is
    left out too: saving it is saving the same weights under another name."""
    if primitive.name == "all_gather":
        return False
    return not (primitive.name == "name" and params.get("name") == LAYER_WEIGHTS)


def _backward_after_its_cotangent(body):
    """A checkpointed scan body whose backward (recomputation included) waits for its output's
    cotangent: the same vjp, tied to the cotangent by an optimization barrier.

    Unrolled layers are one straight-line program, where nothing keeps XLA from replaying a layer's
    forward early, in the forward pass, which keeps what the checkpoint was to drop (a Llama-3-8B
    "selective" step on an H200 needed 22.5 GiB of temporaries unrolled, 12.6 in the scan). On the
    CPU with a sequential scheduler, the tie takes a small Llama's unrolled "selective" step from
    2,776 to 2,364 MiB (the scan: 777); on the H200 the 8B step's peak from 37.9 to 33.6 GiB, and its
    speed from 16,522 to 15,022 tok/s, so it is kernels.unrolled_backward="tied", not the default."""

    @jax.custom_vjp
    def layer(hidden, per_layer):
        return body(hidden, per_layer)[0]

    def layer_fwd(hidden, per_layer):
        return jax.vjp(lambda h, p: body(h, p)[0], hidden, per_layer)

    def layer_bwd(vjp_fn, cotangent):
        residuals, treedef = jax.tree.flatten(vjp_fn)
        residuals, cotangent = jax.lax.optimization_barrier((residuals, cotangent))
        return jax.tree.unflatten(treedef, residuals)(cotangent)

    layer.defvjp(layer_fwd, layer_bwd)
    return lambda hidden, per_layer: (layer(hidden, per_layer), None)


def _any_quantized(layers: dict) -> bool:
    return any(is_quantized(leaf) for leaf in jax.tree.leaves(layers, is_leaf=is_quantized))


def _without_kernels(layers: dict) -> dict:
    """The stacked layer weights without the projections' kernels (norms, biases: what the scan slices)."""
    return {name: ({key: value for key, value in weights.items() if key != "kernel"} if isinstance(weights, dict)
                   else weights) for name, weights in layers.items()}


@functools.cache
def has_pinned_host() -> bool:
    try:
        return any(memory.kind == "pinned_host" for memory in jax.devices()[0].addressable_memories())
    except (AttributeError, NotImplementedError):  # runtimes without the memories API
        return False


def decoder_hidden(
    params: dict,
    lora_params: dict | None,
    input_ids: Int[Array, "batch seq"],
    positions: Int[Array, "batch seq"] | None,
    segment_ids: Int[Array, "batch seq"] | None,
    *,
    config: ModelConfig,
    lora_config: LoRAConfig | None,
    ops_config: ops.OpsConfig,
    compute_dtype: Any,
    gradient_checkpointing: bool | str = False,
    dropout_rng: Array | None = None,
) -> Float[Array, "batch seq hidden"]:
    """Embeddings, every decoder layer (scanned) and the final norm."""
    if gradient_checkpointing not in CHECKPOINT_MODES:
        raise ValueError(f"gradient_checkpointing={gradient_checkpointing!r} is not a mode the layers run "
                         f"({CHECKPOINT_MODES}); resolve \"auto\" first (layer_checkpoint_mode, or SFTTrainer)")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    hidden = embed_tokens(params, input_ids, compute_dtype)
    layers_lora = (lora_params or {}).get("layers")
    if ops_config.mlp_tile_tokens == "auto":  # "auto" depends on the checkpointing mode: settle it here
        ops_config = dataclasses.replace(ops_config, mlp_tile_tokens=tiling.mlp_tile_for(
            input_ids.size, config.intermediate_size, compute_dtype, ops_config, gradient_checkpointing))
    if dropout_rng is not None:
        layer_rngs = jax.random.split(dropout_rng, config.num_layers)
    else:
        layer_rngs = None

    def run_layer(hidden, layer, layer_lora, positions, segment_ids, layer_rng):
        return decoder_layer(hidden, layer, layer_lora, positions, segment_ids, config, lora_config, ops_config, layer_rng)

    fsdp = sharding.weights_sharded_in_context()
    if fsdp:
        # FSDP: every device runs the whole layer on its own rows (Pallas kernels included, which
        # XLA cannot split), and gathers the layer's weights from their shards as it starts it:
        # one layer's weights at a time, inside the loop (sharding.batch_local says why XLA's own
        # gather copied every stacked shard).
        specs = {1: sharding.layer_slice_specs(params["layers"], "layers")}
        if layers_lora is not None:
            specs[2] = sharding.layer_slice_specs(layers_lora, "layers")
        run_layer = sharding.batch_local(run_layer, (True, False, False, True, True, False), rng_arg=5,
                                         sharded_specs=specs, gathered_name=LAYER_WEIGHTS)

    layers = params["layers"]
    kernel_stacks = None
    if ops_config.layer_matmul_mode() != "slice" and not fsdp and not _any_quantized(layers):
        # The projection kernels stay whole (closed over), and each layer reads its own in place:
        # the scan slices only the norms and biases, and hands the layer its index.
        kernel_stacks = {name: weights["kernel"] for name, weights in layers.items()
                         if isinstance(weights, dict) and "kernel" in weights}
        layers = (_without_kernels(layers), jnp.arange(config.num_layers, dtype=jnp.int32))

    def body(hidden, per_layer):
        layer, layer_lora, layer_rng = per_layer
        if kernel_stacks is not None:
            layer, index = layer
            layer = {name: dict(weights, kernel=ops.StackedKernel(kernel_stacks[name], index))
                     if name in kernel_stacks else weights for name, weights in layer.items()}
        return run_layer(hidden, layer, layer_lora, positions, segment_ids, layer_rng), None

    unroll = ops_config.scan_unroll(config.num_layers)
    if gradient_checkpointing:
        body = jax.checkpoint(body, policy=_checkpoint_policy(gradient_checkpointing), prevent_cse=False)
    elif fsdp:
        body = jax.checkpoint(body, policy=_keep_all_but_gathered_weights, prevent_cse=False)
    if unroll > 1 and (gradient_checkpointing or fsdp) and ops_config.unrolled_backward == "tied":
        body = _backward_after_its_cotangent(body)
    hidden, _ = jax.lax.scan(body, hidden, (layers, layers_lora, layer_rngs), unroll=unroll)
    return ops.rms_norm(hidden, params["final_norm"], config.rms_norm_eps, ops_config)


def lm_head_weight(params: dict, config: ModelConfig) -> Float[Array, "hidden vocab"]:
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(params: dict, hidden: Array, config: ModelConfig) -> Float[Array, "batch seq vocab"]:
    return jnp.dot(hidden, lm_head_weight(params, config).astype(hidden.dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "lora_config", "ops_config", "compute_dtype"))
def _forward_logits(params, lora_params, input_ids, positions, segment_ids, *, config, lora_config, ops_config, compute_dtype):
    hidden = decoder_hidden(
        params, lora_params, input_ids, positions, segment_ids,
        config=config, lora_config=lora_config, ops_config=ops_config, compute_dtype=compute_dtype,
    )
    return logits_from_hidden(params, hidden, config)


def variable_values(tree: Any) -> Any:
    """The raw arrays of a tree of NNX variables."""
    return jax.tree.map(lambda variable: variable[...], tree, is_leaf=lambda node: isinstance(node, nnx.Variable))


class CausalLM(nnx.Module):
    """A Llama/Qwen causal LM with optional LoRA adapters. Call it on int32 token ids."""

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        *,
        dtype: Any,
        max_seq_length: int,
        source_dir: str | None = None,
        ops_config: ops.OpsConfig | None = None,
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.max_seq_length = max_seq_length
        self.source_dir = source_dir
        self.ops_config = ops_config or ops.OpsConfig.from_env()
        self.base = nnx.data(jax.tree.map(BaseWeight, params))
        self.lora = nnx.data(None)
        self.lora_config: LoRAConfig | None = None
        self.gradient_checkpointing: bool | str = False
        self.training = True

    # -- parameters ------------------------------------------------------------------------------
    def base_params(self) -> dict:
        return variable_values(self.base)

    def lora_params(self) -> dict | None:
        return None if self.lora is None else variable_values(self.lora)

    def set_lora_params(self, lora_params: dict) -> None:
        """Write trained adapter values back into the module (trainer.train() updates in place)."""
        jax.tree.map(
            lambda variable, value: variable.set_value(value) if hasattr(variable, "set_value") else setattr(variable, "value", value),
            self.lora, lora_params, is_leaf=lambda node: isinstance(node, nnx.Variable),
        )

    def attach_lora(self, lora_config: LoRAConfig, lora_params: dict) -> None:
        self.lora_config = lora_config
        self.lora = nnx.data(jax.tree.map(nnx.LoRAParam, lora_params))

    # -- forward -----------------------------------------------------------------------------------
    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be int32 [batch, seq], got shape {input_ids.shape}")
        return _forward_logits(
            self.base_params(), self.lora_params(), input_ids,
            None if positions is None else jnp.asarray(positions, jnp.int32),
            None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
            config=self.config, lora_config=self.lora_config, ops_config=self.ops_config, compute_dtype=self.dtype,
        )

    # -- export (PEFT adapter, merged HF checkpoint, GGUF): fastft_jax/export.py -------------------
    def save_pretrained(self, save_directory, overwrite: bool = False, **_ignored):
        """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        from fastft_jax import export

        return export.save_pretrained(self, save_directory, overwrite=overwrite)

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit",
                               max_shard_size: str = "5GB", overwrite: bool = False):
        """W + scale·(A·B) in float32, cast to the model's dtype, as an HF checkpoint."""
        from fastft_jax import export

        return export.save_pretrained_merged(self, save_directory, tokenizer, save_method, max_shard_size, overwrite)

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method: str = "f16",
                             overwrite: bool = False):
        from fastft_jax import export

        return export.save_pretrained_gguf(self, save_directory, tokenizer, quantization_method, overwrite)

    def load_adapter(self, adapter_dir):
        from fastft_jax import export

        return export.load_adapter(self, adapter_dir)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """KV-cache generation, as transformers' generate (fastft_jax/generate.py)."""
        from fastft_jax.generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters, counting a quantized kernel by its weights, not its bytes."""
        tree = self.lora_params() if trainable_only else (self.base_params(), self.lora_params())
        return sum(
            math.prod(leaf.leading_shape) * leaf.num_elements if is_quantized(leaf) else int(leaf.size)
            for leaf in jax.tree.leaves(tree, is_leaf=is_quantized)
        )

    def print_trainable_parameters(self) -> None:
        trainable = self.num_parameters(trainable_only=True)
        total = self.num_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")


def random_params(config: ModelConfig, seed: int, dtype: Any) -> dict:
    """Seeded random weights of the config's shapes (benchmarks and self-checks; no file needed).
    Norm weights sit near 1 and projections at 1/sqrt(fan_in), so activations stay O(1)."""
    from convert.hf import tensor_specs

    tree: dict = {}
    key = jax.random.PRNGKey(seed)
    for index, spec in enumerate(tensor_specs(config)):
        shape = ((config.num_layers,) if spec.stacked else ()) + spec.shape
        draw = jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)
        if spec.path[-1].endswith("norm"):
            leaf = 1.0 + 0.1 * draw
        elif spec.path[-1] == "bias":
            leaf = 0.02 * draw
        elif spec.path == ("embed",):
            # 1/sqrt(hidden) rather than 1: with tied embeddings this matrix is also the head, and
            # unit entries would give logits of std sqrt(hidden) (a first loss near 400, not ln V).
            leaf = draw / jnp.sqrt(spec.shape[-1])
        else:
            leaf = draw / jnp.sqrt(spec.shape[0])
        node = tree
        for part in spec.path[:-1]:
            node = node.setdefault(part, {})
        node[spec.path[-1]] = leaf.astype(dtype)
    return tree

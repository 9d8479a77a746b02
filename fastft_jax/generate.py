"""KV-cache generation for a CausalLM, as transformers' generate does it, and a streaming CLI.

    python -m fastft_jax.generate --model DIR [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--chat]

The prompt goes through the decoder once (prefill, on the training attention path) and each
layer's rotated keys and values land in a preallocated cache [layers, batch, cache_len, kv_heads,
head_dim]. Then one token per step for the whole batch: the new token's query attends to the
cached keys, its own K/V are written into the cache in place. `generate` runs every step inside
one jit (a lax.while_loop that stops once every row has met EOS); `stream_generate` runs the same
step as a jitted function from a Python loop, so the caller sees each token as it comes.

Batches are left-padded (attention_mask 0 on the left), as transformers expects for decoder-only
models: every row's next token then goes into the same cache slot. A row's positions are
cumsum(attention_mask) - 1, and padding slots carry key segment id 0, so no query sees them. The
prompt is left-padded further to a multiple of PROMPT_MULTIPLE columns, so that prompts of nearby
lengths (the turns of a chat) share one compiled program; the padding never shows in the output.

The layer halves are model.py's attention_qkv and attention_out_mlp, whose projections go through `_project`, so un-merged LoRA adapters apply on the fly and
whatever base weights `_project` understands (16-bit or quantized) work unchanged. One exception, in
the decode step only: when the op seam picks the Pallas "decode_matmul" and the seven projections are
plain 16-bit arrays, the scan runs over layer indices and each projection reads its layer's tiles
from the stacked [layers, in, out] kernel in place (pallas_kernels/stacked_matmul.py). Sliced out of
the stack instead, each weight would be copied before the matmul reads it: three times the bytes a
decode step exists to read once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from convert.errors import ConfigError, FastFTError
from convert.hf import PROJECTIONS, ModelConfig
from convert.quant import is_quantized
from fastft_jax import ops
from fastft_jax.lora import LoRAConfig
from fastft_jax.model import (
    CausalLM,
    attention_out_mlp,
    attention_qkv,
    embed_tokens,
    logits_from_hidden,
)
from pallas_kernels.stacked_matmul import stacked_lora_matmul, stacked_matmul, stacked_matmul_group

# A decode step works on [batch, 1] rows: XLA's fusion of the references is what a matrix-vector
# step wants, where the Pallas kernels are tiled for training-length sequences. (Its attention is
# decode_attention below.)
_DECODE_REFERENCE_OPS = ("rms_norm", "rope", "swiglu", "lora_linear")
PROMPT_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Greedy (argmax) unless do_sample; then HF's warpers in HF's
    order: temperature, top-k, top-p (nucleus), and a draw from the seeded key."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validated(self) -> Sampling:
        if not self.do_sample:
            return self
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature!r} must be > 0 when sampling; use do_sample=False for greedy")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r} must be an integer >= 0 (0 turns top-k off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1] (1 turns nucleus sampling off)")
        return self


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the jitted prefill and decode step know at trace time."""

    config: ModelConfig
    lora_config: LoRAConfig | None
    prefill_ops: ops.OpsConfig
    decode_ops: ops.OpsConfig
    compute_dtype: Any
    sampling: Sampling
    max_new_tokens: int
    has_padding: bool


class DecodeState(NamedTuple):
    """Everything that changes from one decode step to the next."""

    tokens: Int[Array, "batch total"]  # prompt, then the generated ids (pad once a row has stopped)
    k_cache: Float[Array, "layers batch cache kv_heads head_dim"]
    v_cache: Float[Array, "layers batch cache kv_heads head_dim"]
    prompt_mask: Int[Array, "batch cache"]  # the attention mask over the prompt slots, 1 beyond them
    prompt_lengths: Int[Array, " batch"]  # real (unpadded) prompt tokens per row
    generated: Int[Array, ""]  # tokens generated so far
    finished: Bool[Array, " batch"]
    rng: Array
    eos_ids: Int[Array, " eos"]  # traced, not static, so that the EOS choice does not recompile
    pad_id: Int[Array, ""]


# -- the layer, split at the KV cache -------------------------------------------------------------
def _last_logits(params: dict, hidden: Array, static: _Static, ops_config: ops.OpsConfig) -> Float[Array, "batch vocab"]:
    last = ops.rms_norm(hidden[:, -1:], params["final_norm"], static.config.rms_norm_eps, ops_config)
    return logits_from_hidden(params, last, static.config)[:, 0]


def decode_attention(
    q: Float[Array, "batch 1 heads_q head_dim"],
    k_cache: Float[Array, "batch cache heads_kv head_dim"],
    v_cache: Float[Array, "batch cache heads_kv head_dim"],
    key_segment_ids: Int[Array, "batch cache"],
) -> Float[Array, "batch 1 heads_q head_dim"]:
    """One query per row against the cache; slots with segment id 0 (padding, not yet written) are
    masked. Every row sees at least its own new key, so no row is empty. The matmuls read the cache
    in its own dtype with float32 accumulation (pallas_kernels' attention_reference would first copy
    the cache to float32, several times the bytes of the step's cache read); the probabilities go
    into the second matmul in the cache's dtype, as transformers' eager attention does."""
    batch, _, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    q_grouped = q.reshape(batch, heads_kv, heads_q // heads_kv, head_dim)
    logits = jnp.einsum("bhgd,bkhd->bhgk", q_grouped, k_cache, preferred_element_type=jnp.float32)
    logits = jnp.where(key_segment_ids[:, None, None, :] != 0, logits * head_dim**-0.5, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bhgk,bkhd->bhgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(batch, 1, heads_q, head_dim).astype(q.dtype)


# -- the decode step's layer on stacked kernels -------------------------------------------------------
def _stacked_kernels(params: dict, static: _Static) -> dict[str, Array] | None:
    """The seven projections' [layers, in, out] kernels, when the decode step multiplies by them in
    place: "decode_matmul" resolves to the Pallas kernel and every projection is a plain 16-bit array.
    None keeps the sliced path (the reference; 4-bit and float32 bases)."""
    if static.decode_ops.resolve("decode_matmul") != "pallas":
        return None
    kernels = {name: params["layers"][name]["kernel"] for name in PROJECTIONS}
    if any(is_quantized(kernel) or kernel.dtype not in (jnp.bfloat16, jnp.float16) for kernel in kernels.values()):
        return None
    return kernels


def _project_stacked(
    name: str, x: Array, layer: dict, layer_lora: dict | None, index: Int[Array, ""], kernels: dict[str, Array],
    lora_config: LoRAConfig | None,
) -> Array:
    """model._project at decode time, with the kernel read from its stack at layer `index`; the same
    roundings as ops.linear and lora_linear_reference (the decode step's lora_linear)."""
    adapter = (layer_lora or {}).get(name)
    if adapter is None:
        out = stacked_matmul(x, kernels[name], index)
    else:
        out = stacked_lora_matmul(x, kernels[name], index, adapter["lora_a"], adapter["lora_b"], lora_config.scale(name))
    if "bias" in layer[name]:
        out = out + layer[name]["bias"].astype(out.dtype)
    return out


# Projections that read the same x, multiplied in one launch of the stacked kernel when
# GROUPED_PROJECTIONS is on: q/k/v and gate/up make a decode layer four launches instead of seven.
# On: batch-1 llama3-8b decode on an H200 went 186 -> 208 tok/s (67 -> 75 % of the bandwidth bound),
# 201 -> 214 with the layers unrolled (bench/decode.py --grouped 0,1, fifth session).
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GROUPED_PROJECTIONS = True


class _GroupedProjector:
    """A decode layer's `project` (model.attention_qkv's hook) that computes a whole group the first
    time one of its projections is asked for with a given x, and answers the others from that."""

    def __init__(self, layer: dict, layer_lora: dict | None, index: Array, kernels: dict[str, Array],
                 lora_config: LoRAConfig | None):
        self.layer, self.layer_lora, self.index, self.kernels, self.lora_config = layer, layer_lora, index, kernels, lora_config
        self.done: dict[str, tuple[Array, Array]] = {}  # name -> (x it was computed from, result)

    def __call__(self, name: str, x: Array) -> Array:
        if name in self.done and self.done[name][0] is x:
            return self.done[name][1]
        group = next((group for group in PROJECTION_GROUPS if name in group), None)
        if group is None:
            return _project_stacked(name, x, self.layer, self.layer_lora, self.index, self.kernels, self.lora_config)
        adapters = []
        for member in group:
            adapter = (self.layer_lora or {}).get(member)
            adapters.append(None if adapter is None else
                            (adapter["lora_a"], adapter["lora_b"], self.lora_config.scale(member)))
        outs = stacked_matmul_group(x, [self.kernels[member] for member in group], self.index, adapters=adapters)
        for member, out in zip(group, outs):
            if "bias" in self.layer[member]:
                out = out + self.layer[member]["bias"].astype(out.dtype)
            self.done[member] = (x, out)
        return self.done[name][1]


# -- choosing the next token ------------------------------------------------------------------------
def filtered_logits(logits: Float[Array, "batch vocab"], sampling: Sampling) -> Float[Array, "batch vocab"]:
    """HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, in that order: removed
    tokens get -inf. Top-p keeps the smallest set of most likely tokens whose probability reaches
    top_p (HF: sort ascending, drop while the cumulative probability is <= 1 - top_p), and always
    the most likely token."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth_largest = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ascending = jnp.sort(logits, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        dropped = (cumulative <= 1.0 - sampling.top_p).at[:, -1].set(False)
        # The kept tokens are a suffix of the ascending order: the threshold is its first logit.
        threshold = jnp.take_along_axis(ascending, jnp.sum(dropped, axis=-1, keepdims=True), axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _next_tokens(logits: Float[Array, "batch vocab"], key: Array, sampling: Sampling) -> Int[Array, " batch"]:
    if not sampling.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, sampling), axis=-1).astype(jnp.int32)


def _append(state: DecodeState, logits: Array, static: _Static) -> DecodeState:
    """Choose and record one token per row. As in transformers, a finished row gets the pad id and a
    row finishes on the step it emits an EOS id."""
    prompt_len = state.tokens.shape[1] - static.max_new_tokens
    tokens = _next_tokens(logits, jax.random.fold_in(state.rng, state.generated), static.sampling)
    tokens = jnp.where(state.finished, state.pad_id, tokens)
    finished = state.finished | jnp.isin(tokens, state.eos_ids)
    written = jax.lax.dynamic_update_slice(state.tokens, tokens[:, None], (0, prompt_len + state.generated))
    return state._replace(tokens=written, generated=state.generated + 1, finished=finished)


# -- prefill and decode ---------------------------------------------------------------------------
def _prefill(
    params: dict,
    lora_params: dict | None,
    input_ids: Int[Array, "batch prompt"],
    attention_mask: Int[Array, "batch prompt"],
    seed: Int[Array, ""],
    eos_ids: Int[Array, " eos"],
    pad_id: Int[Array, ""],
    static: _Static,
) -> DecodeState:
    """Run the prompt through the decoder on the training path, filling the cache, and choose the first
    new token."""
    config = static.config
    batch, prompt_len = input_ids.shape
    cache_len = prompt_len + static.max_new_tokens - 1  # the last new token is never fed back
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    segment_ids = attention_mask if static.has_padding else None
    cache_shape = (config.num_layers, batch, cache_len, config.num_kv_heads, config.head_dim)
    k_cache = jnp.zeros(cache_shape, static.compute_dtype)
    v_cache = jnp.zeros(cache_shape, static.compute_dtype)
    layers_lora = (lora_params or {}).get("layers")

    def body(carry, per_layer):
        hidden, k_cache, v_cache = carry
        layer, layer_lora, index = per_layer
        q, k, v = attention_qkv(hidden, layer, layer_lora, positions, config, static.lora_config, static.prefill_ops)
        attn = ops.attention(q, k, v, segment_ids, static.prefill_ops)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (index, 0, 0, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (index, 0, 0, 0, 0))
        hidden = attention_out_mlp(hidden, attn, layer, layer_lora, config, static.lora_config, static.prefill_ops)
        return (hidden, k_cache, v_cache), None

    layer_index = jnp.arange(config.num_layers, dtype=jnp.int32)
    hidden = embed_tokens(params, input_ids, static.compute_dtype)
    (hidden, k_cache, v_cache), _ = jax.lax.scan(
        body, (hidden, k_cache, v_cache), (params["layers"], layers_lora, layer_index)
    )
    tokens = jnp.concatenate([input_ids, jnp.full((batch, static.max_new_tokens), pad_id, jnp.int32)], axis=1)
    state = DecodeState(
        tokens=tokens,
        k_cache=k_cache,
        v_cache=v_cache,
        prompt_mask=jnp.pad(attention_mask, ((0, 0), (0, cache_len - prompt_len)), constant_values=1),
        prompt_lengths=jnp.sum(attention_mask, axis=1).astype(jnp.int32),
        generated=jnp.zeros((), jnp.int32),
        finished=jnp.zeros((batch,), bool),
        rng=jax.random.PRNGKey(seed),
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    return _append(state, _last_logits(params, hidden, static, static.prefill_ops), static)


def _decode_step(params: dict, lora_params: dict | None, state: DecodeState, static: _Static) -> DecodeState:
    """Feed the last chosen token of every row, write its K/V into the cache, choose the next one."""
    config = static.config
    prompt_len = state.tokens.shape[1] - static.max_new_tokens
    slot = prompt_len + state.generated - 1  # the fed token's column in tokens and its cache slot
    fed = jax.lax.dynamic_slice_in_dim(state.tokens, slot, 1, axis=1)
    positions = (state.prompt_lengths + state.generated - 1)[:, None]
    cache_len = state.k_cache.shape[2]
    visible = (jnp.arange(cache_len) <= slot)[None, :]
    key_segment_ids = jnp.where(visible, state.prompt_mask, 0)
    layers_lora = (lora_params or {}).get("layers")
    kernels = _stacked_kernels(params, static)
    layers = params["layers"]
    if kernels is not None:  # the scan slices the norms and biases; the projections read their stacks
        layers = {key: {part: value for part, value in weights.items() if part != "kernel"} if key in kernels else weights
                  for key, weights in layers.items()}

    def body(carry, per_layer):
        hidden, k_cache, v_cache = carry
        layer, layer_lora, index = per_layer
        if kernels is None:
            project = None
        elif GROUPED_PROJECTIONS:
            project = _GroupedProjector(layer, layer_lora, index, kernels, static.lora_config)
        else:
            project = functools.partial(_project_stacked, layer=layer, layer_lora=layer_lora, index=index,
                                        kernels=kernels, lora_config=static.lora_config)
        q, k, v = attention_qkv(hidden, layer, layer_lora, positions, config, static.lora_config, static.decode_ops,
                                project=project)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (index, 0, slot, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (index, 0, slot, 0, 0))
        attn = decode_attention(q, k_cache[index], v_cache[index], key_segment_ids)
        hidden = attention_out_mlp(hidden, attn, layer, layer_lora, config, static.lora_config, static.decode_ops,
                                   project=project)
        return (hidden, k_cache, v_cache), None

    layer_index = jnp.arange(config.num_layers, dtype=jnp.int32)
    hidden = embed_tokens(params, fed, static.compute_dtype)
    # kernels.layer_unroll 0 (what "auto" picks on a GPU) makes the step straight-line code: static
    # layer indices, no device loop between the layers' kernels (bench/decode.py --layer-unroll).
    (hidden, k_cache, v_cache), _ = jax.lax.scan(
        body, (hidden, state.k_cache, state.v_cache), (layers, layers_lora, layer_index),
        unroll=static.decode_ops.scan_unroll(config.num_layers, decode=True),
    )
    state = state._replace(k_cache=k_cache, v_cache=v_cache)
    return _append(state, _last_logits(params, hidden, static, static.decode_ops), static)


def _should_continue(state: DecodeState, static: _Static) -> Array:
    return (state.generated < static.max_new_tokens) & ~jnp.all(state.finished)


@functools.partial(jax.jit, static_argnames=("static",))
def _generate_jit(params, lora_params, input_ids, attention_mask, seed, eos_ids, pad_id, *, static: _Static):
    state = _prefill(params, lora_params, input_ids, attention_mask, seed, eos_ids, pad_id, static)
    state = jax.lax.while_loop(
        functools.partial(_should_continue, static=static),
        lambda state: _decode_step(params, lora_params, state, static),
        state,
    )
    return state.tokens, state.generated


_prefill_jit = jax.jit(_prefill, static_argnames=("static",))
_decode_step_jit = jax.jit(_decode_step, static_argnames=("static",), donate_argnames=("state",))


# -- the public functions ----------------------------------------------------------------------------
def merged_model(model: CausalLM) -> CausalLM:
    """A CausalLM without adapters whose kernels are W + scale·(A·B), computed in float32 one layer
    at a time and cast to the kernel's dtype. It holds a second copy of every adapted kernel."""
    if model.lora is None:
        return model
    params = model.base_params()
    lora_params = model.lora_params()
    layers = dict(params["layers"])
    for name, adapter in lora_params["layers"].items():
        weights = dict(layers[name])
        if is_quantized(weights["kernel"]):
            raise ConfigError(
                f"merge_lora=True needs 16-bit base weights, but {name} is {weights['kernel'].kind}-quantized "
                "(merging would mean re-quantizing, which changes the fine-tune); generate with merge_lora=False, "
                "the adapter then applies on the fly"
            )
        weights["kernel"] = _merge_kernel(weights["kernel"], adapter["lora_a"], adapter["lora_b"],
                                          model.lora_config.scale(name))
        layers[name] = weights
    merged = CausalLM(model.config, dict(params, layers=layers), dtype=model.dtype, max_seq_length=model.max_seq_length,
                      source_dir=model.source_dir, ops_config=model.ops_config)
    merged.training = model.training
    return merged


@functools.partial(jax.jit, static_argnames=("scale",))
def _merge_kernel(kernel, lora_a, lora_b, scale):
    def one_layer(per_layer):
        layer_kernel, layer_a, layer_b = per_layer
        delta = jnp.dot(layer_a.astype(jnp.float32), layer_b.astype(jnp.float32))
        return (layer_kernel.astype(jnp.float32) + scale * delta).astype(layer_kernel.dtype)

    return jax.lax.map(one_layer, (kernel, lora_a, lora_b))


def _generation_config(model: CausalLM) -> dict:
    if model.source_dir is None:
        return {}
    path = Path(model.source_dir) / "generation_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(item) for item in value)


def resolve_special_ids(model: CausalLM, eos_token_id: Any = None, pad_token_id: int | None = None) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) as transformers resolves them: the arguments, else generation_config.json
    beside the checkpoint, else config.json; pad falls back to the first EOS id, then to 0."""
    stored = _generation_config(model)
    eos_ids = _id_tuple(eos_token_id)
    if eos_token_id is None:
        eos_ids = _id_tuple(stored.get("eos_token_id", model.config.eos_token_id))
    if pad_token_id is None:
        pad_token_id = stored.get("pad_token_id", model.config.pad_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad_token_id)


def _prepared_inputs(
    model: CausalLM, input_ids: Any, attention_mask: Any, max_new_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validated int32 ids and mask, [batch, prompt], on the host; every check before any work."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ConfigError(f"input_ids must be int [batch, prompt_len], got shape {ids.shape}")
    if ids.size == 0:
        raise ConfigError(f"the prompt is empty (input_ids of shape {ids.shape}); give at least one token per row")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= model.config.vocab_size:
        raise ConfigError(
            f"input_ids hold ids in [{ids.min()}, {ids.max()}], outside the vocabulary [0, {model.config.vocab_size})"
        )
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match")
        if not np.isin(mask, (0, 1)).all():
            raise ConfigError("attention_mask must hold only 0 (padding) and 1 (token)")
        mask = mask.astype(np.int32)
    if not mask.any(axis=1).all():
        empty = int(np.flatnonzero(~mask.any(axis=1))[0])
        raise ConfigError(f"the prompt of row {empty} is empty (its attention_mask is all 0); give every row a token")
    if (np.diff(mask, axis=1) < 0).any():
        raise ConfigError(
            "attention_mask has padding on the right; generation needs left padding "
            "(tokenizer.padding_side = 'left') so that every row continues from its last column"
        )
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    prompt_len = ids.shape[1]
    if prompt_len + max_new_tokens > model.max_seq_length:
        room = model.max_seq_length - prompt_len
        fix = (f"lower max_new_tokens to at most {room}" if room > 0 else "shorten the prompt")
        raise ConfigError(
            f"prompt_len {prompt_len} + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} exceeds the "
            f"model's max_seq_length {model.max_seq_length}; {fix}, or load the model with "
            f"max_seq_length >= {prompt_len + max_new_tokens}"
        )
    return ids.astype(np.int32), mask


class _Prepared(NamedTuple):
    model: CausalLM
    arrays: tuple  # input_ids, attention_mask, seed, eos_ids, pad_id: the jitted functions' array arguments
    static: _Static
    added_columns: int  # padding put on the left of the caller's prompt


def _setup(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_p, top_k,
           eos_token_id, pad_token_id, merge_lora, seed) -> _Prepared:
    ids, mask = _prepared_inputs(model, input_ids, attention_mask, max_new_tokens)
    sampling = Sampling(bool(do_sample), float(temperature), int(top_k), float(top_p)).validated()
    if not sampling.do_sample:
        sampling = Sampling()  # temperature and friends do not change an argmax: one compile for greedy
    eos_ids, pad_id = resolve_special_ids(model, eos_token_id, pad_token_id)
    added_columns = -ids.shape[1] % PROMPT_MULTIPLE
    ids = np.pad(ids, ((0, 0), (added_columns, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (added_columns, 0)))
    if merge_lora:
        model = merged_model(model)
    decode_ops = dataclasses.replace(model.ops_config, **{name: "reference" for name in _DECODE_REFERENCE_OPS})
    static = _Static(
        config=model.config, lora_config=model.lora_config if model.lora is not None else None,
        prefill_ops=model.ops_config, decode_ops=decode_ops, compute_dtype=jnp.dtype(model.dtype), sampling=sampling,
        max_new_tokens=int(max_new_tokens), has_padding=not bool(mask.all()),
    )
    arrays = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seed, jnp.uint32), jnp.asarray(eos_ids, jnp.int32),
              jnp.asarray(pad_id, jnp.int32))
    return _Prepared(model, arrays, static, added_columns)


def generate(
    model: CausalLM,
    input_ids: Int[Any, "batch prompt"],
    attention_mask: Int[Any, "batch prompt"] | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    *,
    pad_token_id: int | None = None,
    merge_lora: bool = False,
) -> Int[np.ndarray, "batch total"]:
    """Greedy or sampled continuations of left-padded prompts, as transformers' generate returns them:
    int32 [batch, prompt_len + generated], where generated stops at max_new_tokens or at the step on
    which the last row emitted an EOS id; rows that stopped earlier are padded with the pad id.

    eos_token_id (an id or a list; [] turns stopping off) and pad_token_id default to the checkpoint's
    generation_config.json.
    merge_lora=True merges the adapters into a copy of the adapted kernels first; by default they
    apply on the fly."""
    prepared = _setup(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_p, top_k,
                      eos_token_id, pad_token_id, merge_lora, seed)
    tokens, generated = _generate_jit(prepared.model.base_params(), prepared.model.lora_params(), *prepared.arrays,
                                      static=prepared.static)
    width = prepared.arrays[0].shape[1]
    return np.asarray(tokens)[:, prepared.added_columns: width + int(generated)]


def stream_generate(
    model: CausalLM,
    input_ids: Int[Any, "batch prompt"],
    attention_mask: Int[Any, "batch prompt"] | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    *,
    pad_token_id: int | None = None,
    merge_lora: bool = False,
) -> Iterator[Int[np.ndarray, " batch"]]:
    """The tokens `generate` would return, one column (int32 [batch]) per step as soon as it is chosen.
    The same prefill and decode step, driven from Python instead of a while_loop."""
    prepared = _setup(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_p, top_k,
                      eos_token_id, pad_token_id, merge_lora, seed)
    params, lora_params = prepared.model.base_params(), prepared.model.lora_params()
    state = _prefill_jit(params, lora_params, *prepared.arrays, static=prepared.static)
    width = prepared.arrays[0].shape[1]
    while True:
        yield np.asarray(state.tokens[:, width + int(state.generated) - 1])
        if not bool(_should_continue(state, prepared.static)):
            return
        state = _decode_step_jit(params, lora_params, state, static=prepared.static)


# -- command line ------------------------------------------------------------------------------------
class _TextStream:
    """Print the text of a growing token list as it comes: decode everything so far and print what
    is new, holding back a trailing partial UTF-8 character (decoded as U+FFFD) until it completes."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> str:
        """Print what is still held back and a newline; return the whole text."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
        return text


def _stream_reply(model, tokenizer, prompt_ids: list[int], args, eos_ids: tuple[int, ...]) -> str:
    room = model.max_seq_length - len(prompt_ids)
    if room < 1:
        raise ConfigError(
            f"the conversation is {len(prompt_ids)} tokens, max_seq_length is {model.max_seq_length}; "
            "start a new chat or pass a larger --max-seq-length"
        )
    stream = _TextStream(tokenizer)
    for column in stream_generate(
        model, np.asarray([prompt_ids], np.int32), max_new_tokens=min(args.max_new_tokens, room),
        do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, merge_lora=False,
    ):
        token = int(column[0])
        if token in eos_ids:
            break
        stream.push(token)
    return stream.finish()


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The rendered template carries its own BOS where the family wants one.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _checkpoint_max_positions(model_dir: str) -> int:
    """max_position_embeddings of the checkpoint (of the adapter's base for an adapter directory), so
    that the CLI's default length never turns on RoPE scaling."""
    from convert.hf import read_config_json
    from fastft_jax.export import resolve_base_path

    directory = Path(model_dir).expanduser()
    if (directory / "adapter_config.json").is_file():
        directory = resolve_base_path(directory)
    return int(read_config_json(directory).get("max_position_embeddings", 2048))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastft_jax.generate",
        description="Generate from a (fine-tuned) checkpoint with a KV cache; tokens stream to the terminal.",
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory (or a PEFT adapter directory)")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory to apply to --model")
    parser.add_argument("--prompt", help="the prompt (with --chat: the first user message)")
    parser.add_argument("--chat", action="store_true",
                        help="interactive chat with the tokenizer's chat template; an empty line or EOF ends it")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy; > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge-lora", action="store_true", help="merge the adapter into the weights once")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on GPUs)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="prompt + reply limit (default: the checkpoint's max_position_embeddings)")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature {args.temperature} must be >= 0 (0 is greedy)")
    if not args.chat and not (args.prompt or "").strip():
        parser.error("--prompt is empty; give the text to continue, or pass --chat")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty; leave it out with --chat to start from your first message")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from fastft_jax.api import FastLanguageModel

    try:
        max_seq_length = args.max_seq_length or _checkpoint_max_positions(args.model)
        model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=max_seq_length,
                                                             dtype=args.dtype)
        if args.adapter:
            model.load_adapter(args.adapter)
        FastLanguageModel.for_inference(model)
        if args.merge_lora:
            model = merged_model(model)
        eos_ids, _ = resolve_special_ids(model)
        if not args.chat:
            prompt_ids = tokenizer(args.prompt)["input_ids"]
            sys.stdout.write(args.prompt)
            _stream_reply(model, tokenizer, prompt_ids, args, eos_ids)
            return 0
        messages: list[dict[str, str]] = []
        message = args.prompt
        while True:
            if message is None:
                try:
                    message = input("> ")
                except EOFError:
                    message = ""
            if not message.strip():
                return 0
            messages.append({"role": "user", "content": message})
            reply = _stream_reply(model, tokenizer, _chat_ids(tokenizer, messages), args, eos_ids)
            messages.append({"role": "assistant", "content": reply})
            message = None
    except FastFTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

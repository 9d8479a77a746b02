"""HF Llama/Qwen checkpoints: config.json -> ModelConfig, and HF tensor names <-> the project's
parameter tree.

The parameter tree stacks every decoder layer on a leading axis so that the model can scan over
layers:

    embed            [vocab, hidden]
    layers/input_norm, post_attn_norm        [layers, hidden]
    layers/{q,k,v,o,gate,up,down}_proj/kernel [layers, in, out]   (HF stores [out, in])
    layers/{q,k,v}_proj/bias                  [layers, out]       (qwen2)
    layers/q_norm, k_norm                     [layers, head_dim]  (qwen3)
    final_norm       [hidden]
    lm_head          [hidden, vocab]          (absent when the embeddings are tied)

Like penzai's converter, anything in config.json that would change the math and is not handled
here is refused, so a model is never silently converted wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from convert.errors import CheckpointError, UnsupportedModelError
from convert.safetensors_io import CheckpointReader

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # The HF rope_scaling dict as sorted (key, value) pairs, so the config stays hashable for jit.
    rope_scaling: tuple[tuple[str, Any], ...] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in, out) of a projection, in the x @ kernel orientation."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }[name]

    def with_rope_scaling(self, rope_scaling: dict[str, Any] | None) -> "ModelConfig":
        frozen = tuple(sorted(rope_scaling.items())) if rope_scaling else None
        return dataclasses.replace(self, rope_scaling=frozen)


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; model_name must be a local HF checkpoint directory")
    if not path.exists():
        raise CheckpointError(f"{path} is missing; a checkpoint directory needs the config.json that HF writes")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def _rope_settings(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """Transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params and scaling is None and "rope_type" in params:
        scaling = params
    theta = hf.get("rope_theta", (params or {}).get("rope_theta", 10000.0))
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"{where}: rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type == "default":
            return float(theta), None
        required = {"linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for key in required[rope_type]:
            if key not in scaling:
                raise CheckpointError(f"{where}: rope scaling {rope_type!r} needs the key {key!r}")
        if float(scaling.get("attention_factor", 1.0) or 1.0) != 1.0:
            raise UnsupportedModelError(f"{where}: rope attention_factor != 1 is not supported")
        kept = {key: scaling[key] for key in required[rope_type]}
        kept["rope_type"] = rope_type
        return float(theta), kept
    return float(theta), None


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Validate an HF config dict and build the ModelConfig. Refuses what would change the math."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is")
    if hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{where}: use_sliding_window is true; sliding-window attention is not supported")
    layer_types = hf.get("layer_types")
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedModelError(f"{where}: layer_types {sorted(set(layer_types))} include non-full attention layers")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{where}: mlp_bias true is not supported")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise UnsupportedModelError(f"{where}: attention_bias true is not supported for {model_type}")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{where}: partial_rotary_factor != 1 is not supported")
    if hf.get("quantization_config"):
        from convert.quant import bnb_quantization

        bnb_quantization(hf, where)  # refuses every quantization but bitsandbytes NF4
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {hf.get(key)!r}")
    num_heads = hf["num_attention_heads"]
    num_kv_heads = hf.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    theta, scaling = _rope_settings(hf, where)
    eos = hf.get("eos_token_id")
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One entry of the tree: its path, its HF name (with {layer} for stacked ones), its shape in the
    tree, and whether HF stores it transposed."""

    path: tuple[str, ...]
    hf_name: str
    shape: tuple[int, ...]
    transpose: bool = False
    stacked: bool = False


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    c = config
    prefix = "model.layers.{layer}."
    specs = [TensorSpec(("embed",), "model.embed_tokens.weight", (c.vocab_size, c.hidden_size))]
    specs.append(TensorSpec(("layers", "input_norm"), prefix + "input_layernorm.weight", (c.hidden_size,), stacked=True))
    specs.append(TensorSpec(("layers", "post_attn_norm"), prefix + "post_attention_layernorm.weight", (c.hidden_size,), stacked=True))
    for name in PROJECTIONS:
        module = "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"
        d_in, d_out = c.projection_shape(name)
        specs.append(TensorSpec(("layers", name, "kernel"), prefix + f"{module}.{name}.weight", (d_in, d_out), transpose=True, stacked=True))
        if c.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            specs.append(TensorSpec(("layers", name, "bias"), prefix + f"{module}.{name}.bias", (d_out,), stacked=True))
    if c.qk_norm:
        specs.append(TensorSpec(("layers", "q_norm"), prefix + "self_attn.q_norm.weight", (c.head_dim,), stacked=True))
        specs.append(TensorSpec(("layers", "k_norm"), prefix + "self_attn.k_norm.weight", (c.head_dim,), stacked=True))
    specs.append(TensorSpec(("final_norm",), "model.norm.weight", (c.hidden_size,)))
    if not c.tie_word_embeddings:
        specs.append(TensorSpec(("lm_head",), "lm_head.weight", (c.hidden_size, c.vocab_size), transpose=True))
    return specs


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_hf_params(
    directory: str | os.PathLike,
    config: ModelConfig,
    dtype: np.dtype,
    place: Callable[[np.ndarray], Any] = lambda array: array,
    progress: Callable[[Iterator], Iterator] = lambda it: it,
    quantize: str | None = None,
) -> dict:
    """Read the checkpoint tensor by tensor into the stacked tree, cast to dtype. Each finished leaf
    goes through place (e.g. a device put) at once, so the host holds at most one stacked leaf.

    quantize ("nf4" or "int8", convert/quant.py) turns the projection kernels into QuantizedKernels,
    one layer at a time after place, so the device never holds a 16-bit stack. Kernels that the
    checkpoint holds pre-quantized by bitsandbytes (NF4) are kept as written when quantize is
    "nf4", and dequantized to dtype when quantize is None."""
    from convert import quant

    if quantize is not None and quantize not in quant.KINDS:
        raise ValueError(f"quantize={quantize!r} is not one of {', '.join(quant.KINDS)}")
    tree: dict = {}
    with CheckpointReader(directory) as reader:
        specs = tensor_specs(config)
        check_checkpoint_tensors(reader, specs, config, directory)
        for spec in progress(specs):
            layer_count = config.num_layers if spec.stacked else 1
            first_name = spec.hf_name.format(layer=0)
            if spec.path[-1] == "kernel" and quant.bnb_quant_state_name(reader, first_name) is not None:
                kernel = quant.stack_layers([
                    quant.read_bnb_nf4(reader, spec.hf_name.format(layer=layer), str(directory))
                    for layer in range(layer_count)
                ])
                if quantize == "int8":
                    raise CheckpointError(
                        f"{directory}: the checkpoint is pre-quantized to 4-bit NF4; load it with load_in_4bit=True "
                        "(or without quantization), not load_in_8bit"
                    )
                if quantize is None:
                    kernel = np.asarray(quant.dequantized_tree(kernel, dtype))
                if quantize is None:
                    _set_path(tree, spec.path, place(kernel))
                else:
                    import jax

                    _set_path(tree, spec.path, jax.tree.map(place, kernel))
                continue
            stacked = np.empty(((layer_count,) if spec.stacked else ()) + spec.shape, dtype=dtype)
            for layer in range(layer_count):
                tensor = reader.get(spec.hf_name.format(layer=layer))
                target = stacked[layer] if spec.stacked else stacked
                target[...] = (tensor.T if spec.transpose else tensor).astype(dtype)
                del tensor
            if quantize is not None and spec.path[-1] == "kernel":
                _set_path(tree, spec.path, quant.quantize_stacked(stacked, quantize, place))
            else:
                _set_path(tree, spec.path, place(stacked))
    return tree


def check_checkpoint_tensors(reader: CheckpointReader, specs: list[TensorSpec], config: ModelConfig, directory) -> None:
    """Every expected tensor present with the shape config.json implies, and nothing unexpected,
    checked from the file headers alone before any weight is read."""
    from convert import quant

    expected = set()
    for spec in specs:
        for layer in range(config.num_layers if spec.stacked else 1):
            name = spec.hf_name.format(layer=layer)
            expected.add(name)
            if name not in reader:
                raise CheckpointError(f"{directory}: tensor {name!r} is missing from the checkpoint")
            want = tuple(reversed(spec.shape)) if spec.transpose else spec.shape
            if spec.path[-1] == "kernel" and quant.bnb_quant_state_name(reader, name) is not None:
                expected.update(quant.bnb_tensor_names(reader, name))
                state = quant.read_bnb_quant_state(reader, name, str(directory))
                if tuple(state.get("shape") or ()) != want:
                    raise CheckpointError(
                        f"{directory}: the quant_state of {name!r} has shape {state.get('shape')}, but config.json "
                        f"implies {list(want)}"
                    )
                continue
            hf_shape = reader.shape(name)
            if hf_shape != want:
                raise CheckpointError(
                    f"{directory}: tensor {name!r} has shape {list(hf_shape)}, but config.json implies {list(want)}"
                )
    unused = [name for name in reader.keys() if name not in expected and not name.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    if unused:
        raise CheckpointError(
            f"{directory}: the checkpoint holds tensors this {config.model_type} config does not use, "
            f"e.g. {unused[:3]}; the config and the weights disagree"
        )


def hf_tensors_from_tree(tree: dict, config: ModelConfig, to_numpy: Callable[[Any], np.ndarray] = np.asarray) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of load_hf_params: (HF name, HF-oriented array) pairs, one layer at a time."""
    for spec in tensor_specs(config):
        leaf = get_path(tree, spec.path)
        for layer in range(config.num_layers if spec.stacked else 1):
            array = to_numpy(leaf[layer] if spec.stacked else leaf)
            yield spec.hf_name.format(layer=layer), np.ascontiguousarray(array.T if spec.transpose else array)

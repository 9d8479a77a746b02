"""PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors <-> the project's LoRA tree.

PEFT keeps one pair of torch-oriented matrices per layer and projection,

    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight   [out, r]

and computes lora_B(lora_A(x)) * scale. The tree stacks the layers in the x @ kernel orientation,
layers/<projection>/lora_a [L, in, r] and lora_b [L, r, out], so lora_a[N] = lora_A.T and
lora_b[N] = lora_B.T. The scale is lora_alpha / r, or lora_alpha / sqrt(r) with rslora, where r and
lora_alpha may be overridden per module by rank_pattern / alpha_pattern.

Because the tree stacks layers, every projection has one rank and one alpha across all layers: an
adapter whose patterns, target_modules or layers_to_transform differ between layers is refused with
a message that says so, never loaded approximately.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.errors import CheckpointError, UnsupportedModelError
from convert.hf import ATTENTION_PROJECTIONS, PROJECTIONS, ModelConfig
from convert.safetensors_io import SafetensorsFile, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TORCH_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# Every key peft 0.21 writes for a LoRA adapter, at its default (peft_version is left out: peft fills
# in its own). Writing them all lets peft load the file without "missing key" surprises and keeps
# the file byte-comparable with peft's own.
PEFT_LORA_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

# layers.N.<module>.<projection>.lora_A[.<adapter name>].weight, after the optional
# "base_model.model." and "model." prefixes that different PEFT versions and callers leave on.
_KEY_PATTERN = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.([^.]+))?\.weight$"
)


def module_of(name: str) -> str:
    return "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"


def module_key(name: str, layer: int) -> str:
    """The module's name inside transformers' *ForCausalLM, which PEFT matches its patterns against."""
    return f"model.layers.{layer}.{module_of(name)}.{name}"


def peft_tensor_name(name: str, layer: int, factor: str) -> str:
    return f"{KEY_PREFIX}{module_key(name, layer)}.lora_{factor}.weight"


def _plain_number(value: float) -> int | float:
    """16.0 -> 16, as peft writes what users pass (usually ints); 0.5 stays 0.5."""
    value = float(value)
    return int(value) if value.is_integer() else value


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_peft_adapter(
    directory: str | os.PathLike,
    lora_tree: Mapping[str, Any],
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: tuple[str, ...] | list[str],
    use_rslora: bool,
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = (),
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = (),
    base_model_name_or_path: str | None,
    overwrite: bool = False,
    dtype: Any = np.float32,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors in PEFT's format into directory.

    Other files in the directory (a tokenizer saved there first, as Unsloth's notebooks do) are left
    alone; existing adapter files are only replaced with overwrite=True. Each file is written to a
    temporary name and renamed, the config last, so a directory holding adapter_config.json always
    holds the matching weights.
    """
    directory = Path(directory)
    layers = dict(lora_tree.get("layers", {}))
    targets = tuple(name for name in PROJECTIONS if name in target_modules)
    if set(targets) != set(target_modules) or set(layers) != set(targets):
        raise CheckpointError(
            f"the LoRA tree holds adapters for {sorted(layers)} but target_modules is {sorted(target_modules)}; "
            f"both must name the same projections out of {', '.join(PROJECTIONS)}"
        )
    rank_pattern = {name: int(rank) for name, rank in dict(rank_pattern).items() if name in targets}
    alpha_pattern = {name: _plain_number(alpha) for name, alpha in dict(alpha_pattern).items() if name in targets}

    tensors: dict[str, np.ndarray] = {}
    for name in targets:
        lora_a = np.asarray(layers[name]["lora_a"])
        lora_b = np.asarray(layers[name]["lora_b"])
        rank = rank_pattern.get(name, r)
        if lora_a.ndim != 3 or lora_b.ndim != 3 or lora_a.shape[2] != rank or lora_b.shape[1] != rank \
                or lora_a.shape[0] != lora_b.shape[0]:
            raise CheckpointError(
                f"LoRA adapter {name}: lora_a {list(lora_a.shape)} and lora_b {list(lora_b.shape)} are not "
                f"[layers, in, {rank}] and [layers, {rank}, out] for rank {rank}"
            )
        for layer in range(lora_a.shape[0]):
            tensors[peft_tensor_name(name, layer, "A")] = np.ascontiguousarray(lora_a[layer].T.astype(dtype))
            tensors[peft_tensor_name(name, layer, "B")] = np.ascontiguousarray(lora_b[layer].T.astype(dtype))

    config = dict(PEFT_LORA_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path,
        r=int(r),
        lora_alpha=_plain_number(lora_alpha),
        lora_dropout=float(lora_dropout),
        target_modules=sorted(targets),
        use_rslora=bool(use_rslora),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )

    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (directory / name).exists()]
    if existing and not overwrite:
        raise CheckpointError(
            f"{directory} already holds {', '.join(existing)}; choose another directory or pass overwrite=True"
        )
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    _write_text_atomic(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; point at a directory holding {CONFIG_NAME}")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """peft.utils.other.get_pattern_key: the first pattern that matches the end of the module name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def _is_targeted(config: Mapping[str, Any], key: str, layer: int) -> bool:
    """peft's check_target_module_exists for one module name, as far as plain LoRA uses it."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, key):
            return False
    elif exclude and (key in exclude or any(key.endswith(f".{name}") for name in exclude)):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        found = targets == "all-linear" or re.fullmatch(targets, key) is not None
    else:
        found = key in targets or any(key.endswith(f".{name}") for name in targets)
    layers_to_transform = config.get("layers_to_transform")
    if found and layers_to_transform is not None and layers_to_transform != []:
        if isinstance(layers_to_transform, int):
            layers_to_transform = [layers_to_transform]
        found = layer in layers_to_transform
    return found


def _per_projection(values: list, what: str, name: str, where: str) -> Any:
    if any(value != values[0] for value in values):
        raise UnsupportedModelError(
            f"{where}: {what} gives {name} different values across layers ({values}); fastft-jax stacks the "
            "layers and needs one value per projection; re-export the adapter with module-level settings"
        )
    return values[0]


def _resolve_targets(config: Mapping[str, Any], model_config: ModelConfig, where: str) -> tuple[str, ...]:
    targets = config.get("target_modules")
    if not targets:
        raise CheckpointError(f"{where}: target_modules is empty; the adapter adapts nothing")
    if not isinstance(targets, (str, list, tuple)):
        raise CheckpointError(f"{where}: target_modules must be a list of module names or a regex, got {targets!r}")
    all_keys = [module_key(name, layer) for name in PROJECTIONS for layer in range(model_config.num_layers)]
    others = ("lm_head", "model.embed_tokens")
    if isinstance(targets, str):
        try:
            unknown = [] if targets == "all-linear" else [key for key in others if re.fullmatch(targets, key)]
        except re.error as err:
            raise CheckpointError(f"{where}: target_modules regex {targets!r} is invalid: {err}") from err
    else:
        unknown = [
            target for target in targets
            if not any(key == target or key.endswith(f".{target}") for key in all_keys)
        ]
    if unknown:
        raise CheckpointError(
            f"{where}: unknown target module(s) {unknown}; fastft-jax adapts only {', '.join(PROJECTIONS)}"
        )
    resolved = []
    for name in PROJECTIONS:
        hits = [_is_targeted(config, module_key(name, layer), layer) for layer in range(model_config.num_layers)]
        if _per_projection(hits, "target_modules / layers_to_transform / exclude_modules", name, where):
            resolved.append(name)
    if not resolved:
        raise CheckpointError(f"{where}: target_modules {targets!r} match none of {', '.join(PROJECTIONS)}")
    return tuple(resolved)


def adapter_settings(config: Mapping[str, Any], model_config: ModelConfig, where: str = CONFIG_NAME) -> dict[str, Any]:
    """Validate an adapter_config.json dict against the base and resolve it to one rank and alpha per
    projection. Returns r, lora_alpha, lora_dropout, target_modules, use_rslora, rank_pattern,
    alpha_pattern (plain projection names) and base_model_name_or_path."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; only LORA is")
    refused = {
        "use_dora": "DoRA (use_dora)",
        "lora_bias": "trained LoRA biases (lora_bias)",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "trainable_token_indices": "trainable tokens (trainable_token_indices)",
        "layer_replication": "layer_replication",
        "target_parameters": "target_parameters",
        "use_qalora": "QA-LoRA (use_qalora)",
        "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    }
    for key, what in refused.items():
        if config.get(key):
            raise UnsupportedModelError(f"{where}: the adapter uses {what}, which fastft-jax does not implement")
    if config.get("bias", "none") != "none":
        raise UnsupportedModelError(f"{where}: bias={config['bias']!r} is not supported; only 'none'")
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise CheckpointError(f"{where}: r must be a positive integer, got {rank!r}")
    alpha = float(config.get("lora_alpha", 8))
    targets = _resolve_targets(config, model_config, where)

    patterns: dict[str, dict[str, Any]] = {}
    for field, default in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        table = config.get(field) or {}
        if not isinstance(table, dict):
            raise CheckpointError(f"{where}: {field} must be an object, got {table!r}")
        resolved: dict[str, Any] = {}
        for name in targets:
            try:
                keys = [_pattern_key(table, module_key(name, layer)) for layer in range(model_config.num_layers)]
            except re.error as err:
                raise CheckpointError(f"{where}: a {field} key is not a valid regex: {err}") from err
            values = [default if key is None else table[key] for key in keys]
            value = _per_projection(values, field, name, where)
            if any(key is not None for key in keys):
                resolved[name] = value
        patterns[field] = resolved
    for name, value in patterns["rank_pattern"].items():
        if not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{where}: rank_pattern gives {name} the rank {value!r}; ranks are positive integers")
    return {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(config.get("lora_dropout", 0.0) or 0.0),
        "target_modules": targets,
        "use_rslora": bool(config.get("use_rslora", False)),
        "rank_pattern": {name: int(value) for name, value in patterns["rank_pattern"].items()},
        "alpha_pattern": {name: float(value) for name, value in patterns["alpha_pattern"].items()},
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }


def lora_rank(settings: Mapping[str, Any], name: str) -> int:
    return settings["rank_pattern"].get(name, settings["r"])


def lora_scales(settings: Mapping[str, Any]) -> dict[str, float]:
    """PEFT's scaling per projection: alpha / r, or alpha / sqrt(r) with rslora (fastft_jax's
    LoRAConfig.scale computes the same from the same fields)."""
    scales = {}
    for name in settings["target_modules"]:
        rank = lora_rank(settings, name)
        alpha = settings["alpha_pattern"].get(name, settings["lora_alpha"])
        scales[name] = alpha / math.sqrt(rank) if settings["use_rslora"] else alpha / rank
    return scales


def load_peft_adapter(directory: str | os.PathLike, model_config: ModelConfig) -> tuple[dict[str, Any], dict]:
    """Read a PEFT LoRA adapter made for the base that model_config describes.

    Returns (settings, lora_tree): settings as adapter_settings returns them, and the stacked tree
    {"layers": {projection: {"lora_a": [L, in, r], "lora_b": [L, r, out]}}} as float32 numpy.
    """
    directory = Path(directory)
    settings = adapter_settings(read_adapter_config(directory), model_config, str(directory / CONFIG_NAME))
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        if (directory / TORCH_WEIGHTS_NAME).is_file():
            raise CheckpointError(
                f"{directory} holds {TORCH_WEIGHTS_NAME}, a pickled torch file, which fastft-jax does not read; "
                f"convert it to {WEIGHTS_NAME} (load it with peft and call save_pretrained(..., "
                "safe_serialization=True))"
            )
        raise CheckpointError(f"{weights_path} is missing; a PEFT adapter directory holds {WEIGHTS_NAME}")

    base_name = settings["base_model_name_or_path"]
    made_for = f" (adapter_config.json names the base {base_name!r})" if base_name else ""
    weights = SafetensorsFile(weights_path)
    try:
        found: dict[tuple[str, int, str], str] = {}
        adapter_names = set()
        for key in weights.keys():
            match = _KEY_PATTERN.match(key)
            if match is None:
                raise CheckpointError(
                    f"{weights_path}: tensor {key!r} is not a LoRA factor of a decoder projection; fastft-jax "
                    f"loads lora_A/lora_B of {', '.join(PROJECTIONS)} only"
                )
            layer, module, name, factor, adapter_name = match.groups()
            if name not in PROJECTIONS or module != module_of(name):
                raise CheckpointError(
                    f"{weights_path}: tensor {key!r} adapts the unknown target module {module}.{name}; "
                    f"fastft-jax adapts only {', '.join(PROJECTIONS)}"
                )
            if name not in settings["target_modules"]:
                raise CheckpointError(
                    f"{weights_path}: tensor {key!r} adapts {name}, which target_modules in {CONFIG_NAME} "
                    f"does not name ({', '.join(settings['target_modules'])})"
                )
            if int(layer) >= model_config.num_layers:
                raise CheckpointError(
                    f"{weights_path}: tensor {key!r} is for layer {layer}, but the base model has "
                    f"{model_config.num_layers} layers; this adapter was made for another base{made_for}"
                )
            adapter_names.add(adapter_name)
            slot = (name, int(layer), factor)
            if slot in found:
                raise CheckpointError(f"{weights_path}: tensors {found[slot]!r} and {key!r} hold the same factor")
            found[slot] = key
        if len(adapter_names) > 1:
            raise CheckpointError(
                f"{weights_path} holds several adapters ({sorted(str(n) for n in adapter_names)}); save one at a time"
            )

        tree: dict[str, dict] = {}
        for name in settings["target_modules"]:
            d_in, d_out = model_config.projection_shape(name)
            rank = lora_rank(settings, name)
            lora_a = np.empty((model_config.num_layers, d_in, rank), np.float32)
            lora_b = np.empty((model_config.num_layers, rank, d_out), np.float32)
            for layer in range(model_config.num_layers):
                for factor, expected, target in (("A", (rank, d_in), lora_a), ("B", (d_out, rank), lora_b)):
                    key = found.get((name, layer, factor))
                    if key is None:
                        raise CheckpointError(
                            f"{weights_path}: tensor {peft_tensor_name(name, layer, factor)!r} is missing; "
                            f"target_modules names {name}, so every layer needs its lora_{factor}"
                        )
                    shape = weights.shape(key)
                    if shape != expected:
                        raise CheckpointError(
                            f"{weights_path}: tensor {key!r} has shape {list(shape)}, but the base model "
                            f"({model_config.model_type}, {model_config.num_layers} layers, hidden "
                            f"{model_config.hidden_size}) with rank {rank} needs {list(expected)}; this adapter "
                            f"was made for another base{made_for}"
                        )
                    target[layer] = weights.get(key).T.astype(np.float32)
            tree[name] = {"lora_a": lora_a, "lora_b": lora_b}
    finally:
        weights.close()
    return settings, {"layers": tree}

"""Leaving fastft-jax: PEFT adapters, merged HF checkpoints and GGUF files from a CausalLM, and
adapters loaded back onto one. The formats live in convert/ (peft.py, merge.py, gguf.py); this
module only connects them to the model (CausalLM's save_pretrained, save_pretrained_merged,
save_pretrained_gguf and load_adapter, and FastLanguageModel.from_pretrained on an adapter
directory)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convert.errors import CheckpointError, ConfigError
from convert.gguf import SUPPORTED_TYPES as GGUF_TYPES
from convert.gguf import convert_to_gguf, tensor_types
from convert.hf import read_config_json
from convert.merge import copy_tokenizer_files, merge_lora, save_merged_checkpoint
from convert.peft import CONFIG_NAME, load_peft_adapter, read_adapter_config, save_peft_adapter
from convert.quant import dequantized_view
from convert.safetensors_io import AtomicDirectory
from fastft_jax.lora import LoRAConfig, lora_from_numpy

if TYPE_CHECKING:  # model.py may import this module for its save_* methods
    from fastft_jax.model import CausalLM

SAVE_METHODS = ("merged_16bit", "lora")


def _require_lora(model: CausalLM, what: str) -> tuple[LoRAConfig, dict]:
    if model.lora is None or model.lora_config is None:
        raise ConfigError(f"{what} needs LoRA adapters; call FastLanguageModel.get_peft_model(model, ...) first")
    return model.lora_config, model.lora_params()


def _require_source(model: CausalLM, what: str) -> Path:
    if not model.source_dir:
        raise CheckpointError(
            f"{what} copies config.json and the tokenizer from the base checkpoint, but this model was not "
            "loaded from a directory; load it with FastLanguageModel.from_pretrained"
        )
    return Path(model.source_dir)


def _write_adapter(model: CausalLM, directory: Path, overwrite: bool) -> Path:
    lora_config, lora_params = _require_lora(model, "save_pretrained")
    return save_peft_adapter(
        directory,
        jax_to_numpy(lora_params),
        r=lora_config.r,
        lora_alpha=lora_config.alpha,
        lora_dropout=lora_config.dropout,
        target_modules=lora_config.target_modules,
        use_rslora=lora_config.use_rslora,
        rank_pattern=dict(lora_config.rank_pattern),
        alpha_pattern=dict(lora_config.alpha_pattern),
        base_model_name_or_path=str(Path(model.source_dir).resolve()) if model.source_dir else None,
        overwrite=overwrite,
    )


def jax_to_numpy(tree: Any) -> Any:
    """A nested dict of arrays as numpy arrays on the host."""
    if isinstance(tree, dict):
        return {key: jax_to_numpy(value) for key, value in tree.items()}
    return np.asarray(tree)


def save_pretrained(model: CausalLM, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapters in PEFT's format (adapter_config.json, adapter_model.safetensors, float32).
    Other files in directory (a tokenizer saved there) stay; existing adapter files need overwrite."""
    return _write_adapter(model, Path(directory), overwrite)


def base_params_16bit(model: CausalLM) -> dict:
    """The base tree with quantized (4-bit / int8) kernels seen as [layers, in, out] stacks in the
    model's dtype, dequantized one layer at a time as the merge or the writer reads them. A merged
    checkpoint is never re-quantized."""
    return dequantized_view(model.base_params(), np.dtype(model.dtype))


def merged_params(model: CausalLM) -> dict:
    """The base tree with every adapter merged in (W + scale * A @ B in float32, cast to the base
    dtype); a quantized W is dequantized to float32 first."""
    lora_config, lora_params = _require_lora(model, "merging")
    scales = {name: lora_config.scale(name) for name in lora_params["layers"]}
    return merge_lora(base_params_16bit(model), lora_params, scales)


def save_pretrained_merged(
    model: CausalLM,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """merged_16bit: an HF checkpoint with the adapters merged, in the model's dtype (bfloat16 or
    float16; a float32 model stays float32). lora: the PEFT adapter. Either way the tokenizer is saved
    beside it (the given one, else the base checkpoint's files) and the directory is built under a
    temporary name and renamed into place at the end."""
    if save_method not in SAVE_METHODS:
        raise ConfigError(f"save_method {save_method!r} is not supported; choose one of {', '.join(SAVE_METHODS)}")
    source = _require_source(model, "save_pretrained_merged")
    write_tokenizer = (lambda staging: tokenizer.save_pretrained(str(staging))) if tokenizer is not None else None
    if save_method == "lora":
        with AtomicDirectory(directory, overwrite=overwrite) as staging:
            _write_adapter(model, staging, overwrite=True)
            if write_tokenizer is not None:
                write_tokenizer(staging)
            else:
                copy_tokenizer_files(source, staging)
        return Path(directory)
    tree = merged_params(model) if model.lora is not None else base_params_16bit(model)
    out = save_merged_checkpoint(
        directory, base_dir=source, tree=tree, model_config=model.config, dtype=np.dtype(model.dtype),
        max_shard_size=max_shard_size, overwrite=overwrite, write_tokenizer=write_tokenizer,
    )
    _drop_quantization_config(out / "config.json")
    return out


def _drop_quantization_config(config_path: Path) -> None:
    """A merged checkpoint is 16-bit even when its base was a pre-quantized bitsandbytes one, so
    the quantization_config copied from the base's config.json must not stay."""
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pretrained_gguf(
    model: CausalLM,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    quantization_method: str = "f16",
    overwrite: bool = False,
) -> Path:
    """Merge, then write directory/model.<TYPE>.gguf (f16, bf16 or q8_0) with the gguf package; no
    llama.cpp build is needed. Returns the file's path."""
    tensor_types(quantization_method)  # refuse an unsupported type before any work
    directory = Path(directory)
    out_file = directory / f"model.{quantization_method.upper()}.gguf"
    if out_file.exists() and not overwrite:
        raise CheckpointError(f"{out_file} already exists; choose another directory or pass overwrite=True")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".merged-") as scratch:
        merged_dir = Path(scratch) / "merged"
        save_pretrained_merged(model, merged_dir, tokenizer, save_method="merged_16bit")
        return convert_to_gguf(merged_dir, out_file, quantization_method, overwrite=overwrite)


def lora_config_from_settings(settings: dict[str, Any]) -> LoRAConfig:
    return LoRAConfig(
        r=settings["r"],
        alpha=float(settings["lora_alpha"]),
        dropout=float(settings["lora_dropout"]),
        target_modules=tuple(settings["target_modules"]),
        use_rslora=bool(settings["use_rslora"]),
        rank_pattern=tuple(sorted(settings["rank_pattern"].items())),
        alpha_pattern=tuple(sorted(settings["alpha_pattern"].items())),
    )


def load_adapter(model: CausalLM, adapter_dir: str | os.PathLike) -> CausalLM:
    """Attach a PEFT LoRA adapter (ours or peft's) to the model, replacing any adapters it had."""
    settings, lora_tree = load_peft_adapter(adapter_dir, model.config)
    model.attach_lora(lora_config_from_settings(settings), lora_from_numpy(lora_tree))
    return model


def resolve_base_path(adapter_dir: str | os.PathLike, base_model_path: str | os.PathLike | None = None) -> Path:
    """The base checkpoint of an adapter: base_model_path when given, else adapter_config.json's
    base_model_name_or_path, which must be a local directory (fastft-jax has no hub access)."""
    adapter_dir = Path(adapter_dir)
    if base_model_path is not None:
        base, source = Path(base_model_path).expanduser(), "base_model_path"
    else:
        named = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if not named:
            raise CheckpointError(
                f"{adapter_dir / CONFIG_NAME} does not name its base (base_model_name_or_path is empty); "
                "pass base_model_path= pointing at the base checkpoint directory"
            )
        base, source = Path(named).expanduser(), f"base_model_name_or_path in {adapter_dir / CONFIG_NAME}"
    if not (base / "config.json").is_file():
        raise CheckpointError(
            f"the base model {str(base)!r} (from {source}; tried {base.resolve()}) is not a local checkpoint "
            "directory with a config.json; download the base model and pass base_model_path= pointing at it"
        )
    read_config_json(base)
    return base


def load_from_adapter_dir(
    adapter_dir: str | os.PathLike, base_model_path: str | os.PathLike | None = None, **from_pretrained_kwargs: Any,
) -> tuple[CausalLM, Any]:
    """FastLanguageModel.from_pretrained for a directory holding adapter_config.json: load the base,
    then the adapter. The tokenizer comes from the adapter directory when it holds one, else from
    the base. Returns (model, tokenizer), ready for inference or further training."""
    from fastft_jax.api import FastLanguageModel, _load_tokenizer

    adapter_dir = Path(adapter_dir).expanduser()
    base = resolve_base_path(adapter_dir, base_model_path)
    model, tokenizer = FastLanguageModel.from_pretrained(base, **from_pretrained_kwargs)
    load_adapter(model, adapter_dir)
    if any((adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = _load_tokenizer(adapter_dir)
    return model, tokenizer


__all__ = [
    "GGUF_TYPES",
    "SAVE_METHODS",
    "load_adapter",
    "load_from_adapter_dir",
    "lora_config_from_settings",
    "base_params_16bit",
    "merged_params",
    "resolve_base_path",
    "save_pretrained",
    "save_pretrained_gguf",
    "save_pretrained_merged",
]

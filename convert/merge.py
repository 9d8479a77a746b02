"""Merge LoRA adapters into the base weights and write a standalone HF checkpoint.

    python -m convert.merge --base DIR --adapter DIR --out DIR [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

The merge is W + scale * (A @ B) in the tree's [in, out] orientation, which is HF's
W + scale * (B @ A) transposed. It is computed in float32 whatever the base dtype and cast once at
the end, so a bfloat16 checkpoint loses no more than one rounding to the fine-tune. The checkpoint
is built in a temporary directory beside the target and renamed into place, so an interrupted save
leaves nothing at the target path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from convert.errors import ConfigError, FastFTError
from convert.hf import get_path, hf_tensors_from_tree, load_hf_params, model_config_from_hf, read_config_json, ModelConfig
from convert.peft import load_peft_adapter, lora_scales
from convert.safetensors_io import AtomicDirectory, save_sharded

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
# The files that make up a tokenizer in an HF checkpoint directory.
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "chat_template*",
)
TOKENIZER_DIRS = ("additional_chat_templates",)


def resolve_dtype(dtype: Any) -> np.dtype:
    """'bfloat16', 'float16', 'float32', or a numpy/jax dtype of one of them."""
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        key = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(key, key)
        if key not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[key]
    resolved = np.dtype(dtype)
    if resolved not in DTYPES.values():
        raise ConfigError(f"dtype {resolved} is not one of {', '.join(DTYPES)}")
    return resolved


def merge_lora(base_tree: dict, lora_tree: Mapping[str, Any], scales: Mapping[str, float]) -> dict:
    """A new tree whose adapted kernels are kernel + scale * lora_a @ lora_b, computed in float32 one
    layer at a time and cast back to each kernel's dtype. Leaves that no adapter touches are shared
    with base_tree (numpy or jax arrays alike); merged kernels are numpy."""
    merged = {key: value for key, value in base_tree.items()}
    merged["layers"] = {key: value for key, value in base_tree["layers"].items()}
    for name, adapter in lora_tree["layers"].items():
        kernel = get_path(base_tree, ("layers", name, "kernel"))
        lora_a, lora_b = adapter["lora_a"], adapter["lora_b"]
        dtype = np.dtype(kernel.dtype)
        out = np.empty(kernel.shape, dtype)
        for layer in range(kernel.shape[0]):
            delta = np.asarray(lora_a[layer], np.float32) @ np.asarray(lora_b[layer], np.float32)
            out[layer] = (np.asarray(kernel[layer], np.float32) + np.float32(scales[name]) * delta).astype(dtype)
        merged["layers"][name] = {**base_tree["layers"][name], "kernel": out}
    return merged


def _merged_config_json(hf_config: dict, model_config: ModelConfig, dtype: np.dtype, where: str) -> dict:
    config = dict(hf_config)
    dtype_keys = [key for key in ("torch_dtype", "dtype") if key in config]
    for key in dtype_keys or ["torch_dtype"]:
        config[key] = dtype.name
    # A model may run with rope scaling its base did not have (fastft_jax adds linear scaling when
    # max_seq_length exceeds max_position_embeddings); the checkpoint must say so to behave the same.
    base_scaling = model_config_from_hf(hf_config, where).rope_scaling
    if model_config.rope_scaling != base_scaling:
        scaling = model_config.rope_scaling_dict
        if "rope_parameters" in config:
            config["rope_parameters"] = {"rope_theta": model_config.rope_theta, **(scaling or {"rope_type": "default"})}
            config.pop("rope_scaling", None)
        else:
            config["rope_scaling"] = scaling
    return config


def copy_tokenizer_files(source_dir: str | os.PathLike, target_dir: str | os.PathLike) -> list[str]:
    """Copy every tokenizer file of an HF checkpoint directory; returns the names copied."""
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    copied = []
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and any(path.match(pattern) for pattern in TOKENIZER_PATTERNS):
            shutil.copy2(path, target_dir / path.name)
            copied.append(path.name)
        elif path.is_dir() and path.name in TOKENIZER_DIRS:
            shutil.copytree(path, target_dir / path.name)
            copied.append(path.name)
    return copied


def save_merged_checkpoint(
    out_dir: str | os.PathLike,
    *,
    base_dir: str | os.PathLike,
    tree: dict,
    model_config: ModelConfig,
    dtype: Any,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    write_tokenizer: Callable[[Path], Any] | None = None,
) -> Path:
    """Write tree as an HF checkpoint in out_dir: safetensors (sharded with an index above
    max_shard_size), config.json from base_dir with its dtype set, generation_config.json when the
    base has one, and the tokenizer files of base_dir, or whatever write_tokenizer(directory) saves
    instead (e.g. tokenizer.save_pretrained)."""
    base_dir = Path(base_dir)
    dtype = resolve_dtype(dtype)
    hf_config = read_config_json(base_dir)
    config = _merged_config_json(hf_config, model_config, dtype, str(base_dir / "config.json"))
    with AtomicDirectory(out_dir, overwrite=overwrite) as staging:
        tensors = ((name, array.astype(dtype, copy=False)) for name, array in hf_tensors_from_tree(tree, model_config))
        save_sharded(tensors, staging, max_shard_size=max_shard_size, metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", staging / "generation_config.json")
        if write_tokenizer is not None:
            write_tokenizer(staging)
        else:
            copy_tokenizer_files(base_dir, staging)
    return Path(out_dir)


def base_dtype(hf_config: Mapping[str, Any]) -> np.dtype:
    """The dtype config.json records (transformers 5 "dtype", 4.x "torch_dtype"); float32 if absent."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return resolve_dtype(str(name))


def merge_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """What the CLI does: load the base in float32 and the adapter, merge, save. dtype None keeps
    the base checkpoint's own dtype."""
    base = Path(base)
    hf_config = read_config_json(base)
    model_config = model_config_from_hf(hf_config, str(base / "config.json"))
    out_dtype = base_dtype(hf_config) if dtype is None else resolve_dtype(dtype)
    settings, lora_tree = load_peft_adapter(adapter, model_config)
    base_tree = load_hf_params(base, model_config, np.float32)
    merged = merge_lora(base_tree, lora_tree, lora_scales(settings))
    return save_merged_checkpoint(
        out, base_dir=base, tree=merged, model_config=model_config, dtype=out_dtype,
        max_shard_size=max_shard_size, overwrite=overwrite,
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m convert.merge",
        description="Merge a PEFT LoRA adapter into its base and write a standalone HF checkpoint.",
    )
    parser.add_argument("--base", required=True, type=Path, help="the base HF checkpoint directory")
    parser.add_argument("--adapter", required=True, type=Path, help="the PEFT adapter directory")
    parser.add_argument("--out", required=True, type=Path, help="the directory to write")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the base checkpoint's dtype")
    parser.add_argument("--max-shard-size", default="5GB", help='shard above this size (default "5GB")')
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    out = merge_checkpoint(
        args.base, args.adapter, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"wrote the merged checkpoint to {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except FastFTError as err:
        sys.exit(f"error: {err}")

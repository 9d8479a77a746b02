"""Write an HF Llama / Qwen2 / Qwen3 checkpoint as a GGUF file for llama.cpp and Ollama, with the
`gguf` package alone (no llama.cpp build).

    python -m convert.gguf --model DIR --out FILE.gguf --type f16|bf16|q8_0 [--overwrite]

It does what llama.cpp's convert_hf_to_gguf.py does for these three architectures:
- tensor names from gguf's own TensorNameMap (token_embd, blk.N.attn_q, ..., output_norm, output);
- llama's q_proj / k_proj rows are permuted from HF's rotate-half RoPE layout back to the
  interleaved-pair layout that llama.cpp's LLAMA rope expects; Qwen2/Qwen3 use NEOX rope and keep
  HF's layout;
- 1-D tensors and norms stay float32, everything else takes --type; a q8_0 tensor whose rows are
  not a multiple of 32 falls back to f16, as in llama.cpp;
- the hyper-parameters, rope scaling (linear as metadata, llama3 as a rope_freqs tensor) and the
  byte-level BPE tokenizer ("gpt2" model) with its merges, special ids and chat template.
The file is written under a temporary name beside the target and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from jaxtyping import Float

from convert.errors import CheckpointError, ConfigError, FastFTError, UnsupportedModelError
from convert.hf import ModelConfig, model_config_from_hf, read_config_json, tensor_specs
from convert.safetensors_io import CheckpointReader

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = ("f16", "bf16", "q8_0")
_ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}

# The pre-tokenizer regexes of the families this converter supports, and llama.cpp's name for each
# (tokenizer.ggml.pre). llama.cpp picks the name by hashing a probe text's tokens; matching the
# regex itself works offline and for checkpoints whose vocabulary differs from the hashed one.
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def tensor_types(out_type: str):
    """(GGMLQuantizationType for matrices, LlamaFileType) of an --type value."""
    table = {
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }
    key = str(out_type).strip().lower()
    if key not in table:
        raise ConfigError(f"GGUF type {out_type!r} is not supported; supported types: {', '.join(SUPPORTED_TYPES)}")
    return table[key]


def permute_for_llama_rope(weights: Float[np.ndarray, "rows *cols"], n_head: int) -> Float[np.ndarray, "rows *cols"]:
    """HF orders each head's rows as [first halves of the pairs, second halves] (rotate-half RoPE);
    llama.cpp's LLAMA rope rotates adjacent pairs. Interleave the two halves of every head: the
    `permute` of convert_hf_to_gguf.py, applied to q_proj with n_head and k_proj with n_kv_head."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama3_rope_factors(config: ModelConfig) -> Float[np.ndarray, " half_head_dim"]:
    """Per-frequency divisors of llama3 rope scaling (rope_freqs.weight): 1 for high frequencies,
    factor for low ones, a smooth blend between, as HF's _compute_llama3_parameters and
    convert_hf_to_gguf.py compute them. llama.cpp reads original_max_position_embeddings from the
    top level of config.json with a default of 8192, which equals the rope_scaling value in every
    Llama 3.x checkpoint; the rope_scaling value is what HF uses, so it is the one taken here."""
    scaling = config.rope_scaling_dict
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _hf_tensors(directory: Path, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF orientation), one tensor at a time, checked against the config."""
    with CheckpointReader(directory) as reader:
        for spec in tensor_specs(config):
            for layer in range(config.num_layers if spec.stacked else 1):
                name = spec.hf_name.format(layer=layer)
                if name not in reader:
                    raise CheckpointError(f"{directory}: tensor {name!r} is missing from the checkpoint")
                want = tuple(reversed(spec.shape)) if spec.transpose else spec.shape
                if reader.shape(name) != want:
                    raise CheckpointError(
                        f"{directory}: tensor {name!r} has shape {list(reader.shape(name))}, but config.json implies {list(want)}"
                    )
                yield name, np.asarray(reader.get(name), dtype=np.float32)


def gguf_tensors(directory: str | os.PathLike, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array as llama.cpp stores it) for every tensor of the checkpoint."""
    arch = getattr(gguf.MODEL_ARCH, _ARCHS[config.model_type])
    name_map = gguf.get_tensor_name_map(arch, config.num_layers)
    if config.model_type == "llama" and config.rope_scaling_dict and config.rope_scaling_dict["rope_type"] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config)
    for hf_name, array in _hf_tensors(Path(directory), config):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedModelError(f"tensor {hf_name!r} has no GGUF name for {config.model_type}")
        if config.model_type == "llama":
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                array = permute_for_llama_rope(array, config.num_heads)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                array = permute_for_llama_rope(array, config.num_kv_heads)
        yield gguf_name, array


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special, for added tokens not flagged special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (
        token.startswith("<|") and token.endswith("|>")
    ) or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">"))


def vocabulary(directory: Path, config: ModelConfig) -> tuple[str, list[str], list[int]]:
    """(tokenizer.ggml.pre, tokens, token types) of a byte-level BPE tokenizer.json, padded to the
    model's vocab_size with [PADn] tokens of type UNUSED, as convert_hf_to_gguf.py's get_vocab_base."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; GGUF export needs the fast tokenizer file tokenizer.json")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(step.get("type") == "ByteLevel" for step in steps):
        raise UnsupportedModelError(
            f"{path}: only byte-level BPE tokenizers (Llama 3, Qwen2, Qwen3) can be exported to GGUF; this one is "
            f"{model.get('type')!r} with pre-tokenizer {[step.get('type') for step in steps]}"
        )
    regexes = [step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"]
    tokenizer_pre = _PRE_TOKENIZERS.get(regexes[0]) if len(regexes) == 1 else None
    if tokenizer_pre is None:
        raise UnsupportedModelError(
            f"{path}: the pre-tokenizer split {regexes} is not one llama.cpp knows for Llama 3 or Qwen; "
            "llama.cpp would tokenize differently"
        )

    reverse = {token_id: token for token, token_id in model["vocab"].items()}
    added = {}
    for entry in tokenizer.get("added_tokens", []):
        reverse[entry["id"]] = entry["content"]
        added[entry["id"]] = entry
    if reverse and max(reverse) >= config.vocab_size:
        raise CheckpointError(
            f"{path}: token id {max(reverse)} is outside the model's vocab_size {config.vocab_size}"
        )
    tokens, token_types = [], []
    for token_id in range(config.vocab_size):
        if token_id not in reverse:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[token_id]
        if token_id in added:
            special = added[token_id].get("special") or _looks_special(token)
            token_types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            token_types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokenizer_pre, tokens, token_types


def _add_metadata(writer, directory: Path, config: ModelConfig, file_type) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(directory.resolve().name)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    scaling = config.rope_scaling_dict
    if scaling and scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokenizer_pre, tokens, token_types = vocabulary(directory, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    # Merges, bos/eos/pad ids, add_bos/add_eos and the chat template, read exactly as llama.cpp does.
    gguf.SpecialVocab(directory, load_merges=True).add_to_gguf(writer, quiet=True)


def convert_to_gguf(
    model_dir: str | os.PathLike, out_file: str | os.PathLike, out_type: str = "f16", *, overwrite: bool = False,
) -> Path:
    """Write the HF checkpoint in model_dir as a GGUF file; returns its path."""
    matrix_type, file_type = tensor_types(out_type)
    model_dir, out_file = Path(model_dir), Path(out_file)
    config = model_config_from_hf(read_config_json(model_dir), str(model_dir / "config.json"))
    if out_file.exists() and not overwrite:
        raise CheckpointError(f"{out_file} already exists; choose another path or pass --overwrite")
    if out_file.is_dir():
        raise CheckpointError(f"{out_file} is a directory; --out names the .gguf file to write")
    out_file.parent.mkdir(parents=True, exist_ok=True)

    arch_name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, _ARCHS[config.model_type])]
    fd, tmp_name = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".tmp")
    os.close(fd)
    # use_temp_file spills tensor data to disk as it is added, so memory holds one tensor at a time.
    writer = gguf.GGUFWriter(path=None, arch=arch_name, use_temp_file=True)
    try:
        for name, array in gguf_tensors(model_dir, config):
            tensor_type = matrix_type
            if array.ndim <= 1 or name.endswith("_norm.weight"):
                tensor_type = gguf.GGMLQuantizationType.F32
            try:
                data = gguf.quants.quantize(array, tensor_type)
            except gguf.QuantError as err:
                logger.warning("%s: %s; falling back to F16", name, err)
                tensor_type = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(array, tensor_type)
            writer.add_tensor(name, data, raw_dtype=tensor_type)
        _add_metadata(writer, model_dir, config, file_type)
        writer.write_header_to_file(path=Path(tmp_name))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, out_file)
    except BaseException:
        writer.close()
        if writer.temp_file is not None:
            writer.temp_file.close()
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_file


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m convert.gguf",
        description="Convert an HF Llama/Qwen2/Qwen3 checkpoint to GGUF (llama.cpp, Ollama) without llama.cpp.",
    )
    parser.add_argument("--model", required=True, type=Path, help="the HF checkpoint directory (e.g. a merged one)")
    parser.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    parser.add_argument("--type", default="f16", help=f"tensor type: {', '.join(SUPPORTED_TYPES)} (default f16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    out = convert_to_gguf(args.model, args.out, args.type, overwrite=args.overwrite)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except FastFTError as err:
        sys.exit(f"error: {err}")

"""Tiny, seeded Llama / Qwen2 / Qwen3 checkpoints written by transformers itself, for offline tests.

A checkpoint directory holds what a hub download would: config.json, model.safetensors,
generation_config.json and the tokenizer files (tokenizer.json, tokenizer_config.json,
special tokens and a chat template). The tokenizer is a byte-level BPE trained on
convert/data/corpus.txt with the pre-tokenizer regex of the real model family, and its special
tokens sit after the BPE vocabulary, as in the real families. The model's vocab_size is the
tokenizer length rounded up to a multiple of 64, so the embedding has padding rows that no
token uses, as real Qwen checkpoints do.

    python -m convert.tiny --arch qwen3 --out /tmp/tiny-qwen3 [--size small] [--seed 1] [--no-tie]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import CheckpointError, ConfigError, FastFTError

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"

# Scale of the re-drawn weights. HF's default init (normal std 0.02, zero biases, unit norm
# weights) gives near-uniform logits and leaves biases and norm weights untested. Instead every
# matrix is drawn with std 1/sqrt(fan_in), so each projection keeps activations O(1) and the
# logits come out O(1) whether or not the head is tied to the embedding; norm weights and biases
# are drawn far enough from 1 and 0 that a dropped bias or norm shows at bfloat16 tolerance.
NORM_WEIGHT_STD = 0.1
BIAS_STD = 0.1

LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen splits numbers into single digits where Llama 3 takes up to three.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Llama 3 Instruct template: the rendered text starts with bos_token, and the tokenizer
# adds BOS by itself, so tokenising rendered text must pass add_special_tokens=False (as with
# the real model).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Qwen2 Instruct's ChatML template, default system prompt included.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3's ChatML without a default system prompt; enable_thinking=False pre-fills an empty
# think block, as the real template does.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the families: config class, tokenizer conventions, defaults."""

    config_class_name: str
    split_regex: str
    special_tokens: tuple[str, ...]
    added_plain_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str
    end_of_turn_token: str
    adds_bos: bool
    chat_template: str
    tie_word_embeddings: bool
    rms_norm_eps: float


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        config_class_name="LlamaConfig",
        split_regex=LLAMA3_SPLIT_REGEX,
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>", "<|pad|>"),
        added_plain_tokens=(),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        end_of_turn_token="<|eot_id|>",
        adds_bos=True,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    # Real Qwen tokenizers have no BOS token and add nothing; eos is the end-of-turn token of
    # the Instruct models and pad is <|endoftext|>.
    "qwen2": ArchSpec(
        config_class_name="Qwen2Config",
        split_regex=QWEN_SPLIT_REGEX,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        added_plain_tokens=(),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        end_of_turn_token="<|endoftext|>",
        adds_bos=False,
        chat_template=QWEN2_CHAT_TEMPLATE,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
    "qwen3": ArchSpec(
        config_class_name="Qwen3Config",
        split_regex=QWEN_SPLIT_REGEX,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        added_plain_tokens=("<think>", "</think>"),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        end_of_turn_token="<|endoftext|>",
        adds_bos=False,
        chat_template=QWEN3_CHAT_TEMPLATE,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
}


@dataclass(frozen=True)
class SizeSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    qwen3_head_dim: int  # deliberately not hidden_size / num_attention_heads
    bpe_vocab_size: int  # BPE vocabulary before the special tokens are appended


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=176, qwen3_head_dim=24,
                     bpe_vocab_size=512),
    "small": SizeSpec(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=688, qwen3_head_dim=48,
                      bpe_vocab_size=2048),
}

DTYPES = ("float32", "bfloat16", "float16")
VOCAB_MULTIPLE = 64
MAX_POSITION_EMBEDDINGS = 2048
ROPE_THETA = 10000.0


def _lookup(table: dict[str, Any], key: str, what: str) -> Any:
    if key not in table:
        raise ConfigError(f"unknown {what} {key!r}; choose one of {sorted(table)}")
    return table[key]


def build_tokenizer(arch: str, size: str = "tiny"):
    """Train the byte-level BPE tokenizer for `arch` on the bundled corpus (deterministic).

    Returns a transformers PreTrainedTokenizerFast with the family's special tokens, BOS
    behaviour and chat template.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors, trainers
    from transformers import PreTrainedTokenizerFast

    arch_spec: ArchSpec = _lookup(ARCHS, arch, "arch")
    size_spec: SizeSpec = _lookup(SIZES, size, "size")
    if not CORPUS_PATH.is_file():
        raise CheckpointError(f"tokenizer corpus {CORPUS_PATH} is missing; reinstall the package")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(arch_spec.split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size_spec.bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train([str(CORPUS_PATH)], trainer=trainer)
    if bpe.get_vocab_size() != size_spec.bpe_vocab_size:
        raise CheckpointError(
            f"BPE training on {CORPUS_PATH} reached {bpe.get_vocab_size()} tokens, not "
            f"{size_spec.bpe_vocab_size}; the corpus is too small for size {size!r}"
        )
    bpe.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in arch_spec.special_tokens]
    )
    if arch_spec.added_plain_tokens:
        bpe.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token in arch_spec.added_plain_tokens])
    if arch_spec.adds_bos:
        bos = arch_spec.bos_token
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos}:1 $B:1",
            special_tokens=[(bos, bpe.token_to_id(bos))],
        )
    else:
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=arch_spec.bos_token,
        eos_token=arch_spec.eos_token,
        pad_token=arch_spec.pad_token,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = arch_spec.chat_template
    return tokenizer


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def build_config(arch: str, size: str, tokenizer_length: int,
                 special_token_ids: dict[str, int | None],
                 tie_word_embeddings: bool | None = None,
                 rope_scaling: dict[str, Any] | None = None, **config_overrides: Any):
    """The transformers config for `arch`/`size`; overrides go straight to the config class.

    vocab_size is tokenizer_length rounded up to a multiple of 64 unless overridden.
    """
    import transformers

    arch_spec: ArchSpec = _lookup(ARCHS, arch, "arch")
    size_spec: SizeSpec = _lookup(SIZES, size, "size")
    config_kwargs: dict[str, Any] = dict(
        vocab_size=_round_up(tokenizer_length, VOCAB_MULTIPLE),
        hidden_size=size_spec.hidden_size,
        intermediate_size=size_spec.intermediate_size,
        num_hidden_layers=size_spec.num_hidden_layers,
        num_attention_heads=size_spec.num_attention_heads,
        num_key_value_heads=size_spec.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_theta=ROPE_THETA,
        rms_norm_eps=arch_spec.rms_norm_eps,
        tie_word_embeddings=(arch_spec.tie_word_embeddings if tie_word_embeddings is None
                             else tie_word_embeddings),
        attention_dropout=0.0,
        bos_token_id=special_token_ids["bos"],
        eos_token_id=special_token_ids["eos"],
        pad_token_id=special_token_ids["pad"],
    )
    if arch == "qwen3":
        config_kwargs["head_dim"] = size_spec.qwen3_head_dim
    if rope_scaling is not None:
        # transformers 5 folds this into config.rope_parameters; 4.x keeps config.rope_scaling.
        config_kwargs["rope_scaling"] = dict(rope_scaling)
    config_kwargs.update(config_overrides)
    config = getattr(transformers, arch_spec.config_class_name)(**config_kwargs)
    if config.vocab_size < tokenizer_length:
        raise ConfigError(
            f"vocab_size={config.vocab_size} is smaller than the tokenizer ({tokenizer_length} "
            f"ids); drop the vocab_size override or raise it"
        )
    return config


def _redraw_parameters(model, seed: int) -> None:
    """Overwrite every parameter with seeded draws that exercise biases and norm weights."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters lists a tied lm_head once, under the embedding's name.
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                values = 1.0 + NORM_WEIGHT_STD * noise
            elif name.endswith(".bias"):
                values = BIAS_STD * noise
            elif parameter.ndim == 2:
                values = noise / math.sqrt(parameter.shape[1])
            else:
                raise CheckpointError(
                    f"parameter {name} of shape {tuple(parameter.shape)} is neither a matrix, a "
                    f"bias nor a norm weight; teach convert/tiny.py how to draw it"
                )
            parameter.copy_(values.to(parameter.dtype))


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_output_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output path {out_dir} exists and is not a directory")
    if _is_nonempty_dir(out_dir) and not force:
        raise CheckpointError(
            f"output directory {out_dir} is not empty; pass --force (force=True) to overwrite it"
        )


@contextmanager
def _atomic_output_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temp dir beside out_dir; on success it replaces out_dir in one rename."""
    _check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # mkdtemp makes the directory private (0700); give it the mode a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if out_dir.exists():
            # Move the old directory aside first so out_dir is never half-written.
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-save progress bar, which tests would print on every checkpoint."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    return getattr(torch, dtype)


def _portable_tokenizer_class(out_dir: Path) -> None:
    """Name the generic fast tokenizer class, which every transformers 4.x and 5.x resolves.

    transformers 5 writes its own class name (TokenizersBackend), which 4.x cannot load, and a
    family class such as LlamaTokenizerFast would rebuild the pipeline from its own defaults
    instead of reading tokenizer.json.
    """
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    rope_scaling: dict[str, Any] | None = None,
    dtype: str = "float32",
    force: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a seeded tiny HF checkpoint (model, config, tokenizer) to out_dir and return it.

    Everything is built with transformers itself, so the directory is exactly what
    AutoModelForCausalLM / AutoTokenizer.from_pretrained expect. `config_overrides` are passed
    to the config class (e.g. rms_norm_eps=1e-5, attention_bias=True for llama).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    _check_output_dir(out_dir, force)  # fail before the work, not after it
    torch_dtype = _torch_dtype(dtype)
    arch_spec: ArchSpec = _lookup(ARCHS, arch, "arch")
    tokenizer = build_tokenizer(arch, size)
    special_token_ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    config = build_config(
        arch, size, len(tokenizer), special_token_ids,
        tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling, **config_overrides,
    )

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _redraw_parameters(model, seed)
    model = model.to(torch_dtype)
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(arch_spec.end_of_turn_token)
    ]

    with _atomic_output_dir(out_dir, force) as staging, _quiet_transformers():
        model.save_pretrained(staging, safe_serialization=True)
        if not (staging / "generation_config.json").exists():
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _portable_tokenizer_class(staging)
    return out_dir


def _safetensors_files(src_dir: Path) -> list[Path]:
    index_path = src_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return [src_dir / name for name in sorted(set(weight_map.values()))]
    single = src_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{src_dir} has neither model.safetensors nor model.safetensors.index.json"
    )


def write_sharded_copy(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, num_shards: int = 3,
    force: bool = False,
) -> Path:
    """Copy a checkpoint to dst_dir with its weights split into `num_shards` safetensors files.

    Tensors keep their names and dtypes; shards are contiguous runs of tensors in name order,
    balanced by bytes, and model.safetensors.index.json maps every tensor to its shard, as
    save_pretrained does for large models. Every other file (config, tokenizer) is copied.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    _check_output_dir(dst_dir, force)
    weight_files = _safetensors_files(src_dir)
    tensors = {}
    for weight_file in weight_files:
        with safe_open(weight_file, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    if not 1 <= num_shards <= len(tensors):
        raise ConfigError(
            f"num_shards={num_shards} must be between 1 and the {len(tensors)} tensors in {src_dir}"
        )

    names = sorted(tensors)
    nbytes = {name: tensors[name].numel() * tensors[name].element_size() for name in names}
    total_size = sum(nbytes.values())
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    shard = 0
    written = 0
    for position, name in enumerate(names):
        # Move on once this shard holds its byte quota, or when every later shard needs one of
        # the remaining tensors; never skip a shard, so none is left empty.
        by_bytes = min(num_shards - 1, written * num_shards // total_size)
        by_count = num_shards - (len(names) - position)
        if shards[shard]:
            shard = min(shard + 1, max(shard, by_bytes, by_count))
        shards[shard].append(name)
        written += nbytes[name]

    skipped = {path.name for path in weight_files} | {"model.safetensors.index.json"}
    with _atomic_output_dir(dst_dir, force) as staging:
        weight_map = {}
        for shard_index, shard_names in enumerate(shards):
            file_name = f"model-{shard_index + 1:05d}-of-{num_shards:05d}.safetensors"
            save_file({name: tensors[name].contiguous() for name in shard_names},
                      staging / file_name, metadata={"format": "pt"})
            weight_map.update({name: file_name for name in shard_names})
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for path in sorted(src_dir.iterdir()):
            if path.name in skipped:
                continue
            if path.is_dir():
                shutil.copytree(path, staging / path.name)
            else:
                shutil.copy2(path, staging / path.name)
    return dst_dir


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convert.tiny",
        description="Write a tiny seeded HF checkpoint (weights, config, tokenizer) offline.",
    )
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS))
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--tie", dest="tie_word_embeddings", default=None,
                        action=argparse.BooleanOptionalAction,
                        help="tie lm_head to the embedding (default: llama no, qwen yes)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--rope-scaling", type=json.loads, default=None,
                        help='HF rope scaling dict as JSON, e.g. \'{"rope_type": "linear", '
                             '"factor": 2.0}\'')
    parser.add_argument("--shards", type=int, default=0,
                        help="also write a copy split into this many shards to OUT-sharded")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        out_dir = write_tiny_checkpoint(
            args.out, arch=args.arch, size=args.size, seed=args.seed,
            tie_word_embeddings=args.tie_word_embeddings, rope_scaling=args.rope_scaling,
            dtype=args.dtype, force=args.force,
        )
        print(f"wrote {args.size} {args.arch} checkpoint to {out_dir}")
        if args.shards:
            sharded_dir = out_dir.with_name(out_dir.name + "-sharded")
            write_sharded_copy(out_dir, sharded_dir, num_shards=args.shards, force=args.force)
            print(f"wrote {args.shards}-shard copy to {sharded_dir}")
    except FastFTError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()

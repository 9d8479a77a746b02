"""Tests for convert/tiny.py: the offline tiny checkpoints load in transformers as written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.errors import CheckpointError, ConfigError
from convert.tiny import ARCHS, SIZES, main, write_sharded_copy, write_tiny_checkpoint

REASONING_PATH = Path(__file__).resolve().parents[1] / "examples" / "data" / "reasoning.jsonl"
MESSAGES = [
    {"role": "system", "content": "You answer medical arithmetic questions."},
    {"role": "user", "content": "A child weighs 12 kg. What is 15 mg/kg?"},
    {"role": "assistant", "content": "15 times 12 is 180, so 180 mg."},
]


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _state_dict(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def _reasoning_texts(count: int) -> list[str]:
    lines = REASONING_PATH.read_text().splitlines()
    texts: list[str] = []
    for line in random.Random(count).sample(lines, count):
        texts.extend(json.loads(line).values())
    return texts


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpoint_loads_with_consistent_vocab_and_weights(arch, seed, tmp_path):
    out_dir = write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = model.config
    spec, size = ARCHS[arch], SIZES["tiny"]

    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {path.name for path in out_dir.iterdir()}
    assert config.vocab_size % 64 == 0
    assert len(tokenizer) <= config.vocab_size < len(tokenizer) + 64
    assert len(tokenizer) > size.bpe_vocab_size  # special tokens come after the BPE vocabulary
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.bos_token == spec.bos_token
    assert tokenizer.eos_token == spec.eos_token and tokenizer.pad_token == spec.pad_token
    for token in spec.special_tokens + spec.added_plain_tokens:
        assert tokenizer.convert_tokens_to_ids(token) < len(tokenizer)
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id

    assert config.hidden_size == size.hidden_size
    assert config.num_hidden_layers == size.num_hidden_layers
    assert config.num_key_value_heads == size.num_key_value_heads
    assert config.intermediate_size == size.intermediate_size
    assert config.tie_word_embeddings is spec.tie_word_embeddings
    q_proj = model.model.layers[0].self_attn.q_proj
    head_dim = size.qwen3_head_dim if arch == "qwen3" else size.hidden_size // size.num_attention_heads
    assert tuple(q_proj.weight.shape) == (size.num_attention_heads * head_dim, size.hidden_size)
    assert (q_proj.bias is not None) is (arch == "qwen2")

    saved = load_file(out_dir / "model.safetensors")
    loaded = _state_dict(model)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    if spec.tie_word_embeddings:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    else:
        assert "lm_head.weight" in saved
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    # The re-drawn weights move every norm weight off 1 and every bias off 0.
    for name, tensor in saved.items():
        if name.endswith("norm.weight"):
            assert not torch.allclose(tensor, torch.ones_like(tensor)), name
        if name.endswith(".bias"):
            assert tensor.abs().min() > 0 and tensor.std() > 0.05, name

    input_ids = tokenizer(_reasoning_texts(1)[0], return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        logits = model(input_ids).logits
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 3.0, f"logit std {logits.std().item()} (seed {seed})"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tokenizer_matches_tokenizer_json_and_family_conventions(arch, seed, tmp_path):
    out_dir = write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    for text in _reasoning_texts(20) + ["Ünïcode café 1234567\n\n  tabs\tand spaces  "]:
        ids = tokenizer(text)["input_ids"]
        assert ids == raw.encode(text).ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    with_markers = "a <|im_end|> b <|eot_id|> c <think> d"
    assert tokenizer(with_markers)["input_ids"] == raw.encode(with_markers).ids
    first_ids = tokenizer("Fever and cough.")["input_ids"]
    if ARCHS[arch].adds_bos:
        assert first_ids[0] == tokenizer.bos_token_id and first_ids.count(tokenizer.bos_token_id) == 1
    else:
        assert tokenizer.bos_token_id is None
        assert first_ids == tokenizer("Fever and cough.", add_special_tokens=False)["input_ids"]
    for token in ARCHS[arch].special_tokens + ARCHS[arch].added_plain_tokens:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)]
    # Ten reasoning examples should cost far fewer tokens than bytes with a corpus-trained BPE.
    joined = " ".join(_reasoning_texts(10))
    assert len(tokenizer(joined)["input_ids"]) < 0.6 * len(joined.encode())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_chat_template_renders_in_family_style(arch, seed, tmp_path):
    out_dir = write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    for message in MESSAGES:
        assert message["content"] in rendered
    if arch == "llama":
        assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
        assert rendered.count("<|eot_id|>") == 3
        assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    else:
        assert rendered.startswith("<|im_start|>system\n")
        assert rendered.count("<|im_end|>\n") == 3
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    if arch == "qwen2":
        no_system = tokenizer.apply_chat_template(MESSAGES[1:], tokenize=False)
        assert no_system.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    if arch == "qwen3":
        no_think = tokenizer.apply_chat_template(
            MESSAGES[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    turn_end = "<|eot_id|>" if arch == "llama" else "<|im_end|>"
    assert ids.count(tokenizer.convert_tokens_to_ids(turn_end)) == 3
    if arch == "llama":
        assert ids.count(tokenizer.bos_token_id) == 1


def test_sharded_copy_has_index_and_identical_weights(seed, tmp_path):
    source = write_tiny_checkpoint(tmp_path / "source", arch="qwen2", seed=seed, dtype="bfloat16")
    sharded = write_sharded_copy(source, tmp_path / "sharded", num_shards=3)

    shard_files = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shard_files) >= 3
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    original = load_file(source / "model.safetensors")
    assert set(index["weight_map"]) == set(original)
    assert set(index["weight_map"].values()) == {path.name for path in shard_files}
    assert index["metadata"]["total_size"] == sum(
        tensor.numel() * tensor.element_size() for tensor in original.values())
    resharded = {}
    for path in shard_files:
        part = load_file(path)
        assert part, f"{path.name} is empty"
        assert set(part).isdisjoint(resharded)
        resharded.update(part)
    for name, tensor in original.items():
        assert resharded[name].dtype == torch.bfloat16 and torch.equal(resharded[name], tensor)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (sharded / name).read_bytes() == (source / name).read_bytes()

    from_single = _state_dict(AutoModelForCausalLM.from_pretrained(source))
    from_shards = _state_dict(AutoModelForCausalLM.from_pretrained(sharded))
    assert from_single.keys() == from_shards.keys()
    for name in from_single:
        assert torch.equal(from_single[name], from_shards[name]), name

    with pytest.raises(ConfigError, match="num_shards"):
        write_sharded_copy(source, tmp_path / "too_many", num_shards=len(original) + 1)


def test_refuses_to_overwrite_without_force(seed, tmp_path):
    out_dir = write_tiny_checkpoint(tmp_path / "ckpt", arch="llama", seed=seed)
    first = load_file(out_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=str(out_dir)):
        write_tiny_checkpoint(out_dir, arch="llama", seed=seed + 1)
    assert all(torch.equal(first[name], tensor)
               for name, tensor in load_file(out_dir / "model.safetensors").items())
    with pytest.raises(CheckpointError, match=str(out_dir)):
        write_sharded_copy(out_dir, out_dir)

    write_tiny_checkpoint(out_dir, arch="llama", seed=seed + 1, force=True)
    second = load_file(out_dir / "model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], second["model.embed_tokens.weight"])
    # Nothing is left behind by the staging directories, and an empty directory is fine.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "empty").mkdir()
    write_tiny_checkpoint(tmp_path / "empty", arch="qwen3", seed=seed)


def test_same_seed_same_weights_and_tokenizer(seed, tmp_path):
    first = write_tiny_checkpoint(tmp_path / "a", arch="qwen3", seed=seed)
    second = write_tiny_checkpoint(tmp_path / "b", arch="qwen3", seed=seed)
    other = write_tiny_checkpoint(tmp_path / "c", arch="qwen3", seed=seed + 1)
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    weights_c = load_file(other / "model.safetensors")
    assert not torch.equal(weights_a["model.norm.weight"], weights_c["model.norm.weight"])


def test_rope_scaling_overrides_and_small_size(seed, tmp_path):
    rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    out_dir = write_tiny_checkpoint(
        tmp_path / "scaled", arch="llama", seed=seed, rope_scaling=rope_scaling,
        attention_bias=True, tie_word_embeddings=True)
    config = AutoModelForCausalLM.from_pretrained(out_dir).config
    # transformers 5 stores the dict as rope_parameters, 4.x as rope_scaling.
    stored = getattr(config, "rope_parameters", None) or config.rope_scaling
    for key, value in rope_scaling.items():
        assert stored[key] == value
    assert config.tie_word_embeddings is True
    saved = load_file(out_dir / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in saved and "lm_head.weight" not in saved

    small = write_tiny_checkpoint(tmp_path / "small", arch="qwen3", size="small", seed=seed,
                                  tie_word_embeddings=False)
    small_config = AutoModelForCausalLM.from_pretrained(small).config
    assert (small_config.hidden_size, small_config.head_dim) == (256, 48)
    assert small_config.tie_word_embeddings is False
    assert small_config.vocab_size >= len(AutoTokenizer.from_pretrained(small)) > 2048

    with pytest.raises(ConfigError, match="vocab_size"):
        write_tiny_checkpoint(tmp_path / "bad", arch="qwen2", vocab_size=100)
    with pytest.raises(ConfigError, match="arch"):
        write_tiny_checkpoint(tmp_path / "bad", arch="mistral")


def test_command_line(seed, tmp_path, capsys):
    out_dir = tmp_path / "cli"
    main(["--arch", "qwen3", "--out", str(out_dir), "--seed", str(seed), "--no-tie",
          "--shards", "3"])
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] is False
    assert len(list(tmp_path.glob("cli-sharded/model-*-of-00003.safetensors"))) == 3
    with pytest.raises(SystemExit, match="not empty"):
        main(["--arch", "qwen3", "--out", str(out_dir)])
    assert str(out_dir) in capsys.readouterr().out

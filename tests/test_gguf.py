"""Tests for convert/gguf.py: gguf's own reader reads back what was written, with llama.cpp's names,
types and metadata, values equal to the merged checkpoint's, and transformers' GGUF loader (an
independent reader that undoes llama's Q/K permutation itself) gives the checkpoint's logits."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import convert.gguf as gguf_module
from convert.errors import CheckpointError, ConfigError, UnsupportedModelError
from convert.gguf import convert_to_gguf, main as gguf_main
from convert.safetensors_io import CheckpointReader
from convert.tiny import write_tiny_checkpoint
from fastft_jax import FastLanguageModel, export
from tests.test_export import random_lora

FLOAT32_TOLERANCE = 1e-5
ARCHS = {"llama": False, "qwen2": True, "qwen3": False}  # arch -> tied embeddings
TYPES = ("f16", "bf16", "q8_0")
Q = gguf.GGMLQuantizationType

# HF name part -> llama.cpp name part, written out here rather than taken from gguf's TensorNameMap.
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[part]}.{suffix}"


def field(reader: gguf.GGUFReader, key: str):
    assert key in reader.fields, f"metadata {key} is missing"
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """arch -> (model with random non-zero LoRA, tokenizer, its merged float32 checkpoint)."""
    root = tmp_path_factory.mktemp("gguf")
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    out = {}
    for arch, tied in ARCHS.items():
        base_dir = write_tiny_checkpoint(root / arch, arch=arch, seed=seed, tie_word_embeddings=tied)
        model, tokenizer = FastLanguageModel.from_pretrained(base_dir, dtype="float32")
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=seed)
        random_lora(model, rng)
        out[arch] = (model, tokenizer, export.save_pretrained_merged(model, root / f"{arch}-merged", tokenizer))
    return out


def llama_rope_rows(n_head: int, rows: int) -> np.ndarray:
    """For each GGUF row of a permuted llama q/k matrix, the HF row it holds: llama.cpp rotates
    adjacent pairs (2i, 2i+1), HF rotates (i, i + head_dim/2) within each head."""
    head_dim = rows // n_head
    return np.asarray([head * head_dim + half * (head_dim // 2) + i
                       for head in range(n_head) for i in range(head_dim // 2) for half in (0, 1)])


@pytest.mark.parametrize("out_type", TYPES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tensors_read_back_equal_to_the_merged_checkpoint(arch, out_type, merged, tmp_path):
    model, tokenizer, merged_dir = merged[arch]
    config = model.config
    path = export.save_pretrained_gguf(model, tmp_path, tokenizer, quantization_method=out_type)
    assert path == tmp_path / f"model.{out_type.upper()}.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "no merged scratch copy is left behind"
    reader = gguf.GGUFReader(path)
    matrix_type = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    assert field(reader, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[out_type]

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    with CheckpointReader(merged_dir) as checkpoint:
        assert set(tensors) == {gguf_name(name) for name in checkpoint.keys()}
        assert ("output.weight" in tensors) == (not ARCHS[arch])
        for hf_name in checkpoint.keys():
            name = gguf_name(hf_name)
            expected = np.asarray(checkpoint.get(hf_name), np.float32)
            tensor = tensors[name]
            assert list(tensor.shape) == list(reversed(expected.shape)), name
            if expected.ndim == 1:
                want_type = Q.F32
            elif out_type == "q8_0" and expected.shape[-1] % 32:
                want_type = Q.F16  # llama.cpp's fallback for rows that are not whole Q8_0 blocks
            else:
                want_type = matrix_type
            assert tensor.tensor_type == want_type, f"{name}: {tensor.tensor_type.name}, want {want_type.name}"
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(expected.shape)
            if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_heads if "q_proj" in hf_name else config.num_kv_heads
                expected = expected[llama_rope_rows(heads, expected.shape[0])]
            if want_type == Q.F32:
                np.testing.assert_array_equal(values, expected, err_msg=name)
            elif want_type == Q.F16:
                np.testing.assert_array_equal(values, expected.astype(np.float16).astype(np.float32), err_msg=name)
            elif want_type == Q.BF16:
                np.testing.assert_array_equal(values, expected.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=name)
            else:
                blocks = expected.reshape(-1, 32)
                step = np.abs(blocks).max(axis=1, keepdims=True) / 127
                error = np.abs(values.reshape(-1, 32) - blocks)
                assert np.all(error <= step), f"{name}: q8_0 error beyond one quantization step"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_metadata_describes_model_and_tokenizer(arch, merged, tmp_path):
    model, _, merged_dir = merged[arch]
    config = model.config
    out = tmp_path / "model.gguf"
    gguf_main(["--model", str(merged_dir), "--out", str(out), "--type", "f16"])
    reader = gguf.GGUFReader(out)
    prefix = arch
    assert field(reader, "general.architecture") == arch
    expected = {
        "context_length": 2048, "embedding_length": 64, "block_count": 2, "feed_forward_length": 176,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim, "vocab_size": config.vocab_size,
    }
    for key, value in expected.items():
        assert field(reader, f"{prefix}.{key}") == value, key
    assert config.head_dim == (24 if arch == "qwen3" else 16)
    assert field(reader, f"{prefix}.rope.freq_base") == config.rope_theta
    assert field(reader, f"{prefix}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert f"{prefix}.rope.scaling.type" not in reader.fields

    tokenizer_json = json.loads((merged_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((merged_dir / "tokenizer_config.json").read_text())
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == ("llama-bpe" if arch == "llama" else "qwen2")
    assert len(tokens) == len(types) == config.vocab_size
    for token, token_id in tokenizer_json["model"]["vocab"].items():
        assert tokens[token_id] == token and types[token_id] == gguf.TokenType.NORMAL
    for added in tokenizer_json["added_tokens"]:
        want = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        assert tokens[added["id"]] == added["content"] and types[added["id"]] == want, added["content"]
    used = len(tokenizer_json["model"]["vocab"]) + len(tokenizer_json["added_tokens"])
    assert tokens[-1] == f"[PAD{config.vocab_size - 1}]" and set(types[used:]) == {gguf.TokenType.UNUSED}
    assert len(field(reader, "tokenizer.ggml.merges")) == len(tokenizer_json["model"]["merges"])
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokens.index(tokenizer_config["eos_token"])
    assert field(reader, "tokenizer.ggml.padding_token_id") == config.pad_token_id
    if arch == "llama":
        assert field(reader, "tokenizer.ggml.bos_token_id") == config.bos_token_id
        assert field(reader, "tokenizer.ggml.add_bos_token") is True
        assert field(reader, "llama.rope.dimension_count") == config.head_dim
    assert field(reader, "tokenizer.chat_template") == (merged_dir / "chat_template.jinja").read_text()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_gguf_loader_gives_the_checkpoint_logits(arch, merged, tmp_path):
    """transformers supports llama and qwen2 GGUF files (not yet qwen3's head_dim)."""
    seed = fresh_seed()
    _, _, merged_dir = merged[arch]
    convert_to_gguf(merged_dir, tmp_path / "model.gguf", "f16")
    reference = AutoModelForCausalLM.from_pretrained(str(merged_dir), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.ndim >= 2:  # the GGUF holds matrices in f16 and 1-D tensors in f32
                parameter.copy_(parameter.half().float())
    from_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                     attn_implementation="eager", dtype=torch.float32)
    input_ids = torch.as_tensor(np.random.default_rng(seed).integers(0, 500, (2, 13)))
    with torch.no_grad():
        expected, actual = reference(input_ids).logits.numpy(), from_gguf(input_ids).logits.numpy()
    error = float(np.abs(actual - expected).max() / np.abs(expected).max())
    assert error <= FLOAT32_TOLERANCE, f"{arch}: {error:.3g} (seed {seed})"

    text = "Dose: 12 kg x 15 mg/kg = 180 mg.\n<|im_start|>user it's   fine"
    original = AutoTokenizer.from_pretrained(str(merged_dir))
    read_back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    assert read_back(text)["input_ids"] == original(text)["input_ids"]


def test_rope_scaling_linear_metadata_and_llama3_rope_freqs(tmp_path):
    seed = fresh_seed()
    linear = write_tiny_checkpoint(tmp_path / "linear", arch="llama", seed=seed,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0})
    reader = gguf.GGUFReader(convert_to_gguf(linear, tmp_path / "linear.gguf", "f16"))
    assert field(reader, "llama.rope.scaling.type") == "linear"
    assert field(reader, "llama.rope.scaling.factor") == 4.0
    assert "rope_freqs.weight" not in {tensor.name for tensor in reader.tensors}

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    directory = write_tiny_checkpoint(tmp_path / "llama3", arch="llama", seed=seed, rope_scaling=llama3)
    reader = gguf.GGUFReader(convert_to_gguf(directory, tmp_path / "llama3.gguf", "q8_0"))
    assert "llama.rope.scaling.type" not in reader.fields
    rope_freqs = {tensor.name: tensor for tensor in reader.tensors}["rope_freqs.weight"]
    assert rope_freqs.tensor_type == Q.F32 and list(rope_freqs.shape) == [8]
    hf_config = LlamaConfig.from_pretrained(str(directory))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    unscaled = 1.0 / (hf_config.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    expected = (unscaled / scaled).numpy()
    assert len(set(np.round(expected, 3))) > 2, "the test's rope must cover all three regimes"
    np.testing.assert_allclose(np.asarray(rope_freqs.data), expected, rtol=FLOAT32_TOLERANCE)


def test_unsupported_type_is_refused_before_any_work(merged, tmp_path):
    model, tokenizer, merged_dir = merged["qwen2"]
    with pytest.raises(ConfigError, match="q4_k_m.*f16, bf16, q8_0"):
        export.save_pretrained_gguf(model, tmp_path / "out", tokenizer, quantization_method="q4_k_m")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="supported types: f16, bf16, q8_0"):
        gguf_main(["--model", str(merged_dir), "--out", str(tmp_path / "x.gguf"), "--type", "q4_0"])
    assert list(tmp_path.iterdir()) == []


def test_existing_file_needs_overwrite_and_interrupted_write_leaves_nothing(merged, tmp_path, monkeypatch):
    _, _, merged_dir = merged["qwen3"]
    out = tmp_path / "model.gguf"
    convert_to_gguf(merged_dir, out, "bf16")
    first = out.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_to_gguf(merged_dir, out, "bf16")
    convert_to_gguf(merged_dir, out, "bf16", overwrite=True)
    assert out.read_bytes() == first, "the conversion is deterministic"

    calls = []

    def fail_on_third(data, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_quantize(data, qtype)

    real_quantize = gguf.quants.quantize
    monkeypatch.setattr(gguf_module.gguf.quants, "quantize", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert_to_gguf(merged_dir, tmp_path / "other.gguf", "f16")
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        convert_to_gguf(merged_dir, out, "f16", overwrite=True)
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]
    assert out.read_bytes() == first, "an interrupted overwrite keeps the old file"


def test_tokenizers_llama_cpp_would_split_differently_are_refused(merged, tmp_path):
    _, _, merged_dir = merged["llama"]
    copy = Path(shutil.copytree(merged_dir, tmp_path / "copy"))
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer"):
        convert_to_gguf(copy, tmp_path / "model.gguf", "f16")
    assert not (tmp_path / "model.gguf").exists()

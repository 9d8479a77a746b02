"""Tests for fastft_jax/generate.py: KV-cache generation against transformers' generate (and peft's for
adapters) on the tiny float32 checkpoints, left-padded batches, sampling, streaming, the CLI, errors."""

from __future__ import annotations

import dataclasses
import functools
import random
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from convert.errors import ConfigError
from convert.quant import dequantized_tree
from fastft_jax import CausalLM, FastLanguageModel, LoRAConfig, ops
from fastft_jax import generate as generate_module
from fastft_jax.generate import (
    Sampling,
    decode_attention,
    filtered_logits,
    generate,
    stream_generate,
)
from pallas_kernels.attention import attention_reference

VOCAB_IN_USE = 500  # ids below the tiny tokenizers' special tokens and padding rows
MAX_SEQ_LENGTH = 64


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def load(directory):
    model, tokenizer = FastLanguageModel.from_pretrained(directory, dtype="float32", max_seq_length=MAX_SEQ_LENGTH)
    return FastLanguageModel.for_inference(model), tokenizer


def attach_random_lora(model, rng: np.random.Generator) -> None:
    """LoRA on every projection with non-zero A and B, so that the adapter changes every token."""
    lora_config = LoRAConfig(r=4, alpha=8.0)
    tree = {"layers": {}}
    for name in lora_config.target_modules:
        d_in, d_out = model.config.projection_shape(name)
        tree["layers"][name] = {
            "lora_a": jnp.asarray(rng.normal(0.0, 0.1, (model.config.num_layers, d_in, lora_config.r)), jnp.float32),
            "lora_b": jnp.asarray(rng.normal(0.0, 0.1, (model.config.num_layers, lora_config.r, d_out)), jnp.float32),
        }
    model.attach_lora(lora_config, tree)


def left_padded(rng: np.random.Generator, lengths: list[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(lengths)
    input_ids = np.full((len(lengths), width), pad_id, np.int32)
    attention_mask = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = rng.integers(0, VOCAB_IN_USE, length)
        attention_mask[row, width - length:] = 1
    return input_ids, attention_mask


def hf_generate(hf_model, input_ids: np.ndarray, attention_mask: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return hf_model.generate(
            input_ids=torch.as_tensor(input_ids, dtype=torch.long),
            attention_mask=torch.as_tensor(attention_mask, dtype=torch.long), do_sample=False, **kwargs,
        ).numpy()


def hf_model(directory, adapter_dir=None):
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="eager").eval()
    if adapter_dir is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return model


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers(arch, adapter, tiny_checkpoints, tmp_path):
    """A left-padded batch, greedy, EOS as the checkpoint's generation_config sets it, on both sides."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, tokenizer = load(tiny_checkpoints[arch])
    adapter_dir = None
    if adapter:
        attach_random_lora(model, rng)
        adapter_dir = model.save_pretrained(tmp_path / "adapter")
    input_ids, attention_mask = left_padded(rng, [5, 9], tokenizer.pad_token_id)
    expected = hf_generate(hf_model(tiny_checkpoints[arch], adapter_dir), input_ids, attention_mask, max_new_tokens=10)

    ours = model.generate(input_ids, attention_mask, max_new_tokens=10)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, expected, err_msg=f"seed {seed}")
    if adapter and arch == "llama":
        merged = generate(model, input_ids, attention_mask, max_new_tokens=10, merge_lora=True)
        np.testing.assert_array_equal(merged, expected, err_msg=f"merge_lora=True, seed {seed}")


def test_rows_stop_on_eos_and_are_padded_as_in_transformers(tiny_checkpoints):
    """EOS ids picked from an unstopped run so that one row stops early, the other later: the early
    row is padded after its EOS and generation ends on the step the last row stops."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, tokenizer = load(tiny_checkpoints["qwen3"])
    input_ids, attention_mask = left_padded(rng, [4, 7], tokenizer.pad_token_id)
    prompt_len = input_ids.shape[1]
    unstopped = generate(model, input_ids, attention_mask, max_new_tokens=10, eos_token_id=[])
    assert unstopped.shape == (2, prompt_len + 10)
    new = unstopped[:, prompt_len:]
    first_stop = int(new[0, 1])
    later_stops = [int(token) for token in new[1, 3:] if token not in new[0, :2] and token not in new[1, :3]]
    eos_ids = [first_stop] + later_stops[:1]
    pad_id = VOCAB_IN_USE + 7

    ours = generate(model, input_ids, attention_mask, max_new_tokens=10, eos_token_id=eos_ids, pad_token_id=pad_id)
    expected = hf_generate(hf_model(tiny_checkpoints["qwen3"]), input_ids, attention_mask, max_new_tokens=10,
                           eos_token_id=eos_ids, pad_token_id=pad_id)
    np.testing.assert_array_equal(ours, expected, err_msg=f"seed {seed}, eos {eos_ids}")
    first_eos = list(ours[0, prompt_len:]).index(first_stop)
    assert first_eos <= 1 and (ours[0, prompt_len + first_eos + 1:] == pad_id).all()
    if later_stops:
        assert ours.shape[1] < prompt_len + 10, "every row met an EOS, so generation must have ended early"


def test_4bit_base_with_adapter_generates_as_its_dequantized_weights(tiny_checkpoints):
    """QLoRA inference: the NF4 base (dequantized inside the projections) and the un-merged adapter give
    the tokens of a 16-bit model holding the dequantized weights; merging into NF4 is refused."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen3"], dtype="float32",
                                                         max_seq_length=MAX_SEQ_LENGTH, load_in_4bit=True)
    attach_random_lora(model, rng)
    weights = jax.jit(dequantized_tree, static_argnums=1)(model.base_params(), jnp.float32)
    dequantized = CausalLM(model.config, weights, dtype=jnp.float32, max_seq_length=MAX_SEQ_LENGTH,
                           ops_config=model.ops_config)
    dequantized.attach_lora(model.lora_config, model.lora_params())
    input_ids, attention_mask = left_padded(rng, [5, 9], tokenizer.pad_token_id)
    ours = generate(model, input_ids, attention_mask, max_new_tokens=10, eos_token_id=[])
    expected = generate(dequantized, input_ids, attention_mask, max_new_tokens=10, eos_token_id=[])
    np.testing.assert_array_equal(ours, expected, err_msg=f"seed {seed}")
    with pytest.raises(ConfigError, match="nf4-quantized"):
        generate(model, input_ids, attention_mask, max_new_tokens=10, merge_lora=True)


def test_left_padded_batch_equals_prompts_one_by_one(tiny_checkpoints):
    """The 16-token prompt fills generate's PROMPT_MULTIPLE columns: alone it runs the unpadded path."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, tokenizer = load(tiny_checkpoints["llama"])
    attach_random_lora(model, rng)
    lengths = [3, 16, 6]
    input_ids, attention_mask = left_padded(rng, lengths, tokenizer.pad_token_id)
    batched = generate(model, input_ids, attention_mask, max_new_tokens=10, eos_token_id=[])
    width = input_ids.shape[1]
    for row, length in enumerate(lengths):
        alone = generate(model, input_ids[row:row + 1, width - length:], max_new_tokens=10, eos_token_id=[])
        np.testing.assert_array_equal(batched[row, width:], alone[0, length:], err_msg=f"row {row}, seed {seed}")


def test_stream_yields_the_tokens_generate_returns(tiny_checkpoints):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, tokenizer = load(tiny_checkpoints["qwen2"])
    input_ids, attention_mask = left_padded(rng, [6, 2], tokenizer.pad_token_id)
    whole = generate(model, input_ids, attention_mask, max_new_tokens=10)
    columns = list(stream_generate(model, input_ids, attention_mask, max_new_tokens=10))
    np.testing.assert_array_equal(np.stack(columns, axis=1), whole[:, input_ids.shape[1]:], err_msg=f"seed {seed}")


def test_sampling_is_reproducible_per_seed(tiny_checkpoints):
    model, _ = load(tiny_checkpoints["qwen3"])
    rng = np.random.default_rng(fresh_seed())
    input_ids = rng.integers(0, VOCAB_IN_USE, (2, 5))
    seed = fresh_seed()
    settings = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, top_k=50, eos_token_id=[])
    first = generate(model, input_ids, seed=seed, **settings)
    np.testing.assert_array_equal(first, generate(model, input_ids, seed=seed, **settings))
    other = generate(model, input_ids, seed=seed + 1, **settings)
    assert (first != other).any(), f"seeds {seed} and {seed + 1} drew the same 20 tokens"
    greedy = generate(model, input_ids, max_new_tokens=10, eos_token_id=[])
    only_top_token = generate(model, input_ids, seed=seed, **dict(settings, top_k=1))
    np.testing.assert_array_equal(only_top_token, greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.9), (1.0, 20, 1.0), (1.3, 40, 0.5), (1.0, 0, 0.01)])
def test_filtered_logits_match_transformers_warpers(temperature, top_k, top_p):
    rng = np.random.default_rng(fresh_seed())
    logits = rng.normal(0.0, 2.0, (4, 577)).astype(np.float32)
    ours = np.asarray(filtered_logits(jnp.asarray(logits), Sampling(True, temperature, top_k, top_p)))
    expected = torch.as_tensor(logits)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    warpers.append(TopPLogitsWarper(top_p))
    for warper in warpers:
        expected = warper(None, expected)
    expected = expected.numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
    kept = np.isfinite(expected)
    assert kept.any(axis=1).all()
    np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6)


def test_decode_attention_equals_the_reference_with_one_query():
    """GQA (6 query heads on 2 KV heads), head_dim 24, masked padding and unwritten cache slots."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    batch, cache_len, heads_q, heads_kv, head_dim = 3, 13, 6, 2, 24
    q = jnp.asarray(rng.standard_normal((batch, 1, heads_q, head_dim)), jnp.float32)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((batch, cache_len, heads_kv, head_dim)), jnp.float32)
                        for _ in range(2))
    key_segment_ids = (rng.random((batch, cache_len)) < 0.7).astype(np.int32)
    key_segment_ids[:, 9] = 1  # the new token's own slot
    key_segment_ids[:, 10:] = 0  # not written yet
    ours = decode_attention(q, k_cache, v_cache, jnp.asarray(key_segment_ids))
    expected = attention_reference(q, k_cache, v_cache, causal=False, segment_ids=jnp.ones((batch, 1), jnp.int32),
                                   kv_segment_ids=jnp.asarray(key_segment_ids))
    error = float(jnp.max(jnp.abs(ours - expected)) / jnp.max(jnp.abs(expected)))
    assert error <= 1e-5, f"relative error {error:.3g} (seed {seed})"


def test_bad_input_is_refused_before_any_work(tiny_checkpoints):
    model, _ = load(tiny_checkpoints["llama"])
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(model, np.zeros((1, 0), np.int32))
    with pytest.raises(ConfigError, match="row 1 is empty"):
        generate(model, np.ones((2, 3), np.int32), np.array([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ConfigError, match="left padding"):
        generate(model, np.ones((1, 3), np.int32), np.array([[1, 1, 0]]))
    with pytest.raises(ConfigError, match=r"prompt_len 10 \+ max_new_tokens 60 = 70 exceeds the model's "
                                          r"max_seq_length 64; lower max_new_tokens to at most 54"):
        generate(model, np.ones((1, 10), np.int32), max_new_tokens=60)
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, np.ones((1, 3), np.int32), max_new_tokens=4, do_sample=True, temperature=0.0)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        generate(model, np.full((1, 3), model.config.vocab_size, np.int32), max_new_tokens=4)


def test_cli_streams_the_greedy_continuation(tiny_checkpoints, capsys):
    directory = tiny_checkpoints["llama"]
    assert generate_module.main(["--model", str(directory), "--prompt", "The patient", "--max-new-tokens", "6",
                                 "--max-seq-length", "32"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = FastLanguageModel.from_pretrained(directory, dtype="float32", max_seq_length=32)
    prompt_ids = tokenizer("The patient")["input_ids"]
    tokens = generate(model, np.asarray([prompt_ids]), max_new_tokens=6)[0, len(prompt_ids):]
    eos_ids, _ = generate_module.resolve_special_ids(model)
    reply = []
    for token in tokens:
        if token in eos_ids:
            break
        reply.append(int(token))
    assert printed == "The patient" + tokenizer.decode(reply, skip_special_tokens=True) + "\n"


def test_cli_chat_keeps_the_conversation(tiny_checkpoints, monkeypatch, capsys):
    """Each turn's prompt is the chat template over the whole history, the model's replies included."""
    directory = tiny_checkpoints["qwen2"]
    turns = []
    real_stream_reply = generate_module._stream_reply

    def recording_stream_reply(model, tokenizer, prompt_ids, *args):
        reply = real_stream_reply(model, tokenizer, prompt_ids, *args)
        turns.append((list(prompt_ids), reply))
        return reply

    monkeypatch.setattr(generate_module, "_stream_reply", recording_stream_reply)
    typed = iter(["and the dose?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    assert generate_module.main(["--model", str(directory), "--chat", "--prompt", "Hello doctor",
                                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == "".join(reply + "\n" for _, reply in turns)
    assert len(turns) == 2
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    conversation = [{"role": "user", "content": "Hello doctor"}, {"role": "assistant", "content": turns[0][1]},
                    {"role": "user", "content": "and the dose?"}]
    for (prompt_ids, _), messages in zip(turns, (conversation[:1], conversation)):
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(prompt_ids) == expected


def test_cli_refuses_an_empty_prompt(tiny_checkpoints, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_module.main(["--model", str(tiny_checkpoints["qwen3"]), "--prompt", "  "])
    assert exit_info.value.code == 2
    assert "--prompt is empty" in capsys.readouterr().err


# -- the decode step on stacked kernels (pallas_kernels/stacked_matmul.py) ----------------------
def test_decode_matmul_defaults_to_the_kernel_on_the_gpu_only():
    assert ops.OpsConfig().resolve("decode_matmul") == "reference"
    assert ops.GPU_AUTO_CHOICE["decode_matmul"] == "pallas"  # 2.5x the sliced path at batch 1 (bench/RESULTS.md)
    assert ops.OpsConfig.from_env(decode_matmul="pallas").resolve("decode_matmul") == "pallas"


def decode_step_kernel_launches(model, input_ids, attention_mask) -> int:
    """How many Pallas calls generate's decode step (as traced for this model and prompt) contains
    (the layer scan's body once)."""
    prepared = generate_module._setup(model, input_ids, attention_mask, 4, False, 1.0, 1.0, 0, [], None, False, 0)
    base, lora = prepared.model.base_params(), prepared.model.lora_params()
    state = jax.eval_shape(functools.partial(generate_module._prefill, static=prepared.static), base, lora,
                           *prepared.arrays)
    step = functools.partial(generate_module._decode_step, static=prepared.static)
    return str(jax.make_jaxpr(step)(base, lora, state)).count("pallas_call[")


def decode_step_runs_the_kernel(model, input_ids, attention_mask) -> bool:
    """Whether generate's decode step contains a Pallas call."""
    return decode_step_kernel_launches(model, input_ids, attention_mask) > 0


def with_decode_matmul(model, mode: str):
    model.ops_config = dataclasses.replace(model.ops_config, decode_matmul=mode)
    return model


@pytest.mark.parametrize("arch,adapter", [("llama", False), ("qwen2", True), ("qwen3", True)])
def test_greedy_decode_on_stacked_kernels_equals_the_sliced_path(arch, adapter, tiny_checkpoints):
    """bfloat16 weights (the kernel's case); qwen2 has q/k/v biases; the adapters stay un-merged."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoints[arch], dtype="bfloat16", max_seq_length=64)
    model = FastLanguageModel.for_inference(model)
    if adapter:
        attach_random_lora(model, rng)
    input_ids, attention_mask = left_padded(rng, [5, 9], tokenizer.pad_token_id)
    settings = {"max_new_tokens": 12, "eos_token_id": []}
    expected = generate_module.generate(with_decode_matmul(model, "reference"), input_ids, attention_mask, **settings)
    assert not decode_step_runs_the_kernel(model, input_ids, attention_mask)
    ours = generate_module.generate(with_decode_matmul(model, "pallas"), input_ids, attention_mask, **settings)
    assert decode_step_runs_the_kernel(model, input_ids, attention_mask)
    np.testing.assert_array_equal(ours, expected, err_msg=f"{arch}, adapter={adapter}, seed {seed}")


def test_4bit_and_float32_bases_keep_the_sliced_path(tiny_checkpoints):
    rng = np.random.default_rng(fresh_seed())
    for kwargs in ({"dtype": "bfloat16", "load_in_4bit": True}, {"dtype": "float32"}):
        model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen3"], max_seq_length=64, **kwargs)
        model = with_decode_matmul(FastLanguageModel.for_inference(model), "pallas")
        input_ids, attention_mask = left_padded(rng, [4, 7], tokenizer.pad_token_id)
        assert not decode_step_runs_the_kernel(model, input_ids, attention_mask), kwargs


def test_unrolled_decode_step_gives_the_same_tokens(tiny_checkpoints):
    """kernels.layer_unroll=0 makes the decode step straight-line code with static layer indices (on
    the stacked-kernel path as well); the tokens are those of the layer loop."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen2"], dtype="bfloat16", max_seq_length=64)
    model = FastLanguageModel.for_inference(model)
    attach_random_lora(model, rng)
    input_ids, attention_mask = left_padded(rng, [4, 7], tokenizer.pad_token_id)
    settings = {"max_new_tokens": 10, "eos_token_id": []}
    for mode in ("reference", "pallas"):
        model = with_decode_matmul(model, mode)
        expected = generate_module.generate(model, input_ids, attention_mask, **settings)
        model.ops_config = dataclasses.replace(model.ops_config, layer_unroll=0)
        ours = generate_module.generate(model, input_ids, attention_mask, **settings)
        model.ops_config = dataclasses.replace(model.ops_config, layer_unroll=1)
        np.testing.assert_array_equal(ours, expected, err_msg=f"decode_matmul={mode}, seed {seed}")


def test_grouped_projections_give_the_same_tokens(tiny_checkpoints, monkeypatch):
    """q/k/v and gate/up in one launch each (qwen2: q/k/v biases; un-merged adapters on every
    projection) give the tokens of one launch per projection."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen2"], dtype="bfloat16", max_seq_length=64)
    model = with_decode_matmul(FastLanguageModel.for_inference(model), "pallas")
    attach_random_lora(model, rng)
    input_ids, attention_mask = left_padded(rng, [6, 3], tokenizer.pad_token_id)
    settings = {"max_new_tokens": 10, "eos_token_id": []}
    monkeypatch.setattr(generate_module, "GROUPED_PROJECTIONS", False)
    jax.clear_caches()
    expected = generate_module.generate(model, input_ids, attention_mask, **settings)
    assert decode_step_kernel_launches(model, input_ids, attention_mask) == 7
    monkeypatch.setattr(generate_module, "GROUPED_PROJECTIONS", True)
    jax.clear_caches()  # the flag is read while tracing
    try:
        assert decode_step_kernel_launches(model, input_ids, attention_mask) == 4
        ours = generate_module.generate(model, input_ids, attention_mask, **settings)
    finally:
        jax.clear_caches()
    np.testing.assert_array_equal(ours, expected, err_msg=f"seed {seed}")

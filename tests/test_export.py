"""Tests for the PEFT adapter format (convert/peft.py), the merge (convert/merge.py) and the model glue
(fastft_jax/export.py), against peft and transformers themselves on tiny float32 checkpoints."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import convert.merge as merge_module
from convert.errors import CheckpointError, ConfigError, UnsupportedModelError
from convert.hf import PROJECTIONS
from convert.merge import main as merge_main
from convert.peft import CONFIG_NAME, WEIGHTS_NAME, load_peft_adapter, lora_scales
from convert.safetensors_io import CheckpointReader, SafetensorsFile
from convert.tiny import write_tiny_checkpoint
from fastft_jax import FastLanguageModel, export
from fastft_jax.trainer import SFTTrainer, TrainingArguments

FLOAT32_TOLERANCE = 1e-5
BFLOAT16_TOLERANCE = 1e-2
VOCAB_IN_USE = 500  # ids below the tiny tokenizers' special tokens and padding rows


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny float32 checkpoints: (arch, tied) -> directory."""
    root = tmp_path_factory.mktemp("bases")
    seed = fresh_seed()
    return {
        (arch, tied): write_tiny_checkpoint(root / f"{arch}-{'tied' if tied else 'untied'}", arch=arch, seed=seed, tie_word_embeddings=tied)
        for arch in ("llama", "qwen2", "qwen3") for tied in (False, True)
    }


def hf_model(directory) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager", dtype=torch.float32).eval()


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(input_ids)).logits.numpy()


# A and B at this std make scale·A·B about a third of the tiny models' weights: far from zero, so a
# dropped or mis-scaled adapter shows at once, but not so large that q·k logits blow up and float32
# rounding alone passes 1e-5 (at std 0.2 the deltas were 5x the weights and merged-vs-transformers
# logits on identical weights reached 1.0e-5).
LORA_STD = 0.05


def random_lora(model, rng: np.random.Generator) -> None:
    """Overwrite every adapter factor, B included, with non-zero draws."""
    model.set_lora_params(jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(0.0, LORA_STD, leaf.shape).astype(np.float32)), model.lora_params()
    ))


def peft_warnings(caught) -> list[str]:
    return [str(item.message) for item in caught if "/peft/" in item.filename.replace("\\", "/")]


def train_a_few_steps(model, tokenizer, output_dir: Path) -> None:
    texts = [{"text": f"Patient {i} takes {3 * i} mg of drug {i % 5} twice a day."} for i in range(12)]
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        save_strategy="no", plot_loss=False, logging_steps=10,
    )
    SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=texts, max_seq_length=64, args=args).train()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_adapter_and_merged_checkpoint_match_transformers(arch, tied, checkpoints, tmp_path):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    base_dir = checkpoints[(arch, tied)]
    model, tokenizer = FastLanguageModel.from_pretrained(base_dir, dtype="float32", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             random_state=seed)
    if (arch, tied) == ("llama", False):
        train_a_few_steps(model, tokenizer, tmp_path / "run")
    else:
        random_lora(model, rng)
    lora_b = np.asarray(model.lora_params()["layers"]["q_proj"]["lora_b"])
    assert np.abs(lora_b).max() > 0, "the adapter must change the model for the test to mean anything"
    input_ids = rng.integers(0, VOCAB_IN_USE, (2, 11))
    ours = np.asarray(model(input_ids))

    adapter_dir = tmp_path / "adapter"
    export.save_pretrained(model, adapter_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_model(base_dir), str(adapter_dir)).eval()
    assert peft_warnings(caught) == []
    error = relative_error(ours, hf_logits(peft_model, input_ids))
    assert error <= FLOAT32_TOLERANCE, f"adapter logits differ from peft's by {error:.3g} (seed {seed})"

    merged_dir = tmp_path / "merged"
    export.save_pretrained_merged(model, merged_dir, tokenizer, save_method="merged_16bit")
    error = relative_error(ours, hf_logits(hf_model(merged_dir), input_ids))
    assert error <= FLOAT32_TOLERANCE, f"merged logits differ by {error:.3g} (seed {seed})"
    files = {path.name for path in merged_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "float32"


def test_adapter_config_has_peft_fields_and_tensor_layout(checkpoints, tmp_path):
    seed = fresh_seed()
    base_dir = checkpoints[("qwen3", False)]
    model, _ = FastLanguageModel.from_pretrained(base_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=6, lora_alpha=12, lora_dropout=0.05,
                                             target_modules=["q_proj", "down_proj"], use_rslora=True,
                                             random_state=seed)
    random_lora(model, np.random.default_rng(seed))
    export.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(config) | {"peft_version"} == set(LoraConfig().to_dict())
    assert {key: config[key] for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                         "bias", "use_rslora", "fan_in_fan_out")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 6, "lora_alpha": 12, "lora_dropout": 0.05,
        "target_modules": ["down_proj", "q_proj"], "bias": "none", "use_rslora": True, "fan_in_fan_out": False,
    }
    assert Path(config["base_model_name_or_path"]) == Path(base_dir).resolve()
    lora = model.lora_params()["layers"]
    weights = SafetensorsFile(tmp_path / WEIGHTS_NAME)
    try:
        assert len(weights.keys()) == 2 * 2 * model.config.num_layers
        key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
        assert weights.shape(key) == (6, 64) and weights.header[key]["dtype"] == "F32"
        np.testing.assert_array_equal(weights.get(key), np.asarray(lora["q_proj"]["lora_a"][1]).T)
        key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
        assert weights.shape(key) == (64, 6)
        np.testing.assert_array_equal(weights.get(key), np.asarray(lora["down_proj"]["lora_b"][0]).T)
    finally:
        weights.close()


def test_save_pretrained_keeps_a_tokenizer_saved_first_and_does_not_clobber(checkpoints, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(checkpoints[("llama", False)], dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=2, target_modules=["v_proj"])
    tokenizer.save_pretrained(str(tmp_path))
    export.save_pretrained(model, tmp_path)
    assert {"tokenizer.json", CONFIG_NAME, WEIGHTS_NAME} <= {path.name for path in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match="overwrite=True"):
        export.save_pretrained(model, tmp_path)
    export.save_pretrained(model, tmp_path, overwrite=True)


PEFT_VARIANTS = {
    "all-projections": ("llama", False, dict(r=4, lora_alpha=8, target_modules=list(PROJECTIONS))),
    "rslora": ("qwen2", True, dict(r=8, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)),
    "subset": ("qwen3", False, dict(r=3, lora_alpha=7, target_modules=["k_proj", "up_proj"])),
    "rank-pattern": ("qwen3", True, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, r"layers\.\d+\.self_attn\.o_proj": 6},
        alpha_pattern={"down_proj": 3, "v_proj": 20},
    )),
}


@pytest.mark.parametrize("variant", sorted(PEFT_VARIANTS))
def test_adapters_made_by_peft_load_with_equal_logits(variant, checkpoints, tmp_path):
    arch, tied, lora_kwargs = PEFT_VARIANTS[variant]
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    base_dir = checkpoints[(arch, tied)]
    peft_model = get_peft_model(hf_model(base_dir), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    peft_dir = tmp_path / "peft-adapter"
    peft_model.save_pretrained(str(peft_dir))

    model, _ = export.load_from_adapter_dir(peft_dir, dtype="float32")
    input_ids = np.random.default_rng(seed).integers(0, VOCAB_IN_USE, (2, 9))
    error = relative_error(np.asarray(model(input_ids)), hf_logits(peft_model, input_ids))
    assert error <= FLOAT32_TOLERANCE, f"{variant}: logits differ from peft's by {error:.3g} (seed {seed})"

    # The resolved settings give peft's scale per projection, in convert/ and in LoRAConfig alike.
    settings, _ = load_peft_adapter(peft_dir, model.config)
    for name, scale in lora_scales(settings).items():
        layer = peft_model.base_model.model.model.layers[0]
        module = getattr(layer.self_attn if name in PROJECTIONS[:4] else layer.mlp, name)
        assert scale == pytest.approx(module.scaling["default"], rel=1e-12)
        assert model.lora_config.scale(name) == pytest.approx(scale, rel=1e-12)

    # Saved again by fastft-jax, the tensors are peft's own, bit for bit.
    ours_dir = tmp_path / "ours"
    export.save_pretrained(model, ours_dir)
    peft_weights, our_weights = SafetensorsFile(peft_dir / WEIGHTS_NAME), SafetensorsFile(ours_dir / WEIGHTS_NAME)
    try:
        assert sorted(peft_weights.keys()) == sorted(our_weights.keys())
        for key in peft_weights.keys():
            np.testing.assert_array_equal(our_weights.get(key), peft_weights.get(key), err_msg=key)
    finally:
        peft_weights.close()
        our_weights.close()


def test_save_load_save_round_trip_is_identical(checkpoints, tmp_path):
    seed = fresh_seed()
    base_dir = checkpoints[("qwen2", False)]
    model, tokenizer = FastLanguageModel.from_pretrained(base_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=16, target_modules=["q_proj", "gate_proj", "o_proj"],
                                             random_state=seed)
    random_lora(model, np.random.default_rng(seed))
    first = export.save_pretrained_merged(model, tmp_path / "first", tokenizer, save_method="lora")
    assert (first / "tokenizer.json").is_file()
    reloaded, _ = export.load_from_adapter_dir(first, dtype="float32")
    assert reloaded.lora_config == model.lora_config
    second = export.save_pretrained(reloaded, tmp_path / "second")
    assert (first / WEIGHTS_NAME).read_bytes() == (second / WEIGHTS_NAME).read_bytes()
    assert (first / CONFIG_NAME).read_text() == (second / CONFIG_NAME).read_text()


def test_merge_cli_matches_peft_merge_and_unload(checkpoints, tmp_path):
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    base_dir = checkpoints[("llama", True)]
    lora_config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "down_proj"],
                             rank_pattern={"k_proj": 2})
    peft_model = get_peft_model(hf_model(base_dir), lora_config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reference = {name: tensor.numpy() for name, tensor in peft_model.merge_and_unload().state_dict().items()}

    for dtype, tolerance in (("float32", FLOAT32_TOLERANCE), ("bfloat16", BFLOAT16_TOLERANCE)):
        out = tmp_path / f"merged-{dtype}"
        merge_main(["--base", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                    "--dtype", dtype, "--max-shard-size", "200KB"])
        assert (out / "model.safetensors.index.json").is_file(), "a checkpoint above max_shard_size is sharded"
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        with CheckpointReader(out) as reader:
            assert set(reader.keys()) == set(reference) - {"lm_head.weight"}
            for name in reader.keys():
                merged = reader.get(name)
                assert merged.dtype == merge_module.DTYPES[dtype], name
                error = relative_error(merged.astype(np.float32), reference[name])
                assert error <= tolerance, f"{name} ({dtype}): {error:.3g} from peft's merge (seed {seed})"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged-bfloat16"))
    assert loaded.dtype == torch.bfloat16


def test_merged_checkpoint_carries_the_rope_scaling_the_model_ran_with(checkpoints, tmp_path):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, _ = FastLanguageModel.from_pretrained(checkpoints[("llama", False)], dtype="float32", max_seq_length=4096)
    model = FastLanguageModel.get_peft_model(model, r=2, target_modules=["q_proj", "k_proj"], random_state=seed)
    random_lora(model, rng)
    export.save_pretrained_merged(model, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    # Linear scaling halves every rotation angle, so a short sequence already tells it apart; far
    # positions would only add float32 rounding of large angles.
    input_ids = rng.integers(0, VOCAB_IN_USE, (1, 40))
    error = relative_error(model(input_ids), hf_logits(hf_model(tmp_path / "merged"), input_ids))
    assert error <= FLOAT32_TOLERANCE, f"{error:.3g} (seed {seed})"


def test_bfloat16_model_merges_to_bfloat16(checkpoints, tmp_path):
    seed = fresh_seed()
    base_dir = checkpoints[("qwen3", True)]
    model, _ = FastLanguageModel.from_pretrained(base_dir, dtype="bfloat16")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["up_proj"], random_state=seed)
    random_lora(model, np.random.default_rng(seed))
    export.save_pretrained_merged(model, tmp_path / "merged", max_shard_size="5GB")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    lora = model.lora_params()["layers"]["up_proj"]
    base_kernel = np.asarray(model.base_params()["layers"]["up_proj"]["kernel"][1], np.float32)
    delta = np.asarray(lora["lora_a"][1]) @ np.asarray(lora["lora_b"][1]) * model.lora_config.scale("up_proj")
    expected = (base_kernel + delta).astype(ml_dtypes.bfloat16)
    with CheckpointReader(tmp_path / "merged") as reader:
        merged = reader.get("model.layers.1.mlp.up_proj.weight")
        assert merged.dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(merged.T, expected)
        np.testing.assert_array_equal(reader.get("model.layers.1.mlp.gate_proj.weight").T,
                                      np.asarray(model.base_params()["layers"]["gate_proj"]["kernel"][1]))


def test_interrupted_merged_save_leaves_nothing_at_the_target(checkpoints, tmp_path, monkeypatch):
    model, tokenizer = FastLanguageModel.from_pretrained(checkpoints[("qwen2", True)], dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=2)

    def save_half_then_fail(tensors, directory, **kwargs):
        (Path(directory) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(merge_module, "save_sharded", save_half_then_fail)
    target = tmp_path / "out" / "merged"
    with pytest.raises(KeyboardInterrupt):
        export.save_pretrained_merged(model, target, tokenizer)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        export.save_pretrained_merged(model, target, tokenizer, overwrite=True)
    assert [path.name for path in target.iterdir()] == ["config.json"], "the old checkpoint must survive"
    assert sorted(path.name for path in target.parent.iterdir()) == ["merged"]


@pytest.fixture(scope="module")
def llama_adapter(checkpoints, tmp_path_factory):
    """A llama adapter over all projections, saved by fastft-jax."""
    model, _ = FastLanguageModel.from_pretrained(checkpoints[("llama", False)], dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=list(PROJECTIONS))
    return export.save_pretrained(model, tmp_path_factory.mktemp("llama-adapter") / "adapter")


def _edited_copy(adapter_dir: Path, target: Path, **config_changes) -> Path:
    target.mkdir()
    (target / WEIGHTS_NAME).write_bytes((adapter_dir / WEIGHTS_NAME).read_bytes())
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    config.update(config_changes)
    (target / CONFIG_NAME).write_text(json.dumps(config))
    return target


def test_adapter_for_another_base_names_the_tensor_and_both_shapes(checkpoints, llama_adapter):
    with pytest.raises(CheckpointError) as caught:
        export.load_from_adapter_dir(llama_adapter, base_model_path=checkpoints[("qwen3", False)], dtype="float32")
    message = str(caught.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in message
    assert "[64, 4]" in message and "[96, 4]" in message and "another base" in message


def test_unknown_target_modules_are_refused(checkpoints, llama_adapter, tmp_path):
    from convert.hf import model_config_from_hf, read_config_json

    config = model_config_from_hf(read_config_json(checkpoints[("llama", False)]))
    in_config = _edited_copy(llama_adapter, tmp_path / "config", target_modules=list(PROJECTIONS) + ["lm_head"])
    with pytest.raises(CheckpointError, match=r"unknown target module.*lm_head"):
        load_peft_adapter(in_config, config)

    in_tensors = tmp_path / "tensors"
    in_tensors.mkdir()
    (in_tensors / CONFIG_NAME).write_text((llama_adapter / CONFIG_NAME).read_text())
    weights = SafetensorsFile(llama_adapter / WEIGHTS_NAME)
    tensors = {key: np.array(weights.get(key)) for key in weights.keys()}
    weights.close()
    tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
    from convert.safetensors_io import save_file

    save_file(tensors, in_tensors / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"unknown target module self_attn\.qkv_proj"):
        load_peft_adapter(in_tensors, config)


def test_missing_base_model_path_says_what_was_tried(llama_adapter, tmp_path):
    missing = tmp_path / "no-such-base"
    adapter = _edited_copy(llama_adapter, tmp_path / "adapter", base_model_name_or_path=str(missing))
    with pytest.raises(CheckpointError) as caught:
        export.load_from_adapter_dir(adapter, dtype="float32")
    assert str(missing) in str(caught.value) and "base_model_path" in str(caught.value)
    with pytest.raises(CheckpointError, match="base_model_path"):
        export.load_from_adapter_dir(adapter, base_model_path=tmp_path / "also-missing", dtype="float32")


def test_other_unsupported_adapters_get_clear_errors(checkpoints, llama_adapter, tmp_path):
    from convert.hf import model_config_from_hf, read_config_json

    config = model_config_from_hf(read_config_json(checkpoints[("llama", False)]))
    per_layer = _edited_copy(llama_adapter, tmp_path / "per-layer",
                             rank_pattern={"model.layers.0.self_attn.q_proj": 2})
    with pytest.raises(UnsupportedModelError, match="across layers"):
        load_peft_adapter(per_layer, config)
    dora = _edited_copy(llama_adapter, tmp_path / "dora", use_dora=True)
    with pytest.raises(UnsupportedModelError, match="DoRA"):
        load_peft_adapter(dora, config)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / CONFIG_NAME).write_text((llama_adapter / CONFIG_NAME).read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_peft_adapter(pickled, config)
    with pytest.raises(ConfigError, match="save_method"):
        model, _ = FastLanguageModel.from_pretrained(checkpoints[("llama", False)], dtype="float32")
        export.save_pretrained_merged(model, tmp_path / "x", save_method="merged_4bit")


def test_peft_key_variants_load_the_same_tree(checkpoints, llama_adapter, tmp_path):
    from convert.hf import model_config_from_hf, read_config_json
    from convert.safetensors_io import save_file

    config = model_config_from_hf(read_config_json(checkpoints[("llama", False)]))
    _, expected = load_peft_adapter(llama_adapter, config)
    weights = SafetensorsFile(llama_adapter / WEIGHTS_NAME)
    tensors = {key: np.array(weights.get(key)) for key in weights.keys()}
    weights.close()
    renames = {
        "with-adapter-name": lambda key: key.replace(".weight", ".default.weight"),
        "without-prefix": lambda key: key.removeprefix("base_model.model."),
        "without-model": lambda key: key.removeprefix("base_model.model.model."),
    }
    for variant, rename in renames.items():
        directory = tmp_path / variant
        directory.mkdir()
        (directory / CONFIG_NAME).write_text((llama_adapter / CONFIG_NAME).read_text())
        save_file({rename(key): value for key, value in tensors.items()}, directory / WEIGHTS_NAME)
        _, loaded = load_peft_adapter(directory, config)
        jax.tree.map(np.testing.assert_array_equal, loaded, expected)

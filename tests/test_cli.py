"""The CLI and YAML, the bundled demo, the medical recipe script, the self-check and the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from convert.errors import ConfigError
from fastft_jax.train import load_run_config, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    from convert.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "tiny-qwen2", arch="qwen2")


def test_quickstart_trains_with_a_falling_loss(demo_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--config", str(ROOT / "examples/quickstart.yaml"), "--set", f"model.name={demo_checkpoint}",
                 "--set", f"training.output_dir={out}", "--set", "training.max_steps=30",
                 "--set", f"data.path={ROOT / 'examples/data/reasoning.jsonl'}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "resolved config" in printed and "max_steps: 30" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < train_losses[0] - 0.5, train_losses
    assert (out / "lora_model" / "adapter_config.json").exists()
    assert (out / "lora_model" / "adapter_model.safetensors").exists()
    assert (out / "lora_model" / "tokenizer_config.json").exists()
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_run_exports_merged_checkpoint_and_gguf(demo_checkpoint, tmp_path):
    import gguf

    out = tmp_path / "out"
    code = main(["--config", str(ROOT / "examples/quickstart.yaml"), "--set", f"model.name={demo_checkpoint}",
                 "--set", f"training.output_dir={out}", "--set", "training.max_steps=2",
                 "--set", f"data.path={ROOT / 'examples/data/reasoning.jsonl'}",
                 "--set", "export.merged=true", "--set", "export.gguf=q8_0"])
    assert code == 0
    merged = out / "merged_model"
    assert (merged / "config.json").exists() and (merged / "tokenizer_config.json").exists()
    gguf_files = list((out / "gguf").glob("*.gguf"))
    assert len(gguf_files) == 1
    reader = gguf.GGUFReader(str(gguf_files[0]))
    assert any(tensor.name == "token_embd.weight" for tensor in reader.tensors)


def _write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _base_config(tmp_path) -> dict:
    return {
        "model": {"name": str(tmp_path / "no-such-model")},
        "data": {"path": str(ROOT / "examples/data/reasoning.jsonl"), "text_field": None,
                 "template": "{Question}\n{Response}"},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2},
    }


def test_medical_recipe_yaml_is_valid():
    config = load_run_config(ROOT / "examples/medical_cot.yaml")
    assert config.training.gradient_accumulation_steps == 4
    assert "{Complex_CoT}" in config.data.template and config.export.gguf == "q8_0"


def test_unknown_key_names_the_nearest(tmp_path):
    config = _base_config(tmp_path)
    config["training"]["learning_rat"] = 1e-4
    with pytest.raises(ConfigError, match="learning_rat.*did you mean `learning_rate`"):
        load_run_config(_write_yaml(tmp_path / "run.yaml", config))
    config = _base_config(tmp_path)
    config["trainig"] = {}
    with pytest.raises(ConfigError, match="trainig.*did you mean `training`"):
        load_run_config(_write_yaml(tmp_path / "run.yaml", config))


def test_wrong_type_names_the_key(tmp_path):
    config = _base_config(tmp_path)
    config["lora"] = {"r": "sixteen"}
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_run_config(_write_yaml(tmp_path / "run.yaml", config))


def test_missing_dataset_field_fails_before_the_model_loads(tmp_path, capsys):
    """The model path does not exist: the error must still be the dataset's, so the data was
    checked first."""
    config = _base_config(tmp_path)
    config["data"]["template"] = "{Question}\n{Answer}"
    code = main(["--config", str(_write_yaml(tmp_path / "run.yaml", config))])
    assert code == 2
    assert "'Answer'" in capsys.readouterr().err


def test_set_override_and_bad_override(tmp_path):
    path = _write_yaml(tmp_path / "run.yaml", _base_config(tmp_path))
    assert load_run_config(path, ["training.max_steps=7"]).training.max_steps == 7
    with pytest.raises(ConfigError, match="section.key=value"):
        load_run_config(path, ["max_steps"])


def test_medical_recipe_script_runs_with_only_imports_changed(demo_checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/medical_cot.py"), "--model", str(demo_checkpoint),
         "--data", str(ROOT / "examples/data/reasoning.jsonl"), "--max-seq-length", "256", "--max-steps", "2",
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "lora_model" / "adapter_config.json").exists()


def test_self_check_exits_zero():
    result = subprocess.run([sys.executable, "-m", "fastft_jax"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fastft_jax is installed correctly" in result.stdout
    for op in ("rms_norm", "rope", "swiglu", "lora_linear", "cross_entropy", "attention"):
        assert f"{op}" in result.stdout


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line][0].strip()
    assert ci_command in readme

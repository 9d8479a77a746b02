"""`python -m fastft_jax.train --config FILE.yaml [--set section.key=value ...]`

One YAML holds a whole run in five sections, each mapping one to one onto a frozen dataclass:
model (ModelSection), lora (LoRASection), data (fastft_jax.data.DataConfig), training
(fastft_jax.trainer.TrainingArguments) and export (ExportSection). Everything is validated, and
the dataset's fields checked, before the model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from convert.errors import ConfigError, FastFTError
from fastft_jax.config_utils import dataclass_from_dict, nearest_key_hint
from fastft_jax.data import DataConfig, load_records, validate_fields

SECTIONS = ("model", "lora", "data", "training", "export")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """FastLanguageModel.from_pretrained's arguments."""

    name: str = ""
    max_seq_length: int = 2048
    dtype: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # Per-op implementation: {"attention": "auto", "rms_norm": "pallas", ...}; see fastft_jax.ops.
    kernels: dict | None = None

    def __post_init__(self):
        if not self.name:
            raise ConfigError("model.name is required: the local HF checkpoint directory to fine-tune")


@dataclasses.dataclass(frozen=True)
class LoRASection:
    """FastLanguageModel.get_peft_model's arguments."""

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    bias: str = "none"
    # "auto": the fastest mode predicted to fit the memory limit (FastLanguageModel.get_peft_model).
    use_gradient_checkpointing: bool | str = "auto"
    random_state: int = 3407
    use_rslora: bool = False

    def __post_init__(self):
        from fastft_jax.model import validate_checkpoint_setting  # lazily: it pulls in jax

        validate_checkpoint_setting(self.use_gradient_checkpointing, "lora.use_gradient_checkpointing")


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """What the run leaves behind. Relative paths are inside training.output_dir."""

    adapter_dir: str = "lora_model"
    merged: bool = False
    merged_dir: str = "merged_model"
    gguf: str | None = None  # f16, bf16 or q8_0
    gguf_dir: str = "gguf"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    lora: LoRASection
    data: DataConfig
    training: Any  # TrainingArguments (imported lazily: it pulls in jax)
    export: ExportSection


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2:
        raise ConfigError(f"--set {text!r}: name a section and a key, e.g. training.max_steps=10")
    return keys, yaml.safe_load(raw)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read and validate the YAML: unknown sections/keys and wrong types fail here, naming the key."""
    from fastft_jax.trainer import TrainingArguments

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of the sections {', '.join(SECTIONS)}")
    for override in overrides:
        keys, value = _parse_override(override)
        node = raw.setdefault(keys[0], {})
        for key in keys[1:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}{nearest_key_hint(section, list(SECTIONS))}")
    where = lambda section: f"{path.name}:{section}"  # noqa: E731
    model = dataclass_from_dict(ModelSection, raw.get("model") or {}, where("model"))
    lora = dataclass_from_dict(LoRASection, raw.get("lora") or {}, where("lora"))
    data_values = dict(raw.get("data") or {})
    data_values.setdefault("max_seq_length", model.max_seq_length)
    data = DataConfig.from_dict(data_values, where("data"))
    training = TrainingArguments.from_dict(raw.get("training") or {}, where("training"))
    export = dataclass_from_dict(ExportSection, raw.get("export") or {}, where("export"))
    if export.gguf is not None and export.gguf not in ("f16", "bf16", "q8_0"):
        raise ConfigError(f"{path.name}:export.gguf {export.gguf!r}: choose f16, bf16 or q8_0")
    return RunConfig(model=model, lora=lora, data=data, training=training, export=export)


def _resolved_yaml(config: RunConfig) -> str:
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return yaml.safe_dump({section: plain(getattr(config, section)) for section in SECTIONS}, sort_keys=False)


def _inside(output_dir: str, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else Path(output_dir) / candidate


def run(config: RunConfig) -> dict:
    """Validate the data, load the model, attach LoRA, train, export. Returns where things went.

    Several hosts: run the same command on each, one process per host, with JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under srun); process 0 logs and exports."""
    import jax

    from fastft_jax import sharding

    sharding.initialize_distributed()
    sharding.make_mesh(config.training.mesh)  # a mesh that does not fit the devices fails before any work
    records = load_records(config.data.path, config.data.split) if config.data.path else None
    if records is None:
        raise ConfigError("data.path is required on the command line: the dataset file or directory to train on")
    validate_fields(records, config.data)

    from fastft_jax import FastLanguageModel
    from fastft_jax.trainer import SFTTrainer, set_variables

    model, tokenizer = FastLanguageModel.from_pretrained(
        config.model.name, max_seq_length=config.model.max_seq_length, dtype=config.model.dtype,
        load_in_4bit=config.model.load_in_4bit, load_in_8bit=config.model.load_in_8bit, kernels=config.model.kernels,
    )
    lora = config.lora
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, target_modules=lora.target_modules, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        bias=lora.bias, use_gradient_checkpointing=lora.use_gradient_checkpointing, random_state=lora.random_state,
        use_rslora=lora.use_rslora,
    )
    if sharding.is_main_process():
        model.print_trainable_parameters()
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=records, args=config.training,
                         data_config=config.data)
    stats = trainer.train()
    output_dir = config.training.output_dir
    outputs = {"output_dir": output_dir, "metrics": str(Path(output_dir) / "metrics.jsonl"),
               "loss_curve": str(Path(output_dir) / "loss_curve.png")}
    outputs["final_loss"] = trainer.log_history[-1].get("loss") if trainer.log_history else None
    outputs["training_loss"] = stats.training_loss
    outputs["global_step"] = stats.global_step
    if jax.process_count() > 1:
        # The exports read whole arrays: gather them to every host (a collective, so every process
        # takes part); then process 0 alone writes.
        model.set_lora_params(sharding.gather_to_host(model.lora_params()))
        if config.export.merged or config.export.gguf:
            set_variables(model.base, sharding.gather_to_host(model.base_params()))
    if not sharding.is_main_process():
        return outputs
    adapter_dir = _inside(output_dir, config.export.adapter_dir)
    model.save_pretrained(adapter_dir, overwrite=True)
    tokenizer.save_pretrained(str(adapter_dir))
    outputs["adapter"] = str(adapter_dir)
    if config.export.merged:
        merged_dir = _inside(output_dir, config.export.merged_dir)
        model.save_pretrained_merged(merged_dir, tokenizer, save_method="merged_16bit", overwrite=True)
        outputs["merged"] = str(merged_dir)
    if config.export.gguf:
        gguf_dir = _inside(output_dir, config.export.gguf_dir)
        outputs["gguf"] = str(model.save_pretrained_gguf(gguf_dir, tokenizer, quantization_method=config.export.gguf))
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastft_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key of the YAML (repeatable)")
    args = parser.parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        from fastft_jax import sharding

        sharding.initialize_distributed()
        sharding.main_print("fastft_jax: resolved config\n" + _resolved_yaml(config))
        outputs = run(config)
    except FastFTError as err:
        print(f"fastft_jax.train: error: {err}", file=sys.stderr)
        return 2
    sharding.main_print("\nfastft_jax: done")
    for name, value in outputs.items():
        sharding.main_print(f"  {name:14s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

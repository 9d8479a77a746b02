"""fastft_jax/plan.py: the formula against XLA's memory analysis, the searches, the trainer's refusal
of a run that cannot fit, and the CLI."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from convert import quant
from convert.errors import ConfigError
from convert.hf import model_config_from_hf, read_config_json
from fastft_jax import ops, tiling
from fastft_jax.data import DataConfig
from fastft_jax.lora import LoRAConfig
from fastft_jax.plan import (
    CHECKPOINT_SPEED_ORDER,
    _abstract_quantized,
    abstract_base_params,
    check_run_fits,
    choose_checkpointing,
    host_memory_available,
    main,
    max_batch_size_that_fits,
    max_seq_length_that_fits,
    parse_memory_size,
    plan_memory,
    weight_bytes,
    weight_bytes_of_tree,
)

# Every checkpointing mode in both dtypes, each on one of the tiny checkpoints (all three appear:
# tied and untied heads, GQA, Qwen3's q/k norms and head_dim 24) at a length between 64 and 2048
# tokens, powers of two and not, with attention as the GPU runs it (the flash kernel, here in the
# Pallas interpreter: nothing quadratic in the length) and as the CPU runs it by default (the
# reference, which holds [batch, heads, seq, seq] scores). The compiled peak is XLA's
# argument + output - alias + temp: all the step holds on the device at once.
CASES = [
    ("pallas", False, "float32", "qwen2", 2048),
    ("pallas", "unsloth", "bfloat16", "qwen3", 600),
    ("pallas", "selective", "float32", "llama", 1000),
    ("reference", False, "float32", "llama", 64),
    ("reference", False, "bfloat16", "qwen3", 1536),
    ("reference", True, "float32", "qwen2", 384),
    ("reference", True, "bfloat16", "llama", 2048),
    ("reference", "unsloth", "float32", "qwen3", 768),
    ("reference", "unsloth", "bfloat16", "qwen2", 96),
    ("reference", "selective", "float32", "qwen3", 2048),
    ("reference", "selective", "bfloat16", "llama", 600),
]


def _config(tiny_checkpoints, name):
    return model_config_from_hf(read_config_json(tiny_checkpoints[name]))


@pytest.mark.parametrize("attention,mode,dtype,name,length", CASES)
def test_formula_within_10_percent_of_xla(tiny_checkpoints, attention, mode, dtype, name, length):
    plan = plan_memory(_config(tiny_checkpoints, name), max_seq_length=length, dtype=dtype, gradient_checkpointing=mode,
                       ops_config=ops.OpsConfig(attention=attention), source="compiled", backend="cpu")
    compiled = plan.compiled
    # The arguments are known exactly: weights, adapters, AdamW state and the token batch.
    assert plan.weights_total + plan.lora_params + plan.optimizer_state + plan.batch_inputs == compiled.argument
    error = (plan.predicted_peak - compiled.peak) / compiled.peak
    assert abs(error) <= 0.10, f"{name} {attention} {mode} {dtype} {length} tokens: formula off by {error:+.1%}"


@pytest.mark.parametrize("quantization", [None, "nf4", "int8"])
def test_weight_bytes_match_the_quantized_tree(tiny_checkpoints, quantization):
    config = _config(tiny_checkpoints, "qwen3")
    from_config = weight_bytes(config, jnp.bfloat16, quantization)
    assert from_config == weight_bytes_of_tree(abstract_base_params(config, jnp.bfloat16, quantization))
    if quantization:
        # The abstract layout is convert/quant.py's, for a kernel of an odd size.
        weight = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (88, 24))
        real = quant.stack_layers([quant.quantize(weight, quantization)] * 3)
        abstract = _abstract_quantized(24, 88, 3, quantization)
        def shapes(tree):
            return [(leaf.shape, jnp.dtype(leaf.dtype)) for leaf in jax.tree.leaves(tree)]

        assert shapes(real) == shapes(abstract)


def test_searches_return_the_largest_run_that_fits(tiny_checkpoints):
    config = _config(tiny_checkpoints, "llama")
    args = dict(dtype="float32", gradient_checkpointing=True, backend="cpu", batch_size=2, max_seq_length=512)
    limit = plan_memory(config, source="shapes", **args).peak * 3
    longest = max_seq_length_that_fits(limit, config, **args)
    assert plan_memory(config, source="shapes", **{**args, "max_seq_length": longest}).peak <= limit
    assert plan_memory(config, source="shapes", **{**args, "max_seq_length": longest + 1}).peak > limit
    widest = max_batch_size_that_fits(limit, config, **args)
    assert plan_memory(config, source="shapes", **{**args, "batch_size": widest}).peak <= limit
    assert plan_memory(config, source="shapes", **{**args, "batch_size": widest + 1}).peak > limit
    assert max_seq_length_that_fits(1000, config, **args) == 0  # not even the weights fit


def test_memory_sizes_parse():
    assert parse_memory_size("24GB") == parse_memory_size("24 GiB") == 24 << 30
    assert parse_memory_size("1.5tb") == 3 << 39
    assert parse_memory_size(4096) == 4096
    assert parse_memory_size("off") is None and parse_memory_size(None) is None
    with pytest.raises(ConfigError, match="24 parsecs"):
        parse_memory_size("24 parsecs")


def test_trainer_refuses_a_run_that_cannot_fit_before_compiling(tiny_checkpoints, tmp_path, monkeypatch):
    from fastft_jax import FastLanguageModel, SFTTrainer, TrainingArguments

    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen2"], max_seq_length=1024, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=True)
    monkeypatch.setattr(SFTTrainer, "_build_train_step", lambda self: pytest.fail("the step was built"))
    monkeypatch.setattr("fastft_jax.trainer.prepare_datasets", lambda *a, **k: pytest.fail("the data was prepared"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, memory_limit="128MB")
    with pytest.raises(ConfigError) as raised:
        SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=[{"text": "a b c"}], args=args, max_seq_length=1024)
    message = str(raised.value)
    assert "more than the limit of 128.00 MiB (training.memory_limit)" in message
    assert float(re.search(r"needs about ([0-9.]+) MiB", message).group(1)) > 128
    longest = int(re.search(r"largest max_seq_length that fits at batch 4 is ([0-9,]+)", message).group(1).replace(",", ""))
    widest = int(re.search(r"largest batch that fits at max_seq_length 1,024 is ([0-9,]+)", message).group(1).replace(",", ""))
    plan_args = dict(lora_config=model.lora_config, dtype="float32", gradient_checkpointing=True, source="shapes",
                     ops_config=model.ops_config, base_params=model.base_params())
    assert plan_memory(model.config, batch_size=4, max_seq_length=longest, **plan_args).peak <= 128 << 20
    assert plan_memory(model.config, batch_size=4, max_seq_length=longest + 1, **plan_args).peak > 128 << 20
    assert plan_memory(model.config, batch_size=widest, max_seq_length=1024, **plan_args).peak <= 128 << 20
    assert plan_memory(model.config, batch_size=widest + 1, max_seq_length=1024, **plan_args).peak > 128 << 20


def test_cli_prints_the_split_and_what_fits(tiny_checkpoints, tmp_path, capsys):
    config = {
        "model": {"name": str(tiny_checkpoints["llama"]), "max_seq_length": 4096, "load_in_4bit": True},
        "lora": {"r": 32, "use_gradient_checkpointing": "unsloth"},
        "data": {"path": "unused.jsonl"},
        "training": {"per_device_train_batch_size": 2, "memory_limit": "64MB"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--set", "training.gradient_accumulation_steps=2"]) == 0
    printed = capsys.readouterr().out
    for row in ("nf4 codes (4-bit projections)", "nf4 absmax + double quant", "bfloat16 weights",
                "LoRA parameters (float32)", "AdamW m and v (float32)", "gradients (float32)",
                "saved activations: 2 layers", "one layer's backward", "loss head",
                "peak device memory (formula)", "host memory (offloaded layer inputs)",
                "memory limit (training.memory_limit)", "largest max_seq_length that fits at batch 2",
                "largest batch that fits at max_seq_length 4096"):
        assert row in printed, row
    assert "batch 2 x 4096 tokens x 2 accumulation" in printed
    # --memory wins over the YAML; --backend cpu compiles the tiny step for XLA's own number.
    assert main(["--config", str(path), "--memory", "1GB", "--backend", "cpu", "--set", "model.load_in_4bit=false"]) == 0
    printed = capsys.readouterr().out
    assert "peak device memory (XLA memory analysis)" in printed and "memory limit (--memory)" in printed
    assert main(["--config", str(path), "--memory", "24 parsecs"]) == 2
    assert "24 parsecs" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["gpu", "cpu"])
def test_auto_checkpointing_takes_the_fastest_mode_that_fits(tiny_checkpoints, backend):
    config = _config(tiny_checkpoints, "llama")
    length = int(np.random.default_rng().integers(700, 3000))
    args = dict(dtype="bfloat16", backend=backend, batch_size=2, max_seq_length=length, gradient_accumulation_steps=2)
    peaks = {mode: plan_memory(config, source="shapes", gradient_checkpointing=mode, **args).peak
             for mode in CHECKPOINT_SPEED_ORDER}
    chosen = set()
    for limit in sorted({peak + offset for peak in peaks.values() for offset in (-1, 0)}) + [1 << 40]:
        expected = next((mode for mode in CHECKPOINT_SPEED_ORDER if peaks[mode] <= limit), "unsloth")
        choice = choose_checkpointing(limit, config, gradient_checkpointing="auto", **args)
        assert choice.mode == expected and type(choice.mode) is type(expected), (limit, peaks, choice)
        assert dict(choice.peaks) == peaks
        chosen.add(choice.mode)
    assert "selective" in chosen and len(chosen) >= 2, chosen  # the limits above did make it choose
    # No limit known: full recomputation, whatever the sizes.
    assert choose_checkpointing(None, config, **args).mode is True
    assert choose_checkpointing("off", config, **args).mode is True
    with pytest.raises(ConfigError, match="choose_checkpointing"):
        plan_memory(config, source="shapes", gradient_checkpointing="auto", **args)


def test_cli_resolves_auto_checkpointing(tiny_checkpoints, tmp_path, capsys):
    config = {
        "model": {"name": str(tiny_checkpoints["qwen2"]), "max_seq_length": 2048},
        "lora": {"r": 8},  # use_gradient_checkpointing left at its default, "auto"
        "data": {"path": "unused.jsonl"},
        "training": {"per_device_train_batch_size": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--memory", "1TB"]) == 0
    printed = capsys.readouterr().out
    assert 'use_gradient_checkpointing: auto -> "selective" (predicted' in printed
    assert 'use_gradient_checkpointing="selective"' in printed and "predicted peak by mode, fastest first" in printed
    # A GPU plan on this CPU with no limit: full recomputation.
    assert main(["--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "auto -> True (no memory limit known" in printed and "use_gradient_checkpointing=True" in printed
    assert main(["--config", str(path), "--set", "lora.use_gradient_checkpointing=full"]) == 2
    assert '"auto"' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Pinned host memory: use_gradient_checkpointing="unsloth" keeps every layer's input on the host.
# ---------------------------------------------------------------------------------------------


def _unsloth_model(tiny_checkpoints):
    from fastft_jax import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoints["llama"], max_seq_length=4096,
                                                         dtype="float32")
    return FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing="unsloth"), tokenizer


def _gpu_plan(model, **run):
    """The trainer's plan of `model` as a GPU would run it (this CPU would offload nothing)."""
    return plan_memory(model.config, lora_config=model.lora_config, dtype="float32", gradient_checkpointing="unsloth",
                       ops_config=model.ops_config, base_params=model.base_params(), backend="gpu", source="shapes",
                       **run)


def test_trainer_refuses_a_run_whose_offloaded_inputs_pass_the_host_memory(tiny_checkpoints, tmp_path, monkeypatch):
    from fastft_jax import SFTTrainer, TrainingArguments

    model, tokenizer = _unsloth_model(tiny_checkpoints)
    batch, length = 3, int(np.random.default_rng().integers(1500, 4000))
    need = _gpu_plan(model, batch_size=batch, max_seq_length=length).host
    available = int(need * np.random.default_rng().uniform(0.2, 0.8))
    monkeypatch.setattr("fastft_jax.plan.current_backend", lambda: "gpu")
    monkeypatch.setattr("fastft_jax.plan.host_memory_available", lambda: available)
    monkeypatch.setattr(SFTTrainer, "_build_train_step", lambda self: pytest.fail("the step was built"))
    monkeypatch.setattr("fastft_jax.trainer.prepare_datasets", lambda *a, **k: pytest.fail("the data was prepared"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=1,
                             memory_limit="1GB")
    with pytest.raises(ConfigError) as raised:
        SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=[{"text": "a b c"}], args=args,
                   max_seq_length=length)
    message = str(raised.value)
    assert "of pinned host memory" in message and "more than the" in message
    # Both sizes are below a GiB, so the message gives them in MiB.
    assert f"about {need / (1 << 20):.2f} MiB of pinned host memory" in message
    assert f"more than the {available / (1 << 20):.2f} MiB of memory this host has available" in message
    assert "fits the limit of 1.00 GiB (training.memory_limit)" in message
    assert "use_gradient_checkpointing=True, which keeps the layer inputs on the device" in message
    longest = int(re.search(rf"largest max_seq_length that fits both at batch {batch} is ([0-9,]+)", message)
                  .group(1).replace(",", ""))
    widest = re.search(rf"largest batch that fits both at max_seq_length {length:,} is ([0-9,]+)", message)
    # Host memory is linear in the tokens: below the run's, and the next length passes it.
    assert 0 < longest < length
    fitting = _gpu_plan(model, batch_size=batch, max_seq_length=longest)
    assert fitting.host <= available and fitting.peak <= 1 << 30
    assert _gpu_plan(model, batch_size=batch, max_seq_length=longest + 1).host > available
    # Batch 1 holds a third of the need, so it fits when the fraction drawn above is over one third.
    assert (widest is not None) == (need // batch <= available), message
    if widest:
        widest = int(widest.group(1).replace(",", ""))
        assert _gpu_plan(model, batch_size=widest, max_seq_length=length).host <= available
        assert _gpu_plan(model, batch_size=widest + 1, max_seq_length=length).host > available


def test_check_run_fits_passes_with_enough_host_memory(tiny_checkpoints, tmp_path, monkeypatch):
    from fastft_jax import TrainingArguments

    model, _ = _unsloth_model(tiny_checkpoints)
    data_config = DataConfig(max_seq_length=2048)
    need = _gpu_plan(model, batch_size=2, max_seq_length=2048).host
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, memory_limit="1GB")
    monkeypatch.setattr("fastft_jax.plan.current_backend", lambda: "gpu")
    for available in (need, 2 * need, None):
        monkeypatch.setattr("fastft_jax.plan.host_memory_available", lambda value=available: value)
        plan = check_run_fits(model, args, data_config)
        assert plan is not None and plan.host == need > 0 and plan.saved_activations == 0
    # One byte short fails; training.memory_limit "off" skips the host check with the device's.
    monkeypatch.setattr("fastft_jax.plan.host_memory_available", lambda: need - 1)
    with pytest.raises(ConfigError, match="pinned host memory"):
        check_run_fits(model, args, data_config)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, memory_limit="off")
    assert check_run_fits(model, args, data_config) is None
    # Two devices on the host offload twice as much.
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, memory_limit="1GB")
    monkeypatch.setattr("fastft_jax.plan.host_memory_available", lambda: 2 * need - 1)
    assert check_run_fits(model, args, data_config) is not None
    with pytest.raises(ConfigError, match="2 devices x"):
        check_run_fits(model, args, data_config, devices_on_host=2)


def test_host_memory_available_reads_meminfo_else_the_physical_memory(monkeypatch):
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = host_memory_available()
    assert available is not None and 0 < available <= physical

    def no_meminfo(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")

    monkeypatch.setattr("builtins.open", no_meminfo)
    assert host_memory_available() == physical


def test_searches_and_cli_respect_the_host_memory(tiny_checkpoints, tmp_path, capsys):
    config = _config(tiny_checkpoints, "llama")
    args = dict(dtype="bfloat16", gradient_checkpointing="unsloth", backend="gpu", batch_size=2, max_seq_length=4096)
    plan = plan_memory(config, source="shapes", **args)
    host_limit = plan.host // 2
    # The device alone: as before; with the host, the smaller of the two.
    assert max_seq_length_that_fits(1 << 30, config, **args) > 4096
    assert max_seq_length_that_fits(1 << 30, config, host_memory_limit=host_limit, **args) == 2048
    assert max_batch_size_that_fits(1 << 30, config, host_memory_limit=host_limit, **args) == 1
    # Nothing offloaded (True keeps the inputs on the device): the host limit changes nothing.
    on_device = {**args, "gradient_checkpointing": True}
    assert (max_seq_length_that_fits(1 << 30, config, host_memory_limit=1, **on_device)
            == max_seq_length_that_fits(1 << 30, config, **on_device))

    run = {
        "model": {"name": str(tiny_checkpoints["llama"]), "max_seq_length": 4096, "dtype": "bfloat16"},
        "lora": {"r": 16, "use_gradient_checkpointing": "unsloth"},
        "data": {"path": "unused.jsonl"},
        "training": {"per_device_train_batch_size": 2, "memory_limit": "1GB"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert main(["--config", str(path), "--host-memory", str(host_limit)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"host memory available \(--host-memory\) +[0-9.]+ MiB +does NOT fit", printed), printed
    longest = re.search(r"largest max_seq_length that fits at batch 2 +([0-9,]+) +\(device and host\)", printed)
    assert longest and int(longest.group(1).replace(",", "")) < 4096, printed
    # A GPU run planned on this CPU: this machine's memory is not its host's.
    assert main(["--config", str(path)]) == 0
    assert "host memory available: not known here" in capsys.readouterr().out


# max_seq_length -> measured peak in GiB (test_gpu_peak_within_10_percent_of_the_h200_long_context_runs).
H200_QLORA_PEAKS_GIB = {63_488: 12.77, 66_560: 13.054, 132_096: 19.093, 138_240: 19.659, 611_328: 63.242,
                        641_024: 65.785}


def test_gpu_peak_within_10_percent_of_the_h200_long_context_runs(monkeypatch):
    """The formula's GPU peak against the peaks measured on an H200 on 2026-11-28 by
    bench/long_context.py's QLoRA trials (bench/results/2026-11-28-h200-s4/call5, long-qlora.log:
    llama3-8b shape, NF4 base, LoRA r=32 on all 7 projections, batch 1, bfloat16, "unsloth", MLP
    tiled as "auto" tiles it, cuDNN attention, one AdamW step). Each peak is peak_bytes_in_use of
    a 2-layer model plus a filler standing for the other 30 layers' weights, LoRA, AdamW state and
    gradients, which equals the full model's device memory. The planner is given the arguments
    long_context.planner_prediction gives it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import long_context

    config = long_context.full_model_config(False)
    tile = tiling.mlp_tile_for(1 << 20, config.intermediate_size, "bfloat16", ops.OpsConfig(), "unsloth")
    for length, measured_gib in H200_QLORA_PEAKS_GIB.items():
        plan = plan_memory(config, lora_config=LoRAConfig(r=32, alpha=32.0), batch_size=1, max_seq_length=length,
                           dtype="bfloat16", quantization="nf4", gradient_checkpointing="unsloth", packing=False,
                           ops_config=ops.OpsConfig(mlp_tile_tokens=tile), backend="gpu", source="shapes")
        error = (plan.peak / (1 << 30) - measured_gib) / measured_gib
        assert abs(error) <= 0.10, (f"{length:,} tokens: predicted {plan.peak / (1 << 30):.2f} GiB, "
                                    f"measured {measured_gib} GiB ({error:+.1%})")

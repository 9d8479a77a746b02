"""The trainer: step-by-step parity with transformers + peft + torch AdamW, gradient accumulation,
packing, resume, checkpointing modes and bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.errors import ConfigError, DataError
from fastft_jax import FastLanguageModel
from fastft_jax.data import Batch, DataConfig
from fastft_jax.trainer import (
    LossSetup,
    SFTTrainer,
    TrainingArguments,
    accumulate_gradients,
    stack_micro_batches,
    token_loss_sum,
)
from tests.conftest import relative_error

TEMPLATE = "### Question:\n{q}\n\n### Response:\n{a}"
WORDS = ("the patient has a fever and a cough so the doctor orders a test of the blood pressure "
         "heart rate and the dose of the tablets is five mg each").split()


def make_rows(count: int, rng: np.random.Generator) -> list[dict]:
    """Question/answer rows of uneven lengths, so batches pad and trained-token counts differ."""
    rows = []
    for _ in range(count):
        q = " ".join(rng.choice(WORDS, rng.integers(3, 12)))
        a = " ".join(rng.choice(WORDS, rng.integers(2, 15)))
        rows.append({"q": q, "a": a})
    return rows


def data_config(**overrides) -> DataConfig:
    values = dict(text_field=None, template=TEMPLATE, response_marker="### Response:", train_on_responses_only=True,
                  max_seq_length=64, padding="max_length", shuffle=True)
    values.update(overrides)
    return DataConfig(**values)


def build(checkpoint, tmp_path, rows, *, lora=None, data=None, **training):
    model, tokenizer = FastLanguageModel.from_pretrained(checkpoint, dtype="float32", max_seq_length=64)
    lora_args = dict(r=8, lora_alpha=16, use_gradient_checkpointing=False, random_state=7)
    lora_args.update(lora or {})
    model = FastLanguageModel.get_peft_model(model, **lora_args)
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", seed=11, plot_loss=False)
    args.update(training)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=rows, args=TrainingArguments(**args),
                         data_config=data or data_config())
    return model, tokenizer, trainer


def losses(trainer) -> list[float]:
    return [record["loss"] for record in trainer.log_history if "loss" in record]


def test_losses_match_transformers_peft_torch_adamw(tiny_checkpoints, tmp_path):
    """20 steps: r=8, alpha=16, all 7 projections, AdamW with weight decay, warmup, accumulation 2,
    padded batches with masked prompt tokens. Per-step losses equal the PyTorch stack's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    rng = np.random.default_rng()
    checkpoint = tiny_checkpoints["llama"]
    model, _, trainer = build(checkpoint, tmp_path, make_rows(24, rng), max_steps=20, gradient_accumulation_steps=2,
                              warmup_steps=3, weight_decay=0.05, learning_rate=2e-3, max_grad_norm=1.0)
    initial_lora = jax.tree.map(np.asarray, model.lora_params())
    step_batches = [trainer.micro_batches_for_step(step) for step in range(20)]
    trainer.train()
    ours = losses(trainer)

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, attn_implementation="eager")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                layer = int(name.split(".layers.")[1].split(".")[0])
                projection = name.split(".")[-1]
                module.lora_A["default"].weight.copy_(torch.as_tensor(initial_lora["layers"][projection]["lora_a"][layer].T))
                module.lora_B["default"].weight.zero_()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    scheduler = get_linear_schedule_with_warmup(optimizer, 3, 20)
    theirs = []
    for micro_batches in step_batches:
        normalizer = sum(int((b.labels != -100).sum()) for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            logits = peft_model(
                input_ids=torch.as_tensor(batch.input_ids, dtype=torch.long),
                attention_mask=torch.as_tensor(batch.segment_ids > 0, dtype=torch.long),
            ).logits
            labels = torch.as_tensor(batch.labels, dtype=torch.long)
            token_losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            loss = token_losses / normalizer
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        theirs.append(step_loss)
    assert len(ours) == 20
    assert ours[-1] < ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def _step_gradients(trainer):
    step_inputs = jax.tree.map(jnp.asarray, stack_micro_batches(trainer.micro_batches_for_step(0)))
    setup = LossSetup.of(trainer.model, use_segments=False)
    return jax.jit(accumulate_gradients, static_argnums=(3,))(
        trainer.model.lora_params(), trainer.model.base_params(), step_inputs, setup, None)


def test_accumulation_equals_one_big_batch(tiny_checkpoints, tmp_path):
    """4 micro-batches of 1 with uneven trained-token counts give the loss and gradient of one
    batch of 4 (the gradient-accumulation bug would weight each micro-batch's mean equally)."""
    rows = make_rows(4, np.random.default_rng())
    data = data_config(shuffle=False)
    model, _, accumulated = build(tiny_checkpoints["qwen2"], tmp_path / "a", rows, data=data,
                                  per_device_train_batch_size=1, gradient_accumulation_steps=4)
    _nonzero_b(model)
    _, _, big = build(tiny_checkpoints["qwen2"], tmp_path / "b", rows, data=data,
                      per_device_train_batch_size=4, gradient_accumulation_steps=1)
    big.model.set_lora_params(model.lora_params())
    counts = [int((b.labels != -100).sum()) for b in accumulated.micro_batches_for_step(0)]
    assert len(set(counts)) > 1, "the micro-batches should have uneven trained-token counts"
    loss_a, grads_a, tokens_a = _step_gradients(accumulated)
    loss_b, grads_b, tokens_b = _step_gradients(big)
    assert int(tokens_a) == int(tokens_b) == sum(counts)
    assert relative_error(loss_a, loss_b) <= 1e-5
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        assert relative_error(a, b) <= 1e-5


def _loss_and_grads(model, step_inputs, use_segments, mode=False):
    setup = LossSetup.of(model, use_segments=use_segments, gradient_checkpointing=mode)
    normalizer = jnp.float32(max(int((step_inputs.labels != -100).sum()), 1))
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), step_inputs)
    return jax.value_and_grad(token_loss_sum)(model.lora_params(), model.base_params(), micro, normalizer, None, setup)


def _nonzero_b(model):
    lora = model.lora_params()
    key = jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30)))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(key, x.shape), lora)
    model.set_lora_params(lora)


def test_packed_batch_equals_unpacked(tiny_checkpoints, tmp_path):
    rows = make_rows(6, np.random.default_rng())
    model, _, packed = build(tiny_checkpoints["qwen3"], tmp_path / "p", rows,
                             data=data_config(packing=True, shuffle=False, padding="max_length", max_seq_length=256),
                             per_device_train_batch_size=1)
    _nonzero_b(model)
    _, _, unpacked = build(tiny_checkpoints["qwen3"], tmp_path / "u", rows, data=data_config(shuffle=False, max_seq_length=256),
                           per_device_train_batch_size=6)
    packed_rows = [packed.train_batches.batch_at(0, step) for step in range(packed.train_batches.steps_per_epoch)]
    packed_inputs = stack_micro_batches([Batch(*(np.concatenate(parts) for parts in zip(*packed_rows)))])
    assert packed_inputs.segment_ids.max() > 1, "some row should hold several examples"
    unpacked_inputs = stack_micro_batches([unpacked.train_batches.batch_at(0, 0)])
    loss_p, grads_p = _loss_and_grads(model, packed_inputs, use_segments=True)
    loss_u, grads_u = _loss_and_grads(model, unpacked_inputs, use_segments=False)
    assert relative_error(loss_p, loss_u) <= 1e-5
    for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)):
        assert relative_error(a, b) <= 1e-5


def test_checkpointing_modes_give_the_same_loss_and_grads(tiny_checkpoints, tmp_path):
    rows = make_rows(4, np.random.default_rng())
    model, _, trainer = build(tiny_checkpoints["llama"], tmp_path, rows)
    _nonzero_b(model)
    step_inputs = stack_micro_batches(trainer.micro_batches_for_step(0))
    loss_ref, grads_ref = _loss_and_grads(model, step_inputs, False, False)
    for mode in (True, "unsloth", "selective"):
        with pytest.warns(UserWarning, match="pinned") if mode == "unsloth" and not _has_pinned_host() else _no_warning():
            loss, grads = _loss_and_grads(model, step_inputs, False, mode)
        assert relative_error(loss, loss_ref) <= 1e-5
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
            assert relative_error(a, b) <= 1e-5


def _has_pinned_host():
    from fastft_jax.model import has_pinned_host

    return has_pinned_host()


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_resume_continues_with_the_same_losses(tiny_checkpoints, tmp_path):
    """Stop at step 6 of 12 (Ctrl-C saves a checkpoint), resume, and steps 7-12 equal the
    uninterrupted run's."""
    rows = make_rows(16, np.random.default_rng())
    common = dict(max_steps=12, gradient_accumulation_steps=2, warmup_steps=2, weight_decay=0.01,
                  lr_scheduler_type="cosine")
    _, _, full = build(tiny_checkpoints["qwen2"], tmp_path / "full", rows, lora=dict(lora_dropout=0.1), **common)
    full.train()
    uninterrupted = losses(full)

    _, _, first = build(tiny_checkpoints["qwen2"], tmp_path / "part", rows, lora=dict(lora_dropout=0.1), **common)
    real_step = first._train_step
    calls = {"n": 0}

    def interrupt_after_six(*args):
        if calls["n"] == 6:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_step(*args)

    first._train_step = interrupt_after_six
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (tmp_path / "part" / "out" / "checkpoint-6" / "trainer_state.json").exists()

    _, _, resumed = build(tiny_checkpoints["qwen2"], tmp_path / "part", rows, lora=dict(lora_dropout=0.1),
                          resume_from_checkpoint=True, **common)
    output = resumed.train()
    assert output.global_step == 12
    np.testing.assert_allclose(losses(resumed)[-6:], uninterrupted[6:], rtol=1e-6)


def test_checkpoints_rotate_and_are_complete(tiny_checkpoints, tmp_path):
    rows = make_rows(8, np.random.default_rng())
    _, _, trainer = build(tiny_checkpoints["qwen2"], tmp_path, rows, max_steps=6, save_strategy="steps",
                          save_steps=2, save_total_limit=2, plot_loss=True)
    trainer.train()
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-4", "checkpoint-6"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert (out / "metrics.jsonl").read_text().count("\n") >= 6
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_train_updates_the_model_in_place(tiny_checkpoints, tmp_path):
    rows = make_rows(6, np.random.default_rng())
    model, _, trainer = build(tiny_checkpoints["llama"], tmp_path, rows, max_steps=2)
    before = jax.tree.map(np.asarray, model.lora_params())
    trainer.train()
    after = model.lora_params()
    assert float(jnp.abs(after["layers"]["q_proj"]["lora_b"]).max()) > 0
    assert not np.array_equal(before["layers"]["q_proj"]["lora_b"], np.asarray(after["layers"]["q_proj"]["lora_b"]))


# -- use_gradient_checkpointing="auto" ----------------------------------------------------------------


def _auto_model(checkpoint, mode=None):
    """A 1024-token model planned with the flash kernel's memory (the GPU's structure); `mode`
    None leaves get_peft_model's default."""
    model, tokenizer = FastLanguageModel.from_pretrained(checkpoint, dtype="float32", max_seq_length=1024,
                                                         kernels={"attention": "pallas"})
    extra = {} if mode is None else {"use_gradient_checkpointing": mode}
    return FastLanguageModel.get_peft_model(model, r=8, random_state=7, **extra), tokenizer


def _auto_trainer(model, tokenizer, tmp_path, memory_limit):
    """The trainer resolves the mode in its constructor; the step compiles lazily, so none compiles here."""
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=1, save_strategy="no", plot_loss=False, memory_limit=memory_limit)
    data = data_config(packing=True, padding="max_length", max_seq_length=1024)
    return SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=make_rows(160, np.random.default_rng()), args=args,
                      data_config=data)


def _predicted_peaks(model) -> dict:
    from fastft_jax.plan import CHECKPOINT_SPEED_ORDER, plan_memory

    run = dict(lora_config=model.lora_config, batch_size=4, max_seq_length=1024, gradient_accumulation_steps=2,
               dtype=model.dtype, packing=True, ops_config=model.ops_config, base_params=model.base_params(),
               source="shapes")
    return {mode: plan_memory(model.config, gradient_checkpointing=mode, **run).peak for mode in CHECKPOINT_SPEED_ORDER}


def test_auto_checkpointing_is_the_default_and_takes_selective_when_memory_is_plenty(tiny_checkpoints, tmp_path, capsys):
    model, tokenizer = _auto_model(tiny_checkpoints["qwen2"])
    assert model.gradient_checkpointing == "auto"
    # Before any trainer resolves it, "auto" runs as full recomputation.
    assert LossSetup.of(model).gradient_checkpointing is True
    _auto_trainer(model, tokenizer, tmp_path, "1TB")
    assert model.gradient_checkpointing == "selective"
    printed = capsys.readouterr().out
    assert printed.count("gradient checkpointing: auto -> ") == 1
    assert 'gradient checkpointing: auto -> "selective" (predicted' in printed
    # No limit known ("off", or a CPU without bytes_limit): full recomputation.
    model, tokenizer = _auto_model(tiny_checkpoints["qwen2"])
    _auto_trainer(model, tokenizer, tmp_path / "off", "off")
    assert model.gradient_checkpointing is True


def test_auto_checkpointing_takes_the_fastest_mode_that_fits(tiny_checkpoints, tmp_path, capsys):
    from fastft_jax.plan import CHECKPOINT_SPEED_ORDER

    model, tokenizer = _auto_model(tiny_checkpoints["llama"])
    peaks = _predicted_peaks(model)
    limit = (peaks["selective"] + peaks["unsloth"]) // 2
    expected = next(mode for mode in CHECKPOINT_SPEED_ORDER if peaks[mode] <= limit)
    assert expected != "selective", peaks
    _auto_trainer(model, tokenizer, tmp_path, limit)
    assert model.gradient_checkpointing == expected and type(model.gradient_checkpointing) is type(expected)
    assert LossSetup.of(model).gradient_checkpointing == expected
    assert "faster but over it: \"selective\"" in capsys.readouterr().out
    # Nothing fits: the memory check stops the run, and the model keeps "auto" for the next try.
    model, tokenizer = _auto_model(tiny_checkpoints["llama"])
    with pytest.raises(ConfigError, match="more than the limit"):
        _auto_trainer(model, tokenizer, tmp_path, min(peaks.values()) - 1)
    assert model.gradient_checkpointing == "auto"
    assert 'auto -> "unsloth" (no mode fits' in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["unsloth", False])
def test_explicit_checkpointing_is_untouched(tiny_checkpoints, tmp_path, capsys, mode):
    model, tokenizer = _auto_model(tiny_checkpoints["qwen3"], mode)
    _auto_trainer(model, tokenizer, tmp_path, "1TB")
    assert model.gradient_checkpointing == mode and type(model.gradient_checkpointing) is type(mode)
    assert "auto ->" not in capsys.readouterr().out


def test_error_bad_checkpointing_value_names_auto(tiny_checkpoints):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoints["qwen2"], dtype="float32", max_seq_length=64)
    with pytest.raises(ConfigError, match='"auto"'):
        FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing="full")
    # The layers run modes only: an unresolved "auto" never reaches them.
    model = FastLanguageModel.get_peft_model(model, r=8)
    setup = dataclasses.replace(LossSetup.of(model), gradient_checkpointing="auto")
    micro = stack_micro_batches([Batch(*(np.ones((1, 8), np.int32),) * 4)])
    with pytest.raises(ValueError, match="auto"):
        token_loss_sum(model.lora_params(), model.base_params(), jax.tree.map(lambda x: jnp.asarray(x[0]), micro),
                       jnp.float32(1.0), None, setup)


# -- bad input --------------------------------------------------------------------------------------


def test_error_missing_dataset_file(tiny_checkpoints, tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        build(tiny_checkpoints["qwen2"], tmp_path, None, data=data_config(path=str(tmp_path / "nope.jsonl")))


def test_error_empty_dataset(tiny_checkpoints, tmp_path):
    with pytest.raises(DataError, match="empty"):
        build(tiny_checkpoints["qwen2"], tmp_path, [])


def test_error_missing_field(tiny_checkpoints, tmp_path):
    with pytest.raises(DataError, match="'q'"):
        build(tiny_checkpoints["qwen2"], tmp_path, [{"question": "x", "a": "y"}])


def test_error_every_label_masked(tiny_checkpoints, tmp_path):
    with pytest.raises(DataError, match="### Answer:"):
        build(tiny_checkpoints["qwen2"], tmp_path, make_rows(4, np.random.default_rng()),
              data=data_config(response_marker="### Answer:"))


def test_error_rank_and_target_modules(tiny_checkpoints, tmp_path):
    rows = make_rows(4, np.random.default_rng())
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        build(tiny_checkpoints["qwen2"], tmp_path, rows, lora=dict(r=0))
    with pytest.raises(ConfigError, match="'attn_proj'"):
        build(tiny_checkpoints["qwen2"], tmp_path, rows, lora=dict(target_modules=["q_proj", "attn_proj"]))
    with pytest.raises(NotImplementedError, match="bias"):
        build(tiny_checkpoints["qwen2"], tmp_path, rows, lora=dict(bias="all"))


def test_error_batch_larger_than_dataset(tiny_checkpoints, tmp_path):
    with pytest.raises(DataError, match="larger than the dataset"):
        build(tiny_checkpoints["qwen2"], tmp_path, make_rows(3, np.random.default_rng()), per_device_train_batch_size=8)


def test_error_output_dir_not_writable(tiny_checkpoints, tmp_path):
    """A path under a regular file can never be created, for root too."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not writable"):
        build(tiny_checkpoints["qwen2"], tmp_path, make_rows(4, np.random.default_rng()), output_dir=str(blocker / "out"))


def test_error_output_dir_with_checkpoints(tiny_checkpoints, tmp_path):
    rows = make_rows(6, np.random.default_rng())
    _, _, trainer = build(tiny_checkpoints["qwen2"], tmp_path, rows, max_steps=1, save_strategy="steps")
    trainer.train()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        build(tiny_checkpoints["qwen2"], tmp_path, rows)
    build(tiny_checkpoints["qwen2"], tmp_path, rows, overwrite_output_dir=True)


def test_error_unknown_training_argument():
    with pytest.raises(ConfigError, match="did you mean `learning_rate`"):
        TrainingArguments(learning_rat=1e-4)
    assert TrainingArguments(report_to="none", optim="adamw_8bit").optim == "adamw_8bit"


def test_eval_loss_is_logged(tiny_checkpoints, tmp_path, capsys):
    rows = make_rows(12, np.random.default_rng())
    _, _, trainer = build(tiny_checkpoints["qwen2"], tmp_path, rows, max_steps=2, eval_strategy="steps", eval_steps=1,
                          data=data_config(eval_fraction=0.25))
    assert "kernels: rms_norm=reference" in capsys.readouterr().out
    trainer.train()
    evals = [r for r in trainer.log_history if "eval_loss" in r]
    assert len(evals) >= 2 and all(np.isfinite(r["eval_loss"]) for r in evals)
    direct = trainer.evaluate()
    assert direct["eval_tokens"] > 0 and abs(direct["eval_loss"] - evals[-1]["eval_loss"]) < 1e-5

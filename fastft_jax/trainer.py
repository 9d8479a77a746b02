"""SFT training: TrainingArguments and SFTTrainer with HF's and TRL's names and meanings.

One optimizer step is one jitted function: it scans over the gradient-accumulation micro-batches,
summing token losses divided by the trained-token count of the WHOLE step (so accumulation equals
one big batch: no gradient-accumulation bug), clips by global norm as torch does, and applies AdamW
to the float32 LoRA masters. The frozen base is an argument, never differentiated.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

Array = jax.Array

from convert.errors import ConfigError, DataError
from fastft_jax import ops, sharding
from fastft_jax.config_utils import dataclass_from_dict, nearest_key_hint
from fastft_jax.data import (
    IGNORE_INDEX,
    Batch,
    BatchIterator,
    DataConfig,
    prepare_datasets,
)
from convert.hf import ModelConfig
from fastft_jax.lora import LoRAConfig
from fastft_jax.model import (
    AUTO_CHECKPOINTING,
    UNRESOLVED_AUTO_MODE,
    CausalLM,
    decoder_hidden,
    layer_checkpoint_mode,
    lm_head_weight,
)

SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")
# Optimizer names HF/Unsloth scripts pass. All run optax AdamW in float32 here; the 8-bit variants
# exist to save GPU memory in PyTorch, and LoRA optimizer state is small.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_8bit", "paged_adamw_8bit",
              "adamw_bnb_8bit", "paged_adamw_32bit", "adamw")
# TrainingArguments keys that HF/Unsloth scripts commonly pass and that change nothing here.
ACCEPTED_WITHOUT_EFFECT = frozenset({
    "report_to", "logging_dir", "run_name", "dataloader_num_workers", "dataloader_pin_memory",
    "remove_unused_columns", "push_to_hub", "hub_model_id", "disable_tqdm", "group_by_length",
    "ddp_find_unused_parameters", "torch_compile", "tf32", "gradient_checkpointing", "include_num_input_tokens_seen",
    "average_tokens_across_devices", "save_safetensors", "logging_first_step", "log_level",
})
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


@dataclasses.dataclass(frozen=True)
class _TrainingArgumentFields:
    """HF TrainingArguments' names, meanings and defaults for what fastft-jax does."""

    output_dir: str = "outputs"
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_steps: float = 500
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    eval_strategy: str = "no"
    eval_steps: float | None = None
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    optim: str = "adamw_torch"
    resume_from_checkpoint: str | bool | None = None
    dataloader_drop_last: bool = False
    # Device mesh, e.g. {"data": -1, "fsdp": 1} (-1: all remaining devices); None is one device.
    # fastft_jax/sharding.py says what each axis splits.
    mesh: dict | None = None
    # Write a loss-curve PNG into output_dir at the end of train().
    plot_loss: bool = True
    # Device memory a step may use ("24GB", bytes, or "off"); None: the GPU's bytes_limit. A run
    # predicted to need more stops before compiling (fastft_jax/plan.py, check_run_fits).
    memory_limit: int | float | str | None = None

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"training.{name} must be a positive integer, got {value!r}")
        if self.lr_scheduler_type not in SCHEDULER_TYPES:
            raise ConfigError(f"training.lr_scheduler_type {self.lr_scheduler_type!r}; choose from {', '.join(SCHEDULER_TYPES)}")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"training.optim {self.optim!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.learning_rate < 0 or self.weight_decay < 0:
            raise ConfigError("training.learning_rate and weight_decay must be >= 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"training.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set training.max_steps > 0 or training.num_train_epochs > 0")
        if self.save_strategy not in ("steps", "epoch", "no"):
            raise ConfigError(f"training.save_strategy {self.save_strategy!r}; choose steps, epoch or no")
        if self.eval_strategy not in ("steps", "epoch", "no"):
            raise ConfigError(f"training.eval_strategy {self.eval_strategy!r}; choose steps, epoch or no")
        if self.bf16 and self.fp16:
            raise ConfigError("training: set bf16 or fp16, not both")
        sharding.validate_mesh_config(self.mesh, "training.mesh")
        from fastft_jax.plan import parse_memory_size  # lazily: plan.py is also a `python -m` entry point

        parse_memory_size(self.memory_limit, "training.memory_limit")



class TrainingArguments(_TrainingArgumentFields):
    """Takes HF's keyword arguments; those in ACCEPTED_WITHOUT_EFFECT (report_to=..., etc.) are
    accepted and ignored so that an Unsloth script runs unchanged, any other unknown one is an error."""

    def __init__(self, **kwargs: Any):
        if "evaluation_strategy" in kwargs:  # HF's older name
            kwargs["eval_strategy"] = kwargs.pop("evaluation_strategy")
        valid = [field.name for field in dataclasses.fields(self)]
        for key in list(kwargs):
            if key in ACCEPTED_WITHOUT_EFFECT:
                kwargs.pop(key)
            elif key not in valid:
                raise ConfigError(f"TrainingArguments got an unknown argument {key!r}{nearest_key_hint(key, valid)}")
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "training") -> "TrainingArguments":
        values = dict(values)
        if "evaluation_strategy" in values:
            values["eval_strategy"] = values.pop("evaluation_strategy")
        return dataclass_from_dict(cls, values, where, accepted_without_effect=ACCEPTED_WITHOUT_EFFECT)


def learning_rate_schedule(args: TrainingArguments, total_steps: int) -> Callable[[Array], Array]:
    """HF's schedulers (transformers.get_scheduler), as a function of the 0-based optimizer step."""
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    peak = args.learning_rate
    kind = args.lr_scheduler_type

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if kind == "constant":
            return jnp.full((), peak, jnp.float32)
        warm = step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            after = jnp.maximum(0.0, 1.0 - progress)
        elif kind == "cosine":
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        else:
            after = jnp.ones_like(step)
        return peak * jnp.where(step < warmup, warm, after)

    return schedule





class StepInputs(NamedTuple):
    """Micro-batches of one optimizer step, stacked: [accumulation, batch, seq]."""

    input_ids: Array
    labels: Array
    positions: Array
    segment_ids: Array


def stack_micro_batches(batches: list[Batch]) -> StepInputs:
    """Pad every micro-batch to the step's longest (bucketed batches may differ) and stack them."""
    seq = max(batch.input_ids.shape[1] for batch in batches)

    def pad(array, value):
        return np.pad(array, ((0, 0), (0, seq - array.shape[1])), constant_values=value)

    return StepInputs(
        input_ids=np.stack([pad(b.input_ids, 0) for b in batches]),
        labels=np.stack([pad(b.labels, IGNORE_INDEX) for b in batches]),
        positions=np.stack([pad(b.positions, 0) for b in batches]),
        segment_ids=np.stack([pad(b.segment_ids, 0) for b in batches]),
    )


@dataclasses.dataclass(frozen=True)
class LossSetup:
    """Everything static about the loss: hashable, so it can sit in a jit closure or key."""

    config: ModelConfig
    lora_config: LoRAConfig | None
    ops_config: ops.OpsConfig
    compute_dtype: Any
    gradient_checkpointing: bool | str = False
    # Packed rows pass segment ids to attention; padded rows need none (right padding sits after
    # every real token, so the causal mask already hides it), which lets attention use cuDNN.
    use_segments: bool = False

    @classmethod
    def of(cls, model: CausalLM, **overrides: Any) -> "LossSetup":
        """The model's setup; an "auto" checkpointing no trainer has resolved yet runs as full recomputation."""
        setup = cls(model.config, model.lora_config, model.ops_config, model.dtype,
                    layer_checkpoint_mode(model.gradient_checkpointing))
        return dataclasses.replace(setup, **overrides)


def token_loss_sum(
    lora_params: dict | None, base_params: dict, micro: StepInputs, normalizer: Array,
    dropout_rng: Array | None, setup: LossSetup,
) -> Array:
    """Sum of token losses of one micro-batch divided by normalizer (the step's trained tokens)."""
    if sharding.data_parallel_only():
        # Every device holds every weight: each runs the whole model on its own rows (Pallas kernels
        # included, which XLA cannot split by itself); the partial losses add up, and the adapters'
        # gradients are summed over the devices by the transpose of the shard_map.
        per_device = sharding.batch_local(
            functools.partial(_local_token_loss_sum, setup=setup), batched=(False, False, True, False, False),
            sum_output=True, rng_arg=4,
        )
        return per_device(lora_params, base_params, micro, normalizer, dropout_rng)
    return _local_token_loss_sum(lora_params, base_params, micro, normalizer, dropout_rng, setup)


def _local_token_loss_sum(lora_params, base_params, micro: StepInputs, normalizer, dropout_rng, setup: LossSetup):
    hidden = decoder_hidden(
        base_params, lora_params, micro.input_ids, micro.positions,
        micro.segment_ids if setup.use_segments else None,
        config=setup.config, lora_config=setup.lora_config, ops_config=setup.ops_config,
        compute_dtype=setup.compute_dtype, gradient_checkpointing=setup.gradient_checkpointing, dropout_rng=dropout_rng,
    )
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # On a mesh every device scores its own tokens against the whole (gathered) head, and the
    # devices' partial sums are added; the loss head's token-chunk scan then stays on local tokens.
    loss_head = sharding.batch_local(
        lambda hidden, lm_head, labels, normalizer: ops.cross_entropy(hidden, lm_head, labels, normalizer, setup.ops_config),
        batched=(True, False, True, False), sum_output=True,
    )
    return loss_head(hidden, lm_head_weight(base_params, setup.config), micro.labels.reshape(-1), normalizer)


def accumulate_gradients(
    lora_params: dict, base_params: dict, step_inputs: StepInputs, setup: LossSetup, step_key: Array | None,
) -> tuple[Array, dict, Array]:
    """Loss and gradient of one optimizer step over its micro-batches. Every micro-batch's token
    losses are divided by the trained-token count of the whole step, so the sum over micro-batches
    is the mean over all trained tokens: exactly one big batch's loss and gradient."""
    normalizer = jnp.maximum(jnp.sum(step_inputs.labels != IGNORE_INDEX), 1).astype(jnp.float32)
    loss_and_grad = jax.value_and_grad(token_loss_sum)

    def accumulate(carry, per_micro):
        grads_sum, loss_sum = carry
        micro, index = per_micro
        rng = None if step_key is None else jax.random.fold_in(step_key, index)
        loss, grads = loss_and_grad(lora_params, base_params, micro, normalizer, rng, setup)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), None

    zeros = jax.tree.map(jnp.zeros_like, lora_params)
    count = step_inputs.input_ids.shape[0]
    (grads, loss), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), (step_inputs, jnp.arange(count)))
    return loss, grads, normalizer


def clip_by_global_norm_like_torch(grads: Any, max_norm: float) -> tuple[Any, Array]:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""
    norm = optax.tree.norm(grads)
    if max_norm is None or max_norm <= 0:
        return grads, norm
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef, grads), norm


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict


@dataclasses.dataclass
class _LogWindow:
    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)


class SFTTrainer:
    """TRL's SFTTrainer for a FastLanguageModel with LoRA adapters."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        dataset_text_field: str | None = "text",
        max_seq_length: int | None = None,
        dataset_num_proc: int | None = None,
        packing: bool = False,
        formatting_func: Callable | None = None,
        args: TrainingArguments | None = None,
        data_config: DataConfig | None = None,
        processing_class: Any = None,
        data_collator: Any = None,
        **kwargs: Any,
    ):
        if kwargs:
            raise ConfigError(f"SFTTrainer got unknown arguments {sorted(kwargs)}")
        if not isinstance(model, CausalLM):
            raise ConfigError("SFTTrainer expects the model from FastLanguageModel.from_pretrained")
        if model.lora is None:
            raise ConfigError("the model has no LoRA adapters; call FastLanguageModel.get_peft_model first")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else processing_class
        if self.tokenizer is None:
            raise ConfigError("SFTTrainer needs tokenizer= (or processing_class=)")
        self.args = args or TrainingArguments()
        # The mesh first: a mesh that does not fit the devices fails before any data work.
        self.mesh = sharding.make_mesh(self.args.mesh)
        self.batch_shards = sharding.batch_shards(self.mesh)
        if self.mesh.devices.size > 1:
            sharding.main_print(f"fastft_jax: mesh {sharding.describe_mesh(self.mesh)}; global batch "
                                f"{self.args.per_device_train_batch_size} x {self.batch_shards} rows")
        if data_config is None:
            data_config = DataConfig(
                text_field=dataset_text_field or "text",
                max_seq_length=max_seq_length or model.max_seq_length,
                packing=packing,
            )
        self.data_config = data_config
        kernels = self.model.ops_config.describe(packed_rows=self.data_config.packing)
        sharding.main_print("fastft_jax: kernels: " + ", ".join(f"{op}={impl}" for op, impl in kernels.items()))
        layers_per_step = self.model.ops_config.scan_unroll(self.model.config.num_layers)
        if layers_per_step > 1:
            # The planner's formula and its GPU calibration are those of the layer scan.
            sharding.main_print(
                f"fastft_jax: kernels.layer_unroll={self.model.ops_config.layer_unroll}: "
                f"{layers_per_step} layers a scan step; the memory check below models one, "
                "and unrolled layers have needed more (llama3-8b \"selective\" b2x2048 on an H200: 37.9 GiB "
                "instead of 28.0, bench/RESULTS.md)")
        self._resolve_checkpointing_and_check_fit()
        self._check_output_dir()
        source = train_dataset
        if formatting_func is not None and train_dataset is not None:
            source = _apply_formatting_func(train_dataset, formatting_func, self.data_config.text_field or "text")
        self.train_data, self.eval_data = prepare_datasets(
            self.data_config, self.tokenizer, source=source, seed=self.args.seed
        )
        if eval_dataset is not None:
            eval_source = eval_dataset
            if formatting_func is not None:
                eval_source = _apply_formatting_func(eval_dataset, formatting_func, self.data_config.text_field or "text")
            self.eval_data, _ = prepare_datasets(dataclasses.replace(self.data_config, eval_fraction=0.0, eval_path=None),
                                                 self.tokenizer, source=eval_source, seed=self.args.seed)
        sharding.main_print(f"fastft_jax: train data: {self.train_data.stats}")
        # HF's meaning: every device trains per_device_train_batch_size rows of each micro-batch.
        self.train_batches = BatchIterator.from_config(
            self.train_data, self.data_config, self.args.per_device_train_batch_size * self.batch_shards,
            seed=self.args.seed,
        )
        self.eval_batches = None
        if self.eval_data is not None:
            # Evaluate example by example (no packing), so the eval loss does not depend on how rows pack.
            eval_config = dataclasses.replace(self.data_config, packing=False)
            self.eval_batches = BatchIterator.from_config(
                self.eval_data, eval_config,
                min(self.args.per_device_eval_batch_size * self.batch_shards, len(self.eval_data)),
                seed=self.args.seed, shuffle=False,
            )
        micro_per_epoch = self.train_batches.steps_per_epoch
        accumulation = self.args.gradient_accumulation_steps
        if self.args.max_steps > 0:
            self.total_steps = self.args.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.args.num_train_epochs * micro_per_epoch / accumulation))
        self.schedule = learning_rate_schedule(self.args, self.total_steps)
        self.optimizer = optax.adamw(
            self.schedule, b1=self.args.adam_beta1, b2=self.args.adam_beta2,
            eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay,
        )
        self.log_history: list[dict] = []
        self._place_model()
        self._train_step = self._build_train_step()
        self._eval_step = self._build_eval_step()

    # -- setup -------------------------------------------------------------------------------------
    def _resolve_checkpointing_and_check_fit(self) -> None:
        """Once, before any data work or compile: resolve use_gradient_checkpointing="auto" to the
        fastest mode predicted to fit (plan.choose_checkpointing), then stop a run that cannot fit
        (plan.check_run_fits). The model keeps the concrete mode, so the step and everything after
        it see one; a run that does not fit leaves "auto" on the model for the next try."""
        from fastft_jax.plan import check_run_fits, choose_run_checkpointing

        model, fsdp = self.model, self.mesh.shape["fsdp"]
        mode = model.gradient_checkpointing
        try:
            if mode == AUTO_CHECKPOINTING:
                choice = choose_run_checkpointing(model, self.args, self.data_config, fsdp)
                mode = choice.mode
                sharding.main_print(f"fastft_jax: gradient checkpointing: {choice.describe()}")
            # Each of this process's devices offloads its own layer inputs into the one host's memory.
            devices_on_host = sum(device.process_index == jax.process_index() for device in self.mesh.devices.flat)
            check_run_fits(model, self.args, self.data_config, fsdp=fsdp, gradient_checkpointing=layer_checkpoint_mode(mode),
                           devices_on_host=max(1, devices_on_host))
        except ConfigError:
            raise
        except Exception as error:  # the planner must never be why a run that fits cannot start
            unresolved = f'; use_gradient_checkpointing="auto" runs as {UNRESOLVED_AUTO_MODE}' if mode == AUTO_CHECKPOINTING else ""
            warnings.warn(f"memory check skipped, the planner failed: {type(error).__name__}: {error}{unresolved}",
                          stacklevel=3)
        model.gradient_checkpointing = layer_checkpoint_mode(mode)

    def _check_output_dir(self) -> None:
        output_dir = Path(self.args.output_dir)
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=output_dir):
                pass
        except OSError as err:
            raise ConfigError(f"output_dir {str(output_dir)!r} is not writable ({err.strerror}); choose another") from err
        existing = list_checkpoints(output_dir)
        if existing and not self.args.resume_from_checkpoint and not self.args.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {str(output_dir)!r} already holds checkpoints ({existing[-1].name}); pass "
                "resume_from_checkpoint=True to continue, overwrite_output_dir=True to start over, or another output_dir"
            )

    def _place_model(self) -> None:
        """Lay the model's base weights and adapters out on the mesh by sharding.PARTITION_RULES and
        write them back into the model, so that no unsharded copy stays on a device."""
        base, lora = self.model.base_params(), self.model.lora_params()
        self.base_shardings = sharding.param_shardings(base, self.mesh)
        self.lora_shardings = sharding.param_shardings(lora, self.mesh)
        self.opt_state_shardings = sharding.optimizer_state_shardings(
            self.optimizer, lora, self.lora_shardings, self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh, leading_axes=1)
        set_variables(self.model.base, sharding.place(base, self.base_shardings))
        self.model.set_lora_params(sharding.place(lora, self.lora_shardings))

    def _build_train_step(self):
        if not hasattr(self, "base_shardings"):  # bench/e2e.py builds the step on a trainer shell
            self.mesh = sharding.make_mesh(self.args.mesh)
            self._place_model()
        args, optimizer = self.args, self.optimizer
        setup = LossSetup.of(self.model, use_segments=self.data_config.packing)
        use_dropout = self.model.lora_config.dropout > 0

        def train_step(lora_params, opt_state, base_params, step_inputs: StepInputs, step, seed_key):
            step_key = jax.random.fold_in(seed_key, step) if use_dropout else None
            loss, grads, normalizer = accumulate_gradients(lora_params, base_params, step_inputs, setup, step_key)
            grads, grad_norm = clip_by_global_norm_like_torch(grads, args.max_grad_norm)
            updates, opt_state = optimizer.update(grads, opt_state, lora_params)
            lora_params = optax.apply_updates(lora_params, updates)
            metrics = {"loss": loss, "grad_norm": grad_norm, "trained_tokens": normalizer}
            return lora_params, opt_state, metrics

        replicated = sharding.replicated(self.mesh)
        # With the shardings below XLA reduces the gradients over the batch axes; under fsdp the
        # layer scan gathers each layer's weights itself (fastft_jax/model.py, sharding.batch_local).
        return jax.jit(
            train_step, donate_argnums=(0, 1),
            in_shardings=(self.lora_shardings, self.opt_state_shardings, self.base_shardings, self.batch_sharding,
                          replicated, replicated),
            out_shardings=(self.lora_shardings, self.opt_state_shardings, replicated),
        )

    def _build_eval_step(self):
        setup = LossSetup.of(self.model, use_segments=False, gradient_checkpointing=False)

        def eval_step(lora_params, base_params, step_inputs: StepInputs):
            micro = jax.tree.map(lambda x: x[0], step_inputs)
            return token_loss_sum(lora_params, base_params, micro, jnp.float32(1.0), None, setup)

        replicated = sharding.replicated(self.mesh)
        return jax.jit(eval_step, in_shardings=(self.lora_shardings, self.base_shardings, self.batch_sharding),
                       out_shardings=replicated)

    # -- running -----------------------------------------------------------------------------------
    def micro_batches_for_step(self, step: int) -> list[Batch]:
        """Micro-batch k of the run is batch k % n of epoch k // n, so any step is reproducible."""
        per_epoch = self.train_batches.steps_per_epoch
        accumulation = self.args.gradient_accumulation_steps
        first = step * accumulation
        return [self.train_batches.batch_at(k // per_epoch, k % per_epoch) for k in range(first, first + accumulation)]

    def evaluate(self) -> dict:
        if self.eval_batches is None:
            raise DataError("evaluate() needs an eval_dataset (or data.eval_path / data.eval_fraction)")
        base, lora = self.model.base_params(), self.model.lora_params()
        total_loss, total_tokens = 0.0, 0
        for batch in self.eval_batches.epoch_batches(0):
            step_inputs = pad_rows(stack_micro_batches([batch]), self.batch_shards)
            with jax.set_mesh(self.mesh):
                loss = self._eval_step(lora, base, sharding.place_batch(step_inputs, self.batch_sharding))
            total_loss += float(loss)
            total_tokens += int(np.count_nonzero(batch.labels != IGNORE_INDEX))
        return {"eval_loss": total_loss / max(total_tokens, 1), "eval_tokens": total_tokens}

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        args = self.args
        output_dir = Path(args.output_dir)
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        base = sharding.place(self.model.base_params(), self.base_shardings)
        lora = sharding.place(self.model.lora_params(), self.lora_shardings)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_state_shardings)(lora)
        start_step = 0
        if resume:
            checkpoint = resolve_checkpoint(output_dir, resume)
            if checkpoint is not None:
                lora, opt_state, state = load_checkpoint(checkpoint, lora, opt_state)
                start_step = state["global_step"]
                self.log_history = state.get("log_history", [])
                sharding.main_print(f"fastft_jax: resumed from {checkpoint} at step {start_step}")
        seed_key = sharding.place(jax.random.PRNGKey(args.seed), sharding.replicated(self.mesh))
        metrics_path = output_dir / "metrics.jsonl"
        if start_step == 0 and metrics_path.exists() and sharding.is_main_process():
            metrics_path.unlink()
        logging_every = _every(args.logging_steps, self.total_steps)
        save_every = _every(args.save_steps, self.total_steps) if args.save_strategy == "steps" else 0
        eval_every = _every(args.eval_steps or args.logging_steps, self.total_steps) if args.eval_strategy == "steps" else 0
        window = _LogWindow()
        all_losses: list[float] = []
        run_start = time.perf_counter()
        tokens_total = 0
        trained_tokens_total = 0
        step = start_step
        progress = tqdm(total=self.total_steps, initial=start_step, desc="Training", unit="step", dynamic_ncols=True,
                        disable=not sharding.is_main_process())
        try:
            while step < self.total_steps:
                step_inputs = stack_micro_batches(self.micro_batches_for_step(step))
                # Traced under the mesh, so that sharding.batch_local and the model's sharding hints see it.
                with jax.set_mesh(self.mesh):
                    lora, opt_state, metrics = self._train_step(
                        lora, opt_state, base, sharding.place_batch(step_inputs, self.batch_sharding), np.int32(step),
                        seed_key,
                    )
                step += 1
                loss = float(metrics["loss"])
                trained = int(metrics["trained_tokens"])
                all_losses.append(loss)
                trained_tokens_total += trained
                window.loss_sum += loss
                window.steps += 1
                window.tokens += int(step_inputs.input_ids.size)
                tokens_total += int(step_inputs.input_ids.size)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
                if step % logging_every == 0 or step == self.total_steps:
                    self._log(step, window, metrics, trained_tokens_total, metrics_path, progress)
                    window = _LogWindow()
                if eval_every and step % eval_every == 0 and self.eval_batches is not None:
                    self.model.set_lora_params(lora)
                    self._record({"step": step, **self.evaluate()}, metrics_path, progress)
                if save_every and step % save_every == 0 and step < self.total_steps:
                    self._save(step, lora, opt_state)
        except KeyboardInterrupt:
            progress.close()
            path = self._save(step, lora, opt_state)
            self.model.set_lora_params(lora)
            sharding.main_print(f"\nfastft_jax: interrupted; saved {path}. Resume with resume_from_checkpoint=True")
            raise
        progress.close()
        self.model.set_lora_params(lora)
        if args.save_strategy != "no":
            self._save(step, lora, opt_state)
        if self.eval_batches is not None and args.eval_strategy != "no":
            self._record({"step": step, **self.evaluate()}, metrics_path, None)
        runtime = time.perf_counter() - run_start
        if args.plot_loss and sharding.is_main_process():
            plot_loss_curve(self.log_history, output_dir / "loss_curve.png")
        training_loss = float(np.mean(all_losses)) if all_losses else float("nan")
        metrics = {
            "train_runtime": runtime,
            "train_loss": training_loss,
            "train_tokens_per_second": tokens_total / runtime if runtime else 0.0,
            "trained_tokens": trained_tokens_total,
            "epoch": step * args.gradient_accumulation_steps / self.train_batches.steps_per_epoch,
        }
        return TrainOutput(global_step=step, training_loss=training_loss, metrics=metrics)

    def _log(self, step, window, metrics, trained_total, metrics_path, progress) -> dict:
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        record = {
            "step": step,
            "epoch": round(step * self.args.gradient_accumulation_steps / self.train_batches.steps_per_epoch, 4),
            "loss": window.loss_sum / max(window.steps, 1),
            "learning_rate": float(self.schedule(step - 1)),
            "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_second": window.tokens / elapsed,
            "trained_tokens": trained_total,
            "peak_memory_gib": peak_device_memory_gib(),
        }
        self._record(record, metrics_path, progress)
        return record

    def _record(self, record: dict, metrics_path: Path, progress) -> None:
        self.log_history.append(record)
        if not sharding.is_main_process():
            return
        line = json.dumps(record)
        with open(metrics_path, "a") as handle:
            handle.write(line + "\n")
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in record.items() if v is not None)
        (progress.write if progress is not None else print)(shown)

    def _save(self, step: int, lora, opt_state) -> Path:
        path = save_checkpoint(Path(self.args.output_dir), step, lora, opt_state,
                               {"global_step": step, "seed": self.args.seed, "log_history": self.log_history})
        if sharding.is_main_process():
            prune_checkpoints(Path(self.args.output_dir), self.args.save_total_limit)
        return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _every(value: float | None, total_steps: int) -> int:
    """HF reads logging/save/eval steps below 1 as a fraction of the total."""
    if value is None or value <= 0:
        return 0
    if value < 1:
        return max(1, math.ceil(value * total_steps))
    return int(value)


def _apply_formatting_func(dataset: Any, formatting_func: Callable, field: str) -> list[dict]:
    from fastft_jax.data import load_records

    records = load_records(dataset)
    out = []
    for row in records:
        text = formatting_func(row)
        if isinstance(text, list):
            if len(text) != 1:
                raise DataError("formatting_func returned a list of several texts for one row; return one string")
            text = text[0]
        out.append({**row, field: text})
    return out


def peak_device_memory_gib() -> float | None:
    """The largest peak over this process's devices."""
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()]
    peaks = [peak for peak in peaks if peak is not None]
    return max(peaks) / 2**30 if peaks else None


def pad_rows(step_inputs: StepInputs, multiple: int) -> StepInputs:
    """Top the rows up to a multiple of the batch shards with empty rows (segment 0, every label
    ignored), which change neither a loss sum nor a gradient."""
    rows = step_inputs.input_ids.shape[1]
    extra = -rows % multiple
    if not extra:
        return step_inputs
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "positions": 0, "segment_ids": 0}
    return StepInputs(**{
        name: np.pad(np.asarray(array), ((0, 0), (0, extra), (0, 0)), constant_values=fill[name])
        for name, array in step_inputs._asdict().items()
    })


def set_variables(variables: Any, values: Any) -> None:
    """Write a tree of arrays into the matching tree of NNX variables."""
    from flax import nnx

    jax.tree.map(
        lambda variable, value: variable.set_value(value) if hasattr(variable, "set_value") else setattr(variable, "value", value),
        variables, values, is_leaf=lambda node: isinstance(node, nnx.Variable),
    )


# -- checkpoints -----------------------------------------------------------------------------------
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json written last), oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / TRAINER_STATE).exists():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: Path, resume: str | bool) -> Path | None:
    if resume is True:
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            print(f"fastft_jax: no checkpoint in {output_dir} to resume from; starting at step 0")
            return None
        return checkpoints[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise ConfigError(f"resume_from_checkpoint {str(path)!r} is not a complete checkpoint (no {TRAINER_STATE})")
    return path


def save_checkpoint(output_dir: Path, step: int, lora, opt_state, state: dict) -> Path:
    """Write checkpoint-<step> atomically: orbax into a temporary directory, the trainer state last,
    then one rename. A crash leaves only a temporary directory, which resume ignores.

    Sharded arrays are saved as they lie: each process writes the shards its devices hold (several
    hosts need an output_dir they all share), and process 0 writes the trainer state and renames."""
    import orbax.checkpoint as ocp

    final = output_dir / f"checkpoint-{step}"
    # One name for every process: orbax writes a single checkpoint from all of them.
    tmp = output_dir / f".tmp-checkpoint-{step}"
    main = sharding.is_main_process()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    sharding.sync_processes(f"fastft_jax:save:{step}:start")
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.resolve() / "state", {"lora": lora, "opt_state": opt_state})
        checkpointer.wait_until_finished()
        sharding.sync_processes(f"fastft_jax:save:{step}:written")
        if main:
            (tmp / TRAINER_STATE).write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        sharding.sync_processes(f"fastft_jax:save:{step}:done")
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(path: Path, lora_like, opt_state_like):
    """Restore onto the layout of lora_like and opt_state_like (arrays already placed on this run's
    mesh), whatever mesh the checkpoint was saved from: orbax reads each device's slices."""
    import orbax.checkpoint as ocp

    abstract = sharding.abstract_like({"lora": lora_like, "opt_state": opt_state_like})
    restored = ocp.StandardCheckpointer().restore(Path(path).resolve() / "state", abstract)
    state = json.loads((Path(path) / TRAINER_STATE).read_text())
    return restored["lora"], restored["opt_state"], state


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if not limit or limit <= 0:
        return
    checkpoints = list_checkpoints(output_dir)
    for stale in checkpoints[:-limit]:
        shutil.rmtree(stale, ignore_errors=True)


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    """Training (and eval) loss against step, as a PNG a person would rather look at than read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), marker="o", markersize=3, linewidth=1.5, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", markersize=4, linewidth=1.5, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.set_title("fastft-jax training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)

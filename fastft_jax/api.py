"""FastLanguageModel: the entry point Unsloth users already know."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from convert.errors import CheckpointError, ConfigError
from convert.hf import load_hf_params, model_config_from_hf, read_config_json
from convert.quant import bnb_quantization
from fastft_jax import ops
from fastft_jax.lora import LoRAConfig, init_lora_params, normalise_target_modules
from fastft_jax.model import AUTO_CHECKPOINTING, CausalLM, validate_checkpoint_setting

_DTYPE_NAMES = {
    "float32": jnp.float32, "fp32": jnp.float32, "float": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16,
}


def is_bfloat16_supported() -> bool:
    """True on GPUs of compute capability 8.0 and newer (Ampere, Hopper), as in Unsloth."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    capability = getattr(device, "compute_capability", None)
    try:
        return capability is None or float(capability) >= 8.0
    except (TypeError, ValueError):
        return True


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """None -> bfloat16 on GPUs that support it, float16 on other GPUs, float32 on the CPU."""
    if dtype is None:
        if jax.default_backend() != "gpu":
            return jnp.dtype(jnp.float32)
        return jnp.dtype(jnp.bfloat16 if is_bfloat16_supported() else jnp.float16)
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.").removeprefix("jnp.")
        if key not in _DTYPE_NAMES:
            raise ConfigError(f"dtype {dtype!r} is not known; use None, 'float32', 'bfloat16' or 'float16'")
        return jnp.dtype(_DTYPE_NAMES[key])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise ConfigError(f"dtype {dtype!r} is not known; use None, 'float32', 'bfloat16' or 'float16'") from err
    if resolved not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ConfigError(f"dtype {dtype!r} is not a floating compute dtype; use float32, bfloat16 or float16")
    return resolved


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}: could not load the tokenizer ({err})") from err


class FastLanguageModel:
    """from_pretrained / get_peft_model, with Unsloth's names and defaults."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike,
        max_seq_length: int = 2048,
        dtype: Any = None,
        load_in_4bit: bool = False,
        *,
        load_in_8bit: bool = False,
        kernels: ops.OpsConfig | dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[CausalLM, Any]:
        """Load a local HF checkpoint directory. Returns (model, tokenizer).

        load_in_4bit quantizes the decoder's seven projections to NF4 on load, exactly as
        bitsandbytes does (blocksize 64, double-quantized absmax); a bitsandbytes pre-quantized
        checkpoint loads as written. load_in_8bit quantizes them to blockwise int8 (absmax per 64).
        Embeddings, lm_head and norms stay 16-bit. LoRA then trains on top (QLoRA)."""
        ignored = {"token", "device_map", "trust_remote_code", "fix_tokenizer", "full_finetuning", "use_gradient_checkpointing"}
        unknown = sorted(set(kwargs) - ignored - {"base_model_path"})
        if unknown:
            raise ConfigError(f"from_pretrained got unknown arguments {unknown}")
        directory = Path(model_name).expanduser()
        if not directory.is_dir():
            raise CheckpointError(
                f"model_name {str(model_name)!r} is not a local directory; fastft-jax has no hub access, so "
                "download the checkpoint first and pass its directory"
            )
        if (directory / "adapter_config.json").is_file():
            from fastft_jax.export import load_from_adapter_dir

            return load_from_adapter_dir(
                directory, base_model_path=kwargs.pop("base_model_path", None), max_seq_length=max_seq_length,
                dtype=dtype, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, kernels=kernels, **kwargs,
            )
        if load_in_4bit and load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both set; choose one")
        compute_dtype = resolve_dtype(dtype)
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ConfigError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
        if isinstance(kernels, dict):
            kernels = ops.OpsConfig.from_env(**kernels)
        ops_config = (kernels or ops.OpsConfig.from_env()).validated()

        hf_config = read_config_json(directory)
        config = model_config_from_hf(hf_config, where=str(directory / "config.json"))
        quantization = "nf4" if load_in_4bit else "int8" if load_in_8bit else None
        if bnb_quantization(hf_config, str(directory / "config.json")) and quantization is None:
            print(f"fastft_jax: {directory} is pre-quantized to 4-bit NF4; dequantizing it to {compute_dtype.name} "
                  "(pass load_in_4bit=True to keep it 4-bit)")
        if max_seq_length > config.max_position_embeddings:
            if config.rope_scaling is None:
                factor = max_seq_length / config.max_position_embeddings
                config = config.with_rope_scaling({"rope_type": "linear", "factor": factor})
                print(
                    f"fastft_jax: max_seq_length {max_seq_length} > max_position_embeddings "
                    f"{config.max_position_embeddings}: linear RoPE scaling with factor {factor:.4g}"
                )
            else:
                print(
                    f"fastft_jax: max_seq_length {max_seq_length} > max_position_embeddings "
                    f"{config.max_position_embeddings}; keeping the checkpoint's own rope scaling"
                )
        tokenizer = _load_tokenizer(directory)
        params = load_hf_params(
            directory, config, compute_dtype, place=jnp.asarray,
            progress=lambda specs: tqdm(specs, desc="Loading weights", unit="tensor", leave=False,
                                        disable=len(specs) < 32),
            quantize=quantization,
        )
        model = CausalLM(config, params, dtype=compute_dtype, max_seq_length=max_seq_length,
                         source_dir=str(directory), ops_config=ops_config)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: CausalLM,
        r: int = 16,
        target_modules: str | Iterable[str] | None = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str = AUTO_CHECKPOINTING,
        random_state: int = 3407,
        use_rslora: bool = False,
        loftq_config: Any = None,
        max_seq_length: int | None = None,
        **kwargs: Any,
    ) -> CausalLM:
        """Attach LoRA adapters (A Kaiming-uniform as PEFT, B zero) and set the checkpointing mode.

        use_gradient_checkpointing: "selective" keeps the matmul outputs (fastest, most memory of the
        recomputing modes), False keeps everything, True keeps each layer's input and recomputes the
        layer, "unsloth" also offloads those inputs to host memory (least memory on a GPU). "auto" (the
        default) lets SFTTrainer pick, once, before it compiles: the first of
        plan.CHECKPOINT_SPEED_ORDER (fastest first) whose predicted peak fits the memory limit
        (training.memory_limit, else the GPU's), "unsloth" if none does (and the trainer's memory
        check says what would fit), and True (full recomputation) where no limit is known (the CPU,
        memory_limit="off") or before any trainer resolves it."""
        unknown = sorted(set(kwargs) - {"layers_to_transform", "modules_to_save", "init_lora_weights", "task_type"} )
        if unknown:
            raise ConfigError(f"get_peft_model got unknown arguments {unknown}")
        for key in ("layers_to_transform", "modules_to_save"):
            if kwargs.get(key):
                raise NotImplementedError(f"get_peft_model({key}=...) is not supported yet")
        if bias != "none":
            raise NotImplementedError(f"bias={bias!r} is not supported; only bias='none' (PEFT's default)")
        if loftq_config:
            raise NotImplementedError("loftq_config is not supported; pass loftq_config=None")
        validate_checkpoint_setting(use_gradient_checkpointing)
        if not isinstance(model, CausalLM):
            raise ConfigError("get_peft_model expects the model returned by FastLanguageModel.from_pretrained")
        if model.lora is not None:
            raise ConfigError("this model already has LoRA adapters; call get_peft_model once")
        lora_config = LoRAConfig(
            r=r, alpha=float(lora_alpha), dropout=float(lora_dropout),
            target_modules=normalise_target_modules(target_modules), use_rslora=bool(use_rslora),
        )
        model.attach_lora(lora_config, init_lora_params(model.config, lora_config, random_state))
        model.gradient_checkpointing = use_gradient_checkpointing
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        return model

    @staticmethod
    def for_training(model: CausalLM) -> CausalLM:
        model.training = True
        return model

    @staticmethod
    def for_inference(model: CausalLM) -> CausalLM:
        model.training = False
        return model

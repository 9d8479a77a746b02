"""fastft-jax: fast, exact LoRA fine-tuning of Llama and Qwen models in JAX."""

from convert.errors import CheckpointError, ConfigError, DataError, FastFTError, UnsupportedModelError
from convert.hf import ModelConfig
from fastft_jax.api import FastLanguageModel, is_bfloat16_supported, resolve_dtype
from fastft_jax.lora import LoRAConfig
from fastft_jax.model import CausalLM
from fastft_jax.ops import OpsConfig
from fastft_jax.trainer import SFTTrainer, TrainingArguments

__version__ = "0.1.0"


def __getattr__(name: str):
    # fastft_jax.plan is also `python -m fastft_jax.plan`: imported here, runpy would load it twice.
    if name == "plan_memory":
        from fastft_jax.plan import plan_memory

        return plan_memory
    raise AttributeError(f"module 'fastft_jax' has no attribute {name!r}")


__all__ = [
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FastFTError",
    "FastLanguageModel",
    "LoRAConfig",
    "ModelConfig",
    "OpsConfig",
    "SFTTrainer",
    "TrainingArguments",
    "UnsupportedModelError",
    "is_bfloat16_supported",
    "plan_memory",
    "resolve_dtype",
]

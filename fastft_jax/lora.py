"""LoRA: the config, the adapter initialisation, and which parameters train.

Adapters live in their own tree, parallel to the base tree: lora/layers/<projection>/lora_a
[layers, in, r] and lora_b [layers, r, out], float32 masters whatever the base dtype. Export to and
import from PEFT's format is convert/peft.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from convert.errors import ConfigError
from convert.hf import PROJECTIONS, ModelConfig


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = PROJECTIONS
    use_rslora: bool = False
    # Per-projection ranks and alphas, as PEFT's rank_pattern / alpha_pattern (sorted pairs: hashable).
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [name for name in self.target_modules if name not in PROJECTIONS]
        if unknown:
            raise ConfigError(
                f"target_modules {unknown} do not exist in this model; choose from {', '.join(PROJECTIONS)}"
            )
        if not self.target_modules:
            raise ConfigError("target_modules is empty; name at least one of " + ", ".join(PROJECTIONS))

    def rank(self, name: str) -> int:
        return dict(self.rank_pattern).get(name, self.r)

    def scale(self, name: str) -> float:
        rank = self.rank(name)
        alpha = dict(self.alpha_pattern).get(name, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def normalise_target_modules(target_modules: str | Iterable[str] | None) -> tuple[str, ...]:
    """PEFT accepts a list, a single name, or "all-linear"; keep the model's order."""
    if target_modules is None or target_modules == "all-linear":
        return PROJECTIONS
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = list(target_modules)
    unknown = [name for name in names if name not in PROJECTIONS]
    if unknown:
        raise ConfigError(f"target_modules {unknown} do not exist in this model; choose from {', '.join(PROJECTIONS)}")
    return tuple(name for name in PROJECTIONS if name in names)


def init_lora_params(config: ModelConfig, lora_config: LoRAConfig, seed: int) -> dict:
    """A as PEFT initialises it (kaiming_uniform_ with a=sqrt(5) on the [r, in] weight, which is
    U(-1/sqrt(in), 1/sqrt(in))), B at zero, so the adapted model starts equal to the base."""
    key = jax.random.PRNGKey(seed)
    layers: dict[str, Any] = {}
    for index, name in enumerate(lora_config.target_modules):
        d_in, d_out = config.projection_shape(name)
        rank = lora_config.rank(name)
        bound = 1.0 / math.sqrt(d_in)
        lora_a = jax.random.uniform(
            jax.random.fold_in(key, index), (config.num_layers, d_in, rank), jnp.float32, -bound, bound
        )
        layers[name] = {"lora_a": lora_a, "lora_b": jnp.zeros((config.num_layers, rank, d_out), jnp.float32)}
    return {"layers": layers}


def lora_from_numpy(tree: Mapping[str, Any]) -> dict:
    return jax.tree.map(lambda array: jnp.asarray(np.asarray(array, np.float32)), dict(tree))

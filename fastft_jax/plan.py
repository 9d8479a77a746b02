"""Memory planner: the device and host memory of one training step, known before any weight loads.

    python -m fastft_jax.plan --config FILE.yaml [--memory 24GB] [--set section.key=value ...]

`plan_memory(...)` predicts the peak device memory of one optimizer step of SFTTrainer and splits
it into the base weights (by storage: 16-bit, NF4 codes with their absmax and double-quant
tensors, int8), the LoRA parameters, AdamW's m and v, the gradients, the activations each layer
saves for the backward, the largest transient (one layer's backward, its recompute included) and
the loss head. `max_seq_length_that_fits` and `max_batch_size_that_fits` search the prediction
for the largest run that fits a budget (and the host's memory, given one). SFTTrainer calls
`check_run_fits` before it builds its step, so a run that cannot fit, on the device or, under
"unsloth", in pinned host memory (`host_memory_available`), stops with the numbers instead of
running out of memory minutes in, and `choose_checkpointing` before it, which resolves
use_gradient_checkpointing="auto" to the fastest mode (CHECKPOINT_SPEED_ORDER) whose predicted
peak fits.

Two sources of numbers:
  - "compiled": XLA's memory analysis of the jitted train step, lowered on abstract shapes
    (jax.ShapeDtypeStruct: nothing is allocated). The peak is argument + output - alias + temp:
    what the executable holds on the device at once (the donated LoRA and optimizer buffers are
    reused by its outputs, hence - alias). Exact for the backend it compiles on, and cheap for a
    small model.
  - "shapes": the closed-form model below, from the model config, LoRA config, batch, sequence,
    dtype, quantization, checkpointing mode and kernels. It needs no compile, so it answers for an
    8B model on a laptop, and the searches run on it. Its constants are counts of buffers measured
    from XLA's analysis (the _Calibration tables); tests/test_plan.py holds it to 10% of XLA:CPU's.

What one step holds (trainer.py, model.py, ops.py). Arguments: the base weights, the float32 LoRA
masters, AdamW's float32 m and v, the token batch. Beside them: float32 gradients (the
accumulation scan's running sum and the micro-batch's), the stack of what each layer saves for the
backward (by checkpointing mode: everything, the layer input alone, or the matmul outputs), and at
any moment one of two transients: one layer's backward (recomputing the layer first under
checkpointing; attention's score matrices when attention materialises them) or the loss head
(float32 logits of one token chunk, never [tokens, vocab]). The peak is the sum of the first
three and the larger transient. "unsloth" keeps its saved layer inputs in pinned host memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import re
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from convert import quant
from convert.errors import ConfigError, FastFTError
from convert.hf import ATTENTION_PROJECTIONS, ModelConfig, tensor_specs
from fastft_jax import ops, tiling
from fastft_jax.lora import LoRAConfig
from fastft_jax.model import AUTO_CHECKPOINTING, CHECKPOINT_MODES, UNRESOLVED_AUTO_MODE, layer_checkpoint_mode
from pallas_kernels import cross_entropy as cross_entropy_kernels
from pallas_kernels._common import next_power_of_2

SOURCES = ("auto", "shapes", "compiled")
BACKENDS = ("gpu", "cpu")
QUANTIZATIONS = (None, "nf4", "int8")
# source="auto" compiles the step for XLA's own analysis up to this many parameters (a small model
# compiles in seconds); above it the formula answers at once.
COMPILE_MAX_PARAMS = 100_000_000
# GB and GiB both mean 2^30 bytes: a "24 GB" card holds 24 GiB, and that is what people type.
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
MEMORY_OFF = "off"
# use_gradient_checkpointing="auto" runs the first of these whose predicted peak fits the memory limit.
# Fastest first, as measured on llama3-8b, LoRA r=16 on all 7 projections, batch 2 x 2048
# (bench/RESULTS.md): in one H100 call "selective" 13,361 tok/s at 28.1 GiB, full (True) 11,158 at
# 17.8 GiB, "unsloth" 10,447 at 16.8 GiB; on an H200 "selective" 14,434 at 28.1 GiB
# (bench/results/2026-11-28-h200-s3). No checkpointing (False) was never timed beside "selective":
# 12,234 tok/s at 63.1 GiB in an older H200 session where full ran 10,687, so it comes second.
# "unsloth" needs the least memory on a GPU (its saved layer inputs live in host memory): "auto"
# falls back to it when nothing fits.
CHECKPOINT_SPEED_ORDER: tuple[bool | str, ...] = ("selective", False, True, "unsloth")
# The flash kernel's smallest head_dim tile (pallas_kernels/attention.py pads head_dim up to it).
_FLASH_MIN_HEAD_DIM = 16


# ---------------------------------------------------------------------------------------------
# Calibration: how many buffers of each kind XLA keeps live, measured from its memory analysis.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Moment:
    """Bytes live at one moment, in units of one layer's forward residuals (see _layer_residuals):
    `attention` copies of its attention block's, `mlp` copies of its MLP block's, and `scores`
    [batch, heads, seq, seq] float32 score matrices (attention that materialises them)."""

    attention: float
    mlp: float
    scores: float = 0.0


@dataclasses.dataclass(frozen=True)
class _ModeCalibration:
    # use_gradient_checkpointing=False only: what each layer saves. (True keeps the layer input,
    # "selective" the layer input and the named matmul outputs: both exact, see _estimate.)
    saved: _Moment
    # The layer backward's peak is the largest of these moments.
    backward: tuple[_Moment, ...]
    # Score matrices XLA:CPU's schedule adds to a layer's backward for Qwen3's q/k norms.
    qk_norm_scores: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Calibration:
    name: str
    # Bytes per stored activation element; None: the compute dtype's. XLA:CPU computes 16-bit
    # activations in float32 and keeps them so.
    activation_bytes: int | None
    # Float32 LoRA-sized buffers beside the arguments: the gradient sum and the micro-batch's
    # gradients (the clipped gradients and AdamW's temporaries reuse them).
    gradients: float
    # The loss head, by ops.cross_entropy's implementation: float32 [chunk, vocab] logits-sized
    # buffers, beside `loss_hidden` [tokens, hidden] ones (the final hidden states, their norm and
    # gradient) in the activation dtype.
    loss_logits: Mapping[str, float]
    loss_hidden: float
    # XLA:CPU converts 16-bit weights to float32 for its matmuls, the whole stack at once.
    upcast_16bit_weights: float
    # A tied lm_head is the embedding transposed; XLA:GPU materialises the transpose for the loss
    # head's matmuls.
    tied_head_copy: float
    # Dequantized copies of the largest quantized projection during a layer (QLoRA).
    dequantized_copies: float
    modes: Mapping[str, _ModeCalibration]

    def mode(self, gradient_checkpointing: bool | str) -> _ModeCalibration:
        # "unsloth" differs from True only in where the saved layer inputs live.
        return self.modes["selective" if gradient_checkpointing == "selective" else str(bool(gradient_checkpointing))]


def _modes(false_saved, false_backward, true_backward, selective_backward, qk_norm_scores=0.0):
    def mode(saved, backward, extra=0.0):
        return _ModeCalibration(_Moment(*saved), tuple(_Moment(*m) for m in backward), extra)

    return {"False": mode(false_saved, false_backward), "True": mode((0, 0), true_backward),
            "selective": mode((0, 0), selective_backward, qk_norm_scores)}


# XLA:CPU (jax 0.10.2), all of it fitted (minimax) to the memory analysis of tiny Llama, Qwen2 and
# Qwen3 steps at 64 to 2048 tokens and of variants with the hidden, intermediate, head or vocab
# size doubled or 4 layers. Worst errors on the tiny checkpoints / the variants: reference
# attention 8.5% / 11%, flash attention 7.6% / 11%.
_CPU = dict(activation_bytes=4, gradients=2.0, loss_logits={"reference": 2.2, "pallas": 2.2}, loss_hidden=2.0,
            tied_head_copy=0.0, dequantized_copies=2.0)
# Reference attention holds [batch, heads, seq, seq] scores. Where they dominate, False keeps 4
# per layer and about 5 more at the peak of a layer's backward; True and "selective" hold 5 to 6,
# and which it is moves with the length in ways no smooth formula follows (Llama at 1000 tokens
# holds 5.4, at 1024 tokens 6.3; Qwen3's q/k norms add one in "selective" float32). Each backward
# has a second moment with fewer scores and more residuals, which sets the peak at short lengths.
_CPU_SCORES_F32 = _Calibration(
    "XLA:CPU, reference attention, float32", upcast_16bit_weights=0.0, **_CPU,
    modes=_modes(false_saved=(0.2, 1.74, 4.0), false_backward=((1.73, 0.3, 5.37), (2.36, 3.34, 1.09)),
                 true_backward=((1.4, 0.09, 5.62), (0.65, 3.05, 4.75)),
                 selective_backward=((0.0, 0.0, 4.78), (0.0, 4.03, 0.0)), qk_norm_scores=1.0),
)
_CPU_SCORES_16 = _Calibration(
    "XLA:CPU, reference attention, 16-bit", upcast_16bit_weights=1.0, **_CPU,
    modes=_modes(false_saved=(1.79, 1.76, 4.0), false_backward=((0.0, 0.07, 4.56), (1.6, 0.91, 3.3)),
                 true_backward=((0.25, 0.25, 5.69), (2.12, 2.26, 2.19)),
                 selective_backward=((0.1, 0.44, 4.74), (2.09, 2.31, 0.9))),
)
# The flash attention kernel (kernels.attention="pallas", in the Pallas interpreter): the GPU's
# memory structure, nothing quadratic in the length.
_CPU_FLASH_F32 = _Calibration(
    "XLA:CPU, flash attention, float32", upcast_16bit_weights=0.0, **_CPU,
    modes=_modes(false_saved=(1.15, 1.65), false_backward=((1.78, 2.31),), true_backward=((2.55, 2.74),),
                 selective_backward=((0.91, 3.22),)),
)
_CPU_FLASH_16 = _Calibration(
    "XLA:CPU, flash attention, 16-bit", upcast_16bit_weights=1.0, **_CPU,
    modes=_modes(false_saved=(1.12, 1.54), false_backward=((1.49, 2.17),), true_backward=((1.82, 1.83),),
                 selective_backward=((1.59, 1.61),)),
)
# XLA:GPU (jax 0.11.2, H200) with the GPU's kernels (cuDNN or flash attention, lora_linear "xla",
# the fused chunked loss head), activations in the compute dtype. From XLA's analysis of
# Llama-3-8B (batch 2 x 2048: False, True, "unsloth", NF4, and the reference kernels) and
# Qwen2.5-1.5B (4 x 2048) steps, bench/results/2026-11-28-h200, which it matches to 2%: the
# arguments exactly; the loss head (it set the checkpointed runs' peaks) at 1.75 float32 logits
# of a chunk (2.3 for the reference head), plus the transposed tied embedding (Qwen); and False's
# saved stack, whose MLP block XLA:GPU keeps at 3.15 times its 16-bit size (SwiGLU's float32
# intermediates). Those runs predate the 16-bit GEMM outputs of lora_linear (6382db2) and the
# 256 MiB loss chunks. The layer-backward moments of False and "selective" are the CPU flash
# path's with that MLP factor (no GPU run has measured them yet: the loss head was larger), so
# they are the least certain constants here. True's ("unsloth" too) is measured: bench/
# long_context.py's QLoRA r=32 trials on an H200 (2026-11-28, 63k to 641k tokens, where the layer
# backward sets the peak) grow by 98.5 KB a token, 0.79 of the CPU moment (1.82, 3.45); at
# (1.44, 2.73) the peak is predicted 0.5 % (641k) to 3.8 % (63k) above the measured one, never
# below it. The score counts (attention "reference" or "xla" only) are the most the
# reference-kernel run leaves room for (4.2 beside its loss head).
_GPU = _Calibration(
    "XLA:GPU", activation_bytes=None, gradients=2.0, loss_logits={"pallas": 1.75, "reference": 2.3},
    loss_hidden=2.0, upcast_16bit_weights=0.0, tied_head_copy=1.0, dequantized_copies=1.0,
    modes=_modes(false_saved=(1.12, 3.15, 4.0), false_backward=((1.49, 3.5, 0.0), (0.0, 0.0, 4.0)),
                 true_backward=((1.44, 2.73, 0.0), (0.25, 0.25, 4.0)),
                 selective_backward=((1.59, 3.2, 0.0), (0.1, 0.44, 4.0))),
)


def _calibration(backend: str, attention_quadratic: bool, dtype: Any) -> _Calibration:
    if backend == "gpu":
        return _GPU
    wide = jnp.dtype(dtype).itemsize >= 4
    if attention_quadratic:
        return _CPU_SCORES_F32 if wide else _CPU_SCORES_16
    return _CPU_FLASH_F32 if wide else _CPU_FLASH_16


# ---------------------------------------------------------------------------------------------
# What is planned.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything the prediction depends on (frozen: the searches vary one field with dataclasses.replace)."""

    config: ModelConfig
    lora_config: LoRAConfig
    batch_size: int
    max_seq_length: int
    gradient_accumulation_steps: int
    dtype: Any
    quantization: str | None
    gradient_checkpointing: bool | str
    packing: bool
    ops_config: ops.OpsConfig
    backend: str
    fsdp: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_seq_length

    def resolve(self, op: str) -> str:
        """OpsConfig.resolve for the planned backend, which need not be the one running."""
        mode = getattr(self.ops_config, op)
        if mode != "auto":
            return mode
        return ops.GPU_AUTO_CHOICE[op] if self.backend == "gpu" else "reference"

    @property
    def attention(self) -> str:
        mode = self.resolve("attention")
        if mode == "auto":  # as ops.attention: cuDNN without segment ids, the flash kernel with them
            return "pallas" if self.packing else "cudnn"
        return mode

    @property
    def attention_quadratic(self) -> bool:
        """The reference and XLA's attention hold [batch, heads, seq, seq] scores; flash and cuDNN do not."""
        return self.attention in ("reference", "xla")

    @property
    def activation_bytes(self) -> int:
        return _calibration(self.backend, self.attention_quadratic, self.dtype).activation_bytes or jnp.dtype(self.dtype).itemsize

    @property
    def mlp_tile_tokens(self) -> int:
        return tiling.mlp_tile_for(self.tokens, self.config.intermediate_size, self.dtype, self.ops_config,
                                   self.gradient_checkpointing)


def _lora_bytes(config: ModelConfig, lora_config: LoRAConfig) -> int:
    """Float32 A [in, r] and B [r, out] of every targeted projection of every layer."""
    return 4 * config.num_layers * sum(
        lora_config.rank(name) * sum(config.projection_shape(name)) for name in lora_config.target_modules
    )


def _quantized_parts(num_elements: int, kind: str) -> dict[str, int]:
    """Bytes of one quantized kernel in convert/quant.py's layout (NF4 double-quantized, as
    load_in_4bit writes it)."""
    blocks = -(-num_elements // quant.BLOCKSIZE)
    if kind == "nf4":
        nested_blocks = -(-blocks // quant.NESTED_BLOCKSIZE)
        return {"nf4 codes (4-bit projections)": -(-num_elements // 2),
                "nf4 absmax + double quant": blocks + 4 * nested_blocks + 4}
    return {"int8 codes (8-bit projections)": num_elements, "int8 absmax": 4 * blocks}


def weight_bytes(config: ModelConfig, dtype: Any, quantization: str | None = None) -> dict[str, int]:
    """Base weight bytes by storage, from the config alone (convert/hf.py's tree): 16-bit (or the
    compute dtype) for embeddings, norms, biases and lm_head, and the projections quantized or not."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantization!r} is not one of None, 'nf4', 'int8'")
    parts: dict[str, int] = {}
    for spec in tensor_specs(config):
        count = config.num_layers if spec.stacked else 1
        for label, size in _stored_bytes(spec, dtype, quantization).items():
            parts[label] = parts.get(label, 0) + count * size
    return parts


def _stored_bytes(tensor: Any, dtype: Any, quantization: str | None) -> dict[str, int]:
    """One tensor_specs entry's bytes by storage (one layer's, for a stacked one): the projection
    kernels quantized when the run quantizes, everything else in dtype."""
    elements = math.prod(tensor.shape)
    if quantization and tensor.path[-1] == "kernel":
        return _quantized_parts(elements, quantization)
    dtype = jnp.dtype(dtype)
    return {f"{dtype.name} weights": elements * dtype.itemsize}


def weight_bytes_of_tree(base_params: Any) -> dict[str, int]:
    """The same split, counted from a parameter tree (arrays or jax.ShapeDtypeStructs)."""
    parts: dict[str, int] = {}

    def add(label: str, leaf: Any) -> None:
        parts[label] = parts.get(label, 0) + math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize

    for leaf in jax.tree.leaves(base_params, is_leaf=quant.is_quantized):
        if quant.is_quantized(leaf):
            if leaf.kind == "nf4":
                add("nf4 codes (4-bit projections)", leaf.codes)
                for extra in (leaf.absmax, leaf.nested_absmax, leaf.nested_offset):
                    if extra is not None:
                        add("nf4 absmax + double quant", extra)
            else:
                add("int8 codes (8-bit projections)", leaf.codes)
                add("int8 absmax", leaf.absmax)
        else:
            add(f"{jnp.dtype(leaf.dtype).name} weights", leaf)
    return parts


def quantization_of(base_params: Any) -> str | None:
    kinds = {leaf.kind for leaf in jax.tree.leaves(base_params, is_leaf=quant.is_quantized) if quant.is_quantized(leaf)}
    return next(iter(kinds)) if kinds else None


# ---------------------------------------------------------------------------------------------
# The formula ("shapes").
# ---------------------------------------------------------------------------------------------


def _flash_head_dim(head_dim: int) -> int:
    return max(_FLASH_MIN_HEAD_DIM, next_power_of_2(head_dim))


def _layer_residuals(spec: _Spec) -> tuple[int, int]:
    """One layer's forward residuals, the unit the calibration counts in, as (attention block, MLP
    block) bytes. Attention: the layer input and the first norm's output, the rotated q and k, v
    and attention's output (head_dim padded as the flash kernel pads it), q and k before their
    norm (Qwen3), and the attention adapters' rank-r x·A. MLP: the post-attention residual and
    its norm, the gate, up and SwiGLU outputs (one tile's worth when the MLP is tiled), and the
    MLP adapters' x·A."""
    c, tokens, lora = spec.config, spec.tokens, spec.lora_config
    head_dim = c.head_dim if spec.attention_quadratic else _flash_head_dim(c.head_dim)
    attention = 2 * c.hidden_size + 2 * (c.num_heads + c.num_kv_heads) * head_dim
    if c.qk_norm:
        attention += (c.num_heads + c.num_kv_heads) * c.head_dim
    attention += sum(lora.rank(name) for name in lora.target_modules if name in ATTENTION_PROJECTIONS)
    mlp_adapters = sum(lora.rank(name) for name in lora.target_modules if name not in ATTENTION_PROJECTIONS)
    mlp_tokens = min(tokens, spec.mlp_tile_tokens or tokens)
    mlp = tokens * (2 * c.hidden_size + mlp_adapters) + mlp_tokens * 3 * c.intermediate_size
    return spec.activation_bytes * tokens * attention, spec.activation_bytes * mlp


def _selective_saved_bytes(spec: _Spec) -> int:
    """"selective" keeps the layer input and what model.py names MATMUL_OUTPUT: q, k, v, attention's
    output, o_proj's output, and gate_proj/up_proj's unless the MLP is tiled (its custom_vjp keeps
    only its input)."""
    c = spec.config
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_token = 2 * c.hidden_size + 2 * q_width + 2 * kv_width
    if not spec.mlp_tile_tokens:
        per_token += 2 * c.intermediate_size
    return spec.activation_bytes * spec.tokens * per_token


def _scores_bytes(spec: _Spec) -> int:
    """One [batch, heads, seq, seq] float32 score matrix, for attention that materialises it."""
    if not spec.attention_quadratic:
        return 0
    return 4 * spec.batch_size * spec.config.num_heads * spec.max_seq_length**2


def _loss_rows(spec: _Spec) -> int:
    """Tokens per chunk of the loss head, as ops.cross_entropy chooses them."""
    tokens, vocab = spec.tokens, spec.config.vocab_size
    if spec.resolve("cross_entropy") == "pallas":
        # fused_linear_cross_entropy's own rule (impl="chunked", the default chunk size).
        return cross_entropy_kernels._chunking(tokens, vocab, None)[0]
    return min(tokens, spec.ops_config.loss_chunk_tokens)


@dataclasses.dataclass(frozen=True)
class _Estimate:
    weights: dict[str, int]
    lora_params: int
    optimizer_state: int
    gradients: int
    batch_inputs: int
    saved_per_layer: int
    saved_on_device: int
    host: int
    layer_backward: int
    loss_head: int
    cpu_weight_copies: int

    @property
    def peak(self) -> int:
        return (sum(self.weights.values()) + self.lora_params + self.optimizer_state + self.gradients
                + self.batch_inputs + self.saved_on_device + self.cpu_weight_copies
                + max(self.layer_backward, self.loss_head))


def _estimate(spec: _Spec, weights: dict[str, int], calibration: _Calibration | None = None) -> _Estimate:
    c = spec.config
    cal = calibration or _calibration(spec.backend, spec.attention_quadratic, spec.dtype)
    mode = cal.mode(spec.gradient_checkpointing)
    activation = spec.activation_bytes
    attention, mlp = _layer_residuals(spec)
    scores = _scores_bytes(spec)
    extra_scores = mode.qk_norm_scores if c.qk_norm else 0.0

    def live(moment: _Moment) -> float:
        return (moment.attention * attention + moment.mlp * mlp
                + (moment.scores + (extra_scores if moment.scores else 0.0)) * scores)

    lora = _lora_bytes(c, spec.lora_config) // spec.fsdp
    if spec.gradient_checkpointing == "selective":
        saved = _selective_saved_bytes(spec)
    elif spec.gradient_checkpointing:
        saved = activation * spec.tokens * c.hidden_size
    else:
        saved = round(live(mode.saved))
    # "unsloth" parks the layer inputs in pinned host memory, where the backend has it (a GPU).
    offloaded = spec.gradient_checkpointing == "unsloth" and spec.backend == "gpu"
    layer_backward = max(live(moment) for moment in mode.backward)
    if spec.quantization:
        largest = max(math.prod(c.projection_shape(name)) for name in ("q_proj", "gate_proj", "down_proj"))
        layer_backward += cal.dequantized_copies * largest * jnp.dtype(spec.dtype).itemsize
    weight_itemsize = jnp.dtype(spec.dtype).itemsize
    if spec.fsdp > 1:
        # Under FSDP each device gathers a whole layer's weights as it runs it (fastft_jax/model.py),
        # again in the backward; two layers' worth counts the next layer's gather overlapping this
        # one's compute (not yet measured on a GPU: an upper estimate).
        layer_weights = sum(sum(_stored_bytes(tensor, spec.dtype, spec.quantization).values())
                            for tensor in tensor_specs(c) if tensor.stacked)
        layer_backward += 2 * layer_weights
    loss_logits = cal.loss_logits["pallas" if spec.resolve("cross_entropy") == "pallas" else "reference"]
    loss_head = (loss_logits * 4 * _loss_rows(spec) * c.vocab_size
                 + cal.loss_hidden * activation * spec.tokens * c.hidden_size
                 + (cal.tied_head_copy * c.vocab_size * c.hidden_size * weight_itemsize if c.tie_word_embeddings else 0))
    cpu_copies = 0
    if cal.upcast_16bit_weights and weight_itemsize < 4 and not spec.quantization:
        kernels = sum(math.prod(s.shape) for s in tensor_specs(c) if s.stacked) * c.num_layers
        cpu_copies = round(cal.upcast_16bit_weights * 4 * kernels)
    return _Estimate(
        weights={label: size // spec.fsdp for label, size in weights.items()},
        lora_params=lora,
        optimizer_state=2 * lora + 8,
        gradients=round(cal.gradients * lora),
        # ids, labels and positions; segment ids too for packed rows (XLA drops an unused argument).
        batch_inputs=4 * (4 if spec.packing else 3) * spec.gradient_accumulation_steps * spec.tokens,
        saved_per_layer=saved,
        saved_on_device=0 if offloaded else c.num_layers * saved,
        host=c.num_layers * saved if offloaded else 0,
        layer_backward=round(layer_backward),
        loss_head=round(loss_head),
        cpu_weight_copies=cpu_copies,
    )


# ---------------------------------------------------------------------------------------------
# XLA's analysis ("compiled").
# ---------------------------------------------------------------------------------------------


def _abstract_quantized(d_in: int, d_out: int, layers: int, kind: str) -> quant.QuantizedKernel:
    """A stacked QuantizedKernel of jax.ShapeDtypeStructs in convert/quant.py's layout (NF4
    double-quantized, as load_in_4bit writes it); quantize itself cannot be traced abstractly."""
    n = d_in * d_out
    blocks = -(-n // quant.BLOCKSIZE)

    def leaf(*shape: int, dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((layers, *shape), dtype)

    if kind == "nf4":
        return quant.QuantizedKernel(
            leaf(-(-n // 2), dtype=jnp.uint8), leaf(blocks, dtype=jnp.uint8),
            leaf(-(-blocks // quant.NESTED_BLOCKSIZE), dtype=jnp.float32), leaf(dtype=jnp.float32), (d_in, d_out), "nf4")
    return quant.QuantizedKernel(leaf(n, dtype=jnp.int8), leaf(blocks, dtype=jnp.float32), None, None, (d_in, d_out), "int8")


def abstract_base_params(config: ModelConfig, dtype: Any, quantization: str | None = None) -> dict:
    """The base parameter tree as jax.ShapeDtypeStructs, quantized kernels included: what
    FastLanguageModel.from_pretrained would load, without reading or allocating anything."""
    from fastft_jax.model import random_params

    tree = jax.eval_shape(lambda: random_params(config, 0, dtype))
    if quantization:
        for node in tree["layers"].values():
            if isinstance(node, dict) and "kernel" in node:
                node["kernel"] = _abstract_quantized(*node["kernel"].shape[1:], config.num_layers, quantization)
    return tree


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory analysis of the step, in bytes."""

    argument: int
    output: int
    alias: int
    temp: int
    host_temp: int

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp


def _compiled_memory(spec: _Spec, base_params: Any) -> CompiledMemory:
    """Lower and compile SFTTrainer's step (trainer.accumulate_gradients, torch-style clipping,
    AdamW, LoRA and optimizer state donated) on abstract shapes of one device."""
    import optax

    from fastft_jax.lora import init_lora_params
    from fastft_jax.trainer import LossSetup, StepInputs, accumulate_gradients, clip_by_global_norm_like_torch

    base = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), base_params)
    lora = jax.eval_shape(lambda: init_lora_params(spec.config, spec.lora_config, 0))
    # A schedule, as the trainer's: its step count is part of the optimizer state.
    optimizer = optax.adamw(lambda step: jnp.float32(1e-4))
    opt_state = jax.eval_shape(optimizer.init, lora)
    setup = LossSetup(spec.config, spec.lora_config, spec.ops_config, jnp.dtype(spec.dtype),
                      spec.gradient_checkpointing, spec.packing)
    use_dropout = spec.lora_config.dropout > 0

    def train_step(lora_params, opt_state, base_params, step_inputs, step, seed_key):
        step_key = jax.random.fold_in(seed_key, step) if use_dropout else None
        loss, grads, _ = accumulate_gradients(lora_params, base_params, step_inputs, setup, step_key)
        grads, grad_norm = clip_by_global_norm_like_torch(grads, 1.0)
        updates, opt_state = optimizer.update(grads, opt_state, lora_params)
        return optax.apply_updates(lora_params, updates), opt_state, {"loss": loss, "grad_norm": grad_norm}

    rows = jax.ShapeDtypeStruct((spec.gradient_accumulation_steps, spec.batch_size, spec.max_seq_length), jnp.int32)
    scalar, key = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32)
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        lora, opt_state, base, StepInputs(rows, rows, rows, rows), scalar, key).compile()
    stats = compiled.memory_analysis()
    return CompiledMemory(
        argument=int(stats.argument_size_in_bytes), output=int(stats.output_size_in_bytes),
        alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes),
        host_temp=int(getattr(stats, "host_temp_size_in_bytes", 0) or 0),
    )


# ---------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------


def _gib(size: float) -> str:
    """A byte count as people read it: MiB below a GiB, GiB below a TiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if size >= 1 << shift or unit == "MiB":
            return f"{size / (1 << shift):.2f} {unit}"
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one training step, in bytes. `peak` is what to compare with a device's
    memory: XLA's analysis when source is "compiled", the formula's otherwise; the split below
    is the formula's either way."""

    source: str
    backend: str
    kernels: str
    model_type: str
    num_parameters: int
    batch_size: int
    max_seq_length: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool | str
    dtype: str
    quantization: str | None
    weights: tuple[tuple[str, int], ...]
    lora_params: int
    optimizer_state: int
    gradients: int
    batch_inputs: int
    saved_per_layer: int
    num_layers: int
    saved_activations: int
    layer_backward: int
    loss_head: int
    cpu_weight_copies: int
    host: int
    predicted_peak: int
    compiled: CompiledMemory | None = None

    @property
    def peak(self) -> int:
        return self.compiled.peak if self.compiled is not None else self.predicted_peak

    @property
    def weights_total(self) -> int:
        return sum(size for _, size in self.weights)

    @property
    def largest_transient(self) -> int:
        return max(self.layer_backward, self.loss_head)

    def fits(self, memory_limit: int) -> bool:
        return self.peak <= memory_limit

    def table(self, memory_limit: int | None = None, limit_source: str = "",
              max_seq_length_fits: int | None = None, max_batch_fits: int | None = None,
              host_limit: int | None = None, host_source: str = "") -> str:
        """The split as a table; with memory_limit, the verdict and the largest run that fits (as
        given: the CLI searches with host_limit too when the plan offloads). host_limit: the host
        memory free for pinned buffers, printed beside the host line."""
        quantized = f", {self.quantization} base" if self.quantization else ""
        mode = mode_name(self.gradient_checkpointing)
        lines = [
            f"fastft_jax memory plan ({'XLA memory analysis' if self.source == 'compiled' else 'formula'}): "
            f"{self.model_type}, {_count(self.num_parameters)} parameters, batch {self.batch_size} x "
            f"{self.max_seq_length} tokens x {self.gradient_accumulation_steps} accumulation, {self.dtype}{quantized}, "
            f"use_gradient_checkpointing={mode}",
            f"  {self.backend} kernels: {self.kernels}",
            "  base weights",
        ]
        rows = [(f"    {label}", size) for label, size in self.weights]
        rows += [
            ("  LoRA parameters (float32)", self.lora_params),
            ("  AdamW m and v (float32)", self.optimizer_state),
            ("  gradients (float32)", self.gradients),
            ("  token batch (int32)", self.batch_inputs),
            (f"  saved activations: {self.num_layers} layers x {_gib(self.saved_per_layer)}"
             f"{', in host memory' if self.host else ''}", self.saved_activations),
        ]
        if self.cpu_weight_copies:
            rows.append(("  float32 copies of 16-bit weights (XLA:CPU)", self.cpu_weight_copies))
        at_peak = "layer backward" if self.layer_backward >= self.loss_head else "loss head"
        rows += [
            (f"  one layer's backward{' (the largest transient)' if at_peak == 'layer backward' else ''}", self.layer_backward),
            (f"  loss head{' (the largest transient)' if at_peak == 'loss head' else ''}", self.loss_head),
        ]
        width = max(len(label) for label, _ in rows) + 2
        lines += [f"{label:<{width}}{_gib(size):>12}" for label, size in rows]
        lines.append(f"{'  ' + '-' * (width + 10)}")
        lines.append(f"{'  peak device memory (formula)':<{width}}{_gib(self.predicted_peak):>12}"
                     "   (everything above but the smaller transient)")
        if self.compiled is not None:
            lines.append(f"{'  peak device memory (XLA memory analysis)':<{width}}{_gib(self.compiled.peak):>12}"
                         "   (argument + output - alias + temp)")
        if self.host:
            lines.append(f"{'  host memory (offloaded layer inputs)':<{width}}{_gib(self.host):>12}   (pinned)")
            if host_limit is None:
                lines.append("  host memory available: not known here; pass --host-memory 128GB for what fits the host")
            else:
                spare = host_limit - self.host
                verdict = f"fits, {_gib(spare)} spare" if spare >= 0 else f"does NOT fit: {_gib(-spare)} over"
                label = "  host memory available" + (f" ({host_source})" if host_source else "")
                lines.append(f"{label:<{width}}{_gib(host_limit):>12}   {verdict}")
        if memory_limit is None:
            lines.append("  no memory limit known: pass --memory 24GB (or set training.memory_limit) for what fits")
            return "\n".join(lines)
        spare = memory_limit - self.peak
        verdict = f"fits, {_gib(spare)} spare" if spare >= 0 else f"does NOT fit: {_gib(-spare)} over"
        lines.append(f"{'  memory limit' + (f' ({limit_source})' if limit_source else ''):<{width}}{_gib(memory_limit):>12}   {verdict}")
        both = "   (device and host)" if self.host and host_limit is not None else ""
        if max_seq_length_fits is not None:
            lines.append(f"{f'  largest max_seq_length that fits at batch {self.batch_size}':<{width}}"
                         f"{max_seq_length_fits:>12,}{both}")
        if max_batch_fits is not None:
            lines.append(f"{f'  largest batch that fits at max_seq_length {self.max_seq_length}':<{width}}"
                         f"{max_batch_fits:>12,}{both}")
        return "\n".join(lines)


def mode_name(mode: bool | str) -> str:
    """A checkpointing mode as the user writes it: False, True, "unsloth"."""
    return str(mode) if isinstance(mode, bool) else f'"{mode}"'


def _count(number: int) -> str:
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if number >= scale:
            return f"{number / scale:.3g}{suffix}"
    return str(number)


def current_backend() -> str:
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"


def _make_spec(
    config: ModelConfig, *, lora_config: LoRAConfig | None, batch_size: int, max_seq_length: int,
    gradient_accumulation_steps: int, dtype: Any, quantization: str | None, gradient_checkpointing: bool | str,
    packing: bool, ops_config: ops.OpsConfig | None, backend: str | None, fsdp: int,
) -> _Spec:
    if gradient_checkpointing == AUTO_CHECKPOINTING:
        raise ConfigError('gradient_checkpointing="auto" is not one mode to plan: plan False, True, "unsloth" or '
                          '"selective", or let choose_checkpointing pick the fastest that fits a memory limit')
    if gradient_checkpointing not in CHECKPOINT_MODES:
        raise ConfigError(f"gradient_checkpointing={gradient_checkpointing!r}: use one of False, True, \"unsloth\", \"selective\"")
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization={quantization!r}: use None, 'nf4' or 'int8'")
    backend = backend or current_backend()
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: use 'gpu' or 'cpu'")
    for name, value in (("batch_size", batch_size), ("max_seq_length", max_seq_length),
                        ("gradient_accumulation_steps", gradient_accumulation_steps), ("fsdp", fsdp)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"plan_memory: {name} must be a positive integer, got {value!r}")
    return _Spec(
        config=config, lora_config=lora_config or LoRAConfig(), batch_size=int(batch_size),
        max_seq_length=int(max_seq_length), gradient_accumulation_steps=int(gradient_accumulation_steps),
        dtype=jnp.dtype(dtype), quantization=quantization, gradient_checkpointing=gradient_checkpointing,
        packing=bool(packing), ops_config=(ops_config or ops.OpsConfig.from_env()).validated(), backend=backend,
        fsdp=int(fsdp),
    )


def _num_parameters(config: ModelConfig) -> int:
    return sum(math.prod(s.shape) * (config.num_layers if s.stacked else 1) for s in tensor_specs(config))


def _describe_kernels(spec: _Spec) -> str:
    tile = spec.mlp_tile_tokens
    rows = _loss_rows(spec)
    return (f"attention {spec.attention}, lora_linear {spec.resolve('lora_linear')}, loss head "
            f"{spec.resolve('cross_entropy')} in {rows:,}-token chunks, MLP "
            f"{f'tiled by {tile:,} tokens' if tile else 'untiled'}")


def _plan_from(spec: _Spec, weights: dict[str, int], compiled: CompiledMemory | None) -> MemoryPlan:
    estimate = _estimate(spec, weights)
    host = estimate.host
    if compiled is not None and compiled.host_temp:
        host = compiled.host_temp
    return MemoryPlan(
        source="compiled" if compiled is not None else "shapes", backend=spec.backend, kernels=_describe_kernels(spec),
        model_type=spec.config.model_type, num_parameters=_num_parameters(spec.config), batch_size=spec.batch_size,
        max_seq_length=spec.max_seq_length, gradient_accumulation_steps=spec.gradient_accumulation_steps,
        gradient_checkpointing=spec.gradient_checkpointing, dtype=jnp.dtype(spec.dtype).name,
        quantization=spec.quantization, weights=tuple(estimate.weights.items()), lora_params=estimate.lora_params,
        optimizer_state=estimate.optimizer_state, gradients=estimate.gradients, batch_inputs=estimate.batch_inputs,
        saved_per_layer=estimate.saved_per_layer, num_layers=spec.config.num_layers,
        saved_activations=estimate.saved_on_device, layer_backward=estimate.layer_backward,
        loss_head=estimate.loss_head, cpu_weight_copies=estimate.cpu_weight_copies, host=host,
        predicted_peak=estimate.peak, compiled=compiled,
    )


def plan_memory(
    config: ModelConfig,
    *,
    lora_config: LoRAConfig | None = None,
    batch_size: int = 1,
    max_seq_length: int = 2048,
    gradient_accumulation_steps: int = 1,
    dtype: Any = "bfloat16",
    quantization: str | None = None,
    gradient_checkpointing: bool | str = "unsloth",
    packing: bool = False,
    ops_config: ops.OpsConfig | None = None,
    backend: str | None = None,
    source: str = "auto",
    base_params: Any = None,
    fsdp: int = 1,
) -> MemoryPlan:
    """The memory one SFTTrainer step needs on one device (and on its host).

    config, lora_config (default LoRAConfig(): r 16 on all seven projections), batch_size
    (per_device_train_batch_size), max_seq_length, dtype (the compute dtype), quantization (None,
    "nf4" for load_in_4bit, "int8" for load_in_8bit), gradient_checkpointing (False, True,
    "unsloth", "selective"; "auto" is choose_checkpointing's to resolve), packing (packed rows pass segment ids to attention) and ops_config
    describe the run as the trainer would execute it. backend ("gpu" or "cpu", default the
    running one) picks whose kernels and whose buffer counts apply, so a CPU can plan a GPU run.
    source: "compiled" (XLA's analysis; only for the running backend), "shapes" (the formula), or
    "auto": compiled for models up to COMPILE_MAX_PARAMS parameters on the running backend, the
    formula otherwise. base_params (arrays or ShapeDtypeStructs) counts the weights from the real
    tree; fsdp divides weights, adapters and optimizer state over that many devices.
    """
    if source not in SOURCES:
        raise ConfigError(f"source={source!r}: use one of {', '.join(SOURCES)}")
    spec = _make_spec(config, lora_config=lora_config, batch_size=batch_size, max_seq_length=max_seq_length,
                      gradient_accumulation_steps=gradient_accumulation_steps, dtype=dtype, quantization=quantization,
                      gradient_checkpointing=gradient_checkpointing, packing=packing, ops_config=ops_config,
                      backend=backend, fsdp=fsdp)
    weights = weight_bytes_of_tree(base_params) if base_params is not None else weight_bytes(config, spec.dtype, quantization)
    can_compile = spec.backend == current_backend() and spec.fsdp == 1
    if source == "compiled" and not can_compile:
        raise ConfigError(
            f"source='compiled' needs the planned backend ({spec.backend}) to be the running one "
            f"({current_backend()}) and one device (fsdp={spec.fsdp}); use source='shapes'"
        )
    compiled = None
    if source == "compiled" or (source == "auto" and can_compile and _num_parameters(config) <= COMPILE_MAX_PARAMS):
        tree = base_params if base_params is not None else abstract_base_params(config, spec.dtype, quantization)
        compiled = _compiled_memory(spec, tree)
    return _plan_from(spec, weights, compiled)


def _largest_monotone(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), for fits true then false over the range; low - 1
    if none."""
    if not fits(low):
        return low - 1
    step = 1
    while low + step <= high and fits(low + step):
        low, step = low + step, step * 2
    high = min(high, low + step)
    while high > low:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _largest(fits, cap: int, breaks: tuple[int, ...] = ()) -> int:
    """The largest n in [1, cap] with fits(n); 0 if none. The peak grows with n except at breaks,
    where mlp_tile_tokens="auto" starts tiling the MLP and it drops: each stretch between them is
    searched on its own, the last one first."""
    edges = [1] + sorted(b + 1 for b in breaks if 1 <= b < cap) + [cap + 1]
    for first, end in reversed(list(itertools.pairwise(edges))):
        found = _largest_monotone(fits, first, end - 1)
        if found >= first:
            return found
    return 0


def _tiling_break(spec: _Spec, per_unit: int) -> tuple[int, ...]:
    """The count (of positions, or of rows) past which "auto" tiles the MLP: where its [tokens,
    intermediate] activation passes the start tiling.mlp_tile_for uses for this checkpointing mode."""
    if spec.ops_config.mlp_tile_tokens != "auto":
        return ()
    bytes_per_token = spec.config.intermediate_size * jnp.dtype(spec.dtype).itemsize
    start = tiling.OFFLOAD_TILE_BYTES if spec.gradient_checkpointing == "unsloth" else tiling.AUTO_START_BYTES
    return (start // bytes_per_token // per_unit,)


def _fits_with(spec: _Spec, weights: dict[str, int], memory_limit: int, host_limit: int | None, **change: int):
    # The host memory grows with the tokens as the peak does, so each stretch stays monotone.
    estimate = _estimate(dataclasses.replace(spec, **change), weights)
    return estimate.peak <= memory_limit and (host_limit is None or estimate.host <= host_limit)


def max_seq_length_that_fits(memory_limit: int | str, config: ModelConfig, *, max_length: int = 1 << 24,
                             base_params: Any = None, host_memory_limit: int | str | None = None,
                             **plan_args: Any) -> int:
    """The largest max_seq_length (at the given batch) whose predicted peak fits memory_limit, by
    search over the formula; 0 when not even one token fits. host_memory_limit (bytes of host
    memory for pinned buffers, e.g. host_memory_available()): the offloaded layer inputs of
    "unsloth" on a GPU must fit it too; None: the device alone."""
    limit, spec, weights = _search_inputs(memory_limit, config, base_params, plan_args)
    host_limit = parse_memory_size(host_memory_limit, "host_memory_limit")
    return _largest(lambda n: _fits_with(spec, weights, limit, host_limit, max_seq_length=n), max_length,
                    _tiling_break(spec, spec.batch_size))


def max_batch_size_that_fits(memory_limit: int | str, config: ModelConfig, *, max_batch: int = 1 << 16,
                             base_params: Any = None, host_memory_limit: int | str | None = None,
                             **plan_args: Any) -> int:
    """The largest per-device batch (at the given max_seq_length) whose predicted peak fits
    (and, given host_memory_limit, whose offloaded layer inputs fit the host)."""
    limit, spec, weights = _search_inputs(memory_limit, config, base_params, plan_args)
    host_limit = parse_memory_size(host_memory_limit, "host_memory_limit")
    return _largest(lambda n: _fits_with(spec, weights, limit, host_limit, batch_size=n), max_batch,
                    _tiling_break(spec, spec.max_seq_length))


def _search_inputs(memory_limit: int | str, config: ModelConfig, base_params: Any, plan_args: dict[str, Any]):
    """(limit in bytes, the run's spec, its weight bytes): what both searches start from. The searches
    always use the formula, so a `source` among plan_args is dropped."""
    limit = parse_memory_size(memory_limit)
    plan_args.pop("source", None)
    spec = _make_spec(config, **_spec_args(plan_args))
    weights = weight_bytes_of_tree(base_params) if base_params is not None else weight_bytes(config, spec.dtype, spec.quantization)
    return limit, spec, weights


def _spec_args(plan_args: Mapping[str, Any]) -> dict[str, Any]:
    defaults = dict(lora_config=None, batch_size=1, max_seq_length=2048, gradient_accumulation_steps=1,
                    dtype="bfloat16", quantization=None, gradient_checkpointing="unsloth", packing=False,
                    ops_config=None, backend=None, fsdp=1)
    unknown = sorted(set(plan_args) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown plan arguments {unknown}; the valid ones are {', '.join(defaults)}")
    return {**defaults, **plan_args}


# ---------------------------------------------------------------------------------------------
# Memory limits, and the trainer's check.
# ---------------------------------------------------------------------------------------------


def parse_memory_size(value: int | float | str | None, where: str = "memory") -> int | None:
    """Bytes from 25769803776, "24GB", "24 GiB", "1.5TB" or "512MB" (GB = GiB = 2^30); None and
    "off" give None (no limit)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in (MEMORY_OFF, "none")):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{where}={value!r}: give a size such as \"24GB\", a number of bytes, or \"off\"")
    if isinstance(value, (int, float, np.integer, np.floating)):
        size = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"{where}={value!r}: give a size such as \"24GB\", \"80GiB\", \"512MB\", a number of bytes, "
                              "or \"off\"")
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if size <= 0:
        raise ConfigError(f"{where}={value!r} must be positive")
    return int(size)


def device_memory_limit() -> int | None:
    """The first device's allocator limit (bytes_limit of memory_stats) where the runtime reports
    one: GPUs do, the CPU does not."""
    try:
        stats = jax.devices()[0].memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def host_memory_available() -> int | None:
    """Bytes of host memory free for pinned buffers now: MemAvailable of /proc/meminfo on Linux
    (free memory plus what the kernel can reclaim), else the physical memory (os.sysconf); None
    where neither is known. check_run_fits and the CLI call it through this module, so a test can
    replace it."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, _, value = line.partition(":")
                if key == "MemAvailable":
                    return int(value.split()[0]) << 10  # the kernel's "kB" are KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def resolve_memory_limit(setting: int | str | None, where: str = "training.memory_limit") -> tuple[int | None, str]:
    """(limit in bytes or None, where it came from): the setting when given ("off": no limit),
    else the device's bytes_limit, else None."""
    if setting is not None:
        return parse_memory_size(setting, where), where
    limit = device_memory_limit()
    return (limit, f"bytes_limit of {jax.devices()[0].device_kind}") if limit else (None, "")


@dataclasses.dataclass(frozen=True)
class CheckpointingChoice:
    """What use_gradient_checkpointing="auto" resolves to, and the numbers it went by."""

    mode: bool | str
    memory_limit: int | None
    limit_source: str
    # (mode, predicted peak in bytes) for every mode, in CHECKPOINT_SPEED_ORDER.
    peaks: tuple[tuple[bool | str, int], ...]

    def describe(self) -> str:
        """One line: 'auto -> "selective" (predicted 28.06 GiB of 80.00 GiB, training.memory_limit)'."""
        head = f"auto -> {mode_name(self.mode)}"
        if self.memory_limit is None:
            return f"{head} (no memory limit known, so full recomputation; give a limit for the fastest mode that fits)"
        limit = _gib(self.memory_limit) + (f", {self.limit_source}" if self.limit_source else "")
        peaks = dict(self.peaks)
        if peaks[self.mode] > self.memory_limit:
            return f"{head} (no mode fits {limit}: {self.per_mode()})"
        order = [mode for mode, _ in self.peaks]
        over = ", ".join(f"{mode_name(mode)} {_gib(peaks[mode])}" for mode in order[:order.index(self.mode)])
        return f"{head} (predicted {_gib(peaks[self.mode])} of {limit}" + (f"; faster but over it: {over})" if over else ")")

    def per_mode(self) -> str:
        """The predicted peak of every mode, fastest first."""
        return ", ".join(f"{mode_name(mode)} {_gib(peak)}" for mode, peak in self.peaks)


def choose_checkpointing(memory_limit: int | str | None, config: ModelConfig, *, limit_source: str = "",
                         base_params: Any = None, **plan_args: Any) -> CheckpointingChoice:
    """Resolve use_gradient_checkpointing="auto" for a run (plan_memory's arguments, any
    gradient_checkpointing among them ignored): the first mode of CHECKPOINT_SPEED_ORDER whose
    predicted peak (the formula) fits memory_limit; the last ("unsloth", the least memory on a GPU)
    when none does, for check_run_fits to report; and UNRESOLVED_AUTO_MODE (True: full recomputation, the middle ground) when no
    limit is known, since then nothing can be checked."""
    limit, spec, weights = _search_inputs(memory_limit, config, base_params,
                                          {**plan_args, "gradient_checkpointing": CHECKPOINT_SPEED_ORDER[0]})
    peaks = tuple((mode, _estimate(dataclasses.replace(spec, gradient_checkpointing=mode), weights).peak)
                  for mode in CHECKPOINT_SPEED_ORDER)
    if limit is None:
        mode = UNRESOLVED_AUTO_MODE
    else:
        mode = next((mode for mode, peak in peaks if peak <= limit), CHECKPOINT_SPEED_ORDER[-1])
    return CheckpointingChoice(mode, limit, limit_source, peaks)


def _run_plan_args(model: Any, args: Any, data_config: Any, fsdp: int, gradient_checkpointing: bool | str) -> dict:
    """plan_memory's arguments for SFTTrainer's run of `model` under TrainingArguments and DataConfig."""
    return dict(
        lora_config=model.lora_config, batch_size=args.per_device_train_batch_size,
        max_seq_length=data_config.max_seq_length, gradient_accumulation_steps=args.gradient_accumulation_steps,
        dtype=model.dtype, quantization=quantization_of(model.base_params()), gradient_checkpointing=gradient_checkpointing,
        packing=data_config.packing, ops_config=model.ops_config, fsdp=fsdp,
    )


def choose_run_checkpointing(model: Any, args: Any, data_config: Any, fsdp: int = 1) -> CheckpointingChoice:
    """choose_checkpointing for SFTTrainer's run, under the memory limit check_run_fits uses."""
    limit, where = resolve_memory_limit(getattr(args, "memory_limit", None))
    plan_args = _run_plan_args(model, args, data_config, fsdp, CHECKPOINT_SPEED_ORDER[0])
    return choose_checkpointing(limit, model.config, limit_source=where, base_params=model.base_params(), **plan_args)


def check_run_fits(model: Any, args: Any, data_config: Any, fsdp: int = 1,
                   gradient_checkpointing: bool | str | None = None, devices_on_host: int = 1) -> MemoryPlan | None:
    """SFTTrainer's check before its step is built: with a memory limit known (args.memory_limit,
    else the device's bytes_limit), a run whose predicted peak passes it raises one ConfigError
    with the peak, the limit, and the largest max_seq_length and batch that fit. Then, where the
    run keeps its layer inputs in pinned host memory ("unsloth" on a GPU) and
    host_memory_available() knows the host's free memory, a run whose host need passes that
    raises one too. Uses the formula: instant, and no compile before the trainer's own. Returns
    the plan, or None without a limit (training.memory_limit "off" skips both checks).
    gradient_checkpointing: the mode to check (default: the model's, "auto" as the layers run it).
    devices_on_host: how many of the run's devices share this host (each offloads its own inputs)."""
    limit, where = resolve_memory_limit(getattr(args, "memory_limit", None))
    if limit is None:
        return None
    base = model.base_params()
    if gradient_checkpointing is None:
        gradient_checkpointing = layer_checkpoint_mode(model.gradient_checkpointing)
    plan_args = _run_plan_args(model, args, data_config, fsdp, gradient_checkpointing)
    plan = plan_memory(model.config, source="shapes", base_params=base, **plan_args)
    available = host_memory_available() if plan.host else None
    # Each device's share of the host; the searches hold the device limit too, so what they report runs.
    host_limit = None if available is None else max(1, available // devices_on_host)
    if not plan.fits(limit):
        # What is suggested must fit the host as well: on a Llama-3-8B QLoRA run with an 80 GB card and
        # 126 GiB of RAM the host is the tighter limit, so a device-only answer would only lead to the
        # host error below.
        longest = max_seq_length_that_fits(limit, model.config, base_params=base, host_memory_limit=host_limit,
                                           **plan_args)
        widest = max_batch_size_that_fits(limit, model.config, base_params=base, host_memory_limit=host_limit,
                                          **plan_args)
        raise ConfigError(_does_not_fit_message(plan, limit, where, longest, widest))
    if available is None or devices_on_host * plan.host <= available:
        return plan
    longest = max_seq_length_that_fits(limit, model.config, base_params=base, host_memory_limit=host_limit, **plan_args)
    widest = max_batch_size_that_fits(limit, model.config, base_params=base, host_memory_limit=host_limit, **plan_args)
    inputs_on_device = plan_memory(model.config, source="shapes", base_params=base,
                                   **{**plan_args, "gradient_checkpointing": True})
    raise ConfigError(_host_does_not_fit_message(plan, available, devices_on_host, limit, where, longest, widest,
                                                 inputs_on_device.peak))


def _largest_runs(plan: MemoryPlan, longest: int, widest: int, limits: str) -> list[str]:
    """The refusal's two suggestions: the largest max_seq_length at the run's batch and the largest
    batch at its max_seq_length that fit (limits: " both" when device and host memory must hold)."""
    return [
        f"the largest max_seq_length that fits{limits} at batch {plan.batch_size} is {longest:,}" if longest
        else f"not even one token fits{limits} at batch {plan.batch_size}",
        f"the largest batch that fits{limits} at max_seq_length {plan.max_seq_length:,} is {widest:,}" if widest
        else f"not even batch 1 fits{limits} at max_seq_length {plan.max_seq_length:,}",
    ]


def _does_not_fit_message(plan: MemoryPlan, limit: int, where: str, longest: int, widest: int) -> str:
    head = (f"this run needs about {_gib(plan.peak)} of device memory (predicted peak: weights "
            f"{_gib(plan.weights_total)}, saved activations {_gib(plan.saved_activations)}, largest transient "
            f"{_gib(plan.largest_transient)}), more than the limit of {_gib(limit)} ({where})")
    if longest == 0:
        return (head + f"; not even one token fits: the weights, adapters and optimizer state alone take "
                f"{_gib(plan.weights_total + plan.lora_params + plan.optimizer_state)}. Load the model with "
                "load_in_4bit, target fewer modules or a lower LoRA rank, or use a larger device")
    fixes = _largest_runs(plan, longest, widest, "")
    advice = "lower data.max_seq_length or training.per_device_train_batch_size"
    if plan.backend == "gpu" and plan.gradient_checkpointing != "unsloth":
        advice += ', or use use_gradient_checkpointing="unsloth" (layer inputs in host memory)'
    return (head + "; " + "; ".join(fixes) + f". {advice[0].upper()}{advice[1:]} "
            "(python -m fastft_jax.plan --config FILE shows the split). If the limit is wrong, set "
            'training.memory_limit (e.g. "80GB", or "off" to skip this check).')


def _host_does_not_fit_message(plan: MemoryPlan, available: int, devices_on_host: int, limit: int, where: str,
                               longest: int, widest: int, peak_on_device: int) -> str:
    """plan fits the device limit, but its offloaded layer inputs do not fit the host's memory.
    peak_on_device: the device peak of the same run under use_gradient_checkpointing=True."""
    need = devices_on_host * plan.host
    shared = f", {devices_on_host} devices x {_gib(plan.host)}" if devices_on_host > 1 else ""
    head = (f"this run needs about {_gib(need)} of pinned host memory for the layer inputs "
            f'use_gradient_checkpointing="unsloth" offloads ({plan.num_layers} layers x {_gib(plan.saved_per_layer)}'
            f"{shared}), more than the {_gib(available)} of memory this host has available; "
            f"its device peak, {_gib(plan.peak)}, fits the limit of {_gib(limit)} ({where})")
    fixes = _largest_runs(plan, longest, widest, " both")
    advice = "Lower data.max_seq_length or training.per_device_train_batch_size, or free host memory"
    if peak_on_device <= limit:
        advice += (", or set use_gradient_checkpointing=True, which keeps the layer inputs on the device: predicted "
                   f"peak {_gib(peak_on_device)}, within the limit")
    else:
        advice += (" (use_gradient_checkpointing=True would keep the layer inputs on the device, but its predicted "
                   f"peak, {_gib(peak_on_device)}, is over the limit)")
    return (head + "; " + "; ".join(fixes) + f". {advice}. python -m fastft_jax.plan --config FILE shows the split; "
            'training.memory_limit: "off" skips this check.')


# ---------------------------------------------------------------------------------------------
# python -m fastft_jax.plan
# ---------------------------------------------------------------------------------------------


def _planned_dtype(name: str | None, backend: str) -> Any:
    """model.dtype as the run would resolve it on the planned backend (null: bfloat16 on a GPU that
    has it, float16 on an older one, float32 on the CPU), without needing that backend here."""
    from fastft_jax.api import is_bfloat16_supported, resolve_dtype

    if name is not None:
        return resolve_dtype(name)
    if backend == "cpu":
        return jnp.dtype(jnp.float32)
    if current_backend() == "gpu" and not is_bfloat16_supported():
        return jnp.dtype(jnp.float16)
    return jnp.dtype(jnp.bfloat16)


def plan_run_config(run_config: Any, *, backend: str | None = None, source: str = "auto",
                    memory_limit: int | None = None, limit_source: str = "",
                    ) -> tuple[MemoryPlan, dict, CheckpointingChoice | None]:
    """The plan of a `python -m fastft_jax.train` run config (fastft_jax.train.RunConfig), from
    the checkpoint's config.json alone; returns (plan, the plan arguments the searches take, and
    what lora.use_gradient_checkpointing="auto" resolved to under memory_limit, else None)."""
    from convert.hf import model_config_from_hf, read_config_json
    from fastft_jax import sharding
    from fastft_jax.lora import normalise_target_modules

    model_section, lora_section, training = run_config.model, run_config.lora, run_config.training
    hf_config = read_config_json(model_section.name)
    config = model_config_from_hf(hf_config, where=f"{model_section.name}/config.json")
    backend = backend or "gpu"
    fsdp = 1
    if training.mesh:
        try:
            fsdp = sharding.resolve_mesh_shape(training.mesh, jax.device_count())["fsdp"]
        except ConfigError:
            fsdp = max(1, int(training.mesh.get("fsdp", 1)))
    plan_args = dict(
        lora_config=LoRAConfig(
            r=lora_section.r, alpha=float(lora_section.lora_alpha), dropout=float(lora_section.lora_dropout),
            target_modules=normalise_target_modules(lora_section.target_modules), use_rslora=bool(lora_section.use_rslora),
        ),
        batch_size=training.per_device_train_batch_size, max_seq_length=run_config.data.max_seq_length,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        dtype=_planned_dtype(model_section.dtype, backend),
        quantization="nf4" if model_section.load_in_4bit else "int8" if model_section.load_in_8bit else None,
        gradient_checkpointing=lora_section.use_gradient_checkpointing, packing=run_config.data.packing,
        ops_config=ops.OpsConfig.from_env(**(model_section.kernels or {})), backend=backend, fsdp=fsdp,
    )
    choice = None
    if plan_args["gradient_checkpointing"] == AUTO_CHECKPOINTING:
        choice = choose_checkpointing(memory_limit, config, limit_source=limit_source, **plan_args)
        plan_args["gradient_checkpointing"] = choice.mode
    if source == "auto" and backend != current_backend():
        source = "shapes"
    return plan_memory(config, source=source, **plan_args), {"config": config, **plan_args}, choice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastft_jax.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's YAML file (as for python -m fastft_jax.train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key of the YAML (repeatable)")
    parser.add_argument("--memory", help='the device memory to plan for, e.g. 24GB (default: training.memory_limit, '
                                         "else this GPU's bytes_limit)")
    parser.add_argument("--host-memory", help='the host memory free for pinned buffers, e.g. 128GB (default: this '
                                              "machine's MemAvailable when it runs the planned backend)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="whose kernels to plan for (default: gpu; a CPU box plans the GPU run it prepares)")
    parser.add_argument("--source", choices=SOURCES, default="auto",
                        help="compiled: XLA's analysis (running backend only); shapes: the formula; auto: "
                             f"compiled up to {COMPILE_MAX_PARAMS:,} parameters")
    args = parser.parse_args(argv)
    try:
        from fastft_jax.train import load_run_config

        run_config = load_run_config(args.config, args.overrides)
        backend = args.backend or "gpu"
        if args.memory is not None:
            limit, where = parse_memory_size(args.memory, "--memory"), "--memory"
        elif run_config.training.memory_limit is not None:
            limit, where = resolve_memory_limit(run_config.training.memory_limit)
        elif backend == current_backend():
            limit, where = resolve_memory_limit(None)
        else:
            limit, where = None, ""
        plan, plan_args, choice = plan_run_config(run_config, backend=backend, source=args.source,
                                                  memory_limit=limit, limit_source=where)
        if choice is not None:
            print(f"use_gradient_checkpointing: {choice.describe()}\n"
                  f"  predicted peak by mode, fastest first: {choice.per_mode()}")
        # This machine's memory says nothing of the host of a GPU run planned on a CPU.
        if args.host_memory is not None:
            host_limit, host_source = parse_memory_size(args.host_memory, "--host-memory"), "--host-memory"
        elif backend == current_backend():
            host_limit, host_source = host_memory_available(), "available on this machine"
        else:
            host_limit, host_source = None, ""
        longest = widest = None
        if limit is not None:
            config = plan_args.pop("config")
            host_args = {"host_memory_limit": host_limit} if plan.host else {}
            longest = max_seq_length_that_fits(limit, config, **host_args, **plan_args)
            widest = max_batch_size_that_fits(limit, config, **host_args, **plan_args)
        print(plan.table(limit, where, longest, widest, host_limit, host_source))
    except FastFTError as err:
        print(f"fastft_jax.plan: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

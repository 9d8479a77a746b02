"""The op seam: every op the model uses goes through here, and here alone the choice between the
Pallas kernels and the pure-jnp references is made.

The choice is static (part of the jit key): an OpsConfig names an implementation per op, and
FASTFT_KERNELS=reference|pallas|auto in the environment sets the default for all of them (and
"op=MODE" items, comma-separated, for one op: "auto,lora_linear=reference"). "auto"
takes the path bench/RESULTS.md measured fastest on the GPU at hand, and the reference on the CPU,
where Pallas only runs in its (slow) interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from convert import quant
from convert.errors import ConfigError
from pallas_kernels import attention as attention_kernels
from pallas_kernels import cross_entropy as cross_entropy_kernels
from pallas_kernels import lora_linear as lora_linear_kernels
from pallas_kernels import nf4 as nf4_kernels
from pallas_kernels import rms_norm as rms_norm_kernels
from pallas_kernels import rope as rope_kernels
from pallas_kernels import stacked_matmul as stacked_matmul_kernels
from pallas_kernels import swiglu as swiglu_kernels

OP_NAMES = ("rms_norm", "rope", "swiglu", "lora_linear", "cross_entropy", "attention", "dequant", "decode_matmul")
MODES = ("auto", "reference", "pallas")
# attention "hopper": pallas_kernels/attention_hopper.py (Mosaic GPU, sm90 only), opt-in until an
# H100/H200 has checked and timed it (bench/attention_hopper_check.py).
ATTENTION_MODES = MODES + ("cudnn", "xla", "hopper")
# lora_linear's "xla": the kernel file's custom_vjp (cheapest matmul order, nothing but x and x·A
# saved) with cuBLAS matmuls instead of the Pallas forward; "xla_rounded_base": the same with the base
# product rounded to 16-bit before the adapter's term is added (PEFT's order; faster, less exact).
LORA_LINEAR_MODES = MODES + ("xla", "xla_rounded_base")

# What "auto" takes on a GPU, from bench/RESULTS.md (H200, jax 0.11.2, 2026-11-28): a Pallas kernel
# only where it beat XLA's fusion of the reference in forward+backward.
GPU_AUTO_CHOICE: dict[str, str] = {
    "rms_norm": "pallas",  # fwd+bwd 0.86x (llama3-8b) / 0.93x (qwen2.5-7b) of XLA's time
    "rope": "pallas",  # 0.84x / 0.98x
    "swiglu": "reference",  # whole llama3-8b step on an H100: 12,580 tok/s with XLA's fusion, 12,222 with the kernel
    # The kernel file's custom_vjp on cuBLAS, base + adapter rounded once as the reference does:
    # llama3-8b "selective" step 13,941 tok/s against 13,284 with the Pallas epilogue (H200, seventh
    # session). "xla_rounded_base" (PEFT's order, 14,564) drops a young adapter's sub-ulp term and
    # failed loss parity 20x, so it is opt-in only. On sm90 the decoder's projections inside the layer
    # scan (and QLoRA's) take layer_matmul's Mosaic GEMM instead (HOPPER_LAYER_MATMUL_IN_AUTO).
    "lora_linear": "xla",
    "cross_entropy": "pallas",  # the kernel file's chunked scan: 0.54x the reference's time, 1/6 of its memory
    "attention": "auto",  # resolved per call: cuDNN without segment ids, the flash kernel with them
    "dequant": "pallas",  # NF4 -> 16-bit: 1.5x-2x XLA's fusion of the reference (bench/qlora.py, H200)
    # The stacked-weight kernel reads each layer's weights in place instead of XLA's sliced copy:
    # llama3-8b bf16 decode 183.9 against 74.7 tok/s at batch 1, 4,960 against 2,427 at batch 32
    # (bench/decode.py --decode-matmul pallas,reference, H200, 2026-11-28), the same tokens.
    "decode_matmul": "pallas",
}

_KERNELS = {
    "rms_norm": (rms_norm_kernels, "rms_norm"),
    "rope": (rope_kernels, "rope"),
    "swiglu": (swiglu_kernels, "swiglu"),
    "lora_linear": (lora_linear_kernels, "lora_linear"),
    "cross_entropy": (cross_entropy_kernels, "fused_linear_cross_entropy"),
    "attention": (attention_kernels, "flash_attention"),
    "dequant": (nf4_kernels, "dequantize_4bit"),
    "decode_matmul": (stacked_matmul_kernels, "stacked_matmul"),
}


def _allowed_modes(op: str) -> tuple[str, ...]:
    """The modes one op takes (op "": what every op takes, FASTFT_KERNELS' base mode)."""
    return {"attention": ATTENTION_MODES, "lora_linear": LORA_LINEAR_MODES}.get(op, MODES)


def _env_modes() -> dict[str, str]:
    """FASTFT_KERNELS as a mode per op: "MODE" for every op, and "op=MODE" items, comma-separated, for
    one op each ("auto,lora_linear=reference": the auto choice except the LoRA matmuls), so that any
    one kernel can be swapped out of a run without editing its YAML."""
    raw = os.environ.get("FASTFT_KERNELS", "auto")
    modes: dict[str, str] = {}
    base = "auto"
    for item in (part.strip().lower() for part in raw.split(",")):
        if not item:
            continue
        name, sep, mode = item.partition("=")
        if not sep:
            name, mode = "", name
        name, mode = name.strip(), mode.strip()
        if name and name not in OP_NAMES:
            raise ConfigError(f"FASTFT_KERNELS={raw!r}: {name!r} is not an op; ops are {', '.join(OP_NAMES)}")
        allowed = _allowed_modes(name)
        if mode not in allowed:
            raise ConfigError(f"FASTFT_KERNELS={raw!r}: {mode!r} is not one of {', '.join(allowed)}"
                              + (f" (for {name})" if name else "; use MODE or op=MODE items, comma-separated"))
        if name:
            modes[name] = mode
        else:
            base = mode
    return {name: modes.get(name, base) for name in OP_NAMES}


UNROLLED_BACKWARD_MODES = ("free", "tied")
# How the layer scan feeds each layer's frozen 16-bit projection kernels to their matmuls. "slice":
# the scan slices the layer out of the stacked [layers, d_in, d_out] array (XLA copies the slice
# before cuBLAS reads it: ~11 % of a Llama-3-8B step on an H200); "hopper": the Mosaic GPU GEMM of
# pallas_kernels/stacked_matmul_hopper.py reads the layer in place (sm90 only); "reference": the same
# in-place plumbing with a dynamic slice and jnp.dot (tests); "auto": OpsConfig.layer_matmul_mode.
# QLoRA's dequantized weights take the same GEMM, as a stack of one layer (_one_layer).
# "hopper_low_rank": the same GEMM with the adapter's rank-r term multiplied into its accumulator.
LAYER_MATMUL_MODES = ("auto", "slice", "hopper", "hopper_low_rank", "reference")
MOSAIC_LAYER_MATMULS = ("hopper", "hopper_low_rank")
# Whether layer_matmul="auto" takes "hopper" on an sm90 GPU. On, since its whole steps beat the
# slices in one H200 call (eighth session, bench/RESULTS.md): llama3-8b "selective" 15,003 against
# 14,043 tok/s, "unsloth" 11,616 tok/s at 16.15 GiB (10,249 at 17.05 sliced), qwen2.5-1.5b 53,540
# (48,536), QLoRA 10,663 at 6.79 GiB (9,699 at 7.20): no slice copies, and the adapter's term added
# in the GEMM's epilogue instead of a float32 [tokens, out] product.
HOPPER_LAYER_MATMUL_IN_AUTO = True
# Whether "auto" takes "hopper_low_rank" rather than "hopper": the Mosaic GEMM multiplies the
# adapter's rank-r term into its own float32 accumulator (stacked_matmul_hopper's low=) instead of
# adding it as a [tokens, out] addend that a thin XLA GEMM writes first: no such array in memory
# (~40 GB a llama3-8b step) and no rounding of the term on its own. Off until its correctness and
# speed rows have run on a GPU (bench/stacked_matmul_hopper_check.py --only low).
HOPPER_LOW_RANK_IN_KERNEL = False
# Fewer rows than this take XLA's GEMM even under a Mosaic layer_matmul mode: the Mosaic GEMM's
# persistent grid has one CTA per 128-row x 256-column output tile, so a few rows (QLoRA decode with
# an unmerged adapter, short prefills) would leave most of the 132 SMs idle on what is a weight read,
# where cuBLAS's GEMV kernels use them all. Its measured wins are at 4,096 rows; few rows were not
# measured, so they keep the path they had.
MOSAIC_LAYER_MATMUL_MIN_ROWS = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedKernel:
    """One layer's frozen [d_in, d_out] kernel, left inside its [layers, d_in, d_out] stack."""

    stack: Array
    layer: Array


@dataclasses.dataclass(frozen=True)
class OpsConfig:
    """Implementation per op: "auto", "reference" or "pallas" (attention also "cudnn" or "xla")."""

    rms_norm: str = "auto"
    rope: str = "auto"
    swiglu: str = "auto"
    lora_linear: str = "auto"
    cross_entropy: str = "auto"
    attention: str = "auto"
    # Dequantization of 4-bit (NF4) base weights, and the fused dequant-matmul for a few rows.
    dequant: str = "auto"
    # The decode step's 16-bit projections (fastft_jax/generate.py): "pallas" multiplies by each layer's
    # weight in place in the stacked [layers, in, out] array; "reference" slices it out first.
    decode_matmul: str = "auto"
    # Tokens per chunk of the reference loss head, which bounds its [chunk, vocab] logits.
    loss_chunk_tokens: int = 4096
    # Tokens per tile of the decoder's MLP (fastft_jax/tiling.py), which bounds its [tile, intermediate]
    # activations in the forward and the backward: 0 runs the MLP untiled; "auto" tiles only a batch
    # whose [tokens, intermediate] activation would pass tiling.AUTO_START_BYTES, or, under
    # use_gradient_checkpointing="unsloth", tiling.OFFLOAD_TILE_BYTES.
    mlp_tile_tokens: int | str = "auto"
    # Decoder layers per step of the layer scan (jax.lax.scan's unroll): 1 keeps one compiled layer
    # whatever the depth; 0 unrolls every layer, so each layer's weights are static slices of the
    # stacked arrays instead of dynamic ones (copied before cuBLAS reads them). "auto": the decode
    # step unrolls on a GPU (batch-1 llama3-8b 201 vs 186 tok/s, 208 -> 214 with grouped
    # projections; compile 4 s), training keeps 1: unrolled, a Llama-3-8B "selective" step ran
    # 16,522 against 14,920 tok/s but its temporaries grew 12.6 -> 22.5 GiB and its compile
    # 10 -> 58-77 s (bench/NOTES.md, fifth session).
    layer_unroll: int | str = "auto"
    # Unrolled checkpointed layers only. "free": XLA schedules each layer's recomputation where it
    # likes, and replays some early in the forward pass, keeping what the checkpoint was to drop
    # (Llama-3-8B "selective" b2x2048 on an H200: 16,522 tok/s, peak 37.9 GiB, against the scan's
    # 14,920 at 28.0). "tied": each layer's backward waits for its cotangent (an optimization
    # barrier): 15,022 tok/s at 33.6 GiB, since it also stops one layer's backward overlapping the
    # next one's recomputation (bench/RESULTS.md, sixth session).
    unrolled_backward: str = "free"
    layer_matmul: str = "auto"  # one of LAYER_MATMUL_MODES; "auto": see layer_matmul_mode

    @classmethod
    def from_env(cls, **overrides: str) -> "OpsConfig":
        values = _env_modes()
        values.update(overrides)
        return cls(**values).validated()

    def validated(self) -> "OpsConfig":
        for name in OP_NAMES:
            value = getattr(self, name)
            allowed = _allowed_modes(name)
            if value not in allowed:
                raise ConfigError(f"kernels.{name}={value!r} is not one of {', '.join(allowed)}")
        tile = self.mlp_tile_tokens
        if tile != "auto" and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 0):
            raise ConfigError(
                f"kernels.mlp_tile_tokens={tile!r}: use a positive number of tokens per MLP tile, 0 for no "
                'tiling, or "auto"'
            )
        unroll = self.layer_unroll
        if unroll != "auto" and (not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 0):
            raise ConfigError(f"kernels.layer_unroll={unroll!r}: use a number of layers per scan step, 0 to "
                              'unroll every layer, or "auto" (the default)')
        if self.attention == "hopper":
            from pallas_kernels.attention_hopper import hopper_attention_available

            if not hopper_attention_available():
                raise ConfigError("kernels.attention=hopper needs an sm90 GPU (H100/H200), and this machine's "
                                  f"default backend is {jax.default_backend()!r}; use auto or pallas")
        if self.layer_matmul not in LAYER_MATMUL_MODES:
            raise ConfigError(f"kernels.layer_matmul={self.layer_matmul!r} is not one of {', '.join(LAYER_MATMUL_MODES)}")
        if self.layer_matmul in MOSAIC_LAYER_MATMULS:
            from pallas_kernels.stacked_matmul_hopper import available

            if not available():
                raise ConfigError(f"kernels.layer_matmul={self.layer_matmul} needs an sm90 GPU (H100/H200), and this "
                                  f"machine's default backend is {jax.default_backend()!r}; use auto (the default) or slice")
        if self.unrolled_backward not in UNROLLED_BACKWARD_MODES:
            raise ConfigError(f"kernels.unrolled_backward={self.unrolled_backward!r} is not one of "
                              f"{', '.join(UNROLLED_BACKWARD_MODES)}")
        return self

    def scan_unroll(self, num_layers: int, decode: bool = False) -> int:
        """jax.lax.scan's unroll for a stack of num_layers layers (decode: the generation step's)."""
        unroll = self.layer_unroll
        if unroll == "auto":
            unroll = 0 if decode and jax.default_backend() == "gpu" else 1
        return num_layers if unroll == 0 else min(unroll, num_layers)

    def layer_matmul_mode(self) -> str:
        """layer_matmul with "auto" resolved: "hopper" on an sm90 GPU where HOPPER_LAYER_MATMUL_IN_AUTO
        allows it, else "slice". With the LoRA matmuls on their reference (kernels off, the path
        every kernel is checked against) "auto" slices too."""
        if self.layer_matmul != "auto":
            return self.layer_matmul
        if HOPPER_LAYER_MATMUL_IN_AUTO and self.lora_linear != "reference":
            from pallas_kernels._common import is_sm90_gpu

            if is_sm90_gpu():
                return "hopper_low_rank" if HOPPER_LOW_RANK_IN_KERNEL else "hopper"
        return "slice"

    def resolve(self, op: str) -> str:
        """'reference' or 'pallas' (attention: also 'cudnn' / 'xla' / 'auto')."""
        mode = getattr(self, op)
        if mode != "auto":
            return mode
        if jax.default_backend() != "gpu":
            return "reference"
        choice = GPU_AUTO_CHOICE[op]
        if choice == "pallas" and not hasattr(_KERNELS[op][0], _KERNELS[op][1]):
            return "reference"
        return choice

    def describe(self, packed_rows: bool | None = None) -> dict[str, str]:
        """The implementation each op runs; for attention under "auto", what padded and packed rows get."""
        chosen = {op: self.resolve(op) for op in OP_NAMES}
        if chosen["attention"] == "auto":
            packed = _auto_attention(True)
            chosen["attention"] = {True: f"{packed} (packed rows)", False: "cudnn (no segment ids)"}.get(
                packed_rows, f"cudnn without segment ids, {packed} flash with them")
        chosen["layer_matmul"] = self.layer_matmul_mode()
        return chosen


# Packed rows in 16-bit on an sm90 GPU: the Mosaic GPU kernel (pallas_kernels/attention_hopper.py)
# instead of the Triton one. On an H200 (bench/attention_hopper_check.py, seventh session) it passed
# 20/20 correctness cases and ran llama3-8b 8k rows of 8 packed sequences at 1.20x the Triton kernel's
# fwd+bwd (272 against 227 TF/s). False: in a whole llama3-8b step (eighth session) it gained nothing,
# 14,147 against the Triton kernel's 14,176 tok/s on packed rows (13,147 against cuDNN's 13,576 padded).
HOPPER_ATTENTION_IN_AUTO = False
# What the Mosaic GPU kernels (attention, layer GEMM) take: wgmma's 16-bit operands.
_MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _auto_attention(packed_rows: bool, dtype: Any = jnp.bfloat16) -> str:
    """attention="auto" on a GPU: cuDNN without segment ids (its public API cannot mask them), and a
    flash kernel with them: the Mosaic GPU one where HOPPER_ATTENTION_IN_AUTO allows it, else Triton."""
    if not packed_rows:
        return "cudnn"
    if HOPPER_ATTENTION_IN_AUTO and jnp.dtype(dtype) in _MOSAIC_DTYPES:
        from pallas_kernels._common import is_sm90_gpu

        if is_sm90_gpu():
            return "hopper"
    return "pallas"


def _kernel(op: str):
    module, name = _KERNELS[op]
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"the Pallas kernel for {op} is not available in this build; use kernels.{op}=reference")
    return fn


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, " d"], eps: float, cfg: OpsConfig) -> Float[Array, "... d"]:
    if cfg.resolve("rms_norm") == "pallas":
        return _kernel("rms_norm")(x, weight, eps)
    return rms_norm_kernels.rms_norm_reference(x, weight, eps)


def swiglu(gate: Float[Array, "... f"], up: Float[Array, "... f"], cfg: OpsConfig) -> Float[Array, "... f"]:
    if cfg.resolve("swiglu") == "pallas":
        return _kernel("swiglu")(gate, up)
    return swiglu_kernels.swiglu_reference(gate, up)


def rope_qk(
    q: Float[Array, "batch seq heads_q head_dim"],
    k: Float[Array, "batch seq heads_kv head_dim"],
    positions: Int[Array, "batch seq"],
    theta: float,
    scaling: Mapping[str, Any] | None,
    cfg: OpsConfig,
) -> tuple[Array, Array]:
    if cfg.resolve("rope") == "pallas":
        rope_qk_kernel = getattr(rope_kernels, "rope_qk", None)
        if rope_qk_kernel is not None:
            return rope_qk_kernel(q, k, positions, theta=theta, scaling=scaling)
        kernel = _kernel("rope")
        return kernel(q, positions, theta=theta, scaling=scaling), kernel(k, positions, theta=theta, scaling=scaling)
    rope = functools.partial(rope_kernels.rope_reference, positions=positions, theta=theta, scaling=scaling)
    return rope(q), rope(k)


def stacked_linear(x: Float[Array, "... d_in"], kernel: StackedKernel, cfg: OpsConfig) -> Float[Array, "... d_out"]:
    """x @ kernel.stack[kernel.layer] without slicing the stack out first ("hopper"), or with it."""
    d_in, d_out = kernel.stack.shape[1:]
    return _stacked_product(x.reshape(-1, d_in), kernel, cfg).reshape(*x.shape[:-1], d_out)


def _stacked_product(lhs, kernel: StackedKernel, cfg: OpsConfig, *, transpose: bool = False,
                     low: tuple[Array, Array, float] | None = None):
    """lhs @ W[layer] (W[layer]^T with transpose) + scale * low_lhs @ low_rhs for low = (low_lhs,
    low_rhs, scale), rounded once to lhs.dtype. "hopper": the Mosaic GPU GEMM reads W in place and
    takes the rank-r term, rounded to 16-bit (2^-9 of a small term), as its epilogue's addend
    ("hopper_low_rank": multiplies it into its own accumulator); otherwise the layer's slice, and
    base_plus_low_rank's float32 sum."""
    dtype = lhs.dtype
    d_in, d_out = kernel.stack.shape[1:]
    # The GEMM takes one dtype; casting a stack of another would copy all of it, so such a stack
    # (a float32 checkpoint under bf16 compute) takes the slice, cast one layer at a time. Its tiles
    # must divide the kernel in both orientations (the backward's dx runs it transposed): every
    # Llama/Qwen size does; a kernel that does not also takes the slice.
    fits = d_in % 128 == 0 and d_out % 128 == 0
    sixteen_bit = jnp.dtype(dtype) in _MOSAIC_DTYPES  # float32 runs slice
    mode = cfg.layer_matmul_mode()
    many_rows = lhs.shape[0] >= MOSAIC_LAYER_MATMUL_MIN_ROWS
    if mode in MOSAIC_LAYER_MATMULS and kernel.stack.dtype == dtype and sixteen_bit and fits and many_rows:
        from pallas_kernels.stacked_matmul_hopper import stacked_matmul_hopper

        if low is None:
            return stacked_matmul_hopper(lhs, kernel.stack, kernel.layer, transpose_w=transpose)
        low_lhs, low_rhs, scale = low
        if mode == "hopper_low_rank":  # the scale folded into the thin operand (exact for powers of 2)
            scaled_rhs = (scale * low_rhs.astype(jnp.float32)).astype(dtype)
            return stacked_matmul_hopper(lhs, kernel.stack, kernel.layer, transpose_w=transpose, low=(low_lhs, scaled_rhs))
        addend = (scale * jnp.dot(low_lhs, low_rhs, preferred_element_type=jnp.float32)).astype(dtype)
        return stacked_matmul_hopper(lhs, kernel.stack, kernel.layer, transpose_w=transpose, addend=addend)
    weight = jax.lax.dynamic_index_in_dim(kernel.stack, kernel.layer, axis=0, keepdims=False).astype(dtype)
    weight = weight.T if transpose else weight
    if low is None:
        return jnp.dot(lhs, weight, preferred_element_type=jnp.float32).astype(dtype)
    return lora_linear_kernels.base_plus_low_rank(lhs, weight, *low)


def linear(
    x: Float[Array, "... d_in"], kernel: Float[Array, "d_in d_out"] | quant.QuantizedKernel | StackedKernel,
    cfg: OpsConfig | None = None,
) -> Float[Array, "... d_out"]:
    if quant.is_quantized(kernel):
        return quantized_linear(x, kernel, cfg or OpsConfig.from_env())
    if isinstance(kernel, StackedKernel):
        return stacked_linear(x, kernel, cfg or OpsConfig.from_env())
    return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def lora_linear(
    x: Float[Array, "... d_in"],
    kernel: Float[Array, "d_in d_out"],
    lora_a: Float[Array, "d_in rank"],
    lora_b: Float[Array, "rank d_out"],
    scale: float,
    cfg: OpsConfig,
    x_for_lora: Float[Array, "... d_in"] | None = None,
) -> Float[Array, "... d_out"]:
    """x @ kernel + scale * (x' @ a) @ b, where x' is x after LoRA dropout (PEFT applies dropout to the
    adapter's input only). The LoRA factors are float32 masters, cast to the compute dtype here.
    A quantized kernel (QLoRA) or one read in place from its stack goes through frozen_lora_linear."""
    if quant.is_quantized(kernel) or isinstance(kernel, StackedKernel):
        return frozen_lora_linear(x, kernel, lora_a, lora_b, scale, cfg, x_for_lora)
    if x_for_lora is not None:
        # LoRA dropout: the base product alone, and the adapter's two thin matmuls by autodiff (which
        # saves x and x·A, as the kernel's custom_vjp does).
        x_a = jnp.dot(x_for_lora, lora_a.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
        lora = scale * jnp.dot(x_a, lora_b.astype(x.dtype), preferred_element_type=jnp.float32)
        base = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
        return (base + lora).astype(x.dtype)
    mode = cfg.resolve("lora_linear")
    if mode in lora_linear_kernels.IMPLS:
        return _kernel("lora_linear")(x, kernel, lora_a.astype(x.dtype), lora_b.astype(x.dtype), float(scale), impl=mode)
    return lora_linear_kernels.lora_linear_reference(x, kernel, lora_a, lora_b, scale)


# ---------------------------------------------------------------------------------------------
# Quantized (QLoRA) base weights. The frozen kernel stays 4-bit (or int8) in memory; each use
# dequantizes it where it is needed, in the forward and again in the backward, so no 16-bit copy
# is ever saved for the backward (the custom_vjps below keep only the quantized arrays). Under
# jax.checkpoint the forward's dequantization is recomputed with the rest of the layer.
# ---------------------------------------------------------------------------------------------

NF4_CODE_BOOK = tuple(quant.NF4_CODE.tolist())
# Up to this many rows the forward runs the fused dequant-matmul kernel (decode) instead of
# dequantizing the whole kernel first. 0: measured on the H200 (bench/RESULTS.md), the fused kernel
# lost to dequantize-then-cuBLAS at 1, 4 and 16 rows on every Llama-3-8B shape but one, so it is off
# until it is faster.
FUSED_DEQUANT_MAX_ROWS = 0


# True: a double-quantized NF4 kernel's absmax is decoded inside the dequant kernel (one Pallas
# call, no XLA fusion before it); False decodes it with quant.block_absmax first. Bit-identical in
# the interpreter (tests) and on an H200 (bench/qlora.py's exactness check, 2026-11-28), where one
# QLoRA layer's fwd+bwd took 0.7-1.5 % less time on each of the four Llama-3-8B shapes.
DEQUANT_NESTED_IN_KERNEL = True


def _dequantize_nf4_flat(kernel: quant.QuantizedKernel, dtype: Any) -> Array:
    """One layer's NF4 weight through the Pallas kernel, flat in HF order."""
    format_args = {"code_book": NF4_CODE_BOOK, "n": kernel.num_elements, "blocksize": kernel.blocksize, "dtype": dtype}
    if kernel.double_quantized and DEQUANT_NESTED_IN_KERNEL:
        return nf4_kernels.dequantize_4bit_nested(
            kernel.codes, kernel.absmax, jnp.asarray(quant.DYNAMIC_MAP), kernel.nested_absmax, kernel.nested_offset,
            nested_blocksize=kernel.nested_blocksize, **format_args,
        )
    return _kernel("dequant")(kernel.codes, quant.block_absmax(kernel), **format_args)


def dequantize_hf(kernel: quant.QuantizedKernel, dtype: Any, cfg: OpsConfig) -> Float[Array, "... d_out d_in"]:
    """The weight in HF's [out, in] orientation, the order its bytes are stored in, so producing it
    moves no data. The training path's GEMMs take it as it is: x W_hf^T in the forward, g W_hf for
    dx. NF4 of one layer goes through the Pallas kernel when chosen; it is bit-identical to the jnp
    reference. No gradient flows into a frozen weight."""
    if kernel.kind == "nf4" and kernel.codes.ndim == 1 and cfg.resolve("dequant") == "pallas":
        return jax.lax.stop_gradient(_dequantize_nf4_flat(kernel, dtype).reshape(kernel.hf_shape))
    return jax.lax.stop_gradient(quant.dequantize_hf_reference(kernel, dtype))


def dequantize(kernel: quant.QuantizedKernel, dtype: Any, cfg: OpsConfig) -> Float[Array, "... d_in d_out"]:
    """The [in, out] kernel in dtype (a transposed copy of dequantize_hf, for callers that need
    the model's layout as an array)."""
    return jnp.swapaxes(dequantize_hf(kernel, dtype, cfg), -1, -2)


def _dequantize_after(kernel: quant.QuantizedKernel, ready: Array, dtype: Any, cfg: OpsConfig) -> tuple[Array, Array]:
    """(dequantize_hf(kernel), ready), the kernel passed through one optimization_barrier with
    `ready`, the GEMM operand the weight meets: its dequantization cannot be scheduled before that
    operand exists, so a layer's 16-bit weights are not all alive at once (XLA may otherwise start
    every projection's dequantization at the top of the layer). The caller must use the returned
    `ready`: XLA drops a barrier operand whose result is unused."""
    kernel, ready = jax.lax.optimization_barrier((kernel, ready))
    return dequantize_hf(kernel, dtype, cfg), ready


def _quantized_base(x2d: Array, kernel: quant.QuantizedKernel, cfg: OpsConfig) -> Array:
    """x @ dequantize(kernel), float32 accumulator."""
    d_in, d_out = kernel.shape
    if (
        kernel.kind == "nf4" and kernel.codes.ndim == 1 and x2d.shape[0] <= FUSED_DEQUANT_MAX_ROWS
        and d_in % kernel.blocksize == 0 and cfg.resolve("dequant") == "pallas"
    ):
        out = nf4_kernels.dequantize_4bit_matmul(
            x2d, kernel.codes, quant.block_absmax(kernel), code_book=NF4_CODE_BOOK, n_out=d_out,
            blocksize=kernel.blocksize,
        )
        return out.astype(jnp.float32)
    # A transpose feeding a dot: XLA folds it into the dot's contracting dims (cuBLAS's transpose
    # flag, XLA's TransposeFolding), so no [in, out] copy is written (tests/test_qlora.py checks
    # the compiled HLO).
    weight_hf, x2d = _dequantize_after(kernel, x2d, x2d.dtype, cfg)
    return jnp.dot(x2d, weight_hf.T, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantized_linear_2d(x2d, kernel, cfg):
    return _quantized_base(x2d, kernel, cfg).astype(x2d.dtype)


def _quantized_linear_2d_fwd(x2d, kernel, cfg):
    return _quantized_linear_2d(x2d, kernel, cfg), kernel


# y = x W: dx = g W^T = g W_hf, with W dequantized again here; W is frozen (no cotangent).
def _quantized_linear_2d_bwd(cfg, kernel, g):
    weight_hf, g = _dequantize_after(kernel, g, g.dtype, cfg)
    return jnp.dot(g, weight_hf, preferred_element_type=jnp.float32).astype(g.dtype), None


_quantized_linear_2d.defvjp(_quantized_linear_2d_fwd, _quantized_linear_2d_bwd)


def quantized_linear(
    x: Float[Array, "... d_in"], kernel: quant.QuantizedKernel, cfg: OpsConfig
) -> Float[Array, "... d_out"]:
    d_in, d_out = kernel.shape
    return _quantized_linear_2d(x.reshape(-1, d_in), kernel, cfg).reshape(*x.shape[:-1], d_out)


def _one_layer(weight_hf: Array) -> StackedKernel:
    """A dequantized [out, in] weight as a stack of one: the layer_matmul GEMMs (the Mosaic GEMM's
    epilogue addend on sm90) then serve QLoRA too. Its x @ W is the transposed product."""
    return StackedKernel(weight_hf[None], jnp.zeros((), jnp.int32))


def _frozen_lora_forward(x2d, x_lora2d, kernel, a, b, scale, cfg):
    # The same roundings as lora_linear_reference: x'@a rounded to the activation dtype.
    dtype = x2d.dtype
    x_a = jnp.dot(x_lora2d, a.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    if isinstance(kernel, StackedKernel):
        return _stacked_product(x2d, kernel, cfg, low=(x_a, b.astype(dtype), scale)), x_a
    if x2d.shape[0] > FUSED_DEQUANT_MAX_ROWS:  # dequantize, then the same GEMM + epilogue as 16-bit LoRA
        weight_hf, x2d = _dequantize_after(kernel, x2d, dtype, cfg)
        out = _stacked_product(x2d, _one_layer(weight_hf), cfg, transpose=True, low=(x_a, b.astype(dtype), scale))
        return out, x_a
    base = _quantized_base(x2d, kernel, cfg)
    lora = jnp.dot(x_a, b.astype(dtype), preferred_element_type=jnp.float32)
    return (base + scale * lora).astype(dtype), x_a


# Gradient, as pallas_kernels/lora_linear.py derives it, with x' the adapter's input (x itself, or
# x after LoRA dropout) and xa = x' a:
#   db = s xa^T g,   d(xa) = s g b^T,   da = x'^T d(xa),   dx = g W^T,   dx' = d(xa) a^T
# (dx + dx' when x' is x). A quantized W is dequantized again for g W^T = g W_hf (HF's [out, in] is
# already the [k, n] operand this GEMM wants) instead of being saved by the forward; a stacked W is
# read in place again, transposed.
def _frozen_lora_grads(scale, cfg, saved, g, separate_dx_lora: bool):
    """(dx, dx', da, db); with separate_dx_lora False, dx already holds dx + dx' (one GEMM with
    the rank-r term as its addend) and dx' is None."""
    x_lora2d, x_a, kernel, a, b = saved
    dtype = x_a.dtype
    g = g.astype(dtype)
    contract_rows = (((0,), (0,)), ((), ()))
    db = scale * jax.lax.dot_general(x_a, g, contract_rows, preferred_element_type=jnp.float32)
    d_x_a = (scale * jnp.dot(g, b.astype(dtype).T, preferred_element_type=jnp.float32)).astype(dtype)
    da = jax.lax.dot_general(x_lora2d, d_x_a, contract_rows, preferred_element_type=jnp.float32)
    a_t = a.astype(dtype).T
    if isinstance(kernel, StackedKernel):
        frozen, transpose = kernel, True
    else:
        weight_hf, g = _dequantize_after(kernel, g, dtype, cfg)
        frozen, transpose = _one_layer(weight_hf), False
    # With dropout the rank-r term belongs to x', not x: dx' is its own thin GEMM below.
    dx = _stacked_product(g, frozen, cfg, transpose=transpose, low=None if separate_dx_lora else (d_x_a, a_t, 1.0))
    if not separate_dx_lora:
        return dx, None, da.astype(a.dtype), db.astype(b.dtype)
    dx_lora = jnp.dot(d_x_a, a_t, preferred_element_type=dtype)
    return dx, dx_lora, da.astype(a.dtype), db.astype(b.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _frozen_lora_2d(x2d, kernel, a, b, scale, cfg):
    return _frozen_lora_forward(x2d, x2d, kernel, a, b, scale, cfg)[0]


def _frozen_lora_2d_fwd(x2d, kernel, a, b, scale, cfg):
    out, x_a = _frozen_lora_forward(x2d, x2d, kernel, a, b, scale, cfg)
    return out, (x2d, x_a, kernel, a, b)


def _frozen_lora_2d_bwd(scale, cfg, saved, g):
    dx, _, da, db = _frozen_lora_grads(scale, cfg, saved, g, separate_dx_lora=False)
    return dx.astype(saved[0].dtype), None, da, db


_frozen_lora_2d.defvjp(_frozen_lora_2d_fwd, _frozen_lora_2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _frozen_lora_dropout_2d(x2d, x_lora2d, kernel, a, b, scale, cfg):
    return _frozen_lora_forward(x2d, x_lora2d, kernel, a, b, scale, cfg)[0]


def _frozen_lora_dropout_2d_fwd(x2d, x_lora2d, kernel, a, b, scale, cfg):
    out, x_a = _frozen_lora_forward(x2d, x_lora2d, kernel, a, b, scale, cfg)
    return out, (x_lora2d, x_a, kernel, a, b)


def _frozen_lora_dropout_2d_bwd(scale, cfg, saved, g):
    dx, dx_lora, da, db = _frozen_lora_grads(scale, cfg, saved, g, separate_dx_lora=True)
    dtype = saved[0].dtype
    return dx.astype(dtype), dx_lora.astype(dtype), None, da, db


_frozen_lora_dropout_2d.defvjp(_frozen_lora_dropout_2d_fwd, _frozen_lora_dropout_2d_bwd)


def frozen_lora_linear(
    x: Float[Array, "... d_in"],
    kernel: quant.QuantizedKernel | StackedKernel,
    lora_a: Float[Array, "d_in rank"],
    lora_b: Float[Array, "rank d_out"],
    scale: float,
    cfg: OpsConfig,
    x_for_lora: Float[Array, "... d_in"] | None = None,
) -> Float[Array, "... d_out"]:
    """lora_linear on a frozen kernel that is not a plain array: quantized (its forward equals
    lora_linear_reference on the dequantized kernel, and the backward dequantizes it again), or one
    layer of a stack read in place (the backward reads it again, transposed). A custom_vjp with the
    16-bit kernel's matmul order and roundings either way."""
    d_in, d_out = kernel.shape if quant.is_quantized(kernel) else kernel.stack.shape[1:]
    x2d = x.reshape(-1, d_in)
    if x_for_lora is None:
        out = _frozen_lora_2d(x2d, kernel, lora_a, lora_b, float(scale), cfg)
    else:
        out = _frozen_lora_dropout_2d(x2d, x_for_lora.reshape(-1, d_in), kernel, lora_a, lora_b, float(scale), cfg)
    return out.reshape(*x.shape[:-1], d_out)


def attention(
    q: Float[Array, "batch seq heads_q head_dim"],
    k: Float[Array, "batch seq heads_kv head_dim"],
    v: Float[Array, "batch seq heads_kv head_dim"],
    segment_ids: Int[Array, "batch seq"] | None,
    cfg: OpsConfig,
) -> Float[Array, "batch seq heads_q head_dim"]:
    mode = cfg.resolve("attention")
    if mode == "auto":
        mode = _auto_attention(segment_ids is not None, q.dtype)
    if mode == "cudnn" and segment_ids is not None:
        raise ConfigError("kernels.attention=cudnn cannot mask packed rows (segment ids); use auto or pallas")
    if mode == "pallas":
        return _kernel("attention")(q, k, v, causal=True, segment_ids=segment_ids)
    if mode == "hopper":  # validated() has checked the GPU; imported here, as only this path needs Mosaic GPU
        from pallas_kernels.attention_hopper import flash_attention_hopper

        return flash_attention_hopper(q, k, v, causal=True, segment_ids=segment_ids)
    if mode in ("cudnn", "xla"):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=mode)
    return attention_kernels.attention_reference(q, k, v, causal=True, segment_ids=segment_ids)


def _chunked_cross_entropy(
    hidden: Float[Array, "n d"], lm_head: Float[Array, "d vocab"], labels: Int[Array, " n"],
    normalizer: Array, chunk: int,
) -> Float[Array, ""]:
    """The reference loss head, in token chunks under jax.checkpoint, so that neither the forward nor
    the backward holds more than [chunk, vocab] logits."""
    n = hidden.shape[0]
    if n <= chunk:
        return cross_entropy_kernels.fused_linear_cross_entropy_reference(hidden, lm_head, labels, normalizer=normalizer)
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad), constant_values=-100)
    hidden_chunks = hidden.reshape(-1, chunk, hidden.shape[-1])
    label_chunks = labels.reshape(-1, chunk)

    @jax.checkpoint
    def chunk_loss(total, xs):
        hidden_chunk, label_chunk = xs
        part = cross_entropy_kernels.fused_linear_cross_entropy_reference(
            hidden_chunk, lm_head, label_chunk, normalizer=normalizer
        )
        return total + part, None

    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32), (hidden_chunks, label_chunks))
    return total


def cross_entropy(
    hidden: Float[Array, "n d"],
    lm_head: Float[Array, "d vocab"],
    labels: Int[Array, " n"],
    normalizer: Array | float,
    cfg: OpsConfig,
) -> Float[Array, ""]:
    """Sum of token losses over labels != -100, divided by normalizer."""
    normalizer = jnp.asarray(normalizer, jnp.float32)
    if cfg.resolve("cross_entropy") == "pallas":
        return _kernel("cross_entropy")(hidden, lm_head, labels, normalizer=normalizer)
    return _chunked_cross_entropy(hidden, lm_head, labels, normalizer, cfg.loss_chunk_tokens)

"""Blockwise quantization of the frozen projection kernels: bitsandbytes' NF4 (QLoRA) and a plain
int8 absmax format, and bitsandbytes' pre-quantized safetensors layout.

NF4, exactly as bitsandbytes' CUDA kernels (kQuantizeBlockwise, dQuantizeNF4, dQuantize) do it:
  - the weight in HF's [out, in] orientation is flattened row-major and cut into blocks of 64;
    a last partial block is padded with zeros (which never change its absmax);
  - per block absmax = max |w| (float32), x = w * (1 / absmax) in float32;
  - the 4-bit code is the number of the 15 decision thresholds (bitsandbytes' float32 literals,
    the midpoints between neighbouring code-book values) that x is strictly greater than, so a
    value exactly on a threshold takes the lower code, and NaN (an all-zero block: 0 * inf)
    takes code 0, as the kernel's decision tree does;
  - two codes per byte, the first element in the high nibble; an odd element count pads the low
    nibble of the last byte with the code of a zero.
Double quantization ("compress_statistics"): offset = mean(absmax) (float32, computed in float64
here; torch's float32 reduction may differ from it in the last bit), then absmax - offset is
quantized in blocks of 256 with bitsandbytes' signed dynamic 8-bit map, by the binary search of
its dQuantize kernel (ties at a midpoint go to the pivot), with a float32 absmax per 256-block.
Dequantization is code_book[code] * absmax in float32, cast once to the compute dtype; the nested
absmax is dynamic_map[q] * absmax2 + offset, two float32 roundings, as bitsandbytes does.

int8 (load_in_8bit here): blocks of 64 in the same layout, q = rint(w * 127 / absmax) in
[-127, 127], w = q * (absmax / 127). This is not bitsandbytes' LLM.int8() (row-wise with
outlier columns); it is the simple blockwise format, with about 1/15 of NF4's weight error
(README).

The arrays keep the stacked layout the model scans over: a QuantizedKernel's arrays have a
leading [layers] axis in the parameter tree and none inside the scanned layer body.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

from convert.errors import CheckpointError, UnsupportedModelError
from pallas_kernels._common import unfused

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
KINDS = ("nf4", "int8")

# bitsandbytes' NF4 code book (functional.get_4bit_type("nf4")), as float32.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
# The decision thresholds of bitsandbytes' dQuantizeNF4 (float literals in its CUDA source), sorted.
NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ],
    dtype=np.float32,
)

# The 127 positive values of bitsandbytes' create_dynamic_map(signed=True) below 1.0, as float32
# bit patterns. bitsandbytes builds them with torch.linspace in float32, whose rounding numpy
# does not reproduce, so they are written out; tests/test_quant.py rebuilds them with torch.
_DYNAMIC_POSITIVE_BITS = (
    0x3513A3B7, 0x365A1A94, 0x370205FF, 0x37B24206, 0x38378034, 0x388AEFB3, 0x38BA1F4B, 0x3923D70B,
    0x398CE705, 0x39C7E283, 0x3A016F01, 0x3A1EECC1, 0x3A3C6A80, 0x3A59E83E, 0x3A7765FF, 0x3AA7EF9D,
    0x3AF1A9FC, 0x3B1DB22D, 0x3B428F5C, 0x3B676C8A, 0x3B8624DD, 0x3B989374, 0x3BAB020D, 0x3BBD70A4,
    0x3BCFDF3B, 0x3BE24DD3, 0x3BF4BC6A, 0x3C039581, 0x3C0CCCCD, 0x3C160418, 0x3C1F3B64, 0x3C3AE148,
    0x3C68F5C3, 0x3C8B851F, 0x3CA28F5D, 0x3CB9999A, 0x3CD0A3D7, 0x3CE7AE15, 0x3CFEB852, 0x3D0AE148,
    0x3D166667, 0x3D21EB85, 0x3D2D70A3, 0x3D38F5C3, 0x3D447AE1, 0x3D500000, 0x3D5B851F, 0x3D670A3D,
    0x3D728F5D, 0x3D7E147B, 0x3D84CCCD, 0x3D8A8F5D, 0x3D9051EB, 0x3D96147B, 0x3D9BD70A, 0x3DA1999A,
    0x3DA75C2A, 0x3DAD1EB8, 0x3DB2E148, 0x3DB8A3D7, 0x3DBE6667, 0x3DC428F7, 0x3DC9EB85, 0x3DDB3334,
    0x3DF80000, 0x3E0A6666, 0x3E18CCCD, 0x3E273333, 0x3E35999A, 0x3E440000, 0x3E526666, 0x3E60CCCD,
    0x3E6F3333, 0x3E7D9999, 0x3E860000, 0x3E8D3334, 0x3E946666, 0x3E9B999A, 0x3EA2CCCC, 0x3EAA0000,
    0x3EB13333, 0x3EB86666, 0x3EBF999A, 0x3EC6CCCC, 0x3ECE0000, 0x3ED53333, 0x3EDC6666, 0x3EE3999A,
    0x3EEACCCC, 0x3EF20000, 0x3EF93332, 0x3F003333, 0x3F03CCCC, 0x3F076666, 0x3F0B0000, 0x3F0E999A,
    0x3F123334, 0x3F15CCCD, 0x3F196666, 0x3F1D0000, 0x3F20999A, 0x3F243334, 0x3F27CCCD, 0x3F2B6666,
    0x3F2F0000, 0x3F32999A, 0x3F363334, 0x3F39CCCD, 0x3F3D6666, 0x3F410000, 0x3F44999A, 0x3F483333,
    0x3F4BCCCD, 0x3F4F6666, 0x3F530000, 0x3F56999A, 0x3F5A3333, 0x3F5DCCCD, 0x3F616666, 0x3F650000,
    0x3F68999A, 0x3F6C3333, 0x3F6FCCCD, 0x3F736666, 0x3F770000, 0x3F7A999A, 0x3F7E3333,
)
_DYNAMIC_POSITIVE = np.array(_DYNAMIC_POSITIVE_BITS, dtype=np.uint32).view(np.float32)
# Sorted ascending: 127 negatives (exact negations), 0, the 127 positives, 1.0.
DYNAMIC_MAP = np.concatenate([-_DYNAMIC_POSITIVE[::-1], [0.0], _DYNAMIC_POSITIVE, [1.0]]).astype(np.float32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("codes", "absmax", "nested_absmax", "nested_offset"),
    meta_fields=("shape", "kind", "blocksize", "nested_blocksize"),
)
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A frozen projection kernel [in, out] held blockwise-quantized in bitsandbytes' layout (the
    HF [out, in] weight flattened row-major). Its arrays may carry leading axes (the stacked
    layers); shape is always the one kernel's (in, out).

    codes: nf4: uint8 [..., ceil(n/2)], two codes a byte; int8: int8 [..., n].
    absmax: float32 [..., blocks], or uint8 [..., blocks] when double-quantized (nf4).
    nested_absmax: float32 [..., ceil(blocks/256)] and nested_offset float32 [...] when
    double-quantized, else None.
    """

    codes: Array
    absmax: Array
    nested_absmax: Array | None
    nested_offset: Array | None
    shape: tuple[int, int]
    kind: str = "nf4"
    blocksize: int = BLOCKSIZE
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def num_elements(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def hf_shape(self) -> tuple[int, int]:
        return self.shape[1], self.shape[0]

    @property
    def leading_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1])

    @property
    def double_quantized(self) -> bool:
        return self.nested_absmax is not None

    def layer(self, index: int) -> "QuantizedKernel":
        """One layer of a stacked kernel."""
        return jax.tree.map(lambda leaf: leaf[index], self)


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedKernel)


# ---------------------------------------------------------------------------------------------
# Quantization (jnp: runs on the device that holds the weight, one layer at a time).
# ---------------------------------------------------------------------------------------------


def _blocks(flat: Float[Array, " n"], blocksize: int) -> Float[Array, "blocks blocksize"]:
    pad = -flat.shape[0] % blocksize
    return jnp.pad(flat, (0, pad)).reshape(-1, blocksize)


@functools.partial(jax.jit, static_argnames=("blocksize",))
def _nf4_codes(weight_hf: Float[Array, "out in"], blocksize: int) -> tuple[UInt8[Array, " bytes"], Float[Array, " blocks"]]:
    flat = weight_hf.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    blocks = _blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = blocks * (jnp.float32(1.0) / absmax)[:, None]
    codes = sum((scaled > threshold).astype(jnp.uint8) for threshold in NF4_THRESHOLDS.tolist())
    codes = codes.reshape(-1)[: 2 * cdiv(n, 2)].reshape(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def dynamic_quantize(values: Float[Array, " m"], code: np.ndarray = DYNAMIC_MAP) -> UInt8[Array, " m"]:
    """bitsandbytes' dQuantize<0>: binary search over the sorted 256-value map, then the nearer of
    the pivot and the neighbour the search last left, by float32 midpoints. values are already
    scaled into [-1, 1]."""
    table = jnp.asarray(code, jnp.float32)
    shape = values.shape
    pivot = jnp.full(shape, 127, jnp.int32)
    upper_pivot = jnp.full(shape, 255, jnp.int32)
    lower_pivot = jnp.zeros(shape, jnp.int32)
    lower = jnp.full(shape, -1.0, jnp.float32)
    upper = jnp.full(shape, 1.0, jnp.float32)
    value = table[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        go_up = values > value
        lower_pivot = jnp.where(go_up, pivot, lower_pivot)
        lower = jnp.where(go_up, value, lower)
        upper_pivot = jnp.where(go_up, upper_pivot, pivot)
        upper = jnp.where(go_up, upper, value)
        pivot = jnp.where(go_up, pivot + step, pivot - step)
        value = table[pivot]
    upper = jnp.where(upper_pivot == 255, table[255], upper)
    lower = jnp.where(lower_pivot == 0, table[0], lower)
    above = values > value
    to_upper = values > (upper + value) * jnp.float32(0.5)
    to_lower = values < (lower + value) * jnp.float32(0.5)
    index = jnp.where(above, jnp.where(to_upper, upper_pivot, pivot), jnp.where(to_lower, lower_pivot, pivot))
    return index.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("blocksize",))
def quantize_blockwise_dynamic(values: Float[Array, " m"], blocksize: int = NESTED_BLOCKSIZE) -> tuple[UInt8[Array, " m"], Float[Array, " blocks"]]:
    """bitsandbytes' quantize_blockwise with the signed dynamic map: (codes, float32 absmax per block)."""
    m = values.shape[0]
    blocks = _blocks(values.astype(jnp.float32), blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = blocks * (jnp.float32(1.0) / absmax)[:, None]
    return dynamic_quantize(scaled).reshape(-1)[:m], absmax


def nested_offset(absmax) -> np.float32:
    """The double-quantization offset: the mean of the float32 absmax, accumulated in float64."""
    return np.float32(np.mean(np.asarray(absmax, np.float64)))


def quantize_nf4(
    weight_hf: Float[Array, "out in"],
    *,
    double_quant: bool = True,
    blocksize: int = BLOCKSIZE,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    offset: float | None = None,
) -> QuantizedKernel:
    """One HF-oriented weight [out, in] to NF4 (bitsandbytes' quantize_4bit, quant_type="nf4",
    compress_statistics=double_quant). offset overrides the nested mean (to reproduce a file)."""
    weight_hf = jnp.asarray(weight_hf)
    out_features, in_features = weight_hf.shape
    codes, absmax = _nf4_codes(weight_hf, blocksize)
    if not double_quant:
        return QuantizedKernel(codes, absmax, None, None, (in_features, out_features), "nf4", blocksize, nested_blocksize)
    offset = nested_offset(absmax) if offset is None else np.float32(offset)
    absmax_codes, absmax2 = quantize_blockwise_dynamic(absmax - jnp.float32(offset), nested_blocksize)
    return QuantizedKernel(
        codes, absmax_codes, absmax2, jnp.asarray(offset, jnp.float32), (in_features, out_features), "nf4",
        blocksize, nested_blocksize,
    )


@functools.partial(jax.jit, static_argnames=("blocksize",))
def _int8_codes(weight_hf: Float[Array, "out in"], blocksize: int):
    flat = weight_hf.reshape(-1).astype(jnp.float32)
    blocks = _blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scale = jnp.where(absmax > 0, jnp.float32(127.0) / absmax, jnp.float32(0.0))
    codes = jnp.clip(jnp.round(blocks * scale[:, None]), -127, 127).astype(jnp.int8)
    return codes.reshape(-1)[: flat.shape[0]], absmax


def quantize_int8(weight_hf: Float[Array, "out in"], *, blocksize: int = BLOCKSIZE) -> QuantizedKernel:
    """One HF-oriented weight [out, in] to blockwise int8 (absmax per block of blocksize)."""
    weight_hf = jnp.asarray(weight_hf)
    out_features, in_features = weight_hf.shape
    codes, absmax = _int8_codes(weight_hf, blocksize)
    return QuantizedKernel(codes, absmax, None, None, (in_features, out_features), "int8", blocksize, NESTED_BLOCKSIZE)


def quantize(weight_hf, kind: str) -> QuantizedKernel:
    if kind == "nf4":
        return quantize_nf4(weight_hf)
    if kind == "int8":
        return quantize_int8(weight_hf)
    raise ValueError(f"quantization kind {kind!r} is not one of {', '.join(KINDS)}")


def stack_layers(layers: list[QuantizedKernel]) -> QuantizedKernel:
    """Per-layer kernels to one with a leading [layers] axis on every array."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)


def quantize_stacked(kernels: np.ndarray, kind: str, place=jnp.asarray) -> QuantizedKernel:
    """A stacked [layers, in, out] kernel (host memory) to a stacked QuantizedKernel, one layer at
    a time through place (e.g. a device put), so the device never holds the 16-bit stack."""
    return stack_layers([quantize(place(np.ascontiguousarray(kernel.T)), kind) for kernel in kernels])


# ---------------------------------------------------------------------------------------------
# Dequantization: the pure-jnp reference (the Pallas kernel is pallas_kernels/nf4.py).
# ---------------------------------------------------------------------------------------------


def block_absmax(kernel: QuantizedKernel) -> Float[Array, "... blocks"]:
    """The float32 absmax of every 64-block: dynamic_map[q] * absmax2, then + offset, two float32
    roundings as in bitsandbytes' separate kernels."""
    if not kernel.double_quantized:
        return kernel.absmax
    blocks = kernel.absmax.shape[-1]
    table = jnp.asarray(DYNAMIC_MAP)
    nested = jnp.repeat(kernel.nested_absmax, kernel.nested_blocksize, axis=-1)[..., :blocks]
    product = unfused(table[kernel.absmax.astype(jnp.int32)] * nested, nested)
    return product + kernel.nested_offset[..., None]


def unpack_nf4(codes: UInt8[Array, "... bytes"], n: int) -> Array:
    """Packed bytes to one code per element, high nibble first: int32 [..., n]."""
    codes = codes.astype(jnp.int32)
    pairs = jnp.stack([codes >> 4, codes & 15], axis=-1)
    return pairs.reshape(*codes.shape[:-1], -1)[..., :n]


def dequantize_flat(kernel: QuantizedKernel, dtype: Any) -> Array:
    """The weight in HF's flattened order, [..., n], in dtype."""
    n = kernel.num_elements
    absmax = block_absmax(kernel)
    if kernel.kind == "nf4":
        values = jnp.asarray(NF4_CODE)[unpack_nf4(kernel.codes, n)]
    else:
        values = kernel.codes.astype(jnp.float32)
        absmax = absmax * jnp.float32(1.0 / 127.0)
    scale = jnp.repeat(absmax, kernel.blocksize, axis=-1)[..., :n]
    return (values * scale).astype(dtype)


def hf_to_kernel(flat: Array, kernel: QuantizedKernel) -> Array:
    """[..., n] in HF order to the model's [..., in, out]."""
    return jnp.swapaxes(flat.reshape(*flat.shape[:-1], *kernel.hf_shape), -1, -2)


def dequantize_hf_reference(kernel: QuantizedKernel, dtype: Any) -> Float[Array, "... d_out d_in"]:
    """The weight in HF's [..., out, in] orientation (the order its bytes are in), in pure jnp."""
    flat = dequantize_flat(kernel, dtype)
    return flat.reshape(*flat.shape[:-1], *kernel.hf_shape)


def dequantize_reference(kernel: QuantizedKernel, dtype: Any) -> Float[Array, "... d_in d_out"]:
    """The [..., in, out] kernel in dtype, in pure jnp."""
    return hf_to_kernel(dequantize_flat(kernel, dtype), kernel)


_dequantize_layer = jax.jit(dequantize_reference, static_argnames=("dtype",))


class DequantizedStack:
    """A stacked QuantizedKernel seen as a [layers, in, out] array whose layers are dequantized to
    float32 on access, for the merge and the merged export: the full-precision stack never exists.
    dtype is what the merged checkpoint is written in."""

    def __init__(self, kernel: QuantizedKernel, dtype: Any):
        self.kernel = kernel
        self.dtype = np.dtype(dtype)
        self.shape = (*kernel.leading_shape, *kernel.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(_dequantize_layer(self.kernel.layer(index), dtype=jnp.float32))


def dequantized_view(tree: dict, dtype: Any) -> dict:
    """The parameter tree with every QuantizedKernel replaced by a DequantizedStack."""
    if isinstance(tree, dict):
        return {key: dequantized_view(value, dtype) for key, value in tree.items()}
    return DequantizedStack(tree, dtype) if is_quantized(tree) else tree


def dequantized_tree(tree: dict, dtype: Any) -> dict:
    """The parameter tree with every QuantizedKernel dequantized to a [layers, in, out] jnp array."""
    return jax.tree.map(
        lambda leaf: _dequantize_layer(leaf, dtype=jnp.dtype(dtype)) if is_quantized(leaf) else leaf, tree,
        is_leaf=is_quantized,
    )


# ---------------------------------------------------------------------------------------------
# bitsandbytes' pre-quantized safetensors layout (Params4bit / QuantState.as_dict(packed=True)):
#   <module>.weight                                  uint8 [ceil(n/2), 1]
#   <module>.weight.absmax                           uint8 [blocks] (float32 without double quant)
#   <module>.weight.quant_map                        float32 [16]
#   <module>.weight.nested_absmax                    float32 [ceil(blocks/256)]
#   <module>.weight.nested_quant_map                 float32 [256]
#   <module>.weight.quant_state.bitsandbytes__nf4    uint8 JSON {quant_type, blocksize, dtype,
#                                                    shape, nested_blocksize, nested_dtype, nested_offset}
# ---------------------------------------------------------------------------------------------

QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__"
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def bnb_quant_state_name(reader, weight_name: str) -> str | None:
    """The name of weight_name's packed quant state in the checkpoint, or None if not pre-quantized."""
    for quant_type in ("nf4", "fp4"):
        name = weight_name + QUANT_STATE_SUFFIX + quant_type
        if name in reader:
            return name
    return None


def bnb_tensor_names(reader, weight_name: str) -> list[str]:
    """Every tensor name that belongs to a pre-quantized weight."""
    names = [weight_name]
    state = bnb_quant_state_name(reader, weight_name)
    if state is not None:
        names.append(state)
        names += [weight_name + suffix for suffix in BNB_SUFFIXES if weight_name + suffix in reader]
    return names


def read_bnb_quant_state(reader, weight_name: str, where: str) -> dict:
    state_name = bnb_quant_state_name(reader, weight_name)
    if state_name is None:
        raise CheckpointError(f"{where}: {weight_name!r} has no bitsandbytes quant_state")
    try:
        state = json.loads(bytes(np.asarray(reader.get(state_name), np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where}: {state_name!r} is not bitsandbytes' packed JSON quant state ({err})") from err
    if state.get("quant_type") != "nf4":
        raise UnsupportedModelError(
            f"{where}: {weight_name!r} is quantized as {state.get('quant_type')!r}; only nf4 is supported"
        )
    return state


def read_bnb_nf4(reader, weight_name: str, where: str) -> QuantizedKernel:
    """One pre-quantized NF4 weight as a QuantizedKernel (no leading axis), bytes kept as written.
    A nested map other than this module's DYNAMIC_MAP (another torch's linspace rounding) is
    resolved into a float32 absmax, exactly, rather than refused."""
    state = read_bnb_quant_state(reader, weight_name, where)
    out_features, in_features = (int(size) for size in state["shape"])
    n = out_features * in_features
    blocksize = int(state["blocksize"])
    codes = np.asarray(reader.get(weight_name)).reshape(-1)
    if codes.dtype != np.uint8:
        codes = codes.view(np.uint8)
    if codes.size != cdiv(n, 2):
        raise CheckpointError(
            f"{where}: {weight_name!r} holds {codes.size} bytes, but its quant_state shape {state['shape']} needs {cdiv(n, 2)}"
        )
    quant_map = np.asarray(reader.get(weight_name + ".quant_map"), np.float32)
    if not np.array_equal(quant_map, NF4_CODE):
        raise CheckpointError(f"{where}: {weight_name}.quant_map is not bitsandbytes' NF4 code book")
    absmax = np.asarray(reader.get(weight_name + ".absmax"))
    if absmax.size != cdiv(n, blocksize):
        raise CheckpointError(f"{where}: {weight_name}.absmax has {absmax.size} blocks, expected {cdiv(n, blocksize)}")
    shape = (in_features, out_features)
    if "nested_absmax" not in state and weight_name + ".nested_absmax" not in reader:
        return QuantizedKernel(jnp.asarray(codes), jnp.asarray(absmax, jnp.float32), None, None, shape, "nf4", blocksize)
    nested_blocksize = int(state["nested_blocksize"])
    nested_absmax = np.asarray(reader.get(weight_name + ".nested_absmax"), np.float32)
    offset = np.float32(state["nested_offset"])
    kernel = QuantizedKernel(
        jnp.asarray(codes), jnp.asarray(absmax.astype(np.uint8)), jnp.asarray(nested_absmax),
        jnp.asarray(offset), shape, "nf4", blocksize, nested_blocksize,
    )
    nested_map = np.asarray(reader.get(weight_name + ".nested_quant_map"), np.float32)
    if np.array_equal(nested_map, DYNAMIC_MAP):
        return kernel
    absmax_f32 = nested_map[absmax.astype(np.int64)] * np.repeat(nested_absmax, nested_blocksize)[: absmax.size]
    absmax_f32 = (absmax_f32.astype(np.float32) + offset).astype(np.float32)
    return QuantizedKernel(jnp.asarray(codes), jnp.asarray(absmax_f32), None, None, shape, "nf4", blocksize)


def bnb_quantization(hf_config: dict, where: str) -> str | None:
    """'nf4' for a bitsandbytes 4-bit NF4 quantization_config, None without one; anything else
    (8-bit bitsandbytes, fp4, GPTQ, AWQ, ...) is refused."""
    config = hf_config.get("quantization_config")
    if not config:
        return None
    method = config.get("quant_method")
    if method != "bitsandbytes" or not config.get("load_in_4bit"):
        raise UnsupportedModelError(
            f"{where}: quantization_config {method!r} (load_in_4bit={config.get('load_in_4bit')}) is not supported; "
            "only bitsandbytes 4-bit NF4 checkpoints load pre-quantized. Load a 16-bit checkpoint instead"
        )
    quant_type = config.get("bnb_4bit_quant_type", "fp4")
    if quant_type != "nf4":
        raise UnsupportedModelError(f"{where}: bnb_4bit_quant_type {quant_type!r} is not supported; only nf4 is")
    return "nf4"

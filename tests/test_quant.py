"""convert/quant.py and pallas_kernels/nf4.py: NF4 quantization bit-identical to bitsandbytes'
published algorithm, dequantization (jnp reference and Pallas kernel), the fused dequant-matmul,
int8, and bitsandbytes' pre-quantized safetensors layout.

The reference below is written from bitsandbytes' source (csrc kQuantizeBlockwise with
dQuantizeNF4 and dQuantize<0>, functional.quantize_4bit with compress_statistics, and
create_dynamic_map), independently of convert/quant.py: a literal port of the NF4 decision tree
and a scalar port of the 8-bit binary search.
"""

from __future__ import annotations

import functools
import json

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from convert import quant
from pallas_kernels import nf4 as nf4_kernels
from tests.conftest import relative_error

# bitsandbytes/functional.py get_4bit_type("nf4").
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)


def bnb_dynamic_map() -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), as published
    (it builds the map with torch in float32)."""
    import torch

    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return np.array(data, dtype=np.float32)


def bnb_nf4_code(x: np.ndarray) -> np.ndarray:
    """dQuantizeNF4, the decision tree of bitsandbytes' CUDA source, literal (float32 literals)."""
    f = np.float32
    w = np.where
    return w(x > f(0.03979014977812767),
             w(x > f(0.3893125355243683),
               w(x > f(0.6427869200706482), w(x > f(0.8614784181118011), 15, 14), w(x > f(0.5016634166240692), 13, 12)),
               w(x > f(0.2035212516784668), w(x > f(0.2920137718319893), 11, 10), w(x > f(0.1202552504837513), 9, 8))),
             w(x > f(-0.33967943489551544),
               w(x > f(-0.13791173323988914),
                 w(x > f(-0.045525018125772476), 7, 6), w(x > f(-0.23460740596055984), 5, 4)),
               w(x > f(-0.6106329262256622), w(x > f(-0.4599952697753906), 3, 2), w(x > f(-0.8480964004993439), 1, 0)))
             ).astype(np.uint8)


def bnb_dquantize(code: np.ndarray, x: np.float32) -> int:
    """dQuantize<0> (non-stochastic) for one value, line by line."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = np.float32(-1.0), np.float32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        return upper_pivot if x > np.float32((upper + val) * np.float32(0.5)) else pivot
    return lower_pivot if x < np.float32((lower + val) * np.float32(0.5)) else pivot


def bnb_quantize_blockwise(values: np.ndarray, code: np.ndarray, blocksize: int):
    """kQuantizeBlockwise, General8bit: (codes uint8, float32 absmax per block)."""
    codes = np.empty(values.size, np.uint8)
    absmax = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, values.size, blocksize):
            block = values[start:start + blocksize].astype(np.float32)
            block_max = np.float32(np.max(np.abs(block)))
            absmax.append(block_max)
            inverse = np.float32(1.0) / block_max
            for j, value in enumerate(block):
                codes[start + j] = bnb_dquantize(code, np.float32(value * inverse))
    return codes, np.array(absmax, np.float32)


def bnb_quantize_nf4(weight: np.ndarray, blocksize: int = 64):
    """quantize_4bit(A, blocksize, compress_statistics=True, quant_type="nf4") on HF [out, in]:
    (packed bytes, absmax codes, nested absmax, offset)."""
    flat = weight.astype(np.float32).reshape(-1)
    n = flat.size
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, np.float32)  # the kernel loads 0 past the end
    padded[:n] = flat
    padded = padded.reshape(blocks, blocksize)
    absmax = np.zeros(blocks, np.float32)
    absmax[:] = np.abs(padded).max(axis=1)  # over valid items; the zero padding never wins
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = padded * (np.float32(1.0) / absmax)[:, None]
    codes = bnb_nf4_code(scaled).reshape(-1)[: n + (n % 2)]
    packed = (codes[0::2] << 4) | codes[1::2]
    offset = np.float32(np.mean(absmax.astype(np.float64)))
    absmax_codes, absmax2 = bnb_quantize_blockwise((absmax - offset).astype(np.float32), bnb_dynamic_map(), 256)
    return packed.astype(np.uint8), absmax_codes, absmax2, offset


def bnb_dequantize_nf4(packed, absmax_codes, absmax2, offset, n, blocksize, dtype):
    """dequantize_4bit with a nested state: absmax = map[q] * absmax2 (float32), += offset; then
    NF4[code] * absmax in float32, cast to dtype. Returns the flat weight."""
    dynamic = bnb_dynamic_map()
    absmax = (dynamic[absmax_codes] * np.repeat(absmax2, 256)[: absmax_codes.size]).astype(np.float32)
    absmax = (absmax + offset).astype(np.float32)
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n]
    values = (BNB_NF4[codes] * np.repeat(absmax, blocksize)[:n]).astype(np.float32)
    return values.astype(dtype)


def _random_weight(rng, shape, dtype):
    weight = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 2.0)
    return weight.astype(dtype).astype(np.float32)


# ---------------------------------------------------------------------------------------------


def test_code_books_are_bitsandbytes():
    assert np.array_equal(quant.NF4_CODE, BNB_NF4)
    assert np.array_equal(quant.DYNAMIC_MAP, bnb_dynamic_map())


@pytest.mark.parametrize("shape, dtype", [
    ((96, 64), ml_dtypes.bfloat16),   # tiny q_proj (HF [out, in])
    ((64, 176), np.float32),          # tiny down_proj: blocks cross rows
    ((33, 7), np.float32),            # odd element count: a padded nibble and a partial block
    ((320, 256), ml_dtypes.bfloat16),  # several nested 256-blocks, the last one partial
])
def test_nf4_quantization_equals_bitsandbytes_algorithm(shape, dtype):
    rng = np.random.default_rng()
    weight = _random_weight(rng, shape, dtype)
    # Values exactly on decision thresholds (ties go to the lower code), on +-absmax, and an
    # all-zero block (0 * inf = NaN -> code 0).
    flat = weight.reshape(-1)
    flat[:64] = np.clip(flat[:64], -0.99, 0.99)
    flat[1:16] = quant.NF4_THRESHOLDS  # with absmax 1.0 these scale to the thresholds exactly
    flat[16] = -1.0
    if flat.size >= 192:
        flat[128:192] = 0.0
    weight = flat.reshape(shape)

    packed, absmax_codes, absmax2, offset = bnb_quantize_nf4(weight)
    kernel = quant.quantize_nf4(jnp.asarray(weight))
    assert kernel.shape == (shape[1], shape[0])
    assert np.array_equal(np.asarray(kernel.codes), packed)
    assert np.array_equal(np.asarray(kernel.absmax), absmax_codes)
    assert np.array_equal(np.asarray(kernel.nested_absmax), absmax2)
    assert np.asarray(kernel.nested_offset).tobytes() == offset.tobytes()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nf4_dequantization_equals_reference(dtype):
    rng = np.random.default_rng()
    shape = (176, 64)
    weight = _random_weight(rng, shape, np.float32)
    packed, absmax_codes, absmax2, offset = bnb_quantize_nf4(weight)
    expected = bnb_dequantize_nf4(packed, absmax_codes, absmax2, offset, weight.size, 64, np.dtype(dtype)).reshape(shape)
    kernel = quant.quantize_nf4(jnp.asarray(weight))
    out = np.asarray(quant.dequantize_reference(kernel, dtype))
    assert out.shape == (64, 176)
    assert np.array_equal(out.T, expected)
    # Under jit too, where XLA would contract the nested absmax's multiply and add into an FMA.
    jitted = jax.jit(quant.dequantize_reference, static_argnames="dtype")(kernel, dtype=dtype)
    assert np.array_equal(np.asarray(jitted).T, expected)
    # The Pallas kernel (interpret mode on CPU) is bit-identical too.
    flat = jax.jit(lambda kernel: nf4_kernels.dequantize_4bit(
        kernel.codes, quant.block_absmax(kernel), code_book=tuple(BNB_NF4.tolist()), n=weight.size, blocksize=64,
        dtype=dtype,
    ))(kernel)
    assert np.array_equal(np.asarray(flat).reshape(shape), expected)
    # and the dequantized weight is close to the original (NF4's error is a few % of absmax).
    assert relative_error(np.asarray(out.T, np.float32), weight) < 0.15


def test_nf4_keeps_bitsandbytes_byte_order():
    weight = np.zeros((1, 64), np.float32)
    weight[0, :4] = [1.0, -1.0, 0.0, 0.5]
    codes = np.asarray(quant.quantize_nf4(jnp.asarray(weight)).codes)
    assert codes[0] == (15 << 4) | 0  # first element in the high nibble
    assert codes[1] == (7 << 4) | bnb_nf4_code(np.float32(0.5))


@pytest.mark.parametrize("n_out, k, dtype", [(4096, 1024, jnp.bfloat16), (3584, 512, jnp.float32), (100, 40, jnp.bfloat16)])
def test_dequant_kernel_equals_reference(n_out, k, dtype):
    rng = np.random.default_rng()
    n = n_out * k
    codes = jnp.asarray(rng.integers(0, 256, -(-n // 2)), jnp.uint8)
    absmax = jnp.asarray(rng.uniform(0.0, 3.0, -(-n // 64)), jnp.float32)
    code_book = tuple(BNB_NF4.tolist())
    out = nf4_kernels.dequantize_4bit(codes, absmax, code_book=code_book, n=n, blocksize=64, dtype=dtype)
    ref = nf4_kernels.dequantize_4bit_reference(codes, absmax, code_book=code_book, n=n, blocksize=64, dtype=dtype)
    assert out.dtype == dtype and out.shape == (n,)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


# Every DequantBlocks field away from its default: the layouts, several steps a program (over a
# partial last program), a step inside one nested 256-block (block_rows 16: one nested scale) and
# one straddling several (block_rows 512: a gather of scales), warps and pipeline stages.
DEQUANT_VARIANTS = [
    nf4_kernels.DequantBlocks(),
    nf4_kernels.DequantBlocks(block_rows=16, layout="join"),
    nf4_kernels.DequantBlocks(block_rows=16, steps=3, layout="strided", num_stages=3),
    nf4_kernels.DequantBlocks(block_rows=512, steps=2, layout="join", num_warps=4),
    nf4_kernels.DequantBlocks(block_rows=512, layout="strided"),
    nf4_kernels.DequantBlocks(block_rows=32, steps=3, num_stages=2),
    # the select tree of constants instead of the default's code book read by index
    nf4_kernels.DequantBlocks(block_rows=16, lookup="select"),
    nf4_kernels.DequantBlocks(block_rows=16, steps=3, layout="strided", lookup="select"),
    nf4_kernels.DequantBlocks(block_rows=32, layout="join", lookup="select"),
]


@pytest.mark.parametrize("blocks", DEQUANT_VARIANTS, ids=lambda blocks: f"{blocks.layout}-{blocks.lookup}-{blocks.block_rows}x{blocks.steps}")
def test_dequant_kernel_variants_equal_reference(blocks):
    """Each variant, with a float32 absmax and with a double-quantized one decoded in the kernel,
    is bit-identical to the references: on a real shape with few rows ([3584, 64], 14 nested
    blocks) and an odd one (a padded nibble, a partial last block). The nested reference is
    bitsandbytes' in numpy, where map[q] * absmax2 and + offset are two float32 roundings; under
    jit XLA would fuse them into one FMA if the kernel let it."""
    rng = np.random.default_rng()
    code_book = tuple(BNB_NF4.tolist())
    for (n_out, k), dtype in (((3584, 64), jnp.bfloat16), ((37, 61), jnp.float32)):
        n = n_out * k
        num_blocks = -(-n // 64)
        packed = rng.integers(0, 256, -(-n // 2)).astype(np.uint8)
        absmax_codes = rng.integers(0, 256, num_blocks).astype(np.uint8)  # every map entry, not only likely ones
        absmax2 = rng.uniform(0.01, 0.1, -(-num_blocks // 256)).astype(np.float32)
        offset = np.float32(rng.uniform(0.0, 0.05))
        nested = jax.jit(functools.partial(
            nf4_kernels.dequantize_4bit_nested, code_book=code_book, n=n, blocksize=64, nested_blocksize=256,
            dtype=dtype, blocks=blocks,
        ))(packed, absmax_codes, quant.DYNAMIC_MAP, absmax2, offset)
        expected = bnb_dequantize_nf4(packed, absmax_codes, absmax2, offset, n, 64, np.dtype(dtype))
        assert nested.dtype == dtype and nested.shape == (n,)
        assert np.array_equal(np.asarray(nested), expected)
        if n_out == 37:
            absmax = jnp.asarray(rng.uniform(0.0, 3.0, num_blocks), jnp.float32)
            out = nf4_kernels.dequantize_4bit(packed, absmax, code_book=code_book, n=n, blocksize=64, dtype=dtype,
                                              blocks=blocks)
            ref = nf4_kernels.dequantize_4bit_reference(packed, absmax, code_book=code_book, n=n, blocksize=64,
                                                        dtype=dtype)
            assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_nested_absmax_reference_is_block_absmax():
    """The kernel file's decode of a double-quantized absmax is convert.quant's, bit for bit."""
    rng = np.random.default_rng()
    kernel = quant.quantize_nf4(jnp.asarray(_random_weight(rng, (320, 256), np.float32)))
    decoded = nf4_kernels.decode_nested_absmax_reference(
        kernel.absmax, jnp.asarray(quant.DYNAMIC_MAP), kernel.nested_absmax, kernel.nested_offset,
        nested_blocksize=kernel.nested_blocksize,
    )
    assert np.asarray(decoded).tobytes() == np.asarray(quant.block_absmax(kernel)).tobytes()


@pytest.mark.parametrize("n_out, k, rows", [(4096, 1024, 3), (3584, 512, 1), (176, 64, 16)])
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_fused_dequant_matmul_equals_dequant_then_matmul(n_out, k, rows, dtype, tolerance):
    rng = np.random.default_rng()
    codes = jnp.asarray(rng.integers(0, 256, n_out * k // 2), jnp.uint8)
    absmax = jnp.asarray(rng.uniform(0.0, 0.1, n_out * k // 64), jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    code_book = tuple(BNB_NF4.tolist())
    out = nf4_kernels.dequantize_4bit_matmul(x, codes, absmax, code_book=code_book, n_out=n_out, blocksize=64)
    ref = nf4_kernels.dequantize_4bit_matmul_reference(x, codes, absmax, code_book=code_book, n_out=n_out, blocksize=64)
    assert out.shape == (rows, n_out) and out.dtype == dtype
    assert relative_error(out, ref) <= tolerance


def test_int8_blockwise():
    rng = np.random.default_rng()
    weight = _random_weight(rng, (64, 176), np.float32)
    kernel = quant.quantize_int8(jnp.asarray(weight))
    codes = np.asarray(kernel.codes)
    assert codes.dtype == np.int8 and codes.size == weight.size and np.abs(codes.astype(int)).max() == 127
    absmax = np.abs(weight.reshape(-1, 64)).max(axis=1)
    assert np.array_equal(np.asarray(kernel.absmax), absmax)
    restored = np.asarray(quant.dequantize_reference(kernel, jnp.float32)).T.reshape(-1, 64)
    # Round to nearest: at most half a step (absmax / 127 / 2) off, plus float32 rounding.
    assert np.all(np.abs(restored - weight.reshape(-1, 64)) <= absmax[:, None] / 254 * (1 + 1e-5))


def test_dequantized_stack_reads_layers_lazily():
    rng = np.random.default_rng()
    stacked = rng.standard_normal((3, 64, 96)).astype(np.float32)  # [layers, in, out]
    kernel = quant.quantize_stacked(stacked, "nf4")
    assert kernel.leading_shape == (3,) and kernel.codes.shape == (3, 64 * 96 // 2)
    view = quant.DequantizedStack(kernel, ml_dtypes.bfloat16)
    assert view.shape == (3, 64, 96) and view.dtype == np.dtype(ml_dtypes.bfloat16)
    for layer in range(3):
        one = quant.quantize_nf4(jnp.asarray(stacked[layer].T))
        assert np.array_equal(view[layer], np.asarray(quant.dequantize_reference(one, jnp.float32)))


# ---------------------------------------------------------------------------------------------
# bitsandbytes' pre-quantized checkpoints
# ---------------------------------------------------------------------------------------------


def _write_bnb_checkpoint(source, target):
    """Re-write a 16-bit tiny checkpoint as bitsandbytes + transformers save a load_in_4bit model:
    every decoder projection as Params4bit with its packed quant state, the rest unchanged."""
    import shutil

    from convert.safetensors_io import CheckpointReader, save_file

    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    tensors = {}
    with CheckpointReader(source) as reader:
        for name in reader.keys():
            tensor = reader.get(name)
            if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                packed, absmax_codes, absmax2, offset = bnb_quantize_nf4(np.asarray(tensor, np.float32))
                state = {
                    "quant_type": "nf4", "absmax": None, "blocksize": 64, "quant_map": None, "dtype": "bfloat16",
                    "shape": list(tensor.shape), "nested_absmax": None, "nested_blocksize": 256,
                    "nested_quant_map": None, "nested_dtype": "float32", "nested_offset": float(offset),
                }
                state = {key: value for key, value in state.items() if value is not None}
                tensors[name] = packed.reshape(-1, 1)
                tensors[name + ".absmax"] = absmax_codes
                tensors[name + ".quant_map"] = BNB_NF4.copy()
                tensors[name + ".nested_absmax"] = absmax2
                tensors[name + ".nested_quant_map"] = bnb_dynamic_map()
                tensors[name + ".quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
            else:
                tensors[name] = np.asarray(tensor)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
    }
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_prequantized_bitsandbytes_checkpoint_loads_as_written(tiny_checkpoints, tmp_path):
    from convert.safetensors_io import CheckpointReader
    from fastft_jax import FastLanguageModel

    source = tiny_checkpoints["qwen3"]
    prequantized = _write_bnb_checkpoint(source, tmp_path / "bnb")
    model, _ = FastLanguageModel.from_pretrained(prequantized, dtype="float32", load_in_4bit=True)
    kernel = model.base_params()["layers"]["down_proj"]["kernel"]
    assert quant.is_quantized(kernel) and kernel.leading_shape == (model.config.num_layers,)
    with CheckpointReader(prequantized) as reader:
        written = reader.get("model.layers.1.mlp.down_proj.weight").reshape(-1)
        assert np.array_equal(np.asarray(kernel.codes[1]), written)
    # Quantizing the 16-bit original on load gives the same bytes, hence the same logits.
    from_16bit, _ = FastLanguageModel.from_pretrained(source, dtype="float32", load_in_4bit=True)
    ids = np.random.default_rng().integers(0, model.config.vocab_size, (2, 9))
    assert np.array_equal(np.asarray(model(ids)), np.asarray(from_16bit(ids)))
    # Without load_in_4bit the checkpoint is dequantized to 16-bit.
    dequantized, _ = FastLanguageModel.from_pretrained(prequantized, dtype="float32")
    plain = dequantized.base_params()["layers"]["down_proj"]["kernel"]
    assert not quant.is_quantized(plain)
    assert np.array_equal(np.asarray(plain), np.asarray(quant.dequantize_reference(kernel, jnp.float32)))


def test_other_quantization_configs_are_refused(tiny_checkpoints, tmp_path):
    import shutil

    from convert.errors import UnsupportedModelError
    from fastft_jax import FastLanguageModel

    target = tmp_path / "gptq"
    shutil.copytree(tiny_checkpoints["qwen2"], target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="only bitsandbytes 4-bit NF4"):
        FastLanguageModel.from_pretrained(target, load_in_4bit=True)

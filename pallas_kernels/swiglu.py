"""SwiGLU activation: silu(gate) * up."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float

from pallas_kernels._common import cdiv, next_power_of_2, use_interpret


def swiglu_reference(gate: Float[Array, "... d"], up: Float[Array, "... d"]) -> Float[Array, "... d"]:
    gate_f32 = gate.astype(jnp.float32)
    return (jax.nn.silu(gate_f32) * up.astype(jnp.float32)).astype(gate.dtype)


# ---------------------------------------------------------------------------------------------
# Pallas-Triton kernel.
#
# The op is elementwise, so the wrapper flattens everything to one axis and a program handles a
# contiguous block of it: no padding of the (non-power-of-2) intermediate size, and only the tail
# block is masked. Forward reads gate and up and writes the product; backward reads the cotangent,
# gate and up, recomputes silu, and writes both gradients. Nothing but gate and up is saved.
# ---------------------------------------------------------------------------------------------

# Elements per program: with 8 warps, 16 per thread, i.e. two 16-byte loads per bf16 input.
_BLOCK_ELEMENTS = 4096
_NUM_WARPS = 8


def _block_size(size: int) -> int:
    return min(_BLOCK_ELEMENTS, next_power_of_2(size))


def _element_mask(size: int, block: int):
    return pl.program_id(0) * block + jnp.arange(block) < size


def _forward_kernel(gate_ref, up_ref, out_ref, *, size: int):
    mask = _element_mask(size, gate_ref.shape[0])
    gate = pltriton.load(gate_ref, mask=mask, other=0.0).astype(jnp.float32)
    up = pltriton.load(up_ref, mask=mask, other=0.0).astype(jnp.float32)
    pltriton.store(out_ref, (gate * jax.nn.sigmoid(gate) * up).astype(out_ref.dtype), mask=mask)


# Gradient. With s = sigmoid(g) and out = g s u:
#   d up   = dout * g s                  (= dout * silu(g))
#   d gate = dout * u * s (1 + g (1 - s)) (since d silu/dg = s + g s (1 - s))
def _backward_kernel(d_out_ref, gate_ref, up_ref, d_gate_ref, d_up_ref, *, size: int):
    mask = _element_mask(size, gate_ref.shape[0])
    d_out = pltriton.load(d_out_ref, mask=mask, other=0.0).astype(jnp.float32)
    gate = pltriton.load(gate_ref, mask=mask, other=0.0).astype(jnp.float32)
    up = pltriton.load(up_ref, mask=mask, other=0.0).astype(jnp.float32)
    sigmoid_gate = jax.nn.sigmoid(gate)
    silu_gate = gate * sigmoid_gate
    d_silu = sigmoid_gate * (1.0 + gate * (1.0 - sigmoid_gate))
    pltriton.store(d_gate_ref, (d_out * up * d_silu).astype(d_gate_ref.dtype), mask=mask)
    pltriton.store(d_up_ref, (d_out * silu_gate).astype(d_up_ref.dtype), mask=mask)


def _elementwise_call(kernel, inputs, out_dtypes):
    size = inputs[0].size
    block = _block_size(size)
    spec = pl.BlockSpec((block,), lambda i: (i,))
    return pl.pallas_call(
        functools.partial(kernel, size=size),
        out_shape=[jax.ShapeDtypeStruct((size,), dtype) for dtype in out_dtypes],
        grid=(cdiv(size, block),),
        in_specs=[spec] * len(inputs),
        out_specs=[spec] * len(out_dtypes),
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=use_interpret(),
    )(*(array.reshape(-1) for array in inputs))


@jax.custom_vjp
def _swiglu(gate, up):
    (out,) = _elementwise_call(_forward_kernel, (gate, up), (gate.dtype,))
    return out.reshape(gate.shape)


def _swiglu_fwd(gate, up):
    return _swiglu(gate, up), (gate, up)


def _swiglu_bwd(saved, d_out):
    gate, up = saved
    d_gate, d_up = _elementwise_call(_backward_kernel, (d_out, gate, up), (gate.dtype, up.dtype))
    return d_gate.reshape(gate.shape), d_up.reshape(up.shape)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(gate: Float[Array, "... d"], up: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """silu(gate) * up as swiglu_reference, as a Pallas-Triton kernel with a hand-written backward."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {gate.shape} and up shape {up.shape} differ")
    return _swiglu(gate, up)

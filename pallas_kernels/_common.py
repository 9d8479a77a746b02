"""Small helpers shared by the kernel files: interpret mode, padding, block sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton


def use_interpret() -> bool:
    """Pallas runs natively only on GPU; on CPU (CI) it runs through the interpreter."""
    return jax.default_backend() != "gpu"


def is_sm90_gpu() -> bool:
    """True when the default backend is an sm90 GPU (H100/H200/GH200), which the Mosaic GPU kernels
    (wgmma, TMA) need; never raises: a missing or broken backend means "no"."""
    try:
        if jax.default_backend() != "gpu":
            return False
        device = jax.devices()[0]
        capability = getattr(device, "compute_capability", None)
        if capability is not None:
            return str(capability).split(".")[0] == "9"
        kind = device.device_kind.lower()
        return any(name in kind for name in ("h100", "h200", "h800", "h20"))
    except Exception:  # noqa: BLE001
        return False


def next_power_of_2(n: int) -> int:
    """Triton needs every in-kernel array to have a power-of-2 size."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def masked_load(ref, rows, cols, row_valid, col_valid):
    """ref[rows, cols] of a 2-D block, reading zeros where a validity mask (rows or columns) is False;
    a None mask means that whole axis is in bounds."""
    if row_valid is None and col_valid is None:
        return ref[rows, cols]
    if row_valid is None:
        mask = col_valid[None, :]
    elif col_valid is None:
        mask = row_valid[:, None]
    else:
        mask = row_valid[:, None] & col_valid[None, :]
    return pltriton.load(ref.at[rows, cols], mask=mask, other=0)


def unfused(product, nonnegative):
    """product, passed through an integer identity that no compiler can see through (the sign bit
    of nonnegative, data known to be >= 0, is 0), so that an add after it is not contracted into a
    fused multiply-add: XLA's CPU and GPU backends and Triton (enable_fp_fusion) all contract
    a * b + c, and neither optimization_barrier nor reduce_precision prevents it. Used where a
    format (bitsandbytes' double-quantized absmax) rounds the product and the sum separately."""
    zero = jax.lax.bitcast_convert_type(nonnegative, jnp.uint32) >> 31
    bits = jax.lax.bitcast_convert_type(product, jnp.uint32) | zero
    return jax.lax.bitcast_convert_type(bits, jnp.float32)

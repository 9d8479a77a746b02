"""Small helpers shared by the kernel files: interpret mode, padding, block sizes."""

from __future__ import annotations

import jax


def use_interpret() -> bool:
    """Pallas runs natively only on GPU; on CPU (CI) it runs through the interpreter."""
    return jax.default_backend() != "gpu"


def next_power_of_2(n: int) -> int:
    """Triton needs every in-kernel array to have a power-of-2 size."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)

"""bench/loss_parity.py's verdicts: exact in float32, and in bf16 no farther from float32 than the reference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loss_parity  # noqa: E402


def _runs(float32, *, auto32_shift=0.0, reference_noise=0.01, auto_noise=0.01, seed=0):
    """Four curves around a float32 one: the bf16 runs off it by random noise of the given size."""
    rng = np.random.default_rng(seed)
    float32 = np.asarray(float32, float)
    curves = {
        "float32": float32,
        "auto-float32": float32 * (1 + auto32_shift),
        "reference": float32 + reference_noise * rng.standard_normal(float32.size),
        "auto": float32 + auto_noise * rng.standard_normal(float32.size),
    }
    return {name: {"ok": True, "losses": [float(x) for x in curve]} for name, curve in curves.items()}


CURVE = np.linspace(12.5, 8.0, 50)


def test_noise_as_large_as_the_references_passes():
    verdict = loss_parity.compare(_runs(CURVE))["verdict"]
    assert verdict == {"exact": True, "noise": True, "pass": True}


def test_a_float32_kernel_path_that_drifts_fails_exactness():
    verdict = loss_parity.compare(_runs(CURVE, auto32_shift=1e-3))["verdict"]
    assert verdict["exact"] is False and verdict["pass"] is False


def test_bf16_kernels_far_from_float32_fail_the_noise_verdict():
    verdict = loss_parity.compare(_runs(CURVE, auto_noise=0.05))["verdict"]
    assert verdict["exact"] is True and verdict["noise"] is False and verdict["pass"] is False


def test_a_missing_run_is_no_pass():
    runs = _runs(CURVE)
    del runs["auto-float32"]
    comparison = loss_parity.compare(runs)
    assert comparison["exact"] is None and comparison["verdict"]["pass"] is False
    assert "exact: run missing" in loss_parity.verdict_line({"comparison": comparison})

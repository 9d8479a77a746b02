"""bench/offload_overlap.py's arithmetic: the hidden share of the host-offload copies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import offload_overlap  # noqa: E402


def test_hidden_share_from_the_step_difference():
    rows = [{"kind": "fastft-jax", "model": "llama3-8b", "batch": 2, "seq": 2048, "rows": "padded",
             "checkpointing": mode, "median_step_s": step} for mode, step in (("full", 0.350), ("unsloth", 0.371))]
    rows.append({"kind": "peer", "model": "llama3-8b", "median_step_s": 0.4})
    bandwidths = {"device_to_host": 40.0, "host_to_device": 60.0}
    (result,) = offload_overlap.overlap_rows(rows, bandwidths)
    each_way = 32 * 2 * 2048 * 4096 * 2  # layers x tokens x hidden, bf16
    assert result["offloaded_gb_each_way"] == pytest.approx(each_way / 1e9)
    copy_s = each_way / 40e9 + each_way / 60e9
    assert result["copy_ms"] == pytest.approx(1e3 * copy_s)
    assert result["exposed_ms"] == pytest.approx(21.0)
    assert result["hidden_pct"] == pytest.approx(100 * (1 - 0.021 / copy_s))


def test_a_shape_without_both_modes_gives_no_row():
    rows = [{"model": "llama3-8b", "batch": 2, "seq": 2048, "checkpointing": "full", "median_step_s": 0.35}]
    assert offload_overlap.overlap_rows(rows, {"device_to_host": 1.0, "host_to_device": 1.0}) == []

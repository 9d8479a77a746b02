"""bench/decode_kernels.py: its sweep's configs, and its smoke run (CPU, interpret mode) of the GEMV rows
and the sweep, whose stacked_matmul rows are checked against stacked_matmul_reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import decode_kernels  # noqa: E402
from pallas_kernels.stacked_matmul import _split_layout, choose_blocks  # noqa: E402


def test_sweep_configs_start_at_the_default_and_never_repeat_a_layout():
    for _, d_in, d_out, _ in decode_kernels.LLAMA3_8B_SHAPES + decode_kernels.SMOKE_SHAPES:
        configs = decode_kernels.sweep_configs(1, d_in, d_out, jnp.bfloat16, 24)
        assert configs[0] == choose_blocks(1, d_in, d_out, jnp.bfloat16)
        assert 2 <= len(configs) <= 24
        layouts = [(b.block_n, b.block_k, _split_layout(d_in, b), b.num_warps, b.num_stages) for b in configs]
        assert len(set(layouts)) == len(layouts)
        for blocks in configs:
            for size in (blocks.block_m, blocks.block_n, blocks.block_k):
                assert size >= 16 and size & (size - 1) == 0, blocks
        assert len(decode_kernels.sweep_configs(1, d_in, d_out, jnp.bfloat16, 3)) == 3


def test_smoke_gemv_and_sweep(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 20))
    assert decode_kernels.main(["--smoke", "--parts", "gemv,sweep", "--seed", str(seed), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "decode_kernels.json").read_text())
    rows = result["rows"]
    assert rows and all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
    checked = [row for row in rows if row["method"] in ("stacked_matmul", "stacked_matmul_scan", "default")]
    assert checked and all(row["rel_err"] <= decode_kernels.BF16_TOLERANCE for row in checked)
    assert {row["shape"] for row in rows if row["part"] == "sweep"} == {s[0] for s in decode_kernels.SMOKE_SHAPES}
    assert set(result["per_layer_us"]) == {"copy_bound", "stacked_matmul", "stacked_matmul_scan",
                                           "xla_stacked_index", "xla_unstacked"}
    assert "stacked_matmul_scan" in result["table"]

"""How much of "unsloth" checkpointing's host-offload time stays hidden behind compute (issue 11).

use_gradient_checkpointing="unsloth" is True (each layer keeps only its input and recomputes the
rest) with the kept inputs parked in pinned host memory: every step copies layers x tokens x hidden
activations device-to-host in the forward and back in the backward. Whatever of that copy time the
step does not overlap with compute shows as "unsloth"'s step time minus True's, when both run
the same shape with the same MLP tiling (bench/e2e.py's rows of one call, e.g.
`--checkpointing full,unsloth --ops mlp_tile_tokens=2048`).

This script measures the two copy bandwidths on the card (jax.device_put of a pinned-host array
to the device and back, --gib each, median of --iters), reads such an e2e.json and prints, per
pair of rows: the bytes offloaded per step each way, the copy time they take at the measured
bandwidths, the exposed time (step difference) and the hidden share, 1 - exposed / copy time.

    python3 bench/offload_overlap.py --e2e-json OUT/e2e.json [--out DIR]
    python3 bench/offload_overlap.py --smoke      # CPU: the arithmetic on a made-up pair of rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

from e2e import hf_config  # noqa: E402


def copy_bandwidths_gbps(gib: float, iters: int) -> dict[str, float]:
    """Host-to-device and device-to-host GB/s of one --gib bf16 array between pinned host memory and
    the device, as jax moves it (device_put to the other memory kind), median of iters copies."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    kinds = {memory.kind for memory in device.addressable_memories()}
    if "pinned_host" not in kinds:
        return {}
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    array = jnp.ones((int(gib * (1 << 29)),), jnp.bfloat16)
    nbytes = array.nbytes

    def timed(source, target) -> float:
        jax.block_until_ready(jax.device_put(source, target))  # warm-up
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            jax.block_until_ready(jax.device_put(source, target))
            samples.append(time.perf_counter() - start)
        return nbytes / statistics.median(samples) / 1e9

    parked = jax.block_until_ready(jax.device_put(array, host))
    return {"device_to_host": timed(array, host), "host_to_device": timed(parked, on_device)}


def offloaded_bytes(row: dict[str, Any]) -> int:
    """Bytes one step parks in host memory: every layer's input, batch x seq x hidden, 16-bit."""
    config = hf_config(row["model"])
    return config["num_hidden_layers"] * row["batch"] * row["seq"] * config["hidden_size"] * 2


def overlap_rows(e2e_rows: list[dict[str, Any]], bandwidths: dict[str, float]) -> list[dict[str, Any]]:
    """One row per (model, batch, seq, row kind) that has both a True ("full") and an "unsloth" step."""
    steps: dict[tuple, dict[str, float]] = {}
    for row in e2e_rows:
        if row.get("kind", "fastft") == "peer" or not row.get("median_step_s"):
            continue
        key = (row["model"], row["batch"], row["seq"], row.get("rows", "padded"))
        steps.setdefault(key, {})[str(row["checkpointing"])] = row["median_step_s"]
    results = []
    for (model, batch, seq, rows), by_mode in steps.items():
        full, unsloth = by_mode.get("full"), by_mode.get("unsloth")
        if full is None or unsloth is None:
            continue
        each_way = offloaded_bytes({"model": model, "batch": batch, "seq": seq})
        copy_s = None
        if bandwidths:
            copy_s = each_way / (bandwidths["device_to_host"] * 1e9) + each_way / (bandwidths["host_to_device"] * 1e9)
        exposed_s = unsloth - full
        results.append({
            "model": model, "batch": batch, "seq": seq, "rows": rows, "offloaded_gb_each_way": each_way / 1e9,
            "step_full_ms": 1e3 * full, "step_unsloth_ms": 1e3 * unsloth, "exposed_ms": 1e3 * exposed_s,
            "copy_ms": None if copy_s is None else 1e3 * copy_s,
            "hidden_pct": None if copy_s is None else 100 * (1 - max(exposed_s, 0.0) / copy_s),
        })
    return results


def table(rows: list[dict[str, Any]], bandwidths: dict[str, float]) -> str:
    lines = ["pinned-host copy bandwidth: " + (", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidths.items())
                                             or "not measured (no pinned_host memory)"),
             "| shape | offloaded GB each way | True ms | \"unsloth\" ms | exposed ms | copy ms | hidden |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        copy = "–" if row["copy_ms"] is None else f"{row['copy_ms']:.1f}"
        hidden = "–" if row["hidden_pct"] is None else f"{row['hidden_pct']:.0f} %"
        lines.append(f"| {row['model']} b{row['batch']}x{row['seq']} {row['rows']} | {row['offloaded_gb_each_way']:.2f} | "
                     f"{row['step_full_ms']:.1f} | {row['step_unsloth_ms']:.1f} | {row['exposed_ms']:.1f} | {copy} | {hidden} |")
    if not rows:
        lines.append("(no shape has both a True and an \"unsloth\" row)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e-json", help="bench/e2e.py's e2e.json with full and unsloth rows of one shape")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the copied array")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="the arithmetic on made-up rows, no device copies")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/fastft_offload"))
    args = parser.parse_args(argv)
    if args.smoke:
        e2e_rows = [{"model": "llama3-8b", "batch": 2, "seq": 2048, "checkpointing": "full", "median_step_s": 0.35},
                    {"model": "llama3-8b", "batch": 2, "seq": 2048, "checkpointing": "unsloth", "median_step_s": 0.37}]
        bandwidths = {"device_to_host": 50.0, "host_to_device": 50.0}
    else:
        if not args.e2e_json:
            parser.error("--e2e-json is required (or --smoke)")
        e2e_rows = json.loads(Path(args.e2e_json).read_text())["rows"]
        bandwidths = copy_bandwidths_gbps(args.gib, args.iters)
    rows = overlap_rows(e2e_rows, bandwidths)
    report = {"bandwidths_GBps": bandwidths, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offload_overlap.json").write_text(json.dumps(report, indent=1))
    print(table(rows, bandwidths))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

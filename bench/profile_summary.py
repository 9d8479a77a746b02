"""Where the GPU time of a traced training step goes: the per-op-class split that issue 8 asks for.

Reads the perfetto_trace.json.gz that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes
(bench/e2e.py --profile does), keeps the kernels that ran on the GPU streams, and sums their
durations by class (matmul, attention, norm/rope/activation fusions, loss head, optimiser, copies,
other). The class comes from the kernel name and the HLO op name in the event's arguments; the top
kernels by time are listed too, so a kernel the rules put in "other" is still visible.

    python bench/profile_summary.py OUT/profile/<row> [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

# First match wins; the text matched is "<kernel name> <hlo op> <hlo module>" in lower case.
CLASS_RULES: tuple[tuple[str, str], ...] = (
    ("host copies", r"memcpy[ _]?(h2d|d2h|htod|dtoh)|host-to-device|device-to-host|pinned|offload"),
    ("device copies", r"memcpy|memset|copy-start|copy-done|dynamic-update-slice|\bcopy[._\d]"),
    ("attention", r"cudnn|flash|fmha|attention|sdpa|_attn"),
    ("loss head", r"cross_entropy|logsumexp|chunk_loss|loss"),
    ("matmul", r"gemm|nvjet|cublas|cutlass|xmma|matmul|\bdot\b|dot[._]|triton_gemm|lora_linear|nf4_matmul"),
    ("optimiser", r"adam|optax|scale_by|clip"),
    ("norm / rope / activation", r"rms_norm|rope|swiglu|silu|rsqrt|norm|fusion|reduce|convert|multiply|add"),
)


def classify(text: str) -> str:
    for label, pattern in CLASS_RULES:
        if re.search(pattern, text):
            return label
    return "other"


def _trace_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.rglob("perfetto_trace.json.gz")) or sorted(path.rglob("*.trace.json.gz"))


def _load(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as handle:
        trace = json.load(handle)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def gpu_kernel_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete events on GPU stream threads. Device processes carry "GPU" in their name; of their
    threads, the "Stream" ones hold the kernels (the "XLA Ops"/"XLA Modules" lines repeat the same
    time, so counting them too would double it)."""
    process_names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread_names = {
        (e["pid"], e.get("tid")): e["args"]["name"]
        for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    gpu_pids = {pid for pid, name in process_names.items() if "gpu" in name.lower() or "device:" in name.lower()}
    complete = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]
    on_streams = [e for e in complete if "stream" in thread_names.get((e["pid"], e.get("tid")), "").lower()]
    return on_streams or complete


def summarise(path: Path, top: int = 30) -> dict[str, Any]:
    files = _trace_files(path)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}")
    events = gpu_kernel_events(_load(files[-1]))
    by_class: dict[str, float] = collections.defaultdict(float)
    by_kernel: dict[str, list] = {}
    for event in events:
        args = event.get("args") or {}
        hlo = " ".join(str(args.get(key, "")) for key in ("hlo_op", "long_name", "hlo_module", "tf_op"))
        name = event.get("name", "")
        label = classify(f"{name} {hlo}".lower())
        duration_us = float(event.get("dur", 0.0))
        by_class[label] += duration_us
        entry = by_kernel.setdefault(name, [0.0, 0, label, hlo[:160]])
        entry[0] += duration_us
        entry[1] += 1
    total_us = sum(by_class.values())
    span_us = (max(e["ts"] + e.get("dur", 0) for e in events) - min(e["ts"] for e in events)) if events else 0.0
    return {
        "trace": str(files[-1]),
        "kernels": len(events),
        "gpu_busy_ms": total_us / 1e3,
        "span_ms": span_us / 1e3,
        "by_class_ms": {label: round(us / 1e3, 3) for label, us in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name[:120], "ms": round(us / 1e3, 3), "calls": calls, "class": label, "hlo": hlo}
            for name, (us, calls, label, hlo) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
        ],
    }


def print_summary(summary: dict[str, Any], title: str = "") -> None:
    busy = summary["gpu_busy_ms"] or 1.0
    print(f"== {title or summary['trace']}: {summary['kernels']} kernels, GPU busy {busy:.1f} ms "
          f"over a {summary['span_ms']:.1f} ms span")
    for label, ms in summary["by_class_ms"].items():
        print(f"  {label:26s} {ms:9.2f} ms  {100 * ms / busy:5.1f} %")
    print("  top kernels:")
    for row in summary["top_kernels"]:
        print(f"    {row['ms']:8.2f} ms {row['calls']:5d}x  {row['class']:14s} {row['name'][:70]}  {row['hlo'][:50]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="profile directories or trace files")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="write the summaries here")
    args = parser.parse_args()
    summaries = {}
    for path in args.paths:
        try:
            summaries[str(path)] = summary = summarise(path, args.top)
        except (FileNotFoundError, json.JSONDecodeError, KeyError) as error:
            print(f"{path}: {error}", file=sys.stderr)
            continue
        print_summary(summary, str(path))
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1))


if __name__ == "__main__":
    main()

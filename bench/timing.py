"""What every bench script shares: wall-clock timing of jax calls, error strings for the tables."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def replicated(fn, args: tuple, max_calls: int = 32, max_bytes: float = 8 * 2**30):
    """(program, inputs): one jitted program that runs fn on each of several copies of args.

    Identical calls inside one program get merged by XLA (an optimization_barrier between them is
    removed first), so each call reads its own copy of the inputs and every output is returned
    (a slice of an output would let XLA compute only that slice). The number of copies keeps
    inputs plus outputs under max_bytes. Returns the program, its inputs and the number of calls."""
    out_shapes = jax.eval_shape(fn, *args)
    per_call = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves((args, out_shapes)))
    calls = int(max(2, min(max_calls, max_bytes // max(per_call, 1))))
    copies = [jax.tree.map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a, args)
              for _ in range(calls)]
    program = jax.jit(lambda all_args: [fn(*call_args) for call_args in all_args])
    return program, (copies,), calls


# Below this many ms per call, host dispatch (~20-50 µs per jitted call) rather than the device
# can set the pace of back-to-back calls, so time_ms times several calls inside one program instead.
_REPLICATE_BELOW_MS = 0.3


def time_ms(fn, *args, warmup: int, iters: int, min_sample_ms: float = 5.0) -> float:
    """Median device milliseconds per call of fn(*args), compilation excluded.

    Each sample launches enough calls back to back (jax dispatches asynchronously) to fill
    min_sample_ms and blocks once at the end, so a sub-millisecond kernel is not charged the ~50 µs
    of Python dispatch and host synchronisation that a block per call would add. The device runs
    the calls in order, so the last one finishing means every one has. A call shorter than
    _REPLICATE_BELOW_MS is timed as many calls on separate input copies inside one program
    (replicated), so that even a few-microsecond kernel is not paced by the host's dispatch."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single_ms = 1e3 * (time.perf_counter() - start)
    calls_per_program = 1
    if single_ms < _REPLICATE_BELOW_MS:
        fn, args, calls_per_program = replicated(fn, args)
        for _ in range(max(warmup, 1)):
            jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        single_ms = 1e3 * (time.perf_counter() - start)
    calls_per_sample = int(min(200, max(1, min_sample_ms // max(single_ms, 1e-3))))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(calls_per_sample):
            out = fn(*args)  # rebinding drops the previous output, so memory stays one call's worth
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls_per_sample / calls_per_program)
    return 1e3 * statistics.median(samples)


def copy_bandwidth_gbps(gib: float, warmup: int, iters: int) -> dict[str, float]:
    """Read + write bandwidth of a plain device copy, measured two ways on the same card: XLA's
    elementwise x + 1, and (when torch is installed) torch's copy_, which is cudaMemcpy-class. The
    larger is the ceiling the "% of copy" columns use, so no kernel is flattered by a slow copy."""
    array = jnp.ones((int(gib * (1 << 29)),), jnp.bfloat16)
    add_one = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    ms = time_ms(add_one, array, warmup=warmup, iters=iters)
    measured = {"xla_add_one": 2 * array.nbytes / (ms * 1e-3) / 1e9}
    del array
    try:
        import torch
    except ImportError:
        return measured
    if torch.cuda.is_available():
        source = torch.ones(int(gib * (1 << 29)), dtype=torch.bfloat16, device="cuda")
        target = torch.empty_like(source)
        for _ in range(max(warmup, 1)):
            target.copy_(source)
        samples = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        measured["torch_copy"] = 2 * source.numel() * 2 / (statistics.median(samples) * 1e-3) / 1e9
        del source, target
        torch.cuda.empty_cache()
    return measured


def copy_ceiling_gbps(gib: float = 2.0, warmup: int = 3, iters: int = 20) -> float:
    """The larger of copy_bandwidth_gbps' measurements: the ceiling every "% of copy" uses."""
    return max(copy_bandwidth_gbps(gib, warmup, iters).values())


def short_error(exc: BaseException) -> str:
    """The first lines of an exception, for a table cell."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " | ".join(line.strip() for line in text[:3])[:400]


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected| in float32; NaN when actual has non-finite values."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    if not np.all(np.isfinite(actual)):
        return float("nan")
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def compiled_memory_gib(compiled) -> dict[str, float] | None:
    """XLA's memory analysis of a compiled program (argument, output, temp, ... sizes) in GiB."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return {name.removesuffix("_size_in_bytes"): round(getattr(analysis, name) / 2**30, 3)
            for name in dir(analysis) if name.endswith("_size_in_bytes")}


def gpu_check_args(description: str, default_deadline: float = 110.0):
    """(args, deadline): the options of a one-call GPU check script (correctness, then speed) and
    the perf_counter time after which it skips what is left."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--deadline", type=float, default=default_deadline,
                        help="seconds after which remaining cases are skipped")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-correctness", action="store_true",
                        help="speed only (for a kernel whose correctness cases already passed on this card)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    return args, time.perf_counter() + args.deadline


def record_timing(row: dict, key: str, fn, args: tuple, flops: float, warmup: int, iters: int) -> float | None:
    """Times fn(*args) into row: {key}_ms and {key}_tflops, or {key}_error if it fails (one failing
    configuration must not stop a table). Returns the ms, or None."""
    try:
        ms = time_ms(fn, *args, warmup=warmup, iters=iters)
    except Exception as exc:  # noqa: BLE001
        row[f"{key}_error"] = short_error(exc)
        return None
    row[f"{key}_ms"] = ms
    row[f"{key}_tflops"] = flops / (ms * 1e-3) / 1e12
    return ms

"""Where a batch-1 decode step's time goes beyond its weight reads (issue 10), in one short GPU call.

The decode step reads ~15 GB of llama3-8b bf16 weights through the seven projections of 32 layers;
at 64.9 % of the copy bound it spends ~60 µs a layer beyond those reads. Three parts tell whether the
GEMV kernel itself or what surrounds it (launches, small ops, the layer loop) is the gap:

  gemv     Each Llama-3-8B projection shape (q/o 4096->4096, k/v 4096->1024, gate/up 4096->14336,
           down 14336->4096) on a random bf16 stack of --layers layers, at batch 1 and 32:
             stacked_matmul        pallas_kernels/stacked_matmul.py at choose_blocks' tiles
             stacked_matmul_scan   the same inside a lax.scan over layer indices (batch 1), the
                                   decode step's loop with its per-iteration slicing
             xla_stacked_index     XLA's x @ w_stacked[i], i traced: the slice copy, then cuBLAS
             xla_unstacked         XLA's x @ w on separate [in, out] arrays: the ideal cuBLAS GEMV
           One program runs many calls back to back, each on its own x and a different layer
           (layer j % layers on call j), so a layer's weight is read again only after every other
           layer's: the 32-layer stack (>= 256 MB) cannot be served from the 50 MB L2.
           Per call: µs, GB/s (weight + x + out bytes) and % of the copy ceiling.
  sweep    StackedMatmulBlocks around the default at batch 1 (block_n x k_splits at the default
           launch settings, num_warps x num_stages at the default tiles, block_k halved/doubled;
           <= --sweep-limit configs a shape), each checked once against stacked_matmul_reference
           (bf16: relative error <= 1e-2) and timed as `stacked_matmul` above. A config that does
           not compile is recorded with its error.
  profile  The real decode step: a random-weight llama3-8b bf16 model built as bench/decode.py
           does, decode_matmul="pallas", prompt 128, batch 1; --profile-steps steps of the step
           loop timed without the profiler, then as many under jax.profiler.trace, summarised by
           bench/profile_summary.py per decode step: GPU busy time per op class, the top kernels,
           kernels per step, and the idle time between kernels by gap size (launch-sized bubbles
           against host waits).

Order (whatever --parts says): profile, gemv, sweep. The profile goes first because it is the one
long piece (~40 s: model, two compiles, the trace); the gemv rows are a few seconds each and the
sweep's configs fill what is left of --budget, split evenly over the shapes; past --budget no new
row starts. Output: a table at the end, $OUT/decode_kernels.json (rewritten after every row),
$OUT/decode_profile_summary.json, and the trace under $OUT/profile when it is under 20 MB.

    python3 bench/decode_kernels.py                          # the GPU call, ~145 s
    python3 bench/decode_kernels.py --parts gemv,sweep --budget 100
    python3 bench/decode_kernels.py --smoke                  # CPU (interpret mode), tiny shapes, < 60 s
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from collections.abc import Callable
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import timing  # noqa: E402
from bench.timing import copy_ceiling_gbps, relative_error, short_error, time_ms  # noqa: E402
from pallas_kernels._common import next_power_of_2  # noqa: E402
from pallas_kernels.stacked_matmul import (  # noqa: E402
    _WEIGHT_TILE_BYTES,
    StackedMatmulBlocks,
    _split_layout,
    choose_blocks,
    stacked_matmul,
    stacked_matmul_reference,
)

# (name, d_in, d_out, projections of a decoder layer with this shape)
LLAMA3_8B_SHAPES = (("q/o", 4096, 4096, 2), ("k/v", 4096, 1024, 2), ("gate/up", 4096, 14336, 2),
                    ("down", 14336, 4096, 1))
# The same roles, tiny, with the real non-power-of-2 ratio on gate/up/down (14336 = 3.5 x 4096).
SMOKE_SHAPES = (("q/o", 64, 64, 2), ("k/v", 64, 32, 2), ("gate/up", 64, 224, 2), ("down", 224, 64, 1))
BF16_TOLERANCE = 1e-2
# A timed program runs at least this long at the card's peak bandwidth, so that time_ms never
# replicates it (it would copy the whole stack per replica) and launch jitter averages out.
MIN_PROGRAM_MS = 0.4
PEAK_GBPS_FOR_SIZING = 4800.0
PROFILE_MAX_BYTES = 20 * 2**20


def log(message: str) -> None:
    print(message, flush=True)


# -- timed programs -----------------------------------------------------------------------------------
def call_bytes(m: int, d_in: int, d_out: int, itemsize: int = 2) -> int:
    return itemsize * (d_in * d_out + m * d_in + m * d_out)


def calls_per_program(layers: int, d_in: int, d_out: int, min_ms: float) -> int:
    """Whole passes over the stack, enough for min_ms at peak bandwidth."""
    pass_ms = layers * call_bytes(1, d_in, d_out) / (PEAK_GBPS_FOR_SIZING * 1e6)
    return layers * max(1, int(np.ceil(min_ms / pass_ms)))


def unrolled_program(call: Callable, calls: int, layers: int, per_layer_arrays: bool = False) -> Callable:
    """jit(xs, weights, layer_ids) -> every call's output: call j multiplies xs[j] by layer j % layers
    (of the stack `weights`, or with per_layer_arrays the separate array weights[j % layers]). call is
    jitted once, so its lowering (a Pallas kernel's Triton module) is built once and called `calls`
    times; each call has its own x, so XLA cannot merge two of them."""
    inner = jax.jit(call)

    def program(xs, weights, layer_ids):
        if per_layer_arrays:
            return [inner(xs[j], weights[j % layers], layer_ids[j % layers]) for j in range(calls)]
        return [inner(xs[j], weights, layer_ids[j % layers]) for j in range(calls)]

    return jax.jit(program)


def scan_program(call: Callable) -> Callable:
    """jit(x_all [calls, m, in], weights, layer_seq [calls]) -> [calls, m, out]: the calls as the body
    of a lax.scan, as the decode step's layer loop runs them (x sliced in, the output written out)."""
    def program(x_all, weights, layer_seq):
        return jax.lax.scan(lambda carry, inputs: (carry, call(inputs[0], weights, inputs[1])), None,
                            (x_all, layer_seq))[1]
    return jax.jit(program)


def stacked_call(blocks: StackedMatmulBlocks | None) -> Callable:
    return functools.partial(stacked_matmul, blocks=blocks)


def xla_stacked_index(x, w_stacked, layer):
    return jnp.dot(x, w_stacked[layer], preferred_element_type=jnp.float32).astype(x.dtype)


def xla_unstacked(x, w, _layer):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    result: dict
    out_dir: Path
    deadline: float

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.result["wall_s"] = round(time.time() - self.result["_start"], 1)
        payload = {key: value for key, value in self.result.items() if not key.startswith("_")}
        (self.out_dir / "decode_kernels.json").write_text(json.dumps(payload, indent=1))


def time_row(ctx: Context, row: dict, program: Callable, program_args: tuple, calls: int,
             check: tuple | None = None) -> None:
    """Compile, time and fill row's us / GBps / pct_copy (per call). check=(w_stacked, x): the first
    call (x @ layer 0) against stacked_matmul_reference, into row["rel_err"], from the compile run."""
    start = time.perf_counter()
    outputs = jax.block_until_ready(program(*program_args))
    row["compile_s"] = round(time.perf_counter() - start, 2)
    if check is not None:
        w_stacked, x = check
        row["rel_err"] = relative_error(outputs[0], stacked_matmul_reference(x, w_stacked, jnp.int32(0)))
    del outputs
    ms = time_ms(program, *program_args, warmup=ctx.args.warmup, iters=ctx.args.iters)
    us = 1e3 * ms / calls
    row["calls_per_program"] = calls
    row["us"] = round(us, 2)
    row["GBps"] = round(call_bytes(row["batch"], row["d_in"], row["d_out"]) / (us * 1e3), 1)
    row["pct_copy"] = round(100 * row["GBps"] / ctx.result["copy_GBps"], 1)


def run_row(ctx: Context, row: dict, measure: Callable[[dict], None]) -> dict:
    ctx.result["rows"].append(row)
    if ctx.left() <= 0:
        row.update(ok=False, error="skipped: past --budget")
        return row
    start = time.perf_counter()
    try:
        measure(row)
        row["ok"] = row.get("rel_err", 0.0) <= BF16_TOLERANCE
        if not row["ok"]:
            row["error"] = f"relative error {row['rel_err']:.3g} > {BF16_TOLERANCE}"
    except Exception as error:  # noqa: BLE001 - a config that fails to compile is a result too
        row.update(ok=False, error=short_error(error))
        print(traceback.format_exc()[-600:], file=sys.stderr, flush=True)
    row["row_s"] = round(time.perf_counter() - start, 2)
    figures = " ".join(f"{key}={row[key]:.3g}" if isinstance(row[key], float) else f"{key}={row[key]}"
                       for key in ("us", "pct_copy", "rel_err", "compile_s", "row_s") if key in row)
    log(f"  {row['part']} {row['shape']} b{row['batch']} {row['method']} {row.get('config', '')}: {figures}"
        + (f" ERROR {row['error'][:200]}" if "error" in row else ""))
    ctx.save()
    return row


def make_stack(seed: int, layers: int, d_in: int, d_out: int):
    """A random bf16 [layers, in, out] stack drawn on the device (speed does not depend on the values)."""
    draw = jax.jit(lambda key: jax.random.normal(key, (layers, d_in, d_out), jnp.bfloat16) * jnp.bfloat16(0.02))
    return jax.block_until_ready(draw(jax.random.PRNGKey(seed)))


def make_xs(seed: int, calls: int, m: int, d_in: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), calls)
    return [jax.random.normal(key, (m, d_in), jnp.bfloat16) for key in keys]


def blocks_label(blocks: StackedMatmulBlocks, d_in: int) -> str:
    _, splits = _split_layout(d_in, blocks)
    return (f"m{blocks.block_m} n{blocks.block_n} k{blocks.block_k} s{splits} "
            f"w{blocks.num_warps} st{blocks.num_stages}")


# -- part 1: the four projection shapes -------------------------------------------------------------
def gemv_shape(ctx: Context, shape: tuple, stack) -> None:
    name, d_in, d_out, _ = shape
    layers = ctx.args.layers
    calls = calls_per_program(layers, d_in, d_out, ctx.args.min_program_ms)
    layer_ids = [jnp.int32(index) for index in range(layers)]
    base = dict(part="gemv", shape=name, d_in=d_in, d_out=d_out)
    for batch in ctx.args.batches:
        xs = make_xs(ctx.args.seed + batch, calls, batch, d_in)
        default = choose_blocks(batch, d_in, d_out, stack.dtype)

        def stacked(row, xs=xs, default=default):
            row["config"] = blocks_label(default, d_in)
            row["blocks"] = dataclasses.asdict(default)
            time_row(ctx, row, unrolled_program(stacked_call(None), calls, layers), (xs, stack, layer_ids), calls,
                     check=(stack, xs[0]))

        def scanned(row, xs=xs):
            x_all = jnp.stack(xs)
            layer_seq = jnp.arange(calls, dtype=jnp.int32) % layers
            time_row(ctx, row, scan_program(stacked_call(None)), (x_all, stack, layer_seq), calls,
                     check=(stack, xs[0]))

        def sliced(row, xs=xs):
            time_row(ctx, row, unrolled_program(xla_stacked_index, calls, layers), (xs, stack, layer_ids), calls)

        run_row(ctx, dict(base, batch=batch, method="stacked_matmul"), stacked)
        if batch == 1:
            run_row(ctx, dict(base, batch=batch, method="stacked_matmul_scan"), scanned)
        run_row(ctx, dict(base, batch=batch, method="xla_stacked_index"), sliced)
        if ctx.left() > 0:
            separate = [stack[index] for index in range(layers)]

            def unstacked(row, xs=xs, separate=separate):
                program = unrolled_program(xla_unstacked, calls, layers, per_layer_arrays=True)
                time_row(ctx, row, program, (xs, separate, layer_ids), calls)

            run_row(ctx, dict(base, batch=batch, method="xla_unstacked"), unstacked)
            for array in separate:
                array.delete()
        del xs


# -- part 2: tiles around the default ---------------------------------------------------------------
def sweep_configs(m: int, d_in: int, d_out: int, dtype, limit: int) -> list[StackedMatmulBlocks]:
    """The default first, then its neighbours one step away on each axis (block_n x2 / /2 with the k
    tile kept at _WEIGHT_TILE_BYTES, k_splits x2 / /2, the other num_warps, num_stages +-1, block_k
    x2 / /2), then the rest of block_n 32-256 x k_splits 1-8 and num_warps 4/8 x num_stages 2-4.
    Neighbours first, so that a sweep cut short by the budget has still moved along every axis.
    Configs with the same effective layout (splits that would start past d_in are dropped) once."""
    default = choose_blocks(m, d_in, d_out, dtype)
    itemsize = jnp.dtype(dtype).itemsize
    max_k, max_n = next_power_of_2(d_in), max(32, next_power_of_2(d_out))

    def tiles(block_n: int, k_splits: int) -> StackedMatmulBlocks:
        block_k = max(16, min(_WEIGHT_TILE_BYTES // (block_n * itemsize), max_k))
        return dataclasses.replace(default, block_n=block_n, block_k=block_k, k_splits=k_splits)

    candidates = [
        default,
        tiles(default.block_n * 2, default.k_splits),
        tiles(default.block_n // 2, default.k_splits),
        dataclasses.replace(default, k_splits=default.k_splits * 2),
        dataclasses.replace(default, k_splits=max(1, default.k_splits // 2)),
        dataclasses.replace(default, num_warps=8 if default.num_warps == 4 else 4),
        dataclasses.replace(default, num_stages=default.num_stages + 1),
        dataclasses.replace(default, num_stages=default.num_stages - 1),
        dataclasses.replace(default, block_k=default.block_k * 2),
        dataclasses.replace(default, block_k=default.block_k // 2),
    ]
    candidates += [tiles(block_n, k_splits) for block_n in (32, 64, 128, 256) for k_splits in (1, 2, 4, 8)]
    candidates += [dataclasses.replace(default, num_warps=num_warps, num_stages=num_stages)
                   for num_warps in (4, 8) for num_stages in (2, 3, 4)]
    seen, configs = set(), []
    for blocks in candidates:
        if not (16 <= blocks.block_n <= max_n and 16 <= blocks.block_k <= max_k and 2 <= blocks.num_stages <= 4):
            continue
        key = (blocks.block_n, blocks.block_k, _split_layout(d_in, blocks), blocks.num_warps, blocks.num_stages)
        if key not in seen:
            seen.add(key)
            configs.append(blocks)
    return configs[:limit]


def sweep_shape(ctx: Context, shape: tuple, stack, shape_deadline: float) -> None:
    name, d_in, d_out, _ = shape
    layers, batch = ctx.args.layers, 1
    calls = calls_per_program(layers, d_in, d_out, ctx.args.min_program_ms)
    layer_ids = [jnp.int32(index) for index in range(layers)]
    xs = make_xs(ctx.args.seed + 1000, calls, batch, d_in)
    default_us = None
    configs = sweep_configs(batch, d_in, d_out, stack.dtype, ctx.args.sweep_limit)
    for index, blocks in enumerate(configs):
        if time.time() > shape_deadline and index > 0:
            ctx.result.setdefault("sweep_not_run", {})[name] = len(configs) - index
            break

        def measure(row, blocks=blocks, xs=xs):
            time_row(ctx, row, unrolled_program(stacked_call(blocks), calls, layers), (xs, stack, layer_ids), calls,
                     check=(stack, xs[0]))

        row = run_row(ctx, dict(part="sweep", shape=name, d_in=d_in, d_out=d_out, batch=batch,
                                method="default" if index == 0 else "stacked_matmul",
                                config=blocks_label(blocks, d_in), blocks=dataclasses.asdict(blocks)), measure)
        if index == 0 and row.get("us"):
            default_us = row["us"]
        if default_us and row.get("us"):
            row["speedup_vs_default"] = round(default_us / row["us"], 3)
    del xs


# -- part 3: the real decode step under the profiler ------------------------------------------------
def gap_histogram(trace_dir: Path, steps: int) -> dict[str, Any]:
    """Idle time between consecutive GPU kernels (all streams merged), by gap size, per decode step:
    launch-sized bubbles (< 5 µs), mid (5-50 µs), host-sized waits (>= 50 µs)."""
    from bench import profile_summary

    files = profile_summary._trace_files(trace_dir)
    events = sorted(profile_summary.gpu_kernel_events(profile_summary._load(files[-1])), key=lambda e: e["ts"])
    bins = {"lt_5us": [0, 0.0], "5_50us": [0, 0.0], "ge_50us": [0, 0.0]}
    busy_until = None
    for event in events:
        start, end = float(event["ts"]), float(event["ts"]) + float(event.get("dur", 0.0))
        if busy_until is not None and start > busy_until:
            gap = start - busy_until
            label = "lt_5us" if gap < 5 else "5_50us" if gap < 50 else "ge_50us"
            bins[label][0] += 1
            bins[label][1] += gap
        busy_until = end if busy_until is None else max(busy_until, end)
    return {label: {"gaps_per_step": round(count / steps, 1), "idle_ms_per_step": round(total / 1e3 / steps, 3)}
            for label, (count, total) in bins.items()}


def profile_decode(ctx: Context) -> None:
    if str(HERE.parent) not in sys.path:  # bench/decode.py and e2e.py import their siblings by plain name
        sys.path.insert(0, str(HERE.parent))
    from convert.hf import model_config_from_hf
    from decode import decode_weight_bytes
    from e2e import device_random_params, hf_config
    from fastft_jax import generate as generate_module
    from fastft_jax.model import CausalLM
    from fastft_jax.ops import OpsConfig

    from bench.profile_summary import print_summary, summarise

    args = ctx.args
    section = ctx.result["profile"] = {"model": args.model, "batch": 1, "prompt_len": args.prompt_len,
                                       "decode_matmul": "pallas", "steps": args.profile_steps}
    start = time.perf_counter()
    config = model_config_from_hf(hf_config(args.model), where=f"bench shape {args.model}")
    params = device_random_params(config, args.seed, jnp.bfloat16)
    jax.block_until_ready(params)
    section["weights_s"] = round(time.perf_counter() - start, 1)
    weight_bytes = decode_weight_bytes(params, config.tie_word_embeddings)
    section["weight_bytes"] = weight_bytes
    section["bound_ms_per_step"] = round(weight_bytes / (ctx.result["copy_GBps"] * 1e6), 3)
    steps = args.profile_steps
    new_tokens = 2 * steps + 4
    ops_config = dataclasses.replace(OpsConfig.from_env(), decode_matmul="pallas").validated()
    model = CausalLM(config, params, dtype=jnp.bfloat16, max_seq_length=args.prompt_len + new_tokens,
                     ops_config=ops_config)
    section["decode_matmul_resolved"] = model.ops_config.resolve("decode_matmul")
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, (1, args.prompt_len), dtype=np.int32)
    prepared = generate_module._setup(model, prompt, None, new_tokens, False, 1.0, 1.0, 0, [], None, False, 0)
    base, lora = model.base_params(), model.lora_params()

    def step(state):
        return generate_module._decode_step_jit(base, lora, state, static=prepared.static)

    start = time.perf_counter()
    state = jax.block_until_ready(generate_module._prefill_jit(base, lora, *prepared.arrays, static=prepared.static))
    section["prefill_compile_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    state = jax.block_until_ready(step(state))
    section["step_compile_s"] = round(time.perf_counter() - start, 1)
    state = jax.block_until_ready(step(state))
    log(f"  profile: model {section['weights_s']} s, prefill compile {section['prefill_compile_s']} s, "
        f"step compile {section['step_compile_s']} s")

    start = time.perf_counter()
    for _ in range(steps):
        state = step(state)
    state = jax.block_until_ready(state)
    section["step_ms"] = round(1e3 * (time.perf_counter() - start) / steps, 3)
    section["pct_of_bound"] = round(100 * section["bound_ms_per_step"] / section["step_ms"], 1)
    section["beyond_bound_us_per_layer"] = round(
        1e3 * (section["step_ms"] - section["bound_ms_per_step"]) / config.num_layers, 1)
    log(f"  profile: step loop {section['step_ms']} ms a token, bound {section['bound_ms_per_step']} ms "
        f"({section['pct_of_bound']} %)")

    trace_dir = ctx.out_dir / "profile"
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(steps):
            state = step(state)
        state = jax.block_until_ready(state)
    del state
    summary = summarise(trace_dir, top=25)
    print_summary(summary, f"decode step x {steps} ({args.model}, batch 1, pallas decode_matmul)")
    per_step = {
        "gpu_busy_ms": round(summary["gpu_busy_ms"] / steps, 3),
        "span_ms": round(summary["span_ms"] / steps, 3),
        "kernels": round(summary["kernels"] / steps, 1),
        "by_class_ms": {label: round(ms / steps, 3) for label, ms in summary["by_class_ms"].items()},
        "top_kernels": [dict(row, ms=round(row["ms"] / steps, 4), calls=round(row["calls"] / steps, 2))
                        for row in summary["top_kernels"]],
    }
    try:
        per_step["gaps"] = gap_histogram(trace_dir, steps)
    except Exception as error:  # noqa: BLE001 - the summary above stands without it
        per_step["gaps_error"] = short_error(error)
    section["per_step"] = per_step
    section["summary_total"] = {key: summary[key] for key in ("trace", "kernels", "gpu_busy_ms", "span_ms")}
    size = sum(path.stat().st_size for path in trace_dir.rglob("*") if path.is_file())
    section["trace_bytes"] = size
    if size > PROFILE_MAX_BYTES:
        shutil.rmtree(trace_dir, ignore_errors=True)
        section["trace_kept"] = False
    else:
        section["trace_kept"] = True
    (ctx.out_dir / "decode_profile_summary.json").write_text(json.dumps(summary, indent=1))


# -- the table --------------------------------------------------------------------------------------
def table(result: dict) -> str:
    """The gemv rows one a line, the sweep one line a shape (its fastest configs), then the profile:
    short enough for a 12,000-character output tail; every row is in the JSON."""
    def cell(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-".rjust(int(spec.split(".")[0]))

    lines = [(f"{result.get('device', '?')}; copy ceiling {result.get('copy_GBps', '?')} GB/s; "
              f"{result.get('layers')} layers a stack; µs per call"),
             "shape   | batch | method              | config                   |      µs |   GB/s | % copy | rel err",
             "------- | ----- | ------------------- | ------------------------ | ------- | ------ | ------ | -------"]
    for row in result.get("rows", []):
        if row["part"] != "gemv":
            continue
        head = f"{row['shape']:7s} | {row['batch']:5d} | {row['method']:19s} | {row.get('config', ''):24s} | "
        if "us" not in row:
            lines.append(head + f"failed: {row.get('error', '?')[:150]}")
            continue
        lines.append(head + f"{cell(row.get('us'), '7.2f')} | {cell(row.get('GBps'), '6.0f')} | "
                     f"{cell(row.get('pct_copy'), '6.1f')} | {cell(row.get('rel_err'), '7.1e')}")
    layer = result.get("per_layer_us")
    if layer:
        lines.append("one decoder layer's 7 projections at batch 1, µs (per-call µs x projections): "
                     + ", ".join(f"{key} {value}" for key, value in layer.items()))
    for shape in dict.fromkeys(row["shape"] for row in result.get("rows", []) if row["part"] == "sweep"):
        rows = [row for row in result["rows"] if row["part"] == "sweep" and row["shape"] == shape]
        timed = sorted((row for row in rows if row.get("ok") and row.get("us")), key=lambda row: row["us"])
        default = next((row for row in rows if row["method"] == "default"), {})
        failed = [row for row in rows if not row.get("ok")]
        line = (f"sweep {shape} b1, {len(rows)} configs; default {default.get('config', '?')} "
                f"{default.get('us', '-')} µs ({default.get('pct_copy', '-')} %); fastest: "
                + "; ".join(f"{row['config']} {row['us']} µs {row['pct_copy']} % ({row.get('speedup_vs_default', '-')}x)"
                            for row in timed[:5]))
        if failed:
            line += f"; {len(failed)} failed, e.g. {failed[0]['config']}: {failed[0].get('error', '?')[:120]}"
        lines.append(line)
    if result.get("sweep_not_run"):
        lines.append(f"sweep configs not run (budget): {result['sweep_not_run']}")
    profile = result.get("profile")
    if profile and "per_step" in profile:
        per_step = profile["per_step"]
        lines.append(f"decode step ({profile['model']} batch 1, pallas): {profile['step_ms']} ms a token (step loop), "
                     f"bound {profile['bound_ms_per_step']} ms ({profile['pct_of_bound']} %, "
                     f"{profile['beyond_bound_us_per_layer']} µs a layer beyond it); per step: GPU busy "
                     f"{per_step['gpu_busy_ms']} ms over a {per_step['span_ms']} ms span, {per_step['kernels']} kernels")
        lines.append("  by class ms/step: " + ", ".join(f"{k} {v}" for k, v in per_step["by_class_ms"].items()))
        if "gaps" in per_step:
            lines.append("  idle between kernels per step: " + ", ".join(
                f"{k}: {v['gaps_per_step']} gaps {v['idle_ms_per_step']} ms" for k, v in per_step["gaps"].items()))
        lines.append("  top kernels, per step:")
        for row in per_step["top_kernels"][:12]:
            lines.append(f"  {row['ms']:8.4f} ms {row['calls']:6.1f}x  {row['class']:14s} {row['name'][:60]}  "
                         f"{row['hlo'][:40]}")
    elif profile and profile.get("error"):
        lines.append(f"profile failed: {profile['error'][:300]}")
    return "\n".join(lines)


def per_layer_summary(result: dict) -> dict[str, float]:
    """Batch-1 µs of one decoder layer's seven projections per method, and the copy bound's."""
    counts = {name: count for name, _, _, count in result["shapes"]}
    sums: dict[str, float] = {}
    complete: dict[str, set] = {}
    for row in result["rows"]:
        if row["part"] == "gemv" and row["batch"] == 1 and row.get("us"):
            sums[row["method"]] = sums.get(row["method"], 0.0) + counts[row["shape"]] * row["us"]
            complete.setdefault(row["method"], set()).add(row["shape"])
    summary = {"copy_bound": round(sum(count * call_bytes(1, d_in, d_out) / (result["copy_GBps"] * 1e3)
                                       for _, d_in, d_out, count in result["shapes"]), 2)}
    summary.update({method: round(total, 2) for method, total in sums.items() if complete[method] == set(counts)})
    return summary


def sweep_best(result: dict) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for row in result["rows"]:
        usable = row["part"] == "sweep" and row.get("ok") and row.get("us")
        if usable and (row["shape"] not in best or row["us"] < best[row["shape"]]["us"]):
            best[row["shape"]] = {key: row.get(key) for key in ("config", "blocks", "us", "pct_copy", "speedup_vs_default")}
    return best


# -- driver -----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="gemv,sweep,profile",
                        type=lambda text: [item for item in text.split(",") if item])
    parser.add_argument("--budget", type=float, default=135.0, help="seconds from the start; no new row after")
    parser.add_argument("--batches", default="1,32", type=lambda text: [int(item) for item in text.split(",")])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--sweep-limit", type=int, default=24, help="configs per shape")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-program-ms", type=float, default=MIN_PROGRAM_MS)
    parser.add_argument("--copy-gib", type=float, default=2.0)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="CPU (interpret mode), tiny shapes: checks the script")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/fastft_decode_kernels"))
    args = parser.parse_args(argv)
    unknown = set(args.parts) - {"gemv", "sweep", "profile"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; use gemv, sweep and/or profile")
    args.shapes = LLAMA3_8B_SHAPES
    if args.smoke:
        args.shapes, args.layers, args.batches, args.sweep_limit = SMOKE_SHAPES, 3, [1, 3], 2
        args.iters, args.warmup, args.copy_gib = 2, 1, 0.01
        args.model, args.prompt_len, args.profile_steps = "tiny-llama", 8, 2
        args.min_program_ms = 0.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "_start": start, "device": device.device_kind, "platform": device.platform, "jax_version": jax.__version__,
        "parts": args.parts, "layers": args.layers, "batches": args.batches, "smoke": args.smoke,
        "shapes": [list(shape) for shape in args.shapes], "rows": [],
    }
    ctx = Context(args, result, out_dir, start + args.budget)
    replicate_below_ms = timing._REPLICATE_BELOW_MS
    if args.smoke:
        # On the CPU every program is shorter than the GPU-sized threshold below which time_ms
        # replicates it 32 times; the replicas would only add compile time to a check of the script.
        timing._REPLICATE_BELOW_MS = 0.0
    try:
        run_parts(ctx)
    finally:
        timing._REPLICATE_BELOW_MS = replicate_below_ms
    result["table"] = table(result)
    ctx.save()
    log("\n" + result["table"])
    log(f"== done in {time.time() - start:.0f} s; {out_dir / 'decode_kernels.json'}")
    return 0


def run_parts(ctx: Context) -> None:
    args, result, start = ctx.args, ctx.result, ctx.result["_start"]
    log(f"== {result['device']} ({result['platform']}), jax {jax.__version__}; parts {','.join(args.parts)}, "
        f"budget {args.budget:.0f} s")
    result["copy_GBps"] = round(copy_ceiling_gbps(args.copy_gib, 1, 5 if args.smoke else 10), 1)
    log(f"== copy ceiling {result['copy_GBps']} GB/s ({time.time() - start:.0f} s)")
    ctx.save()

    if "profile" in args.parts and ctx.left() > 0:
        log(f"== profile of the decode step ({time.time() - start:.0f} s)")
        try:
            profile_decode(ctx)
        except Exception as error:  # noqa: BLE001 - the kernel rows stand without it
            result.setdefault("profile", {})["error"] = short_error(error)
            print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
        ctx.save()

    if "gemv" in args.parts:
        for index, shape in enumerate(args.shapes):
            if ctx.left() <= 0:
                break
            log(f"== gemv {shape[0]} [{shape[1]} -> {shape[2]}] x {args.layers} layers ({time.time() - start:.0f} s)")
            stack = make_stack(args.seed + index, args.layers, shape[1], shape[2])
            gemv_shape(ctx, shape, stack)
            stack.delete()
        result["per_layer_us"] = per_layer_summary(result)
        ctx.save()

    if "sweep" in args.parts:
        for index, shape in enumerate(args.shapes):
            if ctx.left() <= 0:
                break
            shape_deadline = time.time() + ctx.left() / (len(args.shapes) - index)
            log(f"== sweep {shape[0]} [{shape[1]} -> {shape[2]}] until +{shape_deadline - start:.0f} s "
                f"({time.time() - start:.0f} s)")
            stack = make_stack(args.seed + index, args.layers, shape[1], shape[2])
            sweep_shape(ctx, shape, stack, shape_deadline)
            stack.delete()
        result["sweep_best"] = sweep_best(result)


if __name__ == "__main__":
    sys.exit(main())

"""Matmul-bound kernels on the GPU: lora_linear and fused_linear_cross_entropy against XLA's
compilation of their pure-jnp references, bfloat16, 16384 tokens.

lora_linear (r=16, scale 2): Llama-3-8B q_proj 4096->4096, gate 4096->14336, down 14336->4096.
  Implementations: "reference" (XLA autodiff of lora_linear_reference), "xla" (our hand-written
  backward, jnp.dot), "pallas" (Triton matmul with the adapter fused into the epilogue, forward
  and dx), and "base" (the plain x @ w matmul alone: the floor any LoRA layer can reach).
  Forward and forward+backward (jax.vjp with a random cotangent, returning output and dx, da,
  db). TFLOP/s count the useful FLOPs (forward 2 m (in out + r (in + out)); backward 2 m in out
  + 4 m r (in + out); w gets no gradient) and are also given as % of a bf16 matmul peak measured
  here (jnp.dot 8192^3). Unless --no-sweep, a few block sizes of the Pallas kernel at the gate
  shape.
fused_linear_cross_entropy: Llama-3 (d 4096, vocab 128256) and Qwen2.5-7B (d 3584, vocab 152064).
  Implementations: "reference" (materialises [n, vocab] float32 logits), "chunked", "pallas".
  Forward, forward+backward with w trainable (value_and_grad w.r.t. hidden and w) and with w
  frozen (w.r.t. hidden only). Memory: the compiled temp size (memory_analysis) of each, and,
  unless --no-peak, the device peak (memory_stats peak_bytes_in_use less the inputs) of the
  trainable forward+backward, each measured in a fresh subprocess (run before this process touches
  the GPU, autotuning off there) so that one implementation's peak does not hide another's.
Correctness at the bench shapes: relative error max|diff| / max|ref| of every output and
gradient against the bfloat16 reference and against the reference evaluated in float32 (precision
highest) on the same inputs. This also proves that every kernel compiles through Triton.

Timing: AOT-compiled jit functions, warm-up calls, then the median of individual calls each ended
by block_until_ready.

Run from the repository root: python bench/kernels_matmul.py [--iters N] [--no-sweep] [--no-peak]
  [--skip-lora] [--skip-ce]
CPU smoke test of the script (interpret mode, tiny shapes): python bench/kernels_matmul.py --smoke
Writes $OUT/kernels_matmul.json when OUT is set (rewritten after every section).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import short_error, time_ms  # noqa: E402

from pallas_kernels.cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from pallas_kernels.lora_linear import MatmulBlocks, lora_linear, lora_linear_reference  # noqa: E402

DTYPE = jnp.bfloat16
RANK, SCALE = 16, 2.0
LORA_SHAPES = {"q_proj": (4096, 4096), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
CE_MODELS = {"llama3": (4096, 128256), "qwen2.5-7b": (3584, 152064)}
SMOKE_LORA_SHAPES = {"q_proj": (256, 256), "gate_proj": (256, 384)}
SMOKE_CE_MODELS = {"tiny": (128, 1000)}
CE_IMPLS = ("reference", "chunked", "pallas")
LORA_SWEEP = (
    MatmulBlocks(128, 128, 64, 8, 8, 3),
    MatmulBlocks(128, 128, 64, 8, 4, 4),
    MatmulBlocks(128, 256, 64, 8, 8, 3),
    MatmulBlocks(256, 128, 64, 8, 8, 3),
    MatmulBlocks(64, 128, 64, 8, 4, 4),
    MatmulBlocks(128, 128, 32, 8, 4, 5),
)






def compile_fn(fn: Callable, *args):
    return jax.jit(fn).lower(*args).compile()


def temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


@jax.jit
def _relative_error(got, want):
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))


def relative_errors(names, got, want) -> dict[str, float]:
    return {name: float(_relative_error(g, w)) for name, g, w in zip(names, got, want)}


def matmul_peak_tflops(size: int, warmup: int, iters: int) -> float:
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a = jax.random.normal(keys[0], (size, size), DTYPE)
    b = jax.random.normal(keys[1], (size, size), DTYPE)
    ms = time_ms(compile_fn(jnp.dot, a, b), a, b, warmup=warmup, iters=iters)
    return 2.0 * size**3 / (ms * 1e-3) / 1e12


def write_results(results: dict[str, Any]) -> None:
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "kernels_matmul.json").write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------------------------------------
# lora_linear
# ---------------------------------------------------------------------------------------------


def lora_fn(impl: str, blocks: MatmulBlocks | None = None):
    if impl == "reference":
        return lambda x, w, a, b: lora_linear_reference(x, w, a, b, SCALE)
    if impl == "base":
        return lambda x, w, a, b: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return lambda x, w, a, b: lora_linear(x, w, a, b, SCALE, impl=impl, blocks=blocks)


def lora_forward_backward(fn):
    def run(x, w, a, b, cotangent):
        out, vjp = jax.vjp(lambda x, a, b: fn(x, w, a, b), x, a, b)
        return (out, *vjp(cotangent))

    return run


def lora_inputs(tokens: int, d_in: int, d_out: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (tokens, d_in), jnp.float32).astype(DTYPE)
    w = (jax.random.normal(keys[1], (d_in, d_out), jnp.float32) / np.sqrt(d_in)).astype(DTYPE)
    a = (jax.random.normal(keys[2], (d_in, RANK), jnp.float32) / np.sqrt(d_in)).astype(DTYPE)
    b = (0.1 * jax.random.normal(keys[3], (RANK, d_out), jnp.float32)).astype(DTYPE)
    cotangent = jax.random.normal(keys[4], (tokens, d_out), jnp.float32).astype(DTYPE)
    return x, w, a, b, cotangent


def lora_flops(tokens: int, d_in: int, d_out: int) -> tuple[float, float]:
    adapter = 2.0 * tokens * RANK * (d_in + d_out)
    forward = 2.0 * tokens * d_in * d_out + adapter
    backward = 2.0 * tokens * d_in * d_out + 2 * adapter
    return forward, forward + backward


def check_lora(name: str, tokens: int, d_in: int, d_out: int) -> list[dict[str, Any]]:
    x, w, a, b, cotangent = lora_inputs(tokens, d_in, d_out, seed=1)
    names = ("out", "dx", "da", "db")
    want_bf16 = jax.jit(lora_forward_backward(lora_fn("reference")))(x, w, a, b, cotangent)
    f32 = [t.astype(jnp.float32) for t in (x, w, a, b, cotangent)]
    with jax.default_matmul_precision("highest"):
        want_f32 = jax.jit(lora_forward_backward(lora_fn("reference")))(*f32)
    rows = []
    for impl in ("xla", "pallas"):
        row: dict[str, Any] = {"shape": name, "impl": impl}
        try:
            got = jax.jit(lora_forward_backward(lora_fn(impl)))(x, w, a, b, cotangent)
            row["vs_bf16_reference"] = relative_errors(names, got, want_bf16)
            row["vs_f32_reference"] = relative_errors(names, got, want_f32)
            row["bf16_reference_vs_f32_reference"] = relative_errors(names, want_bf16, want_f32)
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
            traceback.print_exc()
        print("check lora", row, flush=True)
        rows.append(row)
    return rows


def bench_lora(name, tokens, d_in, d_out, peak, warmup, iters) -> list[dict[str, Any]]:
    x, w, a, b, cotangent = lora_inputs(tokens, d_in, d_out)
    fwd_flops, fwd_bwd_flops = lora_flops(tokens, d_in, d_out)
    rows = []
    for impl in ("reference", "xla", "pallas", "base"):
        for pass_name, flops in (("fwd", fwd_flops), ("fwd+bwd", fwd_bwd_flops)):
            row: dict[str, Any] = {"shape": name, "tokens": tokens, "d_in": d_in, "d_out": d_out, "rank": RANK,
                                   "impl": impl, "pass": pass_name}
            try:
                if pass_name == "fwd":
                    args = (x, w, a, b)
                    compiled = compile_fn(lora_fn(impl), *args)
                else:
                    args = (x, w, a, b, cotangent)
                    compiled = compile_fn(lora_forward_backward(lora_fn(impl)), *args)
                ms = time_ms(compiled, *args, warmup=warmup, iters=iters)
                row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                row["pct_peak"] = 100.0 * row["tflops"] / peak
            except Exception as exc:  # noqa: BLE001
                row["error"] = short_error(exc)
                traceback.print_exc()
            print("lora", row, flush=True)
            rows.append(row)
    return rows


def sweep_lora(name, tokens, d_in, d_out, peak, warmup, iters) -> list[dict[str, Any]]:
    x, w, a, b, cotangent = lora_inputs(tokens, d_in, d_out)
    fwd_flops, fwd_bwd_flops = lora_flops(tokens, d_in, d_out)
    rows = []
    for blocks in LORA_SWEEP:
        row: dict[str, Any] = {"shape": name, "blocks": dataclasses.asdict(blocks)}
        try:
            fn = lora_fn("pallas", blocks)
            ms = time_ms(compile_fn(fn, x, w, a, b), x, w, a, b, warmup=warmup, iters=iters)
            row.update(fwd_ms=ms, fwd_pct_peak=100.0 * fwd_flops / (ms * 1e-3) / 1e12 / peak)
            fb = compile_fn(lora_forward_backward(fn), x, w, a, b, cotangent)
            ms = time_ms(fb, x, w, a, b, cotangent, warmup=warmup, iters=iters)
            row.update(fwd_bwd_ms=ms, fwd_bwd_pct_peak=100.0 * fwd_bwd_flops / (ms * 1e-3) / 1e12 / peak)
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
        print("sweep lora", row, flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# ---------------------------------------------------------------------------------------------


def ce_fn(impl: str):
    if impl == "reference":
        return lambda h, w, labels: fused_linear_cross_entropy_reference(h, w, labels)
    return lambda h, w, labels: fused_linear_cross_entropy(h, w, labels, impl=impl)


def ce_inputs(tokens: int, d: int, vocab: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(keys[0], (tokens, d), jnp.float32).astype(DTYPE)
    w = (2.0 * jax.random.normal(keys[1], (d, vocab), jnp.float32) / np.sqrt(d)).astype(DTYPE)
    labels = jax.random.randint(keys[2], (tokens,), 0, vocab, jnp.int32)
    # Prompt tokens are masked in SFT: ignore every 5th label.
    labels = jnp.where(jnp.arange(tokens) % 5 == 0, -100, labels)
    return hidden, w, labels


def ce_pass(impl: str, pass_name: str):
    fn = ce_fn(impl)
    if pass_name == "fwd":
        return fn
    argnums = (0, 1) if pass_name == "fwd+bwd" else 0
    return jax.value_and_grad(fn, argnums=argnums)


def check_ce(model: str, tokens: int, d: int, vocab: int) -> list[dict[str, Any]]:
    hidden, w, labels = ce_inputs(tokens, d, vocab, seed=1)
    names = ("loss", "dhidden", "dw")

    def flat(out):
        loss, (dh, dw) = out
        return loss, dh, dw

    want_bf16 = flat(jax.jit(ce_pass("reference", "fwd+bwd"))(hidden, w, labels))
    try:
        with jax.default_matmul_precision("highest"):
            want_f32 = flat(
                jax.jit(ce_pass("reference", "fwd+bwd"))(hidden.astype(jnp.float32), w.astype(jnp.float32), labels)
            )
    except Exception as exc:  # noqa: BLE001
        print("float32 reference failed:", short_error(exc), flush=True)
        want_f32 = None
    rows = []
    for impl in ("chunked", "pallas"):
        row: dict[str, Any] = {"model": model, "impl": impl}
        try:
            got = flat(jax.jit(ce_pass(impl, "fwd+bwd"))(hidden, w, labels))
            row["vs_bf16_reference"] = relative_errors(names, got, want_bf16)
            if want_f32 is not None:
                row["vs_f32_reference"] = relative_errors(names, got, want_f32)
                row["bf16_reference_vs_f32_reference"] = relative_errors(names, want_bf16, want_f32)
            frozen_dh = jax.jit(ce_pass(impl, "fwd+bwd frozen w"))(hidden, w, labels)[1]
            row["frozen_w_dhidden_vs_bf16_reference"] = float(_relative_error(frozen_dh, want_bf16[1]))
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
            traceback.print_exc()
        print("check ce", row, flush=True)
        rows.append(row)
    return rows


def bench_ce(model, tokens, d, vocab, peak, warmup, iters) -> list[dict[str, Any]]:
    hidden, w, labels = ce_inputs(tokens, d, vocab)
    matmul = 2.0 * tokens * d * vocab
    flops = {"fwd": matmul, "fwd+bwd": 3 * matmul, "fwd+bwd frozen w": 2 * matmul}
    rows = []
    for impl in CE_IMPLS:
        for pass_name in ("fwd", "fwd+bwd", "fwd+bwd frozen w"):
            row: dict[str, Any] = {"model": model, "tokens": tokens, "d": d, "vocab": vocab, "impl": impl,
                                   "pass": pass_name}
            try:
                compiled = compile_fn(ce_pass(impl, pass_name), hidden, w, labels)
                row["temp_bytes"] = temp_bytes(compiled)
                ms = time_ms(compiled, hidden, w, labels, warmup=warmup, iters=iters)
                row.update(ms=ms, tflops=flops[pass_name] / (ms * 1e-3) / 1e12)
                row["pct_peak"] = 100.0 * row["tflops"] / peak
            except Exception as exc:  # noqa: BLE001
                row["error"] = short_error(exc)
                traceback.print_exc()
            print("ce", row, flush=True)
            rows.append(row)
    return rows


def ce_peak_child(model: str, impl: str, tokens: int, d: int, vocab: int) -> None:
    """Runs in a fresh process: device peak of one trainable forward+backward, less the inputs."""
    hidden, w, labels = ce_inputs(tokens, d, vocab)
    jax.block_until_ready((hidden, w, labels))
    device = jax.devices()[0]
    if device.memory_stats() is None:
        raise SystemExit(f"{device.device_kind} reports no memory_stats")
    before = device.memory_stats()["bytes_in_use"]
    compiled = compile_fn(ce_pass(impl, "fwd+bwd"), hidden, w, labels)
    jax.block_until_ready(compiled(hidden, w, labels))
    stats = device.memory_stats()
    print("PEAK_JSON " + json.dumps({
        "model": model, "impl": impl, "inputs_bytes": before, "peak_bytes": stats["peak_bytes_in_use"],
        "peak_minus_inputs_bytes": stats["peak_bytes_in_use"] - before,
    }), flush=True)


def ce_peaks(models: dict[str, tuple[int, int]], tokens: int) -> list[dict[str, Any]]:
    rows = []
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip())
    for model, (d, vocab) in models.items():
        for impl in CE_IMPLS:
            cmd = [sys.executable, __file__, "--ce-peak-child", model, impl, str(tokens), str(d), str(vocab)]
            row: dict[str, Any] = {"model": model, "impl": impl}
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_JSON ")]
                if lines:
                    row = json.loads(lines[-1][len("PEAK_JSON "):])
                else:
                    row["error"] = (done.stderr.strip().splitlines() or ["no output"])[-1][:400]
            except Exception as exc:  # noqa: BLE001
                row["error"] = short_error(exc)
            print("peak ce", row, flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_tables(results: dict[str, Any]) -> None:
    print(f"\n{results['device']}  jax {results['jax']}  bf16 matmul peak {results['matmul_peak_tflops']:.0f} TFLOP/s")
    if results.get("lora"):
        print("\nlora_linear (r=16, bf16): ms / TFLOP/s / % of matmul peak")
        print(f"{'shape':10} {'impl':10} {'fwd ms':>8} {'TF/s':>6} {'%pk':>5} {'f+b ms':>8} {'TF/s':>6} {'%pk':>5}")
        by_key: dict[tuple, dict] = {}
        for row in results["lora"]:
            by_key[(row["shape"], row["impl"], row["pass"])] = row
        for shape, impl in dict.fromkeys((r["shape"], r["impl"]) for r in results["lora"]):
            cells = []
            for pass_name in ("fwd", "fwd+bwd"):
                row = by_key.get((shape, impl, pass_name), {})
                if "ms" in row:
                    cells.append(f"{row['ms']:8.2f} {row['tflops']:6.0f} {row['pct_peak']:5.0f}")
                else:
                    cells.append(f"{'ERR':>8} {'':6} {'':5}")
            print(f"{shape:10} {impl:10} {' '.join(cells)}")
    for row in results.get("lora_check", []):
        if "error" in row:
            print(f"check lora {row['shape']} {row['impl']}: ERROR {row['error']}")
        else:
            errors = " ".join(f"{k}={v:.1e}" for k, v in row["vs_f32_reference"].items())
            ref = " ".join(f"{k}={v:.1e}" for k, v in row["bf16_reference_vs_f32_reference"].items())
            print(f"check lora {row['shape']:10} {row['impl']:7} vs f32 ref: {errors}   (bf16 ref: {ref})")
    if results.get("lora_sweep"):
        print("\nlora_linear pallas block sweep (gate_proj)")
        for row in results["lora_sweep"]:
            blocks = row["blocks"]
            label = f"{blocks['block_m']}x{blocks['block_n']}x{blocks['block_k']} w{blocks['num_warps']} s{blocks['num_stages']}"
            if "error" in row:
                print(f"  {label:24} ERROR {row['error'][:120]}")
            else:
                print(f"  {label:24} fwd {row['fwd_ms']:7.2f} ms ({row['fwd_pct_peak']:3.0f}%)  "
                      f"fwd+bwd {row['fwd_bwd_ms']:7.2f} ms ({row['fwd_bwd_pct_peak']:3.0f}%)")
    if results.get("cross_entropy"):
        print(f"\nfused_linear_cross_entropy ({results['tokens']} tokens, bf16): ms (compiled temp GiB);"
              " peak: device peak of fwd+bwd less the inputs")
        print(f"{'model':11} {'impl':10} {'fwd':>16} {'fwd+bwd':>16} {'fwd+bwd frozen w':>18} {'peak GiB':>9}")
        by_key = {(r["model"], r["impl"], r["pass"]): r for r in results["cross_entropy"]}
        peaks = {(r["model"], r["impl"]): r for r in results.get("cross_entropy_peak", [])}
        for model, impl in dict.fromkeys((r["model"], r["impl"]) for r in results["cross_entropy"]):
            cells = []
            for pass_name, width in (("fwd", 16), ("fwd+bwd", 16), ("fwd+bwd frozen w", 18)):
                row = by_key.get((model, impl, pass_name), {})
                cell = f"{row['ms']:.1f} ({gib(row.get('temp_bytes'))})" if "ms" in row else "ERR"
                cells.append(f"{cell:>{width}}")
            peak = peaks.get((model, impl), {}).get("peak_minus_inputs_bytes")
            print(f"{model:11} {impl:10} {' '.join(cells)} {gib(peak):>9}")
    for row in results.get("cross_entropy_check", []):
        if "error" in row:
            print(f"check ce {row['model']} {row['impl']}: ERROR {row['error']}")
            continue
        errors = " ".join(f"{k}={v:.1e}" for k, v in row.get("vs_f32_reference", row["vs_bf16_reference"]).items())
        which = "f32" if "vs_f32_reference" in row else "bf16"
        print(f"check ce {row['model']:11} {row['impl']:7} vs {which} ref: {errors}"
              f"  frozen-w dh vs bf16 ref={row['frozen_w_dhidden_vs_bf16_reference']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-peak", action="store_true")
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--skip-ce", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU run of the script")
    parser.add_argument("--ce-peak-child", nargs=5, metavar=("MODEL", "IMPL", "TOKENS", "D", "VOCAB"))
    args = parser.parse_args()

    if args.ce_peak_child:
        model, impl, tokens, d, vocab = args.ce_peak_child
        ce_peak_child(model, impl, int(tokens), int(d), int(vocab))
        return

    lora_shapes, ce_models = LORA_SHAPES, CE_MODELS
    if args.smoke:
        lora_shapes, ce_models = SMOKE_LORA_SHAPES, SMOKE_CE_MODELS
        args.tokens, args.iters, args.warmup, args.peak_size = 64, 2, 1, 256
        args.no_peak = True

    results: dict[str, Any] = {"jax": jax.__version__, "tokens": args.tokens}
    # The peak-memory children run first, while this process holds no GPU memory.
    if not args.skip_ce and not args.no_peak:
        results["cross_entropy_peak"] = ce_peaks(ce_models, args.tokens)
    results["device"] = str(jax.devices()[0].device_kind)
    results["matmul_peak_tflops"] = peak = matmul_peak_tflops(args.peak_size, args.warmup, args.iters)
    print(f"device {results['device']}: bf16 jnp.dot {args.peak_size}^3 at {peak:.0f} TFLOP/s", flush=True)
    write_results(results)

    if not args.skip_lora:
        results["lora_check"], results["lora"] = [], []
        for name, (d_in, d_out) in lora_shapes.items():
            results["lora_check"] += check_lora(name, args.tokens, d_in, d_out)
            results["lora"] += bench_lora(name, args.tokens, d_in, d_out, peak, args.warmup, args.iters)
            write_results(results)
        if not args.no_sweep:
            name = "gate_proj"
            d_in, d_out = lora_shapes[name]
            results["lora_sweep"] = sweep_lora(name, args.tokens, d_in, d_out, peak, args.warmup, args.iters)
            write_results(results)

    if not args.skip_ce:
        results["cross_entropy_check"], results["cross_entropy"] = [], []
        for model, (d, vocab) in ce_models.items():
            results["cross_entropy_check"] += check_ce(model, args.tokens, d, vocab)
            results["cross_entropy"] += bench_ce(model, args.tokens, d, vocab, peak, args.warmup, args.iters)
            write_results(results)

    print_tables(results)


if __name__ == "__main__":
    main()

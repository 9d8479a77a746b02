"""Memory-bound kernels on the GPU: RMSNorm, SwiGLU and RoPE, Pallas-Triton against XLA's fusion
of the pure-jnp reference, at Llama-3-8B and Qwen2.5-7B training shapes (16384 tokens, bfloat16).

For each op and model it
  - checks the kernel against the reference at the benchmark shape (relative error
    max|diff| / max|ref| of every output and gradient, against the bfloat16 reference and against
    the reference evaluated in float32 on the same inputs), which also validates the Triton lowering;
  - times the forward, the backward alone (the vjp function of a forward run beforehand, jitted)
    and the forward+backward (jax.vjp, the forward output returned so it stays alive), each under
    jax.jit: warm-up calls, then the median of individual calls, each ended by block_until_ready.
    In fwd+bwd XLA may fuse the reference's forward into its backward, which a real model, whose
    backward runs layers after its forward, does not allow; the bwd row is the fairer backward;
  - reports ms, GB/s over the op's logical traffic (every input read once and every output written
    once, the same count for kernel and XLA), that as a % of a measured device-to-device copy
    (x + 1 on a 2 GiB array, read + write), and the ratio kernel / XLA (< 1: the kernel is faster).
Then, unless --no-sweep, it times the kernels' forward+backward at a few other block sizes.

Run from the repository root: python bench/kernels_memory_bound.py [--iters N] [--no-sweep]
(a CPU smoke test of the script itself: --batch 1 --seq 8 --iters 2 --warmup 1 --copy-gib 0.01)
Writes $OUT/kernels_memory_bound.json when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import copy_bandwidth_gbps, relative_error, time_ms  # noqa: E402

from pallas_kernels import rms_norm as rms_norm_module  # noqa: E402
from pallas_kernels import rope as rope_module  # noqa: E402
from pallas_kernels import swiglu as swiglu_module  # noqa: E402

DTYPE = jnp.bfloat16
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
MODELS = {
    # hidden, intermediate, q heads, kv heads, head_dim, rms eps, rope theta, rope scaling
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads_q=32, heads_kv=8, head_dim=128,
                      eps=1e-5, theta=500_000.0, scaling=LLAMA3_SCALING),
    "qwen2.5-7b": dict(hidden=3584, intermediate=18944, heads_q=28, heads_kv=4, head_dim=128,
                       eps=1e-6, theta=1_000_000.0, scaling=None),
}


@dataclasses.dataclass
class Case:
    op: str
    model: str
    shape: str
    kernel: Callable  # (*differentiable, *aux) -> output(s)
    reference: Callable
    differentiable: tuple  # arrays the vjp differentiates
    aux: tuple = ()  # non-differentiable arrays (positions)
    # The least a backward must move: what it reads (the cotangent and the saved tensors it needs)
    # and the gradients it writes. Per op, because ops differ: RoPE's backward reads no input, the
    # fused residual norm writes one gradient that serves both of its inputs.
    backward_bytes: int = 0


def make_cases(model: str, batch: int, seq: int, rng: np.random.Generator) -> list[Case]:
    cfg = MODELS[model]
    tokens = batch * seq
    hidden, intermediate, head_dim = cfg["hidden"], cfg["intermediate"], cfg["head_dim"]

    def normal(shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale, DTYPE)

    eps, theta, scaling = cfg["eps"], cfg["theta"], cfg["scaling"]
    x, residual = normal((tokens, hidden)), normal((tokens, hidden))
    weight = jnp.asarray(1.0 + 0.1 * rng.standard_normal(hidden, dtype=np.float32), DTYPE)
    gate, up = normal((tokens, intermediate), 2.0), normal((tokens, intermediate))
    q = normal((batch, seq, cfg["heads_q"], head_dim))
    k = normal((batch, seq, cfg["heads_kv"], head_dim))
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def rope_reference_qk(q, k, positions):
        rotate = lambda t: rope_module.rope_reference(t, positions, theta=theta, scaling=scaling)  # noqa: E731
        return rotate(q), rotate(k)

    def residual_reference(x, residual, weight):
        summed = x + residual
        return rms_norm_module.rms_norm_reference(summed, weight, eps), summed

    stream, weights = x.nbytes, 2 * weight.nbytes  # the weight read, and its gradient written
    return [
        # reads x and dy, writes dx (and dweight)
        Case("rms_norm", model, f"[{tokens}, {hidden}]",
             lambda x, w: rms_norm_module.rms_norm(x, w, eps),
             lambda x, w: rms_norm_module.rms_norm_reference(x, w, eps), (x, weight),
             backward_bytes=3 * stream + weights),
        # reads d_normed, d_summed and the saved sum, writes one d_stream for both inputs
        Case("rms_norm+residual", model, f"[{tokens}, {hidden}]",
             lambda x, r, w: rms_norm_module.rms_norm(x, w, eps, residual=r),
             residual_reference, (x, residual, weight), backward_bytes=4 * stream + weights),
        # reads gate, up and dh, writes dgate and dup
        Case("swiglu", model, f"[{tokens}, {intermediate}]",
             swiglu_module.swiglu, swiglu_module.swiglu_reference, (gate, up),
             backward_bytes=5 * gate.nbytes),
        # reads dq and dk, writes their inverse rotations
        Case("rope_qk", model, f"q{list(q.shape)} k{list(k.shape)}",
             lambda q, k, p: rope_module.rope_qk(q, k, p, theta=theta, scaling=scaling),
             rope_reference_qk, (q, k), (positions,), backward_bytes=2 * (q.nbytes + k.nbytes) + positions.nbytes),
    ]


def forward_fn(fn):
    return jax.jit(lambda differentiable, aux: fn(*differentiable, *aux))


def forward_backward_fn(fn):
    @jax.jit
    def run(differentiable, aux, cotangent):
        out, vjp = jax.vjp(lambda *d: fn(*d, *aux), *differentiable)
        return out, vjp(cotangent)

    return run


def backward_fn(fn, differentiable, aux):
    """The backward alone: the forward runs once here, its residuals are inputs of the timed call."""
    _, vjp = jax.jit(lambda d, a: jax.vjp(lambda *x: fn(*x, *a), *d))(differentiable, aux)
    return jax.jit(lambda vjp, cotangent: vjp(cotangent)), vjp


def nbytes(tree) -> int:
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))




def random_cotangent(case: Case, rng: np.random.Generator):
    out_shapes = jax.eval_shape(lambda d, a: case.reference(*d, *a), case.differentiable, case.aux)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32), s.dtype), out_shapes
    )


def check_case(case: Case, cotangent) -> dict[str, Any]:
    """Kernel vs the bf16 reference, and vs the reference in float32 math on the same inputs."""
    kernel_out, kernel_grads = forward_backward_fn(case.kernel)(case.differentiable, case.aux, cotangent)
    ref_out, ref_grads = forward_backward_fn(case.reference)(case.differentiable, case.aux, cotangent)
    upcast = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    f32_out, f32_grads = forward_backward_fn(case.reference)(upcast(case.differentiable), case.aux, upcast(cotangent))
    names = [f"out{i}" for i in range(len(jax.tree.leaves(kernel_out)))]
    names += [f"grad{i}" for i in range(len(jax.tree.leaves(kernel_grads)))]
    kernel_leaves = jax.tree.leaves((kernel_out, kernel_grads))
    ref_leaves = jax.tree.leaves((ref_out, ref_grads))
    f32_leaves = jax.tree.leaves((f32_out, f32_grads))
    errors = {
        name: {"vs_bf16_reference": relative_error(k, r), "vs_f32_reference": relative_error(k, f)}
        for name, k, r, f in zip(names, kernel_leaves, ref_leaves, f32_leaves)
    }
    worst = max(e["vs_f32_reference"] for e in errors.values())
    return {"op": case.op, "model": case.model, "errors": errors, "worst_vs_f32": worst, "ok": worst <= 1e-2}


def time_pass(case: Case, fn, pass_name: str, cotangent, warmup: int, iters: int) -> float:
    """Milliseconds of one pass ("fwd", "bwd" alone, or "fwd+bwd") of fn on the case's inputs."""
    if pass_name == "fwd":
        return time_ms(forward_fn(fn), case.differentiable, case.aux, warmup=warmup, iters=iters)
    if pass_name == "bwd":
        backward, vjp = backward_fn(fn, case.differentiable, case.aux)
        return time_ms(backward, vjp, cotangent, warmup=warmup, iters=iters)
    return time_ms(forward_backward_fn(fn), case.differentiable, case.aux, cotangent, warmup=warmup, iters=iters)


def bench_case(case: Case, cotangent, copy_gbps: float, warmup: int, iters: int) -> list[dict[str, Any]]:
    rows = []
    out_shapes = jax.eval_shape(lambda d, a: case.reference(*d, *a), case.differentiable, case.aux)
    inputs_bytes = nbytes(case.differentiable) + nbytes(case.aux)
    forward_bytes = inputs_bytes + nbytes(out_shapes)
    # fwd+bwd as two passes: each moves at least its own minimum.
    backward_bytes = case.backward_bytes
    forward_backward_bytes = forward_bytes + backward_bytes

    for pass_name, traffic in [("fwd", forward_bytes), ("bwd", backward_bytes), ("fwd+bwd", forward_backward_bytes)]:
        kernel_ms = time_pass(case, case.kernel, pass_name, cotangent, warmup, iters)
        xla_ms = time_pass(case, case.reference, pass_name, cotangent, warmup, iters)
        kernel_gbps = traffic / (kernel_ms * 1e-3) / 1e9
        xla_gbps = traffic / (xla_ms * 1e-3) / 1e9
        rows.append({
            "op": case.op, "model": case.model, "shape": case.shape, "pass": pass_name,
            "bytes": traffic, "kernel_ms": kernel_ms, "xla_ms": xla_ms,
            "kernel_GBps": kernel_gbps, "xla_GBps": xla_gbps,
            "kernel_pct_copy": 100 * kernel_gbps / copy_gbps, "xla_pct_copy": 100 * xla_gbps / copy_gbps,
            "kernel_over_xla": kernel_ms / xla_ms,
        })
    return rows


# Block settings the sweep tries, per kernel module: (module, attribute, values), or
# (module, (attribute, ...), ((value, ...), ...)) for settings that only make sense together.
SWEEPS = {
    # The backward's settings were swept in the third and fourth sessions (bench/RESULTS.md); what is
    # open is the forward (72 % of copy). Persistent programs did not help (sixth session); next:
    # warps per row (Inductor runs a 4096-wide row on 8-16) and the loads' eviction hint.
    "rms_norm": [(rms_norm_module, "_ELEMENTS_PER_THREAD", (8, 16, 32)),
                 (rms_norm_module, "_FORWARD_LOAD_EVICTION", (None, "evict_first", "evict_last")),
                 (rms_norm_module, ("_ELEMENTS_PER_THREAD", "_FORWARD_LOAD_EVICTION"), ((8, "evict_first"),)),
                 (rms_norm_module, "_FORWARD_PROGRAMS", (0, 512))],
    "swiglu": [(swiglu_module, "_BLOCK_ELEMENTS", (1024, 2048, 4096, 8192)),
               (swiglu_module, "_NUM_WARPS", (4, 8, 16))],
    # Tiles and warps were swept in the fourth to sixth sessions (no row beat the default); next:
    # the loads' eviction hint, alone and with two tokens a program.
    "rope_qk": [(rope_module, "_LOAD_EVICTION", (None, "evict_first", "evict_last")),
                (rope_module, ("_BLOCK_ELEMENTS", "_LOAD_EVICTION"), ((8192, "evict_first"),)),
                (rope_module, "_ELEMENTS_PER_THREAD", (16, 32))],
}


PASSES = ("fwd", "bwd", "fwd+bwd")


def _pass_key(pass_name: str) -> str:
    return f"{pass_name.replace('+', '_')}_ms"


def _time_setting(module, attributes, values, case: Case, cotangent, warmup: int, iters: int) -> dict[str, float]:
    """The kernel's three passes with module.attributes set to values (restored by the caller)."""
    for attribute, item in zip(attributes, values):
        setattr(module, attribute, item)
    # The custom_vjp traces are cached by function and shapes; without this a new setting would
    # silently reuse the kernel traced under the previous one.
    jax.clear_caches()
    return {_pass_key(pass_name): time_pass(case, case.kernel, pass_name, cotangent, warmup, iters)
            for pass_name in PASSES}


def sweep_case(case: Case, cotangent, warmup: int, iters: int) -> list[dict[str, Any]]:
    """Each setting is timed right after the defaults, and reported as well as a ratio to that
    neighbouring default: the card's clock drifts between rows (the same setting measured 0.187 and
    0.225 ms in one H200 sweep), and a pair timed seconds apart sees the same clock."""
    rows = []
    for module, attributes, values in SWEEPS.get(case.op, []):
        together = isinstance(attributes, tuple)
        attributes = attributes if together else (attributes,)
        defaults = tuple(getattr(module, attribute) for attribute in attributes)
        for value in values:
            value = value if together else (value,)
            setting = ",".join(f"{attribute}={item}" for attribute, item in zip(attributes, value))
            try:
                default_times = _time_setting(module, attributes, defaults, case, cotangent, warmup, iters)
                times = _time_setting(module, attributes, value, case, cotangent, warmup, iters)
                ratios = {key.replace("_ms", "_vs_default"): times[key] / default_times[key] for key in times}
                rows.append({"op": case.op, "model": case.model, "setting": setting, "default": value == defaults,
                             **times, **ratios, "default_times": default_times})
                print_sweep({"sweep": rows[-1:]}, header=False)  # as it goes: a cut-short run keeps it
            except Exception as error:  # a setting that does not compile is a finding, not a crash
                rows.append({"op": case.op, "model": case.model, "setting": setting,
                             "error": f"{type(error).__name__}: {error}"[:500]})
            finally:
                for attribute, item in zip(attributes, defaults):
                    setattr(module, attribute, item)
                jax.clear_caches()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="timed calls per measurement (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--models", default=",".join(MODELS), type=lambda text: text.split(","),
                        help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--ops", default=None, type=lambda text: text.split(","),
                        help="comma-separated subset of the ops (rms_norm, rms_norm_residual, swiglu, rope_qk)")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy-bandwidth array")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, device {device.device_kind} ({jax.default_backend()})", flush=True)
    if jax.default_backend() != "gpu":
        print("warning: not on a GPU; the kernels run in the Pallas interpreter and timings mean nothing")
    copy_measured = copy_bandwidth_gbps(args.copy_gib, args.warmup, args.iters)
    copy_gbps = max(copy_measured.values())
    print(f"device copy bandwidth ({args.copy_gib:g} GiB bf16, read + write): "
          + ", ".join(f"{name} {value:.0f} GB/s" for name, value in copy_measured.items())
          + f"; ceiling {copy_gbps:.0f} GB/s", flush=True)

    rng = np.random.default_rng()
    results: dict[str, Any] = {
        "jax": jax.__version__, "device": device.device_kind, "dtype": "bfloat16",
        "batch": args.batch, "seq": args.seq, "copy_GBps": copy_gbps, "copy_measured_GBps": copy_measured,
        "timing": f"median of {args.iters} samples after {args.warmup} warm-up calls; each sample is the mean "
                  "of back-to-back calls filling >= 5 ms (bench/timing.py)",
        "checks": [], "rows": [], "sweep": [], "failures": [],
    }
    for model in args.models:
        for case in make_cases(model, args.batch, args.seq, rng):
            if args.ops and case.op not in args.ops:
                continue
            label = f"{case.op} {model} {case.shape}"
            try:
                cotangent = random_cotangent(case, rng)
                check = check_case(case, cotangent)
                results["checks"].append(check)
                errors = ", ".join(
                    f"{name} {e['vs_bf16_reference']:.1e}/{e['vs_f32_reference']:.1e}"
                    for name, e in check["errors"].items()
                )
                print(f"check {label}: {'ok' if check['ok'] else 'FAIL'} "
                      f"(rel. error vs bf16 ref / vs f32 ref: {errors})", flush=True)
                results["rows"] += bench_case(case, cotangent, copy_gbps, args.warmup, args.iters)
                for row in results["rows"][-3:]:
                    print(f"  {row['pass']:8s} kernel {row['kernel_ms']:.3f} ms  xla {row['xla_ms']:.3f} ms  "
                          f"ratio {row['kernel_over_xla']:.2f}", flush=True)
            except Exception as error:
                traceback.print_exc()
                results["failures"].append({"case": label, "error": f"{type(error).__name__}: {error}"[:2000]})
    print_table(results)
    write_json(results)

    # The sweep comes last, so that a run cut short by a time limit still has the table above.
    if not args.no_sweep:
        for model in args.models:
            for case in make_cases(model, args.batch, args.seq, rng):
                if case.op in SWEEPS and (not args.ops or case.op in args.ops):
                    results["sweep"] += sweep_case(case, random_cotangent(case, rng), args.warmup,
                                                   max(10, args.iters // 2))
        print_sweep(results)
        write_json(results)


def print_table(results: dict[str, Any]) -> None:
    header = (f"{'op':18s} {'model':11s} {'pass':8s} {'kernel ms':>9s} {'xla ms':>8s} {'kern GB/s':>9s} "
              f"{'xla GB/s':>8s} {'kern %cp':>8s} {'xla %cp':>7s} {'k/xla':>6s}")
    print(f"\ncopy bandwidth {results['copy_GBps']:.0f} GB/s; {results['timing']}; bf16\n{header}\n{'-' * len(header)}")
    for row in results["rows"]:
        print(f"{row['op']:18s} {row['model']:11s} {row['pass']:8s} {row['kernel_ms']:9.3f} {row['xla_ms']:8.3f} "
              f"{row['kernel_GBps']:9.0f} {row['xla_GBps']:8.0f} {row['kernel_pct_copy']:7.0f}% "
              f"{row['xla_pct_copy']:6.0f}% {row['kernel_over_xla']:6.2f}")
    bad_checks = [c for c in results["checks"] if not c["ok"]]
    print(f"\nchecks: {len(results['checks']) - len(bad_checks)}/{len(results['checks'])} within 1e-2 of the "
          f"float32 reference; failures: {len(results['failures'])}", flush=True)


def print_sweep(results: dict[str, Any], header: bool = True) -> None:
    if header:
        print("\nblock-size sweep (kernel only; * = current default; ratios fwd / bwd / fwd+bwd against the "
              "defaults timed right before the row, < 1 is faster)")
    for row in results["sweep"]:
        if "error" in row:
            print(f"  {row['op']:18s} {row['model']:11s} {row['setting']:40s} ERROR {row['error'][:120]}")
        else:
            mark = "*" if row["default"] else " "
            ratios = (f"  vs default timed just before: {row['fwd_vs_default']:.2f} / {row['bwd_vs_default']:.2f}"
                      f" / {row['fwd_bwd_vs_default']:.2f}" if "fwd_vs_default" in row else "")
            print(f"  {row['op']:18s} {row['model']:11s} {row['setting']:40s}{mark} "
                  f"fwd {row['fwd_ms']:.3f} ms  bwd {row['bwd_ms']:.3f} ms  fwd+bwd {row['fwd_bwd_ms']:.3f} ms{ratios}",
                  flush=True)


def write_json(results: dict[str, Any]) -> None:
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "kernels_memory_bound.json"
        path.write_text(json.dumps(results, indent=1))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()

"""The Hopper (Mosaic GPU) flash attention on an H100/H200: correctness first, then speed.

(a) Correctness: output, dq, dk, dv of `flash_attention_hopper` against `attention_reference`
    evaluated in float32 on the same 16-bit inputs, as the relative norm of the difference
    ||got - ref|| / ||ref|| (tolerance 1e-2 for bf16 and fp16), PASS/FAIL per case. Cases: the
    shapes of tests/test_attention_hopper.py, GQA ratios 1, 2, 4, 6, 7, head_dim 64/80/96/128,
    lengths 1, 17, 1000, 2048, packed rows (5 segments and a padding tail, as bench/grad_parity.py's
    packed_batch builds them), non-causal and fewer queries than keys. An exception fails its case
    only. Three of the cases run again with fused_dq=True ("[fused dq]": the dK/dV kernel reduce-adds
    dQ, no separate dQ kernel).
(b) Speed: forward and forward+backward ms and TFLOP/s (causal counted as half of full; backward
    2.5x forward) at Llama-3-8B (32/8 heads, d=128) 2k/8k/16k tokens per row (batch * seq = 16k)
    and Qwen2.5-7B (28/4) 8k, beside cuDNN and our Triton `flash_attention`; then 8 packed
    sequences per 8k row (Llama-3-8B, batch 2) for both of our kernels. "hopper-fused-dq" is the
    fused-dQ backward (forward+backward only: its forward is "hopper"'s).

Run from the repository root on the GPU machine: python bench/attention_hopper_check.py
  --deadline S   skip the cases left after S seconds (default 110)
  --skip-speed   correctness only
  --skip-correctness   speed only
Writes $OUT/attention_hopper.json when OUT is set.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import gpu_check_args, record_timing, short_error  # noqa: E402
from pallas_kernels.attention import attention_reference, flash_attention  # noqa: E402
from pallas_kernels.attention_hopper import flash_attention_hopper, hopper_attention_available  # noqa: E402

TOLERANCE = 1e-2  # bf16 and fp16
CASE_TIMEOUT_S = 60  # compile + run of one correctness case; longer is a hang
MODELS = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}  # heads_q, heads_kv, head_dim


def packed_segment_ids(batch: int, seq: int, segments: int, seed: int) -> np.ndarray:
    """Rows cut into `segments` sequences at random points (ids 1..segments), the tail of every row
    padding (id 0, max(1, seq // 50) tokens), as bench/grad_parity.py's packed_batch builds them."""
    rng = np.random.default_rng(seed)
    segment_ids = np.ones((batch, seq), np.int32)
    segments = max(1, min(segments, seq - 1))
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), segments - 1, replace=False)) if segments > 1 else []
        bounds = [0, *map(int, cuts), seq]
        for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            segment_ids[row, start:end] = index
    segment_ids[:, -max(1, seq // 50):] = 0
    return segment_ids


def random_inputs(seed, batch, seq_q, seq_k, heads_q, heads_kv, head_dim, dtype):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shapes = [(batch, seq_q, heads_q, head_dim), (batch, seq_k, heads_kv, head_dim), (batch, seq_k, heads_kv, head_dim),
              (batch, seq_q, heads_q, head_dim)]
    return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(keys, shapes)]


def value_and_grads(fn):
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run)


def relative_norm(got, want) -> float:
    """||got - want|| / ||want||, the denominator floored at an RMS of 1e-3: some gradients are 0 in
    exact arithmetic (dq, dk of a query with one key) and their reference is then 0 or rounding
    noise, against which any 16-bit residue would look infinitely wrong. The inputs are unit
    normal, so real gradients have an RMS far above the floor."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-3 * np.sqrt(want.size)))


# (name, batch, seq_q, seq_k, heads_q, heads_kv, head_dim, dtype, causal, packed)
BF16, FP16 = jnp.bfloat16, jnp.float16
CORRECTNESS_CASES = [
    # the shapes tests/test_attention_hopper.py lowers
    ("llama3-8b 2048 causal", 1, 2048, 2048, 32, 8, 128, BF16, True, False),
    ("llama3-8b 2048 packed", 1, 2048, 2048, 32, 8, 128, BF16, True, True),
    ("qwen2.5-7b 1000 packed", 1, 1000, 1000, 28, 4, 128, BF16, True, True),
    ("d64 gqa1 300 non-causal fp16", 2, 300, 300, 4, 4, 64, FP16, False, False),
    ("d80 gqa6 17 packed fp16", 1, 17, 17, 6, 1, 80, FP16, True, True),
    # GQA ratios on packed rows
    *[(f"gqa{g} 1000 packed", 1, 1000, 1000, 2 * g, 2, 128, BF16, True, True) for g in (1, 2, 4, 6, 7)],
    # head dims
    *[(f"d{d} 2048 causal", 1, 2048, 2048, 8, 2, d, BF16, True, False) for d in (64, 80, 96)],
    ("d96 1000 packed", 2, 1000, 1000, 8, 2, 96, BF16, True, True),
    # lengths
    ("len 1 causal", 1, 1, 1, 4, 2, 128, BF16, True, False),
    ("len 1 packed (all padding)", 1, 1, 1, 4, 2, 128, BF16, True, True),
    ("len 17 causal", 2, 17, 17, 4, 2, 128, BF16, True, False),
    ("len 1000 non-causal", 1, 1000, 1000, 8, 2, 128, BF16, False, False),
    ("len 1000 non-causal packed", 1, 1000, 1000, 8, 2, 64, BF16, False, True),
    ("500 queries on 1500 keys d96", 1, 500, 1500, 16, 2, 96, BF16, True, False),
]
# cases run a second time with flash_attention_hopper(..., fused_dq=True)
FUSED_DQ_CASES = ("llama3-8b 2048 causal", "gqa4 1000 packed", "d96 1000 packed")


def correctness(deadline: float) -> list[dict[str, Any]]:
    rows = []
    runs = [(index, case, False) for index, case in enumerate(CORRECTNESS_CASES)]
    runs += [(index, case, True) for index, case in enumerate(CORRECTNESS_CASES) if case[0] in FUSED_DQ_CASES]
    for index, (name, batch, seq_q, seq_k, heads_q, heads_kv, head_dim, dtype, causal, packed), fused_dq in runs:
        name = f"{name} [fused dq]" if fused_dq else name
        row: dict[str, Any] = {"case": name, "shape": [batch, seq_q, seq_k, heads_q, heads_kv, head_dim],
                               "dtype": jnp.dtype(dtype).name, "causal": causal, "packed": packed,
                               "fused_dq": fused_dq}
        if time.perf_counter() > deadline:
            row["status"] = "SKIPPED (deadline)"
            rows.append(row)
            print(f"SKIP  {name}", flush=True)
            continue
        # A barrier mistake hangs the GPU rather than failing: name the case first, and after
        # CASE_TIMEOUT_S dump the stacks and exit (the rows so far are already in the JSON).
        print(f"RUN   {name}", flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        try:
            q, k, v, d_out = random_inputs(1000 + index, batch, seq_q, seq_k, heads_q, heads_kv, head_dim, dtype)
            segment_ids = jnp.asarray(packed_segment_ids(batch, seq_q, 5, seed=index)) if packed else None

            def ours(q, k, v, fused_dq=fused_dq):
                return flash_attention_hopper(q, k, v, causal=causal, segment_ids=segment_ids, fused_dq=fused_dq)

            def reference(q, k, v):
                return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids)

            got = value_and_grads(ours)(q, k, v, d_out)
            f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
            want = value_and_grads(reference)(*f32)
            errors = {part: relative_norm(g, w) for part, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
            row["errors"] = errors
            ok = all(e <= TOLERANCE for e in errors.values())
            if packed:
                # padding tokens (id 0): output and every gradient exactly 0, not merely small
                padding = np.asarray(segment_ids) == 0
                residue = max(float(np.max(np.abs(np.asarray(x, np.float32)[padding]), initial=0.0)) for x in got)
                row["padding_max_abs"] = residue
                ok = ok and residue == 0.0
            row["status"] = "PASS" if ok else "FAIL"
        except Exception as exc:  # noqa: BLE001
            row["status"] = "FAIL"
            row["error"] = short_error(exc)
            traceback.print_exc()
        faulthandler.cancel_dump_traceback_later()
        detail = row.get("error") or " ".join(f"{p}={e:.1e}" for p, e in row["errors"].items())
        if "padding_max_abs" in row:
            detail += f" padding_max_abs={row['padding_max_abs']:.1e}"
        print(f"{row['status']:5} {name}: {detail}", flush=True)
        rows.append(row)
        write_json({"correctness": rows})
    return rows


def write_json(results: dict[str, Any]) -> None:
    """$OUT/attention_hopper.json (when OUT is set), rewritten as results arrive."""
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "attention_hopper.json"
        path.write_text(json.dumps(results, indent=1))


def causal_flops(batch: int, seq: int, heads_q: int, head_dim: int) -> float:
    return 4.0 * batch * heads_q * seq * seq * head_dim / 2


def make_impl(name: str, segment_ids=None):
    if name in ("hopper", "hopper-fused-dq"):
        fused_dq = name == "hopper-fused-dq"

        def fn(q, k, v):
            return flash_attention_hopper(q, k, v, causal=True, segment_ids=segment_ids, fused_dq=fused_dq)
    elif name == "triton":
        def fn(q, k, v):
            return flash_attention(q, k, v, causal=True, segment_ids=segment_ids)
    elif name == "cudnn":
        def fn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    else:
        raise ValueError(name)
    return jax.jit(fn), value_and_grads(fn)


def speed(deadline: float, warmup: int, iters: int) -> list[dict[str, Any]]:
    # (model, seq, batch, segments or None)
    cases = [("llama3-8b", 2048, 8, None), ("llama3-8b", 8192, 2, None), ("llama3-8b", 16384, 1, None),
             ("qwen2.5-7b", 8192, 2, None), ("llama3-8b", 8192, 2, 8)]
    rows = []
    for model, seq, batch, segments in cases:
        heads_q, heads_kv, head_dim = MODELS[model]
        q, k, v, d_out = random_inputs(seq + batch, batch, seq, seq, heads_q, heads_kv, head_dim, jnp.bfloat16)
        segment_ids = None
        flops = causal_flops(batch, seq, heads_q, head_dim)
        if segments:
            segment_ids = jnp.broadcast_to(jnp.repeat(jnp.arange(1, segments + 1, dtype=jnp.int32), seq // segments),
                                           (batch, seq))
            flops /= segments  # causal within each of the equal segments
        impls = ("hopper", "hopper-fused-dq", "triton") if segments else ("hopper", "hopper-fused-dq", "cudnn", "triton")
        for impl in impls:
            row: dict[str, Any] = {"impl": impl, "model": model, "seq": seq, "batch": batch,
                                   "layout": f"{segments} packed" if segments else "one sequence per row"}
            if time.perf_counter() > deadline:
                row["error"] = "skipped (deadline)"
                rows.append(row)
                continue
            try:
                forward, fwd_bwd = make_impl(impl, segment_ids)
                for part, fn, args, part_flops in (("fwd", forward, (q, k, v), flops),
                                                   ("fwd_bwd", fwd_bwd, (q, k, v, d_out), 3.5 * flops)):
                    if part == "fwd" and impl == "hopper-fused-dq":
                        continue  # the same forward kernel as "hopper"
                    record_timing(row, part, fn, args, part_flops, warmup, iters)
            except Exception as exc:  # noqa: BLE001
                row["error"] = short_error(exc)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del q, k, v, d_out
    return rows


def print_speed_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'model':11} {'seq':>6} {'b':>2} {'layout':21} {'impl':15} {'fwd ms':>8} {'TF/s':>6} "
          f"{'f+b ms':>8} {'TF/s':>6}")
    for row in rows:
        def cell(part, key, fmt):
            value = row.get(f"{part}_{key}")
            return format(value, fmt) if value is not None else "-"

        line = (f"{row['model']:11} {row['seq']:>6} {row['batch']:>2} {row['layout']:21} {row['impl']:15} "
                f"{cell('fwd', 'ms', '8.3f'):>8} {cell('fwd', 'tflops', '6.0f'):>6} "
                f"{cell('fwd_bwd', 'ms', '8.3f'):>8} {cell('fwd_bwd', 'tflops', '6.0f'):>6}")
        errors = [row.get(key) for key in ("error", "fwd_error", "fwd_bwd_error") if row.get(key)]
        print(line + (f"  [{'; '.join(errors)[:160]}]" if errors else ""))


def main() -> None:
    args, deadline = gpu_check_args(__doc__.splitlines()[0])

    env: dict[str, Any] = {"jax": jax.__version__, "backend": jax.default_backend(),
                           "device": jax.devices()[0].device_kind, "hopper_available": hopper_attention_available()}
    try:
        from jax._src.lib import cuda_versions

        # attention_mgpu refuses causal masks on CUDA 12.8.0-12.9.0 (a ptxas miscompilation).
        env["cuda_runtime"] = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
    except Exception as exc:  # noqa: BLE001
        env["cuda_runtime"] = short_error(exc)
    print(json.dumps(env), flush=True)
    if not env["hopper_available"]:
        print("no sm90 GPU here: flash_attention_hopper cannot run; nothing measured")
        write_json({"env": env})
        return

    checks = [] if args.skip_correctness else correctness(deadline)
    passed = sum(row["status"] == "PASS" for row in checks)
    print(f"correctness: {passed}/{len(checks)} PASS", flush=True)
    speeds = [] if args.skip_speed else speed(deadline, args.warmup, args.iters)
    if speeds:
        print_speed_table(speeds)
    print(f"\ncorrectness: {passed}/{len(checks)} PASS; "
          f"failed: {[row['case'] for row in checks if row['status'] == 'FAIL']}")
    write_json({"env": env, "correctness": checks, "speed": speeds})
    if os.environ.get("OUT"):
        print(f"wrote {Path(os.environ['OUT']) / 'attention_hopper.json'}")


if __name__ == "__main__":
    main()

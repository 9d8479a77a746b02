"""Causal grouped-query attention on the GPU: our Pallas-Triton flash kernel against cuDNN, XLA,
JAX's Pallas `mha` example kernel and PyTorch SDPA (FlashAttention-2 backend), bfloat16.

Shapes: Llama-3-8B (32 q heads, 8 kv heads, head_dim 128) and Qwen2.5-7B (28 / 4, 128) at 2k, 8k
and 32k tokens per row (batch 8, 2, 1: 16k-32k tokens per call).

It
  - checks our kernel on the GPU against `attention_reference` evaluated in float32 on the same
    bfloat16 inputs (relative error max|diff| / max|ref| of out, dq, dk, dv) at moderate sizes,
    covering GQA 4 and 7, packed rows with padding, head_dim 80 / 96 and seq_q < seq_k. This also
    proves that every kernel variant compiles through Triton;
  - times forward and forward+backward (jax.vjp + the vjp call, jitted, returning output and
    gradients) of each implementation: warm-up calls, then the median of >= 20 calls each ended by
    block_until_ready (torch: CUDA events around each call). TFLOP/s count causal attention as half
    of full: forward 4*b*h*s^2*d / 2, backward 2.5x forward, forward+backward 3.5x forward;
  - packed rows: 8 sequences per 8k row (Llama-3-8B shape, batch 2), our kernel only, tokens/s
    against the same rows unpacked (one sequence per row);
  - unless --no-sweep, times a few block-size choices of our kernel at Llama-3-8B 8k.
A competitor that fails (import, unsupported shape, out of memory) is recorded with its error.
Notes: the Pallas `mha` kernel has no GQA, so K/V are repeated to the q heads before timing (its
dK/dV are then per q head, not summed); likewise PyTorch when enable_gqa is refused. XLA
materialises the [T, T] logits and is skipped where they cannot fit.

Run from the repository root: python bench/attention.py [--iters N] [--no-sweep]
CPU smoke test of the script itself (interpret mode, tiny shapes): python bench/attention.py --smoke
Writes $OUT/attention.json when OUT is set.
"""

from __future__ import annotations

import os

# Share the GPU with PyTorch in the same process: no up-front grab of most of the memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import record_timing, relative_error, short_error, time_ms  # noqa: E402

from pallas_kernels import attention as attention_module  # noqa: E402
from pallas_kernels.attention import BlockSizes, attention_reference, flash_attention  # noqa: E402

DTYPE = jnp.bfloat16
MODELS = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}  # heads_q, heads_kv, head_dim
SEQS = ((2048, 8), (8192, 2), (32768, 1))  # tokens per row, batch
XLA_MAX_LOGIT_BYTES = 24e9  # float32 [b, h, T, T] logits above this are not attempted with XLA




def causal_flops(batch: int, seq: int, heads_q: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention, counted as half of full attention."""
    return 4.0 * batch * heads_q * seq * seq * head_dim / 2






def random_qkv(key, batch, seq_q, seq_k, heads_q, heads_kv, head_dim):
    keys = jax.random.split(key, 4)
    q = jax.random.normal(keys[0], (batch, seq_q, heads_q, head_dim), DTYPE)
    k = jax.random.normal(keys[1], (batch, seq_k, heads_kv, head_dim), DTYPE)
    v = jax.random.normal(keys[2], (batch, seq_k, heads_kv, head_dim), DTYPE)
    d_out = jax.random.normal(keys[3], (batch, seq_q, heads_q, head_dim), DTYPE)
    return q, k, v, d_out


def forward_backward(fn: Callable) -> Callable:
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run)


# ----------------------------------------------------------------------------------------------
# Correctness on the GPU


def correctness_checks(smoke: bool) -> list[dict[str, Any]]:
    # (name, batch, seq_q, seq_k, heads_q, heads_kv, head_dim, causal, packed)
    cases = [
        ("llama3-8b 2k causal", 1, 2048, 2048, 32, 8, 128, True, False),
        ("qwen2.5-7b 2k packed+padding", 1, 2048, 2048, 28, 4, 128, True, True),
        ("head_dim 80, 1000 tokens, non-causal", 2, 1000, 1000, 8, 4, 80, False, False),
        ("head_dim 96, 500 queries on 1500 keys", 1, 500, 1500, 16, 2, 96, True, False),
        ("head_dim 64, 777 tokens, packed", 2, 777, 777, 8, 8, 64, True, True),
    ]
    if smoke:
        cases = [(n, b, max(sq // 16, 64), max(sk // 16, 64), hq // 4, max(hkv // 4, 1), d, c, p)
                 for n, b, sq, sk, hq, hkv, d, c, p in cases]
    results = []
    for index, (name, batch, seq_q, seq_k, heads_q, heads_kv, head_dim, causal, packed) in enumerate(cases):
        row: dict[str, Any] = {"check": name, "shape": [batch, seq_q, seq_k, heads_q, heads_kv, head_dim]}
        try:
            q, k, v, d_out = random_qkv(jax.random.PRNGKey(100 + index), batch, seq_q, seq_k, heads_q, heads_kv,
                                        head_dim)
            segment_ids = None
            if packed:
                # Uneven sequences, then 37 padding tokens (segment 0) at the end of each row.
                rng = np.random.default_rng(index)
                cuts = np.sort(rng.choice(np.arange(1, seq_q - 40), size=3, replace=False))
                row_ids = np.zeros(seq_q, np.int32)
                for segment, (start, stop) in enumerate(zip([0, *cuts], [*cuts, seq_q - 37])):
                    row_ids[start:stop] = segment + 1
                segment_ids = jnp.asarray(np.tile(row_ids, (batch, 1)))
            ours = forward_backward(lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=segment_ids))
            reference = forward_backward(
                lambda q, k, v: attention_reference(q, k, v, causal=causal, segment_ids=segment_ids)
            )
            got = ours(q, k, v, d_out)
            want = reference(*(x.astype(jnp.float32) for x in (q, k, v, d_out)))
            for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                row[f"rel_err_{label}"] = relative_error(g, w)
            if packed:
                padding = np.asarray(segment_ids == 0)
                row["padding_rows_zero"] = bool(all(np.all(np.asarray(x, np.float32)[padding] == 0.0) for x in got))
            row["ok"] = all(row[f"rel_err_{label}"] <= 1e-2 for label in ("out", "dq", "dk", "dv"))
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            row["error"] = short_error(exc)
            row["ok"] = False
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


# ----------------------------------------------------------------------------------------------
# Implementations. Each maker returns (forward, forward_backward) callables on JAX arrays, or
# raises with the reason it cannot run.


def make_ours(heads_q, heads_kv, segment_ids=None, block_sizes=None):
    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, block_sizes=block_sizes)

    return jax.jit(fn), forward_backward(fn)


def make_cudnn(heads_q, heads_kv):
    def fn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    return jax.jit(fn), forward_backward(fn)


def make_xla(heads_q, heads_kv):
    def fn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    return jax.jit(fn), forward_backward(fn)


def make_pallas_mha(heads_q, heads_kv):
    from jax.experimental.pallas.ops.gpu import attention as pallas_mha_module

    # Same [batch, seq, heads, head_dim] layout as ours, but no GQA: K/V repeated before timing.
    def fn(q, k, v):
        return pallas_mha_module.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)

    return jax.jit(fn), forward_backward(fn)


def needs_repeated_kv(name: str) -> bool:
    return name == "pallas_mha"


JAX_IMPLS: dict[str, Callable] = {
    "ours": make_ours,
    "cudnn": make_cudnn,
    "xla": make_xla,
    "pallas_mha": make_pallas_mha,
}


def bench_jax(name, maker, model, batch, seq, warmup, iters) -> dict[str, Any]:
    heads_q, heads_kv, head_dim = MODELS[model]
    row: dict[str, Any] = {"impl": name, "model": model, "batch": batch, "seq": seq}
    flops = causal_flops(batch, seq, heads_q, head_dim)
    if name == "xla" and batch * heads_q * seq * seq * 4 > XLA_MAX_LOGIT_BYTES:
        row["error"] = f"skipped: float32 [T, T] logits need {batch * heads_q * seq * seq * 4 / 1e9:.0f} GB"
        return row
    try:
        q, k, v, d_out = random_qkv(jax.random.PRNGKey(seq + batch), batch, seq, seq, heads_q, heads_kv, head_dim)
        if needs_repeated_kv(name):
            k, v = (jnp.repeat(x, heads_q // heads_kv, axis=2) for x in (k, v))
            row["note"] = "K/V repeated to q heads outside the timing"
        forward, fwd_bwd = maker(heads_q, heads_kv)
        for pass_name, fn, args, pass_flops in (
            ("fwd", forward, (q, k, v), flops),
            ("fwd_bwd", fwd_bwd, (q, k, v, d_out), 3.5 * flops),
        ):
            record_timing(row, pass_name, fn, args, pass_flops, warmup, iters)
        del q, k, v, d_out
    except Exception as exc:  # noqa: BLE001
        row["error"] = short_error(exc)
    return row


def bench_torch(model, batch, seq, warmup, iters) -> dict[str, Any]:
    heads_q, heads_kv, head_dim = MODELS[model]
    row: dict[str, Any] = {"impl": "torch_sdpa_flash", "model": model, "batch": batch, "seq": seq}
    flops = causal_flops(batch, seq, heads_q, head_dim)
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device")
        device = torch.device("cuda")
        generator = torch.Generator(device=device).manual_seed(seq)

        def randn(*shape, grad=False):
            x = torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=generator)
            return x.requires_grad_(grad)

        q = randn(batch, heads_q, seq, head_dim, grad=True)
        k = randn(batch, heads_kv, seq, head_dim, grad=True)
        v = randn(batch, heads_kv, seq, head_dim, grad=True)
        d_out = randn(batch, heads_q, seq, head_dim)
        gqa = {"enable_gqa": True}

        def forward(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

        try:
            with torch.no_grad():
                forward(q, k, v)
            row["note"] = "enable_gqa=True"
        except Exception as exc:  # noqa: BLE001 - older flash backends refuse GQA: repeat K/V instead
            gqa = {}
            k = k.detach().repeat_interleave(heads_q // heads_kv, dim=1).requires_grad_(True)
            v = v.detach().repeat_interleave(heads_q // heads_kv, dim=1).requires_grad_(True)
            row["note"] = f"enable_gqa refused ({short_error(exc)[:120]}); K/V repeat_interleave outside timing"

        def fwd():
            with torch.no_grad():
                return forward(q, k, v)

        def fwd_bwd():
            out = forward(q, k, v)
            return torch.autograd.grad(out, (q, k, v), d_out)

        for pass_name, fn, pass_flops in (("fwd", fwd, flops), ("fwd_bwd", fwd_bwd, 3.5 * flops)):
            try:
                for _ in range(warmup):
                    fn()
                torch.cuda.synchronize()
                samples = []
                for _ in range(iters):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    samples.append(start.elapsed_time(end))
                ms = statistics.median(samples)
                row[f"{pass_name}_ms"] = ms
                row[f"{pass_name}_tflops"] = pass_flops / (ms * 1e-3) / 1e12
            except Exception as exc:  # noqa: BLE001
                row[f"{pass_name}_error"] = short_error(exc)
        del q, k, v, d_out
        torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001
        row["error"] = short_error(exc)
    return row


# ----------------------------------------------------------------------------------------------
# Packed rows and block-size sweep (our kernel only)


def packed_rows(model, batch, seq, segments, warmup, iters) -> list[dict[str, Any]]:
    heads_q, heads_kv, head_dim = MODELS[model]
    q, k, v, d_out = random_qkv(jax.random.PRNGKey(7), batch, seq, seq, heads_q, heads_kv, head_dim)
    segment_ids = jnp.repeat(jnp.arange(1, segments + 1, dtype=jnp.int32), seq // segments)
    segment_ids = jnp.broadcast_to(segment_ids, (batch, seq))
    short = seq // segments
    rows = []
    layouts = (
        (f"{segments} packed sequences of {short} per row", segment_ids),
        ("unpacked: one sequence per row", None),
    )
    for label, segs in layouts:
        row: dict[str, Any] = {"impl": "ours", "model": model, "batch": batch, "seq": seq, "layout": label}
        try:
            forward, fwd_bwd = make_ours(heads_q, heads_kv, segment_ids=segs)
            for pass_name, fn, args in (("fwd", forward, (q, k, v)), ("fwd_bwd", fwd_bwd, (q, k, v, d_out))):
                ms = time_ms(fn, *args, warmup=warmup, iters=iters)
                row[f"{pass_name}_ms"] = ms
                row[f"{pass_name}_tokens_per_s"] = batch * seq / (ms * 1e-3)
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def sweep(model, batch, seq, warmup, iters) -> list[dict[str, Any]]:
    heads_q, heads_kv, head_dim = MODELS[model]
    q, k, v, d_out = random_qkv(jax.random.PRNGKey(11), batch, seq, seq, heads_q, heads_kv, head_dim)
    default = attention_module.choose_block_sizes(seq, seq, head_dim, interpret=False)
    flops = causal_flops(batch, seq, heads_q, head_dim)
    # forward tiles: (block_q, block_k, warps, stages)
    forward_choices = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                       (128, 64, 8, 4)]
    # backward tiles: (dkv block_q, dkv block_k, dkv warps, dkv stages, dq block_q, dq block_k, dq warps, dq stages)
    backward_choices = [(64, 64, 4, 2, 64, 64, 4, 2), (32, 64, 4, 3, 64, 32, 4, 3), (64, 128, 8, 2, 128, 64, 8, 2),
                        (32, 128, 4, 3, 128, 32, 4, 3), (64, 64, 8, 3, 64, 64, 8, 3), (64, 128, 4, 2, 128, 64, 4, 2)]
    rows = []
    for bq, bk, warps, stages in forward_choices:
        blocks = BlockSizes(bq, bk, warps, stages, *dataclass_tail(default, "bwd"))
        row: dict[str, Any] = {"pass": "fwd", "block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages}
        try:
            ms = time_ms(make_ours(heads_q, heads_kv, block_sizes=blocks)[0], q, k, v, warmup=warmup, iters=iters)
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
        print(json.dumps(row), flush=True)
        rows.append(row)
    for choice in backward_choices:
        blocks = BlockSizes(*dataclass_tail(default, "fwd"), *choice)
        row = {"pass": "fwd_bwd", "dkv": list(choice[:4]), "dq": list(choice[4:])}
        try:
            ms = time_ms(make_ours(heads_q, heads_kv, block_sizes=blocks)[1], q, k, v, d_out, warmup=warmup,
                             iters=iters)
            row.update(ms=ms, tflops=3.5 * flops / (ms * 1e-3) / 1e12)
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def dataclass_tail(blocks: BlockSizes, part: str) -> tuple[int, ...]:
    """The forward (first 4) or backward (last 8) fields of a BlockSizes."""
    values = (blocks.block_q, blocks.block_k, blocks.num_warps, blocks.num_stages, blocks.block_q_dkv,
              blocks.block_k_dkv, blocks.num_warps_dkv, blocks.num_stages_dkv, blocks.block_q_dq, blocks.block_k_dq,
              blocks.num_warps_dq, blocks.num_stages_dq)
    return values[:4] if part == "fwd" else values[4:]


# ----------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'model':<11} {'seq':>6} {'b':>2} {'impl':<17} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} "
          f"{'f+b TF/s':>9}  note")
    for r in rows:
        def cell(key, fmt):
            width = int(fmt.split(".")[0])
            return format(r[key], fmt) if key in r else "-".rjust(width)

        note = r.get("error") or r.get("fwd_error") or r.get("fwd_bwd_error") or ""
        print(f"{r['model']:<11} {r['seq']:>6} {r['batch']:>2} {r['impl']:<17} {cell('fwd_ms', '8.2f')} "
              f"{cell('fwd_tflops', '9.1f')} {cell('fwd_bwd_ms', '8.2f')} {cell('fwd_bwd_tflops', '9.1f')}  "
              f"{note[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20, help="timed calls per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="the correctness checks and the block-size sweep alone")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script itself on CPU")
    args = parser.parse_args()
    global SEQS, MODELS
    if args.smoke:
        SEQS = ((64, 2),)
        MODELS = {"llama3-8b": (4, 1, 64)}
        args.iters, args.warmup = 2, 1
    started = time.time()
    print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
    report: dict[str, Any] = {
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "dtype": "bfloat16",
        "timing": f"median of {args.iters} calls after {args.warmup} warm-up calls",
        "flops": "causal = half of full: fwd 4*b*h*s^2*d/2, fwd_bwd 3.5x fwd",
    }
    report["checks"] = correctness_checks(args.smoke)

    rows = []
    if args.sweep_only:
        args.no_torch, args.no_sweep = True, False
    if not args.no_torch:
        # PyTorch first, then its cache is emptied, so JAX (no preallocation) gets the memory.
        for model in MODELS:
            for seq, batch in SEQS:
                rows.append(bench_torch(model, batch, seq, args.warmup, args.iters))
                print(json.dumps(rows[-1]), flush=True)
    for model in MODELS if not args.sweep_only else ():
        for seq, batch in SEQS:
            for name, maker in JAX_IMPLS.items():
                rows.append(bench_jax(name, maker, model, batch, seq, args.warmup, args.iters))
                print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r["seq"], r["impl"]))
    report["results"] = rows

    packed_seq, packed_batch = (8192, 2) if not args.smoke else (64, 2)
    report["packed"] = ([] if args.sweep_only
                        else packed_rows("llama3-8b", packed_batch, packed_seq, 8, args.warmup, args.iters))
    if not args.no_sweep:
        sweep_seq, sweep_batch = (8192, 2) if not args.smoke else (64, 2)
        report["sweep"] = {"model": "llama3-8b", "seq": sweep_seq, "batch": sweep_batch,
                           "rows": sweep("llama3-8b", sweep_batch, sweep_seq, args.warmup, args.iters)}
    report["wall_s"] = time.time() - started
    default_blocks = attention_module.choose_block_sizes(8192, 8192, 128, interpret=False)
    report["default_blocks"] = dataclass_tail(default_blocks, "fwd") + dataclass_tail(default_blocks, "bwd")

    print("\nCorrectness (relative error vs float32 reference on the same bf16 inputs):")
    for c in report["checks"]:
        errs = " ".join(f"{k[8:]}={c[k]:.1e}" for k in c if k.startswith("rel_err_"))
        print(f"  {'OK  ' if c['ok'] else 'FAIL'} {c['check']:<42} {errs} {c.get('error', '')[:100]}")
    print_table(rows)
    print("\nPacked rows (ours):")
    for r in report["packed"]:
        print(f"  {r['layout']:<40} fwd {r.get('fwd_tokens_per_s', float('nan')) / 1e6:8.2f} Mtok/s   "
              f"fwd+bwd {r.get('fwd_bwd_tokens_per_s', float('nan')) / 1e6:8.2f} Mtok/s  {r.get('error', '')[:80]}")
    if "sweep" in report:
        print("\nBlock-size sweep (ours, llama3-8b):")
        for r in report["sweep"]["rows"]:
            cfg = {k: v for k, v in r.items() if k not in ("ms", "tflops", "error", "pass")}
            print(f"  {r['pass']:<8} {json.dumps(cfg):<70} {r.get('tflops', float('nan')):7.1f} TF/s "
                  f"{r.get('error', '')[:80]}")
        for pass_name in ("fwd", "fwd_bwd"):
            timed = [r for r in report["sweep"]["rows"] if r["pass"] == pass_name and "tflops" in r]
            if timed:
                best = max(timed, key=lambda r: r["tflops"])
                part = "fwd" if pass_name == "fwd" else "bwd"
                cfg = {k: v for k, v in best.items() if k not in ("ms", "tflops", "pass")}
                print(f"  best {pass_name}: {json.dumps(cfg)} at {best['tflops']:.1f} TF/s "
                      f"(default: {json.dumps(dataclass_tail(default_blocks, part))})")
    print(f"\nwall time {report['wall_s']:.0f} s")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "attention.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

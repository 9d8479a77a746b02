"""QLoRA on one GPU, in one call: the NF4 dequant kernel against copy bandwidth, the fused
dequant-matmul against dequantize-then-matmul for a few rows, bit-parity with bitsandbytes (when
its wheel is importable with CUDA), and a Llama-3-8B-shape QLoRA training step.

  python3 bench/qlora.py                  # everything, ~5 min on an H100
  python3 bench/qlora.py --skip-step      # kernels and parity only
  python3 bench/qlora.py --smoke          # CPU check of this script (tiny shapes, interpret mode)

1. dequant: for each of Llama-3-8B's projection shapes, the Pallas kernel (pallas_kernels/nf4.py,
   NF4 -> bf16) on a float32 absmax, the same kernel decoding the double-quantized absmax itself
   (dequantize_4bit_nested), XLA's fusion of the jnp reference (convert/quant.py), what the
   training path runs (ops.dequantize_hf: HF's [out, in], no transpose) and ops.dequantize
   (transposed to [in, out]) are timed (median of --iters). Bytes counted for every column: n/2
   codes + 4n/64 float32 absmax read, 2n bf16 written (the nested kernel reads n/64 bytes of absmax
   codes instead of 4n/64, so its GB/s is an effective figure). Copy bandwidth: bench/timing.py's
   ceiling. Target (issue 7): the kernel at >= 80% of copy bandwidth. Every output is checked bit
   for bit against the reference on the GPU ("exact").
   --sweep: the kernel's DequantBlocks (block_rows, warps, stages, steps a program, output layout,
     code-book lookup)
   and the nested decode on the smallest and largest shape, about 60 timings, each checked exact.
   --layer: one QLoRA layer's forward + backward (ops.lora_linear, 6144 tokens, r 16) per shape,
   the nested absmax decoded in the kernel and by XLA, and the count of [in, out]-sized transposes
   or copies in its compiled HLO (0 expected: the GEMMs take the HF layout).
2. fused: dequantize_4bit_matmul (m = 1, 4, 16 rows) against the Pallas dequant followed by
   jnp.dot(x, W^T), same inputs, both jitted.
3. parity: with bitsandbytes importable and CUDA up, bitsandbytes' quantize_4bit(nf4, blocksize
   64, compress_statistics=True) on the GPU against convert.quant.quantize_nf4 on the same bf16
   weights: 4-bit codes, quantized absmax and nested absmax must be equal given bitsandbytes'
   offset; the offsets themselves (torch's float32 mean against our float64 one) are compared
   too, and dequantize_4bit's bf16 output against ours.
4. step: bench/e2e.py's run_config (SFTTrainer's jitted step on a trainer shell, timing, memory,
   MFU) in a child process, with its weight builder swapped for one that draws each layer on the
   device and quantizes its seven projections to NF4 at once (the 16-bit stack never exists):
   llama3-8b, batch 2 x 2048, LoRA r=16 alpha 16 on all 7 projections, checkpointing "unsloth" and
   "full". Targets (issue 7, Unsloth 4-bit on one H100): peak <= 7.0 GiB, >= 9,280 tokens/s.

Output: a table at the end; $OUT/qlora.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# HF [out, in] of Llama-3-8B's projections.
LLAMA3_8B_SHAPES = {
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate_proj/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
SMOKE_SHAPES = {"small": (128, 256), "tail": (33, 64)}
TARGET_PEAK_GIB = 7.0
TARGET_TOKENS_PER_S = 9280.0
TARGET_COPY_FRACTION = 0.80




def _median_seconds(fn, *args, iters: int) -> float:
    from bench.timing import time_ms

    return time_ms(fn, *args, warmup=1, iters=iters) / 1e3


def _bytes_moved(n: int) -> int:
    return n // 2 + 4 * (n // 64) + 2 * n


def _nested_args(kernel):
    import jax.numpy as jnp

    from convert import quant

    return kernel.codes, kernel.absmax, jnp.asarray(quant.DYNAMIC_MAP), kernel.nested_absmax, kernel.nested_offset


def bench_dequant(shapes: dict, iters: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from convert import quant
    from fastft_jax import ops
    from pallas_kernels import nf4

    code_book = tuple(quant.NF4_CODE.tolist())
    pallas = dataclasses.replace(ops.OpsConfig.from_env(), dequant="pallas")
    rows = []
    for label, (n_out, k) in shapes.items():
        weight = jax.random.normal(jax.random.PRNGKey(0), (n_out, k), jnp.bfloat16)
        kernel = quant.quantize_nf4(weight)
        absmax = jax.block_until_ready(quant.block_absmax(kernel))
        n = n_out * k
        kernel_fn = jax.jit(lambda codes, absmax: nf4.dequantize_4bit(
            codes, absmax, code_book=code_book, n=n, blocksize=64, dtype=jnp.bfloat16))
        nested_fn = jax.jit(lambda *arrays: nf4.dequantize_4bit_nested(
            *arrays, code_book=code_book, n=n, blocksize=64, nested_blocksize=256, dtype=jnp.bfloat16))
        reference_fn = jax.jit(lambda codes, absmax: nf4.dequantize_4bit_reference(
            codes, absmax, code_book=code_book, n=n, blocksize=64, dtype=jnp.bfloat16))
        hf_fn = jax.jit(lambda kernel: ops.dequantize_hf(kernel, jnp.bfloat16, pallas))
        whole_fn = jax.jit(lambda kernel: ops.dequantize(kernel, jnp.bfloat16, pallas))
        expected = np.asarray(reference_fn(kernel.codes, absmax))
        exact = {
            "pallas": np.array_equal(np.asarray(kernel_fn(kernel.codes, absmax)), expected),
            "pallas_nested": np.array_equal(np.asarray(nested_fn(*_nested_args(kernel))), expected),
            "ops_dequantize_hf": np.array_equal(np.asarray(hf_fn(kernel)).reshape(-1), expected),
        }
        moved = _bytes_moved(n)
        row = {"shape": label, "n_out": n_out, "k": k, "bytes_moved": moved, "exact": all(exact.values()),
               "exact_by_path": exact}
        for name, fn, args in (("pallas", kernel_fn, (kernel.codes, absmax)),
                               ("pallas_nested", nested_fn, _nested_args(kernel)),
                               ("xla_reference", reference_fn, (kernel.codes, absmax)),
                               ("ops_dequantize_hf", hf_fn, (kernel,)),
                               ("ops_dequantize", whole_fn, (kernel,))):
            seconds = _median_seconds(fn, *args, iters=iters)
            row[f"{name}_us"] = round(1e6 * seconds, 1)
            row[f"{name}_gbs"] = round(moved / seconds / 1e9, 1)
        rows.append(row)
        print(f"dequant {label}: {row}", flush=True)
    return rows


def dequant_sweep_configs() -> list[tuple[bool, object]]:
    """(nested, DequantBlocks) pairs, the current default first: the gather lookup (the default
    since the session-4 sweep) over larger tiles and more warps, which it may now afford, then the
    select tree at the old default's tiles for comparison, then the absmax decoded in the kernel."""
    from pallas_kernels import nf4

    configs = [(False, nf4.DequantBlocks())]
    for layout in nf4.LAYOUTS:
        for block_rows, num_warps, num_stages, steps in ((32, 2, 1, 1), (64, 2, 1, 1), (64, 4, 1, 1), (128, 4, 1, 1),
                                                         (256, 4, 1, 1), (256, 8, 1, 1), (64, 2, 2, 4)):
            blocks = nf4.DequantBlocks(block_rows=block_rows, num_warps=num_warps, num_stages=num_stages, steps=steps,
                                       layout=layout, lookup="gather")
            if (False, blocks) not in configs:
                configs.append((False, blocks))
        configs.append((False, nf4.DequantBlocks(layout=layout, lookup="select")))
    configs += [(True, nf4.DequantBlocks()), (True, nf4.DequantBlocks(layout="join")),
                (True, nf4.DequantBlocks(block_rows=128, num_warps=4)), (True, nf4.DequantBlocks(lookup="select"))]
    return configs


def sweep_dequant(shapes: dict, iters: int, on_row=None) -> list[dict]:
    """The dequant kernel's time per DequantBlocks variant (and with the nested absmax decoded in the
    kernel), on the smallest and the largest weight, each output checked against the reference;
    printed, and passed to on_row, as it goes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from convert import quant
    from pallas_kernels import nf4

    code_book = tuple(quant.NF4_CODE.tolist())
    rows = []
    by_size = sorted(shapes.items(), key=lambda item: item[1][0] * item[1][1])
    for label, (n_out, k) in (by_size[0], by_size[-1]):  # the smallest and the largest weight
        kernel = quant.quantize_nf4(jax.random.normal(jax.random.PRNGKey(1), (n_out, k), jnp.bfloat16))
        absmax = jax.block_until_ready(quant.block_absmax(kernel))
        n = n_out * k
        moved = _bytes_moved(n)
        expected = np.asarray(nf4.dequantize_4bit_reference(
            kernel.codes, absmax, code_book=code_book, n=n, blocksize=64, dtype=jnp.bfloat16))
        for nested, blocks in dequant_sweep_configs():
            described = {"shape": label, "nested": nested, **dataclasses.asdict(blocks)}
            if nested:
                fn = jax.jit(lambda *arrays, blocks=blocks: nf4.dequantize_4bit_nested(
                    *arrays, code_book=code_book, n=n, blocksize=64, nested_blocksize=256, dtype=jnp.bfloat16,
                    blocks=blocks))
                args = _nested_args(kernel)
            else:
                fn = jax.jit(lambda codes, absmax, blocks=blocks: nf4.dequantize_4bit(
                    codes, absmax, code_book=code_book, n=n, blocksize=64, dtype=jnp.bfloat16, blocks=blocks))
                args = (kernel.codes, absmax)
            try:
                exact = bool(np.array_equal(np.asarray(fn(*args)), expected))
                seconds = _median_seconds(fn, *args, iters=iters)
            except Exception as error:  # a setting that does not compile is a finding
                rows.append({**described, "error": str(error)[:300]})
            else:
                rows.append({**described, "default": blocks == nf4.DequantBlocks() and not nested, "exact": exact,
                             "us": round(1e6 * seconds, 1), "gbs": round(moved / seconds / 1e9, 1)})
            print(f"dequant sweep {rows[-1]}", flush=True)
            if on_row:
                on_row(rows)
    return rows


def _weight_transposes(hlo: str, n_out: int, k: int) -> int:
    """Instructions of a compiled HLO text that write the weight transposed: any whose bf16 result is
    [in, out], or [out, in] in column-major layout; for a square weight, whose shape says nothing,
    only a transpose, a copy or a fusion named for a transpose. (The token count must differ from
    both dims, or activations would match too.)"""
    import re

    instruction = re.compile(r"^\s*(?:ROOT )?%(\S+) = bf16\[(\d+),(\d+)\]\{(\d),(\d)\} ([\w-]+)\(")
    count = 0
    for line in hlo.splitlines():
        match = instruction.match(line)
        if not match:
            continue
        name, rows, cols, major_last, _, opcode = match.groups()
        dims, column_major = (int(rows), int(cols)), major_last == "0"
        transposed = (dims == (k, n_out) and not column_major) or (dims == (n_out, k) and column_major)
        named = opcode in ("transpose", "copy") or "transpose" in name
        count += transposed and opcode != "parameter" and (named or n_out != k)
    return count


def bench_layer(shapes: dict, tokens: int, rank: int, iters: int) -> list[dict]:
    """One QLoRA layer's forward + backward through ops.lora_linear (bf16, the Pallas dequant), with
    the nested absmax decoded in the kernel and by XLA, and the transposed copies of the weight in
    its compiled HLO."""
    import jax
    import jax.numpy as jnp

    from convert import quant
    from fastft_jax import ops

    cfg = dataclasses.replace(ops.OpsConfig.from_env(), dequant="pallas")
    rows = []
    for label, (n_out, k) in shapes.items():
        kernel = quant.quantize_nf4(jax.random.normal(jax.random.PRNGKey(2), (n_out, k), jnp.bfloat16))
        x = jax.random.normal(jax.random.PRNGKey(3), (tokens, k), jnp.bfloat16)
        a = 0.01 * jax.random.normal(jax.random.PRNGKey(4), (k, rank), jnp.float32)
        b = 0.01 * jax.random.normal(jax.random.PRNGKey(5), (rank, n_out), jnp.float32)

        def step(x, a, b, kernel):
            out, vjp = jax.vjp(lambda x, a, b: ops.lora_linear(x, kernel, a, b, 2.0, cfg), x, a, b)
            return vjp(out)

        row = {"shape": label, "n_out": n_out, "k": k, "tokens": tokens}
        default = ops.DEQUANT_NESTED_IN_KERNEL
        for nested_in_kernel in (True, False):
            ops.DEQUANT_NESTED_IN_KERNEL = nested_in_kernel
            fn = jax.jit(step)
            key = "nested_in_kernel" if nested_in_kernel else "nested_by_xla"
            row[f"{key}_weight_transposes"] = _weight_transposes(fn.lower(x, a, b, kernel).compile().as_text(), n_out, k)
            row[f"{key}_us"] = round(1e6 * _median_seconds(fn, x, a, b, kernel, iters=iters), 1)
        ops.DEQUANT_NESTED_IN_KERNEL = default
        rows.append(row)
        print(f"layer {label}: {row}", flush=True)
    return rows


def bench_fused(shapes: dict, row_counts: tuple[int, ...], iters: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from convert import quant
    from pallas_kernels import nf4

    code_book = tuple(quant.NF4_CODE.tolist())
    results = []
    for label, (n_out, k) in shapes.items():
        if k % 64:
            continue
        weight = jax.random.normal(jax.random.PRNGKey(1), (n_out, k), jnp.bfloat16)
        kernel = quant.quantize_nf4(weight)
        absmax = jax.block_until_ready(quant.block_absmax(kernel))
        fused = jax.jit(lambda x, codes, absmax: nf4.dequantize_4bit_matmul(
            x, codes, absmax, code_book=code_book, n_out=n_out, blocksize=64))

        def unfused_fn(x, codes, absmax):
            w = nf4.dequantize_4bit(codes, absmax, code_book=code_book, n=n_out * k, blocksize=64, dtype=x.dtype)
            return jnp.dot(x, w.reshape(n_out, k).T, preferred_element_type=jnp.float32).astype(x.dtype)

        unfused = jax.jit(unfused_fn)
        for m in row_counts:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
            out, ref = fused(x, kernel.codes, absmax), unfused(x, kernel.codes, absmax)
            error = float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)))
                          / max(float(np.max(np.abs(np.asarray(ref, np.float32)))), 1e-30))
            row = {"shape": label, "m": m, "rel_error": error,
                   "fused_us": round(1e6 * _median_seconds(fused, x, kernel.codes, absmax, iters=iters), 1),
                   "dequant_then_dot_us": round(1e6 * _median_seconds(unfused, x, kernel.codes, absmax, iters=iters), 1)}
            results.append(row)
            print(f"fused {label}: {row}", flush=True)
    return results


def bench_bitsandbytes_parity(shapes: dict, device: str = "cuda") -> dict:
    """bitsandbytes on the GPU against convert.quant on the same weights. (device "cpu" runs
    bitsandbytes' CPU path, whose 8-bit absmax quantization is not its CUDA kernel's.)"""
    try:
        import bitsandbytes.functional as bnb
        import torch
    except Exception as err:  # noqa: BLE001 - the wheel is optional
        return {"ran": False, "why": f"bitsandbytes not importable: {type(err).__name__}: {err}"}
    if device == "cuda" and not torch.cuda.is_available():
        return {"ran": False, "why": "torch sees no CUDA device"}
    import jax.numpy as jnp
    import numpy as np

    from convert import quant

    rows = []
    for label, (n_out, k) in shapes.items():
        torch.manual_seed(0)
        weight = torch.randn(n_out, k, device=device, dtype=torch.bfloat16)
        packed, state = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        host = weight.float().cpu().numpy()
        ours = quant.quantize_nf4(jnp.asarray(host), offset=float(state.offset))
        ours_offset = quant.nested_offset(np.asarray(quant.quantize_nf4(jnp.asarray(host), double_quant=False).absmax))
        theirs_dequant = bnb.dequantize_4bit(packed, state).float().cpu().numpy()
        ours_dequant = np.asarray(quant.dequantize_reference(ours, jnp.bfloat16).astype(jnp.float32)).T
        row = {
            "shape": label,
            "codes_equal": bool(np.array_equal(np.asarray(ours.codes), packed.reshape(-1).cpu().numpy())),
            "absmax_codes_equal": bool(np.array_equal(np.asarray(ours.absmax), state.absmax.cpu().numpy())),
            "nested_absmax_equal": bool(np.array_equal(np.asarray(ours.nested_absmax), state.state2.absmax.cpu().numpy())),
            "offset_equal": bool(np.float32(ours_offset) == np.float32(state.offset.item())),
            "offset_ulps": int(abs(np.float32(ours_offset).view(np.int32) - np.float32(state.offset.item()).view(np.int32))),
            "dequant_bf16_equal": bool(np.array_equal(ours_dequant, theirs_dequant)),
        }
        rows.append(row)
        print(f"bitsandbytes parity {label}: {row}", flush=True)
    import bitsandbytes

    return {"ran": True, "device": device, "bitsandbytes_version": bitsandbytes.__version__, "rows": rows,
            "all_equal": all(r["codes_equal"] and r["absmax_codes_equal"] and r["nested_absmax_equal"]
                             and r["dequant_bf16_equal"] for r in rows)}


# ==================================================================================================
# The QLoRA step: bench/e2e.py's run_config with NF4 weights.


def quantized_random_params(config, seed: int, dtype):
    """e2e.device_random_params' scheme (fastft_jax.model.random_params drawn one layer at a time
    on the device) with the seven projections of each layer quantized to NF4 as soon as they are
    drawn and written into preallocated stacks (donated updates), so neither a 16-bit stack nor a
    second quantized stack ever exists."""
    import jax
    import jax.numpy as jnp

    from convert import quant
    from convert.hf import PROJECTIONS
    from fastft_jax.model import random_params

    params = random_params(dataclasses.replace(config, num_layers=0), seed, dtype)
    one_layer = dataclasses.replace(config, num_layers=1)
    draw_layer = jax.jit(lambda index: random_params(one_layer, seed + 1 + index, dtype)["layers"])
    write = jax.jit(
        lambda stacked, layer, index: jax.tree.map(
            lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part[None], index, axis=0), stacked, layer),
        donate_argnums=0)

    def quantize_layer(layer):
        layer = jax.tree.map(lambda leaf: leaf[0], layer)  # drop the one-layer axis
        for name in PROJECTIONS:
            layer[name] = {**layer[name], "kernel": quant.quantize_nf4(layer[name]["kernel"].T)}
        return layer

    first = quantize_layer(draw_layer(0))
    stacked = jax.tree.map(lambda leaf: jnp.zeros((config.num_layers, *leaf.shape), leaf.dtype), first)
    stacked = write(stacked, first, 0)
    del first
    for index in range(1, config.num_layers):
        stacked = write(stacked, quantize_layer(draw_layer(index)), index)
    params["layers"] = stacked
    return params


def run_step(spec: dict) -> dict:
    import e2e

    e2e.device_random_params = quantized_random_params
    result = {"kind": "fastft-jax qlora", "ok": False, **spec}
    try:
        e2e.run_config(spec, result)
        memory = result.get("memory_gib") or {}
        after_weights = (result.get("memory_after_weights_gib") or {}).get("peak_bytes_in_use")
        # The peak is process-wide: it belongs to the step only if the weights' creation stayed below it.
        result["peak_set_by_step"] = bool(memory.get("peak_bytes_in_use") and after_weights is not None
                                          and memory["peak_bytes_in_use"] > after_weights)
    except BaseException as err:  # noqa: BLE001 - an OOM is a result too
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-6000:])
    return result


def e2e_ops(text: str) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import e2e

    return e2e._ops(text)


def step_spec(args, checkpointing: str) -> dict:
    return {
        "label": f"qlora {args.model} {checkpointing}", "model": args.model, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "warmup": args.warmup, "checkpointing": checkpointing, "kernels": "auto",
        "attention": "preset", "ops": args.ops, "rows": "padded", "segments": 1, "weights": "random", "seed": 0,
        "matmul_size": args.matmul_size,
    }


def run_step_child(spec: dict, out_dir: Path, timeout: float) -> dict:
    spec_path, result_path = out_dir / f"spec_{spec['checkpointing']}.json", out_dir / f"step_{spec['checkpointing']}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    try:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", str(spec_path), str(result_path)],
                       env=env, cwd=REPO, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**spec, "ok": False, "error": f"timed out after {timeout} s"}
    if not result_path.exists():
        return {**spec, "ok": False, "error": "the child wrote no result (crashed)"}
    return json.loads(result_path.read_text())


# ==================================================================================================


def table(results: dict) -> str:
    lines = []
    copy = results.get("copy_gbs")
    if results.get("dequant"):
        lines += [f"copy bandwidth: {copy} GB/s", "",
                  ("| shape [out, in] | Pallas us | Pallas GB/s | % copy | nested in kernel us | % copy | XLA ref GB/s | "
                   "ops.dequantize_hf us | ops.dequantize [in, out] us | exact |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["dequant"]:
            share = f"{100 * row['pallas_gbs'] / copy:.0f}%" if copy else "-"
            nested_share = f"{100 * row['pallas_nested_gbs'] / copy:.0f}%" if copy else "-"
            lines.append(f"| {row['shape']} {row['n_out']}x{row['k']} | {row['pallas_us']} | {row['pallas_gbs']} | {share} | "
                         f"{row['pallas_nested_us']} | {nested_share} | {row['xla_reference_gbs']} | "
                         f"{row['ops_dequantize_hf_us']} | {row['ops_dequantize_us']} | {row['exact']} |")
    if results.get("dequant_sweep"):
        lines += ["", "| sweep shape | nested | block_rows | warps | stages | steps | layout | lookup | us | GB/s | exact |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in sorted(results["dequant_sweep"], key=lambda row: (row["shape"], row.get("us", float("inf")))):
            lines.append(f"| {row['shape']} | {row['nested']} | {row['block_rows']} | {row['num_warps']} | "
                         f"{row['num_stages']} | {row['steps']} | {row['layout']}{' (default)' if row.get('default') else ''} | "
                         f"{row.get('lookup', 'select')} | "
                         f"{row.get('us', row.get('error', '')[:60])} | {row.get('gbs', '-')} | {row.get('exact', '-')} |")
    if results.get("layer"):
        lines += ["", "| layer fwd+bwd [out, in] | tokens | nested in kernel us | nested by XLA us | [in, out] copies |",
                  "|---|---|---|---|---|"]
        for row in results["layer"]:
            lines.append(f"| {row['shape']} {row['n_out']}x{row['k']} | {row['tokens']} | {row['nested_in_kernel_us']} | "
                         f"{row['nested_by_xla_us']} | {row['nested_in_kernel_weight_transposes']} / "
                         f"{row['nested_by_xla_weight_transposes']} |")
    if results.get("fused"):
        lines += ["", "| shape | rows | fused us | dequant+dot us | rel. error |", "|---|---|---|---|---|"]
        for row in results["fused"]:
            lines.append(f"| {row['shape']} | {row['m']} | {row['fused_us']} | {row['dequant_then_dot_us']} | {row['rel_error']:.1e} |")
    parity = results.get("bitsandbytes_parity")
    if parity:
        lines += ["", f"bitsandbytes parity: {parity if not parity.get('ran') else 'all equal' if parity['all_equal'] else 'DIFFERENCES'}"]
        for row in parity.get("rows", []):
            lines.append(f"  {row}")
    if results.get("steps"):
        lines += ["", "| step | tokens/s | peak GiB | peak set by step | compile s | loss first -> last | ok |",
                  "|---|---|---|---|---|---|---|"]
        for row in results["steps"]:
            peak = (row.get("memory_gib") or {}).get("peak_bytes_in_use")
            lines.append(f"| {row.get('label')} | {row.get('tokens_per_s')} | {peak} | {row.get('peak_set_by_step')} | "
                         f"{row.get('compile_s')} | {row.get('loss_first')} -> {row.get('loss_last')} | "
                         f"{row.get('ok')} {row.get('error', '')[:80]} |")
        lines.append(f"targets: peak <= {TARGET_PEAK_GIB} GiB, >= {TARGET_TOKENS_PER_S:,.0f} tokens/s (Unsloth 4-bit, H100); "
                     f"dequant >= {TARGET_COPY_FRACTION:.0%} of copy bandwidth")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", default="unsloth,full")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--step-timeout", type=float, default=300.0)
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time the dequant kernel's variants (DequantBlocks)")
    parser.add_argument("--layer", action="store_true", help="time one QLoRA layer's forward + backward per shape")
    parser.add_argument("--layer-tokens", type=int, default=6144, help="not one of the weights' dims (see _weight_transposes)")
    parser.add_argument("--ops", type=e2e_ops, default={}, help="per-op overrides of the step, e.g. mlp_tile_tokens=2048")
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny shapes, interpret-mode kernels")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/fastft_qlora"))
    parser.add_argument("--_child", dest="child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.child[0]).read_text())
        result = run_step(spec)
        Path(args.child[1]).write_text(json.dumps(result))
        return 0 if result.get("ok") else 1

    if args.smoke:
        args.model, args.seq, args.steps, args.warmup, args.iters, args.matmul_size = "tiny-llama", 64, 1, 0, 2, 256
    shapes = SMOKE_SHAPES if args.smoke else LLAMA3_8B_SHAPES
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}

    # The step first, each in its own process, so that its memory peak is its own.
    if not args.skip_step:
        results["steps"] = []
        for checkpointing in args.checkpointing.split(","):
            row = run_step_child(step_spec(args, checkpointing), out_dir, args.step_timeout)
            results["steps"].append(row)
            print(f"step {checkpointing}: tokens/s {row.get('tokens_per_s')} memory {row.get('memory_gib')} "
                  f"ok {row.get('ok')} {row.get('error', '')}", flush=True)
            (out_dir / "qlora.json").write_text(json.dumps(results, indent=1))

    import jax

    results["device"] = jax.devices()[0].device_kind
    results["jax_version"] = jax.__version__
    from bench.timing import copy_ceiling_gbps

    results["copy_gbs"] = round(copy_ceiling_gbps(0.01 if args.smoke else 1.0, 1, args.iters), 1)
    results["dequant"] = bench_dequant(shapes, args.iters)
    results["fused"] = bench_fused(shapes, (1, 4, 16), args.iters)
    results["bitsandbytes_parity"] = bench_bitsandbytes_parity(shapes, "cpu" if args.smoke else "cuda")
    print(f"bitsandbytes parity: {results['bitsandbytes_parity']}", flush=True)
    (out_dir / "qlora.json").write_text(json.dumps(results, indent=1))
    print("\n" + table(results), flush=True)

    def save_sweep(rows):
        results["dequant_sweep"] = rows
        (out_dir / "qlora.json").write_text(json.dumps(results, indent=1))

    if args.sweep:
        save_sweep(sweep_dequant(shapes, args.iters, on_row=save_sweep))
    if args.layer:
        results["layer"] = bench_layer(shapes, 48 if args.smoke else args.layer_tokens, 16, args.iters)
        (out_dir / "qlora.json").write_text(json.dumps(results, indent=1))
    if args.sweep or args.layer:
        print("\n" + table({key: value for key, value in results.items() if key in ("dequant_sweep", "layer")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

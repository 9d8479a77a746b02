"""The Hopper (Mosaic GPU) stacked-weight GEMM on an H100/H200: correctness first, then speed.

(a) Correctness: `stacked_matmul_hopper(x, w_stack, layer)` (layer a traced argument) against a
    float32 jnp.dot of w_stack[layer] on the same 16-bit inputs, as the relative norm
    ||got - ref|| / ||ref|| (tolerance 1e-2, bf16 and fp16), for every projection shape of
    Llama-3-8B, Qwen2.5-7B and Qwen2.5-1.5B, both orientations (x @ W and x @ W^T), with token
    counts that are and are not a multiple of the 128-row tile; then dx of a 4-layer lax.scan
    (jax.grad through x) against the same scan in float32. First of all (new, so a deadline leaves
    them in), x @ W + addend (the LoRA layer's one rounding) against float32 x @ W + addend for
    Llama-3-8B shapes, both orientations, 4096 and 1000 tokens; the 4096 x 4096 rows also add a
    tiny constant addend (below half a bf16 ulp of most outputs) and report how much of it the
    output keeps on average: about 1 when rounded once, far less when x @ W is rounded first.
(b) Speed, Llama-3-8B shapes at 4096 and 8192 tokens, both orientations: ours; jnp.dot of a static
    slice w_stack[3] (cuBLAS on a slice XLA need not copy: the bar to meet); jnp.dot of a dynamic
    slice w_stack[layer] with the layer a jit argument (what the scan pays: slice copy + cuBLAS);
    for the 4096 x 4096 forward also cuBLAS and jax's example Mosaic GPU GEMM on a plain weight.
    Right after the 4096-token rows: x @ W + addend for the four Llama-3-8B shapes at 4096 tokens,
    ours (the addend in the epilogue) against XLA's jnp.dot of the static slice in float32 + addend,
    then cast, and against ours without an addend (the epilogue's cost).
    Then a lax.scan over 32 layers of x -> x @ W[i] (4096 x 4096, 4096 tokens), forward and
    forward+backward (dx), ours against jnp.dot of the scan's slice, so the per-layer copy shows.
(c) The low-rank term, x @ W + L @ R (low=(L, R), r = 16, the rank-r product in the GEMM's own
    accumulator), for the four Llama-3-8B shapes, both orientations (the LoRA forward, and its dx
    with low = (dx a, a^T)). Correctness at 4096 and 1000 tokens against the float32 x @ W + L @ R
    rounded once: max error in ulps of the 16-bit output (at most 1: one rounding of a float32 sum
    whose own accumulation error is far below an ulp; near-zero outputs count in ulps of rms/256),
    the share of outputs bit-identical to the rounded float32 reference, and for 4096 x 4096 at
    4096 tokens the tiny-term check (L @ R = 2**-10 everywhere, kept fraction ~1). Speed at 4096
    tokens: ours with low against the path the model takes today, XLA's thin GEMM that builds the
    scaled [tokens, d_y] addend plus ours with that addend (the real comparison), against XLA's
    exact path (cuBLAS on the static slice in float32 + the scaled low product, rounded once), and
    against ours with no term at all. The low correctness rows run first of all in (a), before
    the addend's.

Run from the repository root on the GPU machine: python bench/stacked_matmul_hopper_check.py
  --deadline S   skip the cases left after S seconds (default 110)
  --skip-speed   correctness only
  --skip-correctness   speed only (24 of 25 cases passed on an H200, seventh session; their compiles
                 took the whole 230 s part, so its speed rows never ran)
  --only low     only the low-rank rows of (c) (with --skip-speed / --skip-correctness as above);
                 the 16 correctness rows and 8 speed rows compile some 40 programs: give it
                 --deadline 480 in a 600 s call, or run the two parts in separate calls
Writes $OUT/stacked_matmul_hopper.json when OUT is set (rewritten after every row).
"""

from __future__ import annotations

import faulthandler
import functools
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
from pallas_kernels.lora_linear import base_plus_low_rank  # noqa: E402
from pallas_kernels.stacked_matmul_hopper import (  # noqa: E402
    available,
    choose_tiles,
    stacked_matmul_hopper,
    stacked_matmul_reference,
)

TOLERANCE = 1e-2  # bf16 and fp16
CASE_TIMEOUT_S = 60  # compile + run of one case; longer is a hang (a pipeline barrier mistake)
BF16, FP16 = jnp.bfloat16, jnp.float16

# (d_in, d_out) of q/o, k/v, gate/up, down
MODEL_SHAPES = {
    "llama3-8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
    "qwen2.5-7b": [(3584, 3584), (3584, 512), (3584, 18944), (18944, 3584)],
    "qwen2.5-1.5b": [(1536, 1536), (1536, 256), (1536, 8960), (8960, 1536)],
}
# tokens per model in the correctness pass: the real batch (4096), and counts off the 128-row tile
CORRECTNESS_TOKENS = {"llama3-8b": (4096, BF16), "qwen2.5-7b": (1000, BF16), "qwen2.5-1.5b": (77, FP16)}
LAYERS = 4  # stack depth of the correctness and speed cases; the layer read is 2 or 3, not 0
# x @ W + addend: (d_in, d_out) of q/o and down (the widest contraction), and the token counts
ADDEND_SHAPES = [(4096, 4096), (14336, 4096)]
ADDEND_TOKENS = (4096, 1000)
# A constant tiny addend, 2**-10: an eighth of a bf16 ulp for outputs in [1, 2), below half an ulp
# of every output of size 1/2 or more (most of them: x @ W is O(1)); what a young LoRA adapter's
# term looks like. Rounded once, the outputs keep it in expectation (mean kept fraction ~1); with
# x @ W rounded first only the smaller outputs keep it (~0.3 on a CPU sample).
TINY_ADDEND = 2.0**-10
TINY_KEPT_TOLERANCE = 0.05  # |mean kept fraction - 1|, far from the ~0.3 of rounding x @ W first
# The low-rank rows: LoRA's usual rank, and a scale alpha / r = 32 / 16 folded into low_rhs (as the
# caller does) for the speed rows; the correctness rows pass L and R as they are.
LOW_RANK = 16
LORA_SCALE = 2.0
LOW_TOKENS = (4096, 1000)
LOW_MAX_ULPS = 1.0

RESULTS: dict[str, Any] = {}


def write_json() -> None:
    """$OUT/stacked_matmul_hopper.json (when OUT is set), rewritten as rows arrive, so a crash or a
    hang keeps the rows so far."""
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "stacked_matmul_hopper.json").write_text(json.dumps(RESULTS, indent=1))


def relative_norm(got, want) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_stack(seed: int, layers: int, d_in: int, d_out: int, dtype):
    """Weights scaled by 1/sqrt(d_in), as a trained projection keeps activations O(1)."""
    return (jax.random.normal(jax.random.PRNGKey(seed), (layers, d_in, d_out), jnp.float32) / np.sqrt(d_in)).astype(
        dtype
    )


def random_x(seed: int, tokens: int, features: int, dtype):
    return jax.random.normal(jax.random.PRNGKey(seed), (tokens, features), jnp.float32).astype(dtype)


def guarded(rows: list, row: dict[str, Any], deadline: float, body) -> None:
    """Name the case, run body(row) under a hang watchdog, record an exception in the row, append
    the row and rewrite the JSON."""
    if time.perf_counter() > deadline:
        row["status"] = "SKIPPED (deadline)"
        print(f"SKIP  {row['case']}", flush=True)
        rows.append(row)
        return
    print(f"RUN   {row['case']}", flush=True)
    faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
    try:
        body(row)
    except Exception as exc:  # noqa: BLE001
        row["status"] = "FAIL"
        row["error"] = short_error(exc)
        traceback.print_exc()
    faulthandler.cancel_dump_traceback_later()
    rows.append(row)
    write_json()


# --- (a) correctness ----------------------------------------------------------------------------


@functools.cache
def _ours(transpose_w: bool):
    return jax.jit(lambda x, w_stack, layer: stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w))


@functools.cache
def _ours_addend(transpose_w: bool):
    return jax.jit(lambda x, w_stack, layer, addend: stacked_matmul_hopper(
        x, w_stack, layer, transpose_w=transpose_w, addend=addend))


@functools.cache
def _float32_reference(transpose_w: bool):
    def reference(x, w_stack, layer):
        weight = jax.lax.dynamic_index_in_dim(w_stack, layer, keepdims=False).astype(jnp.float32)
        weight = weight.T if transpose_w else weight
        return jnp.dot(x.astype(jnp.float32), weight, precision=jax.lax.Precision.HIGHEST)

    return jax.jit(reference)


@functools.cache
def _float32_reference_addend(transpose_w: bool):
    return jax.jit(lambda x, w_stack, layer, addend: _float32_reference(transpose_w)(x, w_stack, layer)
                   + addend.astype(jnp.float32))


@functools.cache
def _xla_addend(transpose_w: bool):
    """XLA's one rounding: stacked_matmul_reference with the addend (the control for the tiny
    addend's kept fraction)."""
    return jax.jit(lambda x, w_stack, layer, addend: stacked_matmul_reference(
        x, w_stack, layer, transpose_w, addend=addend))


@functools.cache
def _ours_low(transpose_w: bool):
    return jax.jit(lambda x, w_stack, layer, low_lhs, low_rhs: stacked_matmul_hopper(
        x, w_stack, layer, transpose_w=transpose_w, low=(low_lhs, low_rhs)))


@functools.cache
def _float32_reference_low(transpose_w: bool):
    """float32 x @ W + L @ R (HIGHEST: true float32 products, no TF32), not rounded."""
    return jax.jit(lambda x, w_stack, layer, low_lhs, low_rhs: _float32_reference(transpose_w)(x, w_stack, layer)
                   + jnp.dot(low_lhs.astype(jnp.float32), low_rhs.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST))


@functools.cache
def _xla_low(transpose_w: bool):
    """XLA's one rounding: stacked_matmul_reference with low (the tiny term's control)."""
    return jax.jit(lambda x, w_stack, layer, low_lhs, low_rhs: stacked_matmul_reference(
        x, w_stack, layer, transpose_w, low=(low_lhs, low_rhs)))


def ulp_errors(got, reference_f32, dtype) -> dict[str, float]:
    """|got - reference| in ulps of the 16-bit dtype at the reference's magnitude (floored at
    rms/256, so an output that is ~0 is not judged in ulps of a tiny number, where the float32
    sums' own accumulation error would dominate), and the share of outputs equal to the reference
    rounded once."""
    reference = np.asarray(reference_f32, np.float64)
    got64 = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    if not np.all(np.isfinite(got64)):
        return {"max_ulps": float("nan"), "identical_fraction": float("nan")}
    floor = np.sqrt(np.mean(np.square(reference))) / 256
    magnitude = np.maximum(np.abs(reference), floor)
    ulp = np.exp2(np.floor(np.log2(magnitude)) - jnp.finfo(dtype).nmant)
    rounded = np.asarray(jnp.asarray(reference_f32, dtype).astype(jnp.float32), np.float64)
    return {"max_ulps": float(np.max(np.abs(got64 - reference) / ulp)),
            "identical_fraction": float(np.mean(got64 == rounded))}


def _stack_and_x(seed: int, d_in: int, d_out: int, transpose_w: bool, tokens: int):
    """A bf16 [LAYERS, d_in, d_out] stack, an x of the orientation's input width, and the output width."""
    d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)
    return random_stack(seed, LAYERS, d_in, d_out, BF16), random_x(seed + 1000, tokens, d_x, BF16), d_y


def low_correctness(rows: list, deadline: float) -> None:
    seed = 700
    for tokens in LOW_TOKENS:
        for d_in, d_out in MODEL_SHAPES["llama3-8b"]:
            for transpose_w in (False, True):
                seed += 1
                name = (f"low r={LOW_RANK} llama3-8b {d_in}x{d_out}{' T' if transpose_w else ''} tokens={tokens} "
                        "bfloat16")
                row: dict[str, Any] = {"case": name, "tokens": tokens, "d_in": d_in, "d_out": d_out,
                                       "transpose_w": transpose_w, "dtype": "bfloat16", "low_rank": LOW_RANK}

                def body(row, d_in=d_in, d_out=d_out, transpose_w=transpose_w, seed=seed, tokens=tokens):
                    w_stack, x, d_y = _stack_and_x(seed, d_in, d_out, transpose_w, tokens)
                    low_lhs = random_x(seed + 2000, tokens, LOW_RANK, BF16)  # L @ R O(1), as x @ W
                    low_rhs = (random_x(seed + 3000, LOW_RANK, d_y, jnp.float32) / np.sqrt(LOW_RANK)).astype(BF16)
                    layer = jnp.int32(2)
                    got = _ours_low(transpose_w)(x, w_stack, layer, low_lhs, low_rhs)
                    reference = _float32_reference_low(transpose_w)
                    want = reference(x, w_stack, layer, low_lhs, low_rhs)
                    row["rel_err"] = relative_norm(got, want)
                    row["rel_err_vs_layer_1"] = relative_norm(got, reference(x, w_stack, 1, low_lhs, low_rhs))
                    row["rel_err_vs_no_low"] = relative_norm(got, _float32_reference(transpose_w)(x, w_stack, layer))
                    row |= ulp_errors(got, want, BF16)
                    passed = row["rel_err"] <= TOLERANCE and row["max_ulps"] <= LOW_MAX_ULPS
                    if (d_in, d_out, tokens) == (4096, 4096, 4096):
                        # L @ R = 16 * 2**-14 = 2**-10 exactly, in every output
                        ones = jnp.ones((tokens, LOW_RANK), BF16)
                        tiny_rhs = jnp.full((LOW_RANK, d_y), TINY_ADDEND / LOW_RANK, BF16)
                        without = _ours(transpose_w)(x, w_stack, layer)
                        row["tiny_low_kept"] = kept_fraction(_ours_low(transpose_w)(x, w_stack, layer, ones, tiny_rhs),
                                                             without, TINY_ADDEND)
                        row["tiny_low_kept_xla"] = kept_fraction(
                            _xla_low(transpose_w)(x, w_stack, layer, ones, tiny_rhs),
                            stacked_matmul_reference(x, w_stack, layer, transpose_w), TINY_ADDEND)
                        passed = passed and abs(row["tiny_low_kept"] - 1) <= TINY_KEPT_TOLERANCE
                    row["status"] = "PASS" if passed else "FAIL"

                guarded(rows, row, deadline, body)
                detail = row.get("error") or (f"{row.get('rel_err', float('nan')):.2e}, max "
                                              f"{row.get('max_ulps', float('nan')):.3f} ulp, identical "
                                              f"{row.get('identical_fraction', float('nan')):.4f}")
                kept = f", tiny term kept {row['tiny_low_kept']:.3f}" if "tiny_low_kept" in row else ""
                print(f"{row['status']:5} {name}: {detail}{kept}", flush=True)


def kept_fraction(with_addend, without_addend, addend_value: float) -> float:
    """mean(y + a rounded - y rounded) / a for a constant a: the share of the addend the output
    keeps on average (over outputs spread across many ulps, rounding once keeps all of it in
    expectation)."""
    delta = np.asarray(jnp.asarray(with_addend, jnp.float32) - jnp.asarray(without_addend, jnp.float32), np.float64)
    return float(np.mean(delta) / addend_value)


def addend_correctness(rows: list, deadline: float) -> None:
    seed = 500
    for d_in, d_out in ADDEND_SHAPES:
        for tokens in ADDEND_TOKENS:
            for transpose_w in (False, True):
                seed += 1
                name = f"addend llama3-8b {d_in}x{d_out}{' T' if transpose_w else ''} tokens={tokens} bfloat16"
                row: dict[str, Any] = {"case": name, "tokens": tokens, "d_in": d_in, "d_out": d_out,
                                       "transpose_w": transpose_w, "dtype": "bfloat16", "addend": True}

                def body(row, d_in=d_in, d_out=d_out, transpose_w=transpose_w, seed=seed, tokens=tokens):
                    w_stack, x, d_y = _stack_and_x(seed, d_in, d_out, transpose_w, tokens)
                    addend = random_x(seed + 2000, tokens, d_y, BF16)  # O(1), as x @ W
                    layer = jnp.int32(2)
                    got = _ours_addend(transpose_w)(x, w_stack, layer, addend)
                    reference = _float32_reference_addend(transpose_w)
                    row["rel_err"] = relative_norm(got, reference(x, w_stack, layer, addend))
                    row["rel_err_vs_layer_1"] = relative_norm(got, reference(x, w_stack, 1, addend))
                    row["rel_err_vs_no_addend"] = relative_norm(got, _float32_reference(transpose_w)(x, w_stack, layer))
                    passed = row["rel_err"] <= TOLERANCE
                    if (d_in, d_out, tokens) == (4096, 4096, 4096):
                        tiny = jnp.full((tokens, d_y), TINY_ADDEND, BF16)
                        without = _ours(transpose_w)(x, w_stack, layer)
                        row["tiny_addend_kept"] = kept_fraction(_ours_addend(transpose_w)(x, w_stack, layer, tiny),
                                                                without, TINY_ADDEND)
                        row["tiny_addend_kept_xla"] = kept_fraction(_xla_addend(transpose_w)(x, w_stack, layer, tiny),
                                                                    stacked_matmul_reference(x, w_stack, layer,
                                                                                             transpose_w),
                                                                    TINY_ADDEND)
                        passed = passed and abs(row["tiny_addend_kept"] - 1) <= TINY_KEPT_TOLERANCE
                    row["status"] = "PASS" if passed else "FAIL"

                guarded(rows, row, deadline, body)
                kept = f", tiny addend kept {row['tiny_addend_kept']:.3f}" if "tiny_addend_kept" in row else ""
                print(f"{row['status']:5} {name}: {row.get('error') or format(row.get('rel_err', float('nan')), '.2e')}"
                      f"{kept}", flush=True)


def correctness(deadline: float, only: str | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    RESULTS["correctness"] = rows
    if only == "low":
        low_correctness(rows, deadline)
        return rows
    low_correctness(rows, deadline)
    addend_correctness(rows, deadline)
    seed = 0
    for model, shapes in MODEL_SHAPES.items():
        tokens, dtype = CORRECTNESS_TOKENS[model]
        for d_in, d_out in shapes:
            for transpose_w in (False, True):
                seed += 1
                name = f"{model} {d_in}x{d_out}{' T' if transpose_w else ''} tokens={tokens} {jnp.dtype(dtype).name}"
                row: dict[str, Any] = {"case": name, "tokens": tokens, "d_in": d_in, "d_out": d_out,
                                       "transpose_w": transpose_w, "dtype": jnp.dtype(dtype).name}

                def body(row, d_in=d_in, d_out=d_out, transpose_w=transpose_w, seed=seed, tokens=tokens, dtype=dtype):
                    w_stack = random_stack(seed, LAYERS, d_in, d_out, dtype)
                    x = random_x(seed + 1000, tokens, d_out if transpose_w else d_in, dtype)
                    layer = jnp.int32(2)
                    got = _ours(transpose_w)(x, w_stack, layer)
                    want = _float32_reference(transpose_w)(x, w_stack, layer)
                    row["rel_err"] = relative_norm(got, want)
                    # the same product of a neighbouring layer, so reading the wrong layer shows
                    row["rel_err_vs_layer_1"] = relative_norm(got, _float32_reference(transpose_w)(x, w_stack, 1))
                    row["status"] = "PASS" if row["rel_err"] <= TOLERANCE else "FAIL"

                guarded(rows, row, deadline, body)
                print(f"{row['status']:5} {name}: {row.get('error') or format(row.get('rel_err', float('nan')), '.2e')}",
                      flush=True)

    row = {"case": "dx of a 4-layer lax.scan, 4096x4096, tokens=1000 bf16"}

    def scan_grad(row):
        w_stack = random_stack(99, LAYERS, 4096, 4096, BF16)
        x = random_x(100, 1000, 4096, BF16)
        probe = random_x(101, 1000, 4096, jnp.float32)

        def loss(matmul):
            def fn(x, w_stack):
                def body(hidden, layer):
                    return matmul(hidden, w_stack, layer), None

                hidden, _ = jax.lax.scan(body, x, jnp.arange(LAYERS, dtype=jnp.int32))
                return jnp.sum(hidden.astype(jnp.float32) * probe)

            return jax.jit(jax.grad(fn))

        got = loss(stacked_matmul_hopper)(x, w_stack)
        want = loss(stacked_matmul_reference)(x.astype(jnp.float32), w_stack.astype(jnp.float32))
        row["rel_err"] = relative_norm(got, want)
        row["rel_err_vs_xla_bf16"] = relative_norm(got, loss(stacked_matmul_reference)(x, w_stack))
        row["status"] = "PASS" if row["rel_err"] <= TOLERANCE else "FAIL"

    guarded(rows, row, deadline, scan_grad)
    print(f"{row['status']:5} {row['case']}: {row.get('error') or format(row.get('rel_err', float('nan')), '.2e')}",
          flush=True)
    return rows


# --- (b) speed ----------------------------------------------------------------------------------


def _speed_impls(transpose_w: bool):
    def orient(weight):
        return weight.T if transpose_w else weight

    def static_slice(x, w_stack, layer):
        del layer
        return jnp.dot(x, orient(w_stack[3]), preferred_element_type=jnp.float32).astype(x.dtype)

    def dynamic_slice(x, w_stack, layer):
        weight = jax.lax.dynamic_index_in_dim(w_stack, layer, keepdims=False)
        return jnp.dot(x, orient(weight), preferred_element_type=jnp.float32).astype(x.dtype)

    def ours(x, w_stack, layer):
        return stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w)

    return {"ours": jax.jit(ours), "xla_static_slice": jax.jit(static_slice), "xla_dynamic_slice": jax.jit(dynamic_slice)}


def _plain_impls(w_stack):
    """Controls on a plain [d_in, d_out] weight (no stack): cuBLAS, and jax's own Mosaic GPU
    example GEMM with our tiles, so a gap to cuBLAS can be told apart from the Mosaic GPU GEMM's."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as example

    weight = jnp.array(w_stack[3], copy=True)
    tiles = choose_tiles(0, weight.shape[0], weight.shape[1])
    config = example.TuningConfig(
        tile_m=tiles.tile_m, tile_n=tiles.tile_n, tile_k=tiles.tile_k, max_concurrent_steps=tiles.stages,
        epi_tile_m=tiles.epilogue_m, epi_tile_n=tiles.epilogue_n, grid_minor_dim=example.MatmulDimension.N,
        grid_tile_width=tiles.grid_tile_width, wg_dimension=example.MatmulDimension.N,
    )

    def cublas_plain(x, w_stack, layer):
        del w_stack, layer
        return jnp.dot(x, weight, preferred_element_type=jnp.float32).astype(x.dtype)

    def jax_example_plain(x, w_stack, layer):
        del w_stack, layer
        return example.matmul(x, weight, None, config)

    return {"xla_plain_weight": jax.jit(cublas_plain), "jax_example_plain_weight": jax.jit(jax_example_plain)}


def time_ratio(row: dict[str, Any], key: str, numerator: str, denominator: str) -> None:
    """row[key] = numerator's ms / denominator's ms, when both were timed."""
    if f"{numerator}_ms" in row and f"{denominator}_ms" in row:
        row[key] = row[f"{numerator}_ms"] / row[f"{denominator}_ms"]


def warm_the_card(seconds: float = 1.5) -> None:
    """Busy the GPU before the first timed row: on an H200 two x @ W rows that ran first in their
    process took 2x and 5x the time the same kernel took in another process (seventh session), and
    a card idling at 345 MHz may not have reached its clocks within 2 warm-up calls."""
    a = jnp.ones((8192, 8192), BF16)
    matmul = jax.jit(lambda a: a @ a)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        matmul(a).block_until_ready()


def speed_rows(tokens: int, deadline: float, warmup: int, iters: int, rows: list) -> None:
    for d_in, d_out in MODEL_SHAPES["llama3-8b"]:
        w_stack = random_stack(d_in + d_out, LAYERS, d_in, d_out, BF16)
        for transpose_w in (False, True):
            name = f"speed llama3-8b {d_in}x{d_out}{' T' if transpose_w else ''} tokens={tokens}"
            row: dict[str, Any] = {"case": name, "tokens": tokens, "d_in": d_in, "d_out": d_out,
                                   "transpose_w": transpose_w}
            flops = 2.0 * tokens * d_in * d_out

            def body(row, w_stack=w_stack, transpose_w=transpose_w, d_in=d_in, d_out=d_out, flops=flops):
                x = random_x(tokens, tokens, d_out if transpose_w else d_in, BF16)
                layer = jnp.int32(3)
                impls = _speed_impls(transpose_w)
                if (d_in, d_out) == (4096, 4096) and not transpose_w:
                    impls |= _plain_impls(w_stack)
                row["rel_err_ours_vs_static"] = relative_norm(impls["ours"](x, w_stack, layer),
                                                              impls["xla_static_slice"](x, w_stack, layer))
                for impl, fn in impls.items():
                    record_timing(row, impl, fn, (x, w_stack, layer), flops, warmup, iters)
                time_ratio(row, "ours_over_static", "ours", "xla_static_slice")
                time_ratio(row, "dynamic_over_static", "xla_dynamic_slice", "xla_static_slice")
                row["status"] = "OK"

            guarded(rows, row, deadline, body)
        del w_stack


def addend_speed_rows(tokens: int, deadline: float, warmup: int, iters: int, rows: list) -> None:
    """x @ W + addend, rounded once, x @ W orientation (the LoRA forward; its dx has no addend)."""
    for d_in, d_out in MODEL_SHAPES["llama3-8b"]:
        name = f"speed+addend llama3-8b {d_in}x{d_out} tokens={tokens}"
        row: dict[str, Any] = {"case": name, "tokens": tokens, "d_in": d_in, "d_out": d_out, "addend": True}
        flops = 2.0 * tokens * d_in * d_out

        def body(row, d_in=d_in, d_out=d_out, flops=flops):
            w_stack = random_stack(d_in + d_out, LAYERS, d_in, d_out, BF16)
            x = random_x(tokens, tokens, d_in, BF16)
            addend = random_x(tokens + 1, tokens, d_out, BF16)
            layer = jnp.int32(3)

            def xla_static_slice_addend(x, w_stack, layer, addend):
                del layer
                product = jnp.dot(x, w_stack[3], preferred_element_type=jnp.float32)
                return (product + addend.astype(jnp.float32)).astype(x.dtype)

            xla = jax.jit(xla_static_slice_addend)
            row["rel_err_ours_vs_xla"] = relative_norm(_ours_addend(False)(x, w_stack, layer, addend),
                                                       xla(x, w_stack, layer, addend))
            record_timing(row, "ours_addend", _ours_addend(False), (x, w_stack, layer, addend), flops, warmup, iters)
            record_timing(row, "xla_static_slice_addend", xla, (x, w_stack, layer, addend), flops, warmup, iters)
            record_timing(row, "ours_no_addend", _ours(False), (x, w_stack, layer), flops, warmup, iters)
            time_ratio(row, "ours_over_xla", "ours_addend", "xla_static_slice_addend")
            time_ratio(row, "addend_over_no_addend", "ours_addend", "ours_no_addend")
            row["status"] = "OK"

        guarded(rows, row, deadline, body)


def low_speed_rows(tokens: int, deadline: float, warmup: int, iters: int, rows: list) -> None:
    """x @ W + scale * L @ R rounded once, both orientations (the forward's (x a, b) and dx's
    (dx a, a^T)), r = 16: the low-rank term in the kernel against what the model runs today."""
    for d_in, d_out in MODEL_SHAPES["llama3-8b"]:
        for transpose_w in (False, True):
            name = f"speed+low llama3-8b {d_in}x{d_out}{' T' if transpose_w else ''} tokens={tokens}"
            row: dict[str, Any] = {"case": name, "tokens": tokens, "d_in": d_in, "d_out": d_out,
                                   "transpose_w": transpose_w, "low_rank": LOW_RANK}
            flops = 2.0 * tokens * d_in * d_out  # the base product's; the rank-16 term adds 0.4-1.6 %

            def body(row, d_in=d_in, d_out=d_out, transpose_w=transpose_w, flops=flops):
                w_stack = random_stack(d_in + d_out, LAYERS, d_in, d_out, BF16)
                d_x, d_y = (d_out, d_in) if transpose_w else (d_in, d_out)
                x = random_x(tokens, tokens, d_x, BF16)
                low_lhs = random_x(tokens + 1, tokens, LOW_RANK, BF16)
                low_rhs = (random_x(tokens + 2, LOW_RANK, d_y, jnp.float32) / np.sqrt(LOW_RANK)).astype(BF16)
                layer = jnp.int32(3)

                def ours_low(x, w_stack, layer, low_lhs, low_rhs):
                    scaled_rhs = (LORA_SCALE * low_rhs.astype(jnp.float32)).astype(low_rhs.dtype)  # the caller's fold
                    return stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w, low=(low_lhs, scaled_rhs))

                def ours_addend_with_its_gemm(x, w_stack, layer, low_lhs, low_rhs):
                    addend = (LORA_SCALE * jnp.dot(low_lhs, low_rhs, preferred_element_type=jnp.float32)).astype(x.dtype)
                    return stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w, addend=addend)

                def xla_exact_static_slice(x, w_stack, layer, low_lhs, low_rhs):
                    del layer
                    weight = w_stack[3].T if transpose_w else w_stack[3]
                    return base_plus_low_rank(x, weight, low_lhs, low_rhs, LORA_SCALE)

                def ours_no_low(x, w_stack, layer, low_lhs, low_rhs):
                    del low_lhs, low_rhs
                    return stacked_matmul_hopper(x, w_stack, layer, transpose_w=transpose_w)

                impls = {"ours_low": ours_low, "ours_addend": ours_addend_with_its_gemm,
                         "xla_exact_static_slice": xla_exact_static_slice, "ours_no_low": ours_no_low}
                impls = {impl: jax.jit(fn) for impl, fn in impls.items()}
                args = (x, w_stack, layer, low_lhs, low_rhs)
                row["rel_err_low_vs_addend"] = relative_norm(impls["ours_low"](*args), impls["ours_addend"](*args))
                for impl, fn in impls.items():
                    record_timing(row, impl, fn, args, flops, warmup, iters)
                time_ratio(row, "low_over_addend", "ours_low", "ours_addend")
                time_ratio(row, "low_over_xla", "ours_low", "xla_exact_static_slice")
                time_ratio(row, "low_over_no_low", "ours_low", "ours_no_low")
                row["status"] = "OK"

            guarded(rows, row, deadline, body)


def scan_rows(deadline: float, warmup: int, iters: int, rows: list, layers: int = 32, tokens: int = 4096) -> None:
    """x -> x @ W[i] for 32 layers of 4096 x 4096 in a lax.scan: ours reads W[i] in place, XLA's
    dot reads a copy of the scan's slice (and copies again in the backward)."""
    d = 4096
    flops = 2.0 * tokens * d * d * layers
    w_stack = random_stack(7, layers, d, d, BF16)
    x = random_x(8, tokens, d, BF16)

    def scan_fn(matmul):
        def run(x, w_stack):
            def body(hidden, layer):
                return matmul(hidden, w_stack, layer), None

            hidden, _ = jax.lax.scan(body, x, jnp.arange(layers, dtype=jnp.int32))
            return hidden

        return run

    impls = {"ours": stacked_matmul_hopper, "xla_scan_slice": stacked_matmul_reference}
    for part in ("fwd", "fwd_bwd"):
        name = f"scan {layers} layers {d}x{d} tokens={tokens} {part}"
        row: dict[str, Any] = {"case": name, "layers": layers, "tokens": tokens, "d": d, "part": part}

        def body(row, part=part):
            part_flops = flops * (2 if part == "fwd_bwd" else 1)
            for impl, matmul in impls.items():
                run = scan_fn(matmul)
                if part == "fwd":
                    fn = jax.jit(run)
                else:
                    def fwd_bwd(x, w_stack, run=run):
                        out, vjp = jax.vjp(lambda x: run(x, w_stack), x)
                        return out, vjp(out)[0]

                    fn = jax.jit(fwd_bwd)
                ms = record_timing(row, impl, fn, (x, w_stack), part_flops, warmup, iters)
                if ms is not None:
                    row[f"{impl}_ms_per_layer"] = ms / layers
            time_ratio(row, "ours_over_xla", "ours", "xla_scan_slice")
            row["status"] = "OK"

        guarded(rows, row, deadline, body)


def print_tables(checks: list, speeds: list) -> None:
    print(f"\n{'correctness case':66} {'rel err':>9} {'vs layer 1':>10} status")
    for row in checks:
        rel = row.get("rel_err")
        other = row.get("rel_err_vs_layer_1")
        print(f"{row['case']:66} {format(rel, '9.2e') if rel is not None else '-':>9} "
              f"{format(other, '10.2e') if other is not None else '-':>10} {row['status']} {row.get('error', '')[:100]}")
    low_rows = [row for row in checks if row.get("low_rank")]
    if low_rows:
        print(f"\n{'x @ W + L @ R, rounded once':66} {'max ulp':>8} {'identical':>9} {'tiny kept':>9} "
              f"{'xla kept':>8}")
        for row in low_rows:
            cells = [format(row[key], fmt) if row.get(key) is not None else "-" for key, fmt in (
                ("max_ulps", "8.3f"), ("identical_fraction", "9.4f"), ("tiny_low_kept", "9.3f"),
                ("tiny_low_kept_xla", "8.3f"))]
            print(f"{row['case']:66} {cells[0]:>8} {cells[1]:>9} {cells[2]:>9} {cells[3]:>8} {row['status']}")
    for row in checks:
        if "tiny_addend_kept" in row:
            print(f"  tiny addend {TINY_ADDEND:g} kept on average, {row['case']}: ours {row['tiny_addend_kept']:.3f}, "
                  f"XLA rounding once {row.get('tiny_addend_kept_xla', float('nan')):.3f}")
    if not speeds:
        return

    def table(title: str, keep, columns: list[tuple[str, str, str]]) -> None:
        """One table of the speed rows keep() selects: columns are (header, row key, format)."""
        if not any(keep(row["case"]) for row in speeds):
            return
        widths = [max(len(header), int(fmt.split(".")[0])) for header, _, fmt in columns]
        print(f"\n{title:50} " + " ".join(f"{header:>{width}}" for (header, _, _), width in zip(columns, widths)))
        for row in speeds:
            if not keep(row["case"]):
                continue
            cells = [format(row[key], fmt) if row.get(key) is not None else "-" for _, key, fmt in columns]
            print(f"{row['case']:50} " + " ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths))
                  + f" {row.get('error', '')[:80]}")

    table("speed case", lambda case: not case.startswith(("scan", "speed+addend", "speed+low")), [
        ("ours ms", "ours_ms", "8.3f"), ("TF/s", "ours_tflops", "5.0f"), ("static", "xla_static_slice_ms", "8.3f"),
        ("TF/s", "xla_static_slice_tflops", "5.0f"), ("dynamic", "xla_dynamic_slice_ms", "8.3f"),
        ("TF/s", "xla_dynamic_slice_tflops", "5.0f"), ("ours/st", "ours_over_static", "7.3f"),
        ("dyn/st", "dynamic_over_static", "7.3f")])
    for row in speeds:
        controls = {key: round(row[key], 3) for key in ("xla_plain_weight_ms", "jax_example_plain_weight_ms") if key in row}
        if controls:
            print(f"  controls on a plain weight, {row['case']}: {controls}")
    table("x @ W + addend, rounded once", lambda case: case.startswith("speed+addend"), [
        ("ours ms", "ours_addend_ms", "8.3f"), ("TF/s", "ours_addend_tflops", "5.0f"),
        ("xla ms", "xla_static_slice_addend_ms", "8.3f"), ("TF/s", "xla_static_slice_addend_tflops", "5.0f"),
        ("ours/xla", "ours_over_xla", "8.3f"), ("no-add ms", "ours_no_addend_ms", "9.3f"),
        ("add/no-add", "addend_over_no_addend", "10.3f")])
    table("x @ W + 2 L @ R (r=16), rounded once", lambda case: case.startswith("speed+low"), [
        ("low ms", "ours_low_ms", "8.3f"), ("TF/s", "ours_low_tflops", "5.0f"),
        ("addend+gemm", "ours_addend_ms", "11.3f"), ("xla exact", "xla_exact_static_slice_ms", "9.3f"),
        ("no-low ms", "ours_no_low_ms", "9.3f"), ("low/addend", "low_over_addend", "10.3f"),
        ("low/xla", "low_over_xla", "7.3f"), ("low/no-low", "low_over_no_low", "10.3f")])
    table("scan case", lambda case: case.startswith("scan"), [
        ("ours ms", "ours_ms", "8.2f"), ("/layer", "ours_ms_per_layer", "7.3f"), ("TF/s", "ours_tflops", "5.0f"),
        ("xla ms", "xla_scan_slice_ms", "8.2f"), ("/layer", "xla_scan_slice_ms_per_layer", "7.3f"),
        ("TF/s", "xla_scan_slice_tflops", "5.0f"), ("ours/xla", "ours_over_xla", "8.3f")])

def pop_only_option() -> str | None:
    """--only low, taken off sys.argv before bench.timing's shared options are parsed."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--only", choices=["low"], default=None)
    known, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    return known.only


def main() -> None:
    only = pop_only_option()
    args, deadline = gpu_check_args(__doc__.splitlines()[0])

    env: dict[str, Any] = {"jax": jax.__version__, "backend": jax.default_backend(),
                           "device": jax.devices()[0].device_kind, "available": available(),
                           "tiles_llama_4096x4096": str(choose_tiles(4096, 4096, 4096))}
    RESULTS["env"] = env
    print(json.dumps(env), flush=True)
    write_json()
    if not env["available"]:
        print("no sm90 GPU here: stacked_matmul_hopper cannot run; nothing measured")
        return

    checks = [] if args.skip_correctness else correctness(deadline, only)
    passed = sum(row["status"] == "PASS" for row in checks)
    print(f"correctness: {passed}/{len(checks)} PASS", flush=True)
    speeds: list[dict[str, Any]] = []
    if not args.skip_speed:
        RESULTS["speed"] = speeds
        warm_the_card()
        if only == "low":
            low_speed_rows(4096, deadline, args.warmup, args.iters, speeds)
        else:
            speed_rows(4096, deadline, args.warmup, args.iters, speeds)
            addend_speed_rows(4096, deadline, args.warmup, args.iters, speeds)
            low_speed_rows(4096, deadline, args.warmup, args.iters, speeds)
            scan_rows(deadline, args.warmup, args.iters, speeds)
            speed_rows(8192, deadline, args.warmup, args.iters, speeds)
    print_tables(checks, speeds)
    print(f"\ncorrectness: {passed}/{len(checks)} PASS; "
          f"failed: {[row['case'] for row in checks if row['status'] == 'FAIL']}")
    write_json()
    if os.environ.get("OUT"):
        print(f"wrote {Path(os.environ['OUT']) / 'stacked_matmul_hopper.json'}")


if __name__ == "__main__":
    main()

"""The longest sequence one training step can take, per memory budget (issue 11, part 3).

llama3-8b shapes (bench/e2e.py SHAPES), batch 1, two configurations:
  - qlora: NF4 base weights (bench/qlora.py's quantized_random_params), LoRA rank 32 on all 7 linear
    layers; Unsloth's published maxima (Llama 3.1 8B, 4-bit QLoRA, rank 32, batch 1) are its targets;
  - bf16: bf16 base weights (bench/e2e.py's device_random_params), LoRA rank 16 on all 7.
Both: use_gradient_checkpointing="unsloth" (layer inputs offloaded to pinned host memory), the MLP
tiled over the sequence (OpsConfig.mlp_tile_tokens "auto" tiles under "unsloth"), the chunked loss
head and cuDNN attention (random tokens, no segment ids: attention "auto" picks cuDNN on a GPU).

A trial is one child process: draw the weights on the device, build SFTTrainer's own jitted step
on a trainer shell (as bench/e2e.py's run_config does), compile it and run one step (forward,
backward, clipping, AdamW) at sequence length S. It succeeds if that step finishes with a finite
loss (and a second step too, when one is run for its time). An out-of-memory error, a crash or the
trial timeout is a failure; a trial cut short by --deadline is neither, and ends the search. Any
other error counts as a failure too, since it may depend on the length (from 524,288 tokens on, a
[S, 4096] tensor has more than 2^31 elements, where int32 indexing breaks), but a second one
stops the search. A length whose pinned host memory would pass 90 % of the host's available RAM
is not run (a failure, marked "host").

Memory budgets (--budgets, GB; "80" is an H100 80GB's 81,559 MiB, any other B is B GiB, and a
budget above the card is the whole card). The card keeps RESERVE (--reserve-gib, 1 GiB) outside
XLA's allocator for the CUDA context and libraries, as a real card of that size would, so the
allocator is capped at min(budget, card) - RESERVE. Every trial records the memory it actually
used outside the allocator (nvidia-smi's figure for the process less the allocator's pool) to
check that assumption.

How the cap is made real. Each child gets XLA_CLIENT_MEM_FRACTION (never together with its
deprecated name XLA_PYTHON_CLIENT_MEM_FRACTION: jaxlib refuses both) = cap / total device memory, with XLA_PYTHON_CLIENT_PREALLOCATE=true,
and JAX_PLATFORMS=cuda so that a backend that fails to start is an error, not a silent CPU run.
Why preallocation: the JAX GPU memory docs give the fraction as the size of the preallocated
pool; with preallocation off the pool grows on demand and fragments, and how far it may grow
has changed between versions (recent XLA reads a bare fraction as "preallocate this, grow to all
of the card" and wants "F-F" for a fixed pool; older jaxlib rejects that form). So a probe child
checks the cap before any trial: it allocates 256 MiB blocks under a 4 GiB cap and counts what it
got. It tries the bare fraction, then "F-F", then --xla_gpu_memory_fraction_policy=F-F in
XLA_FLAGS; if none holds, trials run on the whole card with a filler array of (card - cap) bytes
allocated first ("filler"), which bounds what is left by the card's physical memory whatever the
allocator does. The method used is in the JSON and the report.

Depth (--layers). At long context a step is dominated by attention, quadratic in S: llama3-8b at
400k tokens needs about 1.9e17 FLOPs in cuDNN's attention alone (forward, backward and the
checkpoint's recomputed forward), some 6-7 minutes per step on an H100, so a search at full depth
cannot fit one 10-minute call. By default a trial therefore runs 2 of the 32 decoder layers, and
the device memory the other 30 would hold is allocated as a filler before the compile: their base
weights and float32 LoRA A/B (bytes per layer measured from the drawn arrays), AdamW's m and v
(2x the adapters) and GRADIENT_COPIES float32 gradient buffers (the memory planner's GPU count).
What a layer's step needs beyond that (its recomputed forward, its backward, one MLP tile, the
loss head's chunk) does not depend on the depth under "unsloth", whose saved layer inputs live in
host memory, so the peak is the 32-layer model's up to the gradient count (one buffer more or less
is 0.3 GiB for qlora, 0.15 GiB for bf16). The host memory is not simulated: the full model needs
32 x S x hidden x 2 bytes of pinned memory for the offloaded layer inputs, printed beside every
result with this machine's RAM (a 128 GiB host holds at most about 480k tokens of llama3-8b).
After the searches, where the time left allows and the estimate is under --confirm-max seconds,
each search's longest length is run once more at all 32 layers (the "check" column): that
validates the proxy where it is cheap (16 and 24 GB) and gives the real tokens/s there. --layers
32 (or "full") searches at the real depth; to confirm one length on its own:
    python3 bench/long_context.py --configs qlora --budgets 16 --layers full --start 49152 --max-trials 1
Tokens/s at the proxy depth is measured; the 32-layer figure beside it is that step time scaled
by 32 / layers (slightly pessimistic: the embedding and loss head do not scale with depth).

Search, per configuration and budget: the first length is the memory planner's prediction
(fastft_jax.plan.max_seq_length_that_fits for the capped allocator, with the MLP tile the run
uses; a budget it says nothing fits is not run), or --start, else (no planner, --no-planner)
--doubling-start (16,384) doubling. From there it gallops (+5 %, +10 %, +20 %, ... after each
success, the same downwards after each failure; x2 and /2 without a planner) until one success
and one failure bracket the maximum, then bisects until the bracket is within 5 % or 2,048 tokens.
Lengths are multiples of 1,024. Each trial's time is estimated (a FLOP model calibrated by the
trials already run); the searches share --deadline in proportion to their estimates, a search
stops (reporting its bracket) when its next trial would not fit its share, and a second, timed
step is run only when its estimate is under --second-step-max seconds (else tokens/s comes from
the first step, which also pays for allocating the pinned host buffers).

Reported per configuration and budget: the longest S that completed, the shortest that failed
(and why), tokens/s at the longest (second step, or first where marked), the peak device memory
there (jax memory_stats peak_bytes_in_use, the filler included: the 32-layer model's peak), the
planner's longest S and its predicted peak at the measured longest S with their errors in %,
the host memory the full model needs there, and Unsloth's published maxima with issue 11's
targets (80 GB: 342,733 -> >= 400,000; 24 GB: 78,475 -> >= 90,000; 16 GB: 40,724 -> >= 48,000).

Output: $OUT (or --out) gets long_context.json (rewritten after every trial), long_context.log and
long_context.md (the section); --results-md FILE appends the dated section (card, jax version,
date); --from-json FILE re-renders a finished run.

  python3 bench/long_context.py --dry-run                        # caps, starting lengths, time estimate; runs nothing
  python3 bench/long_context.py --configs qlora                  # the issue's targets: one call (~9 min)
  python3 bench/long_context.py --configs bf16                   # a second call
  python3 bench/long_context.py --configs qlora --budgets 80 --confirm-max 0   # the headline alone
  python3 bench/long_context.py --smoke                          # CPU check of the whole script, ~3 min

--smoke runs on the CPU: a 4-layer tiny Llama (bench/e2e.py's tiny-llama shape) at a proxy depth
of 2, lengths in multiples of 128. The CPU has no allocator cap, so a SIMULATED out-of-memory
rule stands in for it: a trial fails when its compiled step (XLA's memory analysis) plus the
filler passes SMOKE_BYTES_PER_GB x budget. Every other part (children, planner start, search,
timeouts, JSON, report) is the GPU run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import e2e  # bench/e2e.py, through the path set just above

MODEL = "llama3-8b"
CONFIGS = {
    "qlora": {"quantization": "nf4", "rank": 32},
    "bf16": {"quantization": None, "rank": 16},
}
CHECKPOINTING = "unsloth"
# Unsloth's published maxima for Llama 3.1 8B, 4-bit QLoRA rank 32, batch 1, and issue 11's targets.
UNSLOTH_MAX = {80: 342_733, 24: 78_475, 16: 40_724}
TARGET = {80: 400_000, 24: 90_000, 16: 48_000}
# nvidia-smi's memory.total of an H100 80GB; other budgets are GiB.
H100_80GB_BYTES = 81_559 << 20
GIB = 1 << 30
# Float32 LoRA-sized gradient buffers live in a step (fastft_jax/plan.py's GPU calibration).
GRADIENT_COPIES = 2
# The FLOP model of a step's time, before any trial calibrates it: cuDNN's causal attention at
# 500 TFLOP/s (bench/RESULTS.md: 532 at 32k x 1, fewer at shorter rows) counting forward 2·S²·hidden, backward 2.5x that and the
# checkpoint's recomputed forward; the rest of a layer at 2.7 µs per token (llama3-8b "unsloth", 10,686
# tok/s at 2k, less the loss head); the loss head, 3 matmuls of [S, 4096] x [4096, 128256].
ATTENTION_FLOPS_PER_S = 500e12
LAYER_SECONDS_PER_TOKEN = 2.7e-6
HEAD_SECONDS_PER_TOKEN = 6.3e-6
# A trial's cost besides its steps (process start, weights, compile), until trials measure it.
TRIAL_OVERHEAD_S = 25.0
SMOKE_OVERHEAD_S = 8.0
# Drawing (and quantizing) one more decoder layer's weights on the device.
BUILD_SECONDS_PER_LAYER = 0.5
# --smoke: the simulated allocator limit, per "GB" of budget, for the 4-layer tiny Llama on the CPU.
SMOKE_BYTES_PER_GB = 2 << 20
SMOKE_LAYERS = 4
CHILD_LINES_SHOWN = 60
PROBE_CAP_BYTES = 4 * GIB
PROBE_BLOCK_BYTES = 256 << 20
# Galloping: the first step away from the planner's start, and the tolerance the bisection stops at.
STEP_FRACTION = 0.05


# ==================================================================================================
# Shapes and the FLOP model


def full_model_config(smoke: bool):
    """The 32-layer llama3-8b ModelConfig (or the smoke test's 4-layer tiny Llama)."""
    from convert.hf import model_config_from_hf

    if smoke:
        shape = dict(e2e.hf_config("tiny-llama"), num_hidden_layers=SMOKE_LAYERS)
        return model_config_from_hf(shape, where="bench shape tiny-llama (4 layers)")
    return model_config_from_hf(e2e.hf_config(MODEL), where=f"bench shape {MODEL}")


def shape_of(smoke: bool) -> dict:
    shape = dict(e2e.SHAPES["tiny-llama" if smoke else MODEL])
    if smoke:
        shape["num_hidden_layers"] = SMOKE_LAYERS
    return shape


def estimated_step_s(seq: int, layers: int, hidden: int) -> float:
    attention_flops = 9 * seq * seq * hidden  # per layer: (2 forward + 5 backward + 2 recomputed) S² hidden
    return layers * (attention_flops / ATTENTION_FLOPS_PER_S + LAYER_SECONDS_PER_TOKEN * seq) + HEAD_SECONDS_PER_TOKEN * seq


def host_bytes_full_depth(seq: int, smoke: bool) -> int:
    """Pinned host memory of the 32-layer model's offloaded layer inputs (bf16 [S, hidden] per layer)."""
    shape = shape_of(smoke)
    return shape["num_hidden_layers"] * seq * shape["hidden_size"] * 2


# ==================================================================================================
# The child: one trial


def tree_bytes(tree) -> int:
    import jax

    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def device_filler(size: int) -> list:
    """size bytes held on the device, in blocks of at most 1 GiB (no fill kernel over 2^31 elements)."""
    import jax
    import jax.numpy as jnp

    blocks = [jnp.zeros((min(GIB, size - offset),), jnp.uint8) for offset in range(0, size, GIB)]
    return jax.block_until_ready(blocks)


def filler_bytes_for_missing_layers(base, lora, layers: int, full_layers: int) -> dict[str, int]:
    """Device bytes the full_layers - layers decoder layers left out would hold through a step:
    their base weights and LoRA adapters (measured per layer from the drawn stacks), AdamW's m and
    v, and GRADIENT_COPIES gradient buffers."""
    missing = full_layers - layers
    # QuantizedKernel is a pytree: its codes and absmax arrays are leaves.
    base_per_layer = tree_bytes(base["layers"]) // layers
    lora_per_layer = tree_bytes(lora["layers"]) // layers
    return {
        "base_weights": missing * base_per_layer,
        "lora": missing * lora_per_layer,
        "adamw": missing * 2 * lora_per_layer,
        "gradients": missing * GRADIENT_COPIES * lora_per_layer,
    }


def outside_allocator_bytes(pool_bytes: int | None) -> int | None:
    """Device memory this process holds outside XLA's pool (CUDA context, libraries), per nvidia-smi."""
    if not pool_bytes or not shutil.which("nvidia-smi"):
        return None
    query = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, check=False)
    for line in query.stdout.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()) and used.strip().isdigit():
            return (int(used) << 20) - pool_bytes
    return None


class SimulatedOutOfMemory(RuntimeError):
    """--smoke only: the CPU has no allocator cap, so a size rule stands in for it."""


def run_trial(spec: dict, result: dict) -> None:
    """One trial; fills result as it goes, so a failure keeps what was measured before it."""
    import gc

    import jax
    import jax.numpy as jnp
    import optax
    from qlora import quantized_random_params

    from fastft_jax import ops
    from fastft_jax.api import FastLanguageModel
    from fastft_jax.data import DataConfig
    from fastft_jax.model import CausalLM
    from fastft_jax.trainer import SFTTrainer, StepInputs, TrainingArguments, learning_rate_schedule

    device = jax.devices()[0]
    result.update(device_kind=device.device_kind, platform=device.platform, jax_version=jax.__version__)
    if spec["expect_gpu"] and device.platform != "gpu":
        raise RuntimeError(f"expected a GPU, got {device.platform}")
    seq, layers = spec["seq"], spec["layers"]
    full_config = full_model_config(spec["smoke"])
    config = dataclasses.replace(full_config, num_layers=layers)
    ops_config = ops.OpsConfig.from_env()
    result["ops_resolved"] = ops_config.describe(packed_rows=False)

    result["stage"] = "weights"
    start = time.perf_counter()
    # The "filler" cap (where no allocator setting holds): the card less the budget, taken first.
    cap_filler = device_filler(spec["cap_filler_bytes"])
    draw = quantized_random_params if spec["quantization"] == "nf4" else e2e.device_random_params
    params = draw(config, spec["seed"], jnp.bfloat16)
    model = CausalLM(config, params, dtype=jnp.bfloat16, max_seq_length=seq, ops_config=ops_config)
    del params
    model = FastLanguageModel.get_peft_model(model, r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.0,
                                             use_gradient_checkpointing=CHECKPOINTING, random_state=spec["seed"])
    model.set_lora_params(e2e._nonzero_lora_b(model.lora_params(), jax.random.PRNGKey(spec["seed"] + 99)))
    jax.block_until_ready(model.base_params())
    missing = filler_bytes_for_missing_layers(model.base_params(), model.lora_params(), layers, full_config.num_layers)
    result["missing_layers_gib"] = {name: round(size / GIB, 3) for name, size in missing.items()}
    depth_filler_bytes = sum(missing.values())
    depth_filler = device_filler(depth_filler_bytes)
    result["depth_filler_gib"] = round(depth_filler_bytes / GIB, 3)
    result["weights_s"] = round(time.perf_counter() - start, 2)
    result["memory_after_weights_gib"] = e2e.memory_gib()

    batches, _ = e2e.random_rows(spec["seed"] + 1, 1, seq, config.vocab_size, 1, 2)
    step_inputs = [StepInputs(*(jnp.asarray(array)[None] for array in batch)) for batch in batches]
    args = TrainingArguments(learning_rate=e2e.LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0,
                             max_steps=2, max_grad_norm=1.0, bf16=True, save_strategy="no")
    # A trainer shell, as bench/e2e.py builds it: the step is SFTTrainer's own.
    trainer = SFTTrainer.__new__(SFTTrainer)
    trainer.model, trainer.args = model, args
    trainer.data_config = DataConfig(max_seq_length=seq, packing=False)
    trainer.optimizer = optax.adamw(learning_rate_schedule(args, 2), b1=args.adam_beta1, b2=args.adam_beta2,
                                    eps=args.adam_epsilon, weight_decay=args.weight_decay)
    train_step = trainer._build_train_step()
    lora = model.lora_params()
    opt_state = trainer.optimizer.init(lora)
    seed_key = jax.random.PRNGKey(spec["seed"])
    base = model.base_params()
    del model, trainer
    gc.collect()

    # Compiled with the weights and fillers on the device, as trainer.train() compiles its first step:
    # XLA's GEMM autotuning allocates on the device too.
    result["stage"] = "compile"
    start = time.perf_counter()
    compiled = train_step.lower(lora, opt_state, base, step_inputs[0], jnp.int32(0), seed_key).compile()
    result["compile_s"] = round(time.perf_counter() - start, 2)
    from bench.timing import compiled_memory_gib

    analysis = compiled_memory_gib(compiled)
    result["compiled_memory_gib"] = analysis
    result["memory_after_compile_gib"] = e2e.memory_gib()
    compile_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    step_gib = e2e.compiled_step_gib(analysis)
    print(f"compiled in {result['compile_s']} s; step needs {'?' if step_gib is None else format(step_gib, '.3f')} GiB "
          f"+ {result['depth_filler_gib']} GiB for the {full_config.num_layers - layers} layers left out", flush=True)
    if spec["smoke_limit_bytes"] is not None:
        needed = (step_gib or 0.0) * GIB + depth_filler_bytes
        if needed > spec["smoke_limit_bytes"]:
            raise SimulatedOutOfMemory(f"SMOKE: simulated RESOURCE_EXHAUSTED: the step needs {needed / 2**20:.1f} MiB, "
                                       f"the simulated budget is {spec['smoke_limit_bytes'] / 2**20:.1f} MiB")

    step_s, losses = [], []
    for step in range(2 if spec["second_step"] else 1):
        result["stage"] = f"step {step + 1}"
        start = time.perf_counter()
        lora, opt_state, metrics = compiled(lora, opt_state, base, step_inputs[step], jnp.int32(step), seed_key)
        jax.block_until_ready((lora, opt_state, metrics))
        step_s.append(round(time.perf_counter() - start, 4))
        losses.append(float(metrics["loss"]))
        result.update(step_s=step_s, losses=losses, memory_gib=e2e.memory_gib())
        print(f"step {step + 1}: {step_s[-1]:.2f} s, loss {losses[-1]:.4f}", flush=True)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"non-finite loss {losses[-1]} at step {step + 1}")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_gib"] = round((stats["peak_bytes_in_use"] - spec["cap_filler_bytes"]) / GIB, 3)
        result["peak_from"] = "peak_bytes_in_use"
        # XLA's autotuning allocates while compiling; the peak should be the step's, not the compile's.
        result["peak_set_by_compile"] = stats["peak_bytes_in_use"] == compile_peak
    else:  # the CPU keeps no memory statistics
        result["peak_gib"] = round((step_gib or 0.0) + depth_filler_bytes / GIB, 3)
        result["peak_from"] = "compiled step + filler (no memory_stats)"
    outside = outside_allocator_bytes(stats.get("bytes_limit") if spec["expect_gpu"] else None)
    result["outside_allocator_gib"] = None if outside is None else round(outside / GIB, 3)
    del cap_filler, depth_filler
    result["ok"] = True


def child_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    start = time.time()
    result: dict[str, Any] = {"ok": False, "seq": spec["seq"]}
    try:
        (run_probe if spec.get("probe") else run_trial)(spec, result)
    except BaseException as err:  # noqa: BLE001 - an out-of-memory error is a result
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[:1500], traceback=traceback.format_exc()[-4000:])
        print(result["traceback"], file=sys.stderr, flush=True)
    result["host_max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    result["wall_s"] = round(time.time() - start, 2)
    Path(result_path).write_text(json.dumps(result))
    return 0 if result.get("ok") else 1


def run_probe(spec: dict, result: dict) -> None:
    """Does the allocator stop at the cap? Allocate blocks until it refuses (or passes the cap by 4 blocks)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    result.update(device_kind=device.device_kind, platform=device.platform, jax_version=jax.__version__,
                  bytes_limit=(device.memory_stats() or {}).get("bytes_limit"))
    blocks, held, stop = [], 0, spec["cap_bytes"] + 4 * PROBE_BLOCK_BYTES
    try:
        while held < stop:
            blocks.append(jax.block_until_ready(jnp.zeros((PROBE_BLOCK_BYTES,), jnp.uint8)))
            held += PROBE_BLOCK_BYTES
    except Exception as err:  # noqa: BLE001 - the refusal is what is probed
        result["refused_with"] = f"{type(err).__name__}: {err}"[:300]
    result.update(held_bytes=held, enforced=held <= spec["cap_bytes"], ok=True)


# ==================================================================================================
# The parent: probe, plan, search, report. It imports jax only on the CPU, for the planner.


def gpu_facts() -> dict:
    if not shutil.which("nvidia-smi"):
        return {}
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, check=False)
    first = query.stdout.strip().splitlines()[:1]
    if not first:
        return {}
    name, total_mib, driver = [part.strip() for part in first[0].split(",")]
    return {"gpu": name, "total_bytes": int(total_mib) << 20, "driver": driver}


def host_memory() -> dict:
    facts = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                facts[key] = int(value.split()[0]) << 10
    return facts


def environment() -> dict:
    from importlib import metadata

    info: dict[str, Any] = {"argv": sys.argv[1:], "date_utc": datetime.datetime.now(datetime.UTC).isoformat(),
                            "host": host_memory(), **gpu_facts()}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "optax"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    info["commit"] = commit.stdout.strip() or None
    return info


def budget_bytes(budget: int) -> int:
    return H100_80GB_BYTES if budget == 80 else budget * GIB


class Runner:
    """Runs child processes (probe and trials) with the cap's environment, logging their output."""

    def __init__(self, args, log: e2e.Log, scratch: Path, base_env: dict):
        self.args, self.log, self.scratch, self.base_env = args, log, scratch, base_env
        self.count = 0

    def env(self, fraction_value: str | None, xla_flag: str | None = None) -> dict:
        env = dict(self.base_env, PYTHONPATH=f"{REPO}{os.pathsep}{self.base_env.get('PYTHONPATH', '')}".rstrip(os.pathsep),
                   PYTHONUNBUFFERED="1")
        if self.args.smoke:
            env["JAX_PLATFORMS"] = "cpu"
            return env
        env["JAX_PLATFORMS"] = "cuda"
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
        env.pop("XLA_PYTHON_CLIENT_ALLOCATOR", None)
        # jaxlib (0.10 and 0.11) reads XLA_CLIENT_MEM_FRACTION, or the deprecated
        # XLA_PYTHON_CLIENT_MEM_FRACTION when it is unset, and refuses to start the GPU backend when
        # both are set: only the current name is set, and an inherited deprecated one removed.
        env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
        env.pop("XLA_CLIENT_MEM_FRACTION", None)
        if fraction_value is not None:
            env["XLA_CLIENT_MEM_FRACTION"] = fraction_value
        if xla_flag:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flag}".strip()
        return env

    def run(self, spec: dict, env: dict, timeout: float, label: str) -> tuple[dict | None, dict]:
        self.count += 1
        spec_path, result_path = self.scratch / f"spec_{self.count}.json", self.scratch / f"result_{self.count}.json"
        spec_path.write_text(json.dumps(spec))
        # An allocator that runs out of memory can dump thousands of lines: show the first ones and the tail.
        shown = 0

        def log_some(line: str = "") -> None:
            nonlocal shown
            shown += 1
            if shown <= CHILD_LINES_SHOWN:
                self.log(line)

        code, tail, seconds, timed_out = e2e.run_streaming(
            [sys.executable, str(HERE), "--_child", str(spec_path), str(result_path)], label, timeout, env, log_some)
        if shown > CHILD_LINES_SHOWN:
            self.log(f"[{label}] ... {shown - CHILD_LINES_SHOWN} lines not shown; the last {min(20, len(tail))}:")
            for line in tail[-20:]:
                self.log(f"[{label}] {line}")
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        return result, {"rc": code, "process_s": round(seconds, 1), "timed_out": timed_out, "tail": tail[-15:]}


@dataclasses.dataclass
class CapMethod:
    name: str  # "fraction", "fraction F-F", "xla flag", "filler" or "none (smoke)"
    total_bytes: int | None
    # Card memory outside XLA's allocator (--reserve-gib): the CUDA context and libraries.
    reserve_bytes: int = GIB

    def cap_bytes(self, budget: int) -> int:
        """The allocator's limit for a budget in GB: the card's memory (or less), less the reserve."""
        return min(budget_bytes(budget), self.total_bytes) - self.reserve_bytes

    def fraction_value(self, cap_bytes: int) -> str | None:
        if self.total_bytes is None:
            return None
        fraction = min(cap_bytes, self.total_bytes) / self.total_bytes
        if self.name == "filler":
            return f"{(self.total_bytes - self.reserve_bytes) / self.total_bytes:.4f}"
        if self.name == "fraction F-F":
            return f"{fraction:.4f}-{fraction:.4f}"
        return f"{fraction:.4f}"

    def xla_flag(self, cap_bytes: int) -> str | None:
        if self.name != "xla flag":
            return None
        fraction = min(cap_bytes, self.total_bytes) / self.total_bytes
        return f"--xla_gpu_memory_fraction_policy={fraction:.4f}-{fraction:.4f}"

    def filler_bytes(self, cap_bytes: int) -> int:
        if self.name != "filler":
            return 0
        return max(0, self.total_bytes - self.reserve_bytes - cap_bytes)


def probe_cap(runner: Runner, total_bytes: int | None, log) -> tuple[CapMethod, list[dict]]:
    """Which environment makes the allocator stop at a fraction of the card (module docstring)."""
    reserve = int(runner.args.reserve_gib * GIB)
    if runner.args.smoke:
        return CapMethod("none (smoke)", None, reserve), []
    probes = []
    if total_bytes is None:
        # No nvidia-smi: the card's size from the pool at a known fraction.
        result, _ = runner.run({"probe": True, "cap_bytes": PROBE_CAP_BYTES, "seq": 0},
                               runner.env("0.5"), 120, "probe size")
        probes.append(result or {})
        if not result or not result.get("bytes_limit"):
            raise SystemExit("cannot tell the card's memory: no nvidia-smi and the probe child failed")
        total_bytes = int(result["bytes_limit"] / 0.5)
    for name in ("fraction", "fraction F-F", "xla flag"):
        method = CapMethod(name, total_bytes, reserve)
        env = runner.env(method.fraction_value(PROBE_CAP_BYTES) if name != "xla flag" else
                         f"{PROBE_CAP_BYTES / total_bytes:.4f}", method.xla_flag(PROBE_CAP_BYTES))
        result, meta = runner.run({"probe": True, "cap_bytes": PROBE_CAP_BYTES, "seq": 0}, env, 120, f"probe {name}")
        probes.append({"method": name, **(result or {"ok": False, "error": f"no result, rc {meta['rc']}"})})
        held = (result or {}).get("held_bytes")
        if held is None:
            log(f"== probe {name}: failed: {(result or {}).get('error') or ' / '.join(meta['tail'][-2:])}"[:400])
        else:
            log(f"== probe {name}: held {held / GIB:.2f} GiB under a 4 GiB cap"
                f"{' (enforced)' if result.get('enforced') else ' (NOT enforced)'}")
        if result and result.get("ok") and result.get("enforced") and held >= PROBE_CAP_BYTES // 2:
            return method, probes
    log("== no allocator setting held the cap: trials hold a filler of (card - cap) bytes instead")
    return CapMethod("filler", total_bytes, reserve), probes


def planner_prediction(config_name: str, cap_bytes: int, smoke: bool) -> dict:
    """fastft_jax.plan's longest max_seq_length for this cap, and a function giving its predicted
    peak at any length; {"error": ...} where the planner is missing or fails."""
    try:
        from fastft_jax import ops, plan, tiling
        from fastft_jax.lora import LoRAConfig

        config = full_model_config(smoke)
        rank = CONFIGS[config_name]["rank"]
        # "auto" under "unsloth" tiles the MLP; the planner is given the tile the run resolves to.
        tile = tiling.mlp_tile_for(1 << 20, config.intermediate_size, "bfloat16", ops.OpsConfig(), CHECKPOINTING)
        plan_args = {"lora_config": LoRAConfig(r=rank, alpha=float(rank)), "batch_size": 1, "max_seq_length": 4096,
                     "dtype": "bfloat16", "quantization": CONFIGS[config_name]["quantization"],
                     "gradient_checkpointing": CHECKPOINTING, "packing": False,
                     "ops_config": ops.OpsConfig(mlp_tile_tokens=tile), "backend": "cpu" if smoke else "gpu"}
        longest = int(plan.max_seq_length_that_fits(cap_bytes, config, **plan_args))

        def peak_at(seq: int) -> int:
            return int(plan.plan_memory(config, source="shapes", **{**plan_args, "max_seq_length": seq}).peak)

        return {"max_seq": longest, "peak_at": peak_at, "mlp_tile_tokens": tile}
    except Exception as err:  # noqa: BLE001 - the bench runs without a planner too (doubling search)
        return {"error": f"{type(err).__name__}: {err}"[:300]}


@dataclasses.dataclass
class Search:
    config: str
    budget: int
    cap_bytes: int
    planner: dict
    start: int
    trials: list = dataclasses.field(default_factory=list)
    stopped: str = ""
    spent_s: float = 0.0
    # The trial at all layers at the longest length (--confirm), or why it did not run.
    confirm: dict | None = None

    def best(self) -> dict | None:
        passed = [trial for trial in self.trials if trial["outcome"] == "ok"]
        return max(passed, key=lambda trial: trial["seq"]) if passed else None

    def first_failure(self) -> dict | None:
        failed = [trial for trial in self.trials if trial["outcome"] == "failed"]
        return min(failed, key=lambda trial: trial["seq"]) if failed else None


def round_down(seq: float, unit: int) -> int:
    return int(seq // unit) * unit


def tolerance(seq: int, args) -> int:
    return max(int(STEP_FRACTION * seq), args.min_gap)


def next_length(search: Search, args) -> int | None:
    """The next length to try, or None when the bracket is tight enough (or the range is exhausted)."""
    best, failure = search.best(), search.first_failure()
    low = best["seq"] if best else 0
    high = failure["seq"] if failure else None
    unit = args.round
    if not search.trials:
        return search.start
    if best and failure:
        if high - low <= tolerance(low, args):
            return None
        middle = round_down((low + high) / 2, unit)
        return middle if low < middle < high else None
    # Galloping: the step doubles with every trial in the same direction.
    streak = len(search.trials)
    if failure is None:
        if low >= args.max_seq:
            return None
        proposed = low * 2 if search.planner.get("max_seq") is None else low * (1 + STEP_FRACTION * 2 ** (streak - 1))
        return min(args.max_seq, max(low + unit, round_down(proposed, unit)))
    if high <= args.min_seq:
        return None
    proposed = high / 2 if search.planner.get("max_seq") is None else high * (1 - min(0.5, STEP_FRACTION * 2 ** (streak - 1)))
    return max(args.min_seq, min(high - unit, round_down(proposed, unit)))


def classify(result: dict | None, meta: dict, timeout: float, args) -> tuple[str, str]:
    """(outcome, reason): outcome "ok", "failed", or "cut" (by --deadline: says nothing of memory)."""
    if result and result.get("ok"):
        return "ok", ""
    if meta["timed_out"]:
        if timeout < args.trial_timeout - 1:
            return "cut", f"stopped by --deadline after {meta['process_s']:.0f} s"
        return "failed", f"timeout ({timeout:.0f} s)"
    if result is None and meta["rc"] == -9:
        return "failed", "killed by SIGKILL (the host's out-of-memory killer?)"
    error = (result or {}).get("error") or f"crashed (rc {meta['rc']}): " + " / ".join(meta["tail"][-3:])
    if "SMOKE: simulated" in error:
        return "failed", "simulated OOM (smoke)"
    stage = f" in {result['stage']}" if result and result.get("stage") else ""
    if re.search(r"pinned|host memory|host_memory", error, re.IGNORECASE) and re.search(r"RESOURCE_EXHAUSTED|out of memory|alloc", error, re.IGNORECASE):
        return "failed", f"host OOM{stage}: " + error[:160]
    if re.search(r"RESOURCE_EXHAUSTED|out of memory|OOM|Failed to allocate", error, re.IGNORECASE):
        return "failed", f"OOM{stage}"
    if "non-finite loss" in error:
        return "failed", "non-finite loss"
    return "failed", f"error{stage}: " + error[:200]


class Clock:
    """The trial time model: the FLOP estimate scaled by what the trials measured."""

    def __init__(self, args, hidden: int):
        self.args, self.hidden = args, hidden
        self.step_scale, self.overhead_s = 1.0, SMOKE_OVERHEAD_S if args.smoke else TRIAL_OVERHEAD_S

    def step_s(self, seq: int, layers: int) -> float:
        return self.step_scale * estimated_step_s(seq, layers, self.hidden)

    def second_step(self, seq: int, layers: int) -> bool:
        return self.step_s(seq, layers) <= self.args.second_step_max

    def trial_s(self, seq: int, layers: int) -> float:
        build_s = 0.0 if self.args.smoke else BUILD_SECONDS_PER_LAYER * (layers - self.args.layers)
        steps = 2 if self.second_step(seq, layers) else 1
        return self.overhead_s + max(0.0, build_s) + self.step_s(seq, layers) * steps

    def learn(self, result: dict | None, meta: dict, layers: int) -> None:
        steps = (result or {}).get("step_s") or []
        if steps:
            self.step_scale = max(steps) / estimated_step_s(result["seq"], layers, self.hidden)
            if layers == self.args.layers:
                self.overhead_s = max(1.0, meta["process_s"] - sum(steps))


def trial_row(search: Search, seq: int, layers: int, result: dict | None, meta: dict, outcome: str, reason: str,
              second_step: bool, args) -> dict:
    result = dict(result or {})
    result.pop("traceback", None)
    steps = result.get("step_s") or []
    rate_step = steps[1] if len(steps) > 1 else (steps[0] if steps else None)
    full_layers = shape_of(args.smoke)["num_hidden_layers"]
    row = {
        **result, "config": search.config, "budget": search.budget, "seq": seq, "layers": layers,
        "outcome": outcome, "reason": reason, "second_step_asked": second_step, **{k: v for k, v in meta.items() if k != "tail"},
        "tokens_per_s": round(seq / rate_step, 1) if outcome == "ok" and rate_step else None,
        "tokens_per_s_from": ("step 2" if len(steps) > 1 else "step 1") if outcome == "ok" and steps else None,
        "host_full_depth_gib": round(host_bytes_full_depth(seq, args.smoke) / GIB, 1),
    }
    if row["tokens_per_s"] and layers < full_layers:
        row["tokens_per_s_full_depth_est"] = round(row["tokens_per_s"] * layers / full_layers, 1)
    if outcome != "ok" and meta.get("tail"):
        row["log_tail"] = meta["tail"]
    return row


def attempt(search: Search, seq: int, layers: int, runner: Runner, clock: Clock, method: CapMethod, deadline: float,
            args, log) -> dict:
    """One trial at (seq, layers) under the search's cap; returns its row."""
    full_layers = shape_of(args.smoke)["num_hidden_layers"]
    label = f"{search.config} {search.budget}GB S={seq:,}" + (f" {layers} layers" if layers != args.layers else "")
    needed_host = host_bytes_full_depth(seq, args.smoke) * layers // full_layers
    host_available = host_memory().get("MemAvailable")
    if host_available and needed_host > 0.9 * host_available:
        reason = (f"host: {needed_host / GIB:.0f} GiB of pinned memory needed, {host_available / GIB:.0f} GiB available "
                  "(not run)")
        log(f"== {label}: {reason}")
        return trial_row(search, seq, layers, None, {"rc": None, "process_s": 0.0, "timed_out": False}, "failed",
                         reason, False, args)
    second = clock.second_step(seq, layers)
    timeout = min(args.trial_timeout, deadline - time.time() - 2)
    spec = {"seq": seq, "layers": layers, "quantization": CONFIGS[search.config]["quantization"],
            "rank": CONFIGS[search.config]["rank"], "seed": args.seed, "smoke": args.smoke,
            "expect_gpu": not args.smoke, "second_step": second, "cap_filler_bytes": method.filler_bytes(search.cap_bytes),
            "smoke_limit_bytes": search.cap_bytes if args.smoke else None}
    log(f"== {label}: estimated {clock.trial_s(seq, layers):.0f} s ({'two steps' if second else 'one step'}), "
        f"timeout {timeout:.0f} s")
    env = runner.env(method.fraction_value(search.cap_bytes), method.xla_flag(search.cap_bytes))
    result, meta = runner.run(spec, env, timeout, label)
    outcome, reason = classify(result, meta, timeout, args)
    clock.learn(result, meta, layers)
    row = trial_row(search, seq, layers, result, meta, outcome, reason, second, args)
    log(f"== {label}: {outcome}{' — ' + reason if reason else ''}"
        + (f"; {row['tokens_per_s']:,.0f} tok/s ({row['tokens_per_s_from']}), peak {row.get('peak_gib')} GiB"
           if outcome == "ok" else ""))
    return row


def run_search(search: Search, runner: Runner, clock: Clock, method: CapMethod, share_s: float, deadline: float,
               args, log, record) -> None:
    started = time.time()
    while True:
        seq = next_length(search, args)
        if seq is None:
            search.stopped = ("bracket within tolerance" if search.best() and search.first_failure() else
                              "failed down to --min-seq" if search.first_failure() else "reached --max-seq")
            return
        if len(search.trials) >= args.max_trials:
            search.stopped = f"--max-trials {args.max_trials}"
            return
        left_global = deadline - time.time()
        estimate = clock.trial_s(seq, args.layers)
        used = time.time() - started
        if estimate > left_global or (search.trials and used + estimate > share_s):
            search.stopped = (f"time: next trial (S={seq:,}) estimated {estimate:.0f} s, "
                              f"{min(left_global, share_s - used):.0f} s left")
            return
        row = attempt(search, seq, args.layers, runner, clock, method, deadline, args, log)
        search.trials.append(row)
        search.spent_s = round(time.time() - started, 1)
        record()
        if row["outcome"] == "cut":
            search.stopped = row["reason"]
            return
        errors = [trial for trial in search.trials if trial["reason"].startswith("error")]
        if len(errors) >= 2:
            # Not a memory limit. One error may depend on the length (above 524,288 tokens a [S, 4096]
            # tensor passes 2^31 elements, where int32 indexing breaks), so the search goes on once.
            search.stopped = f"stopped after 2 errors: {row['reason'][:120]}"
            return


def run_confirmations(searches: list[Search], runner: Runner, clock: Clock, method: CapMethod, deadline: float,
                      args, log, record) -> None:
    """With the time left, one trial at the real depth at each search's longest length (module docstring)."""
    full_layers = shape_of(args.smoke)["num_hidden_layers"]
    for search in searches:
        best = search.best()
        if best is None:
            continue
        estimate = clock.trial_s(best["seq"], full_layers)
        left = deadline - time.time()
        if estimate > min(left, args.confirm_max):
            search.confirm = {"outcome": "not run", "reason": f"estimated {estimate:.0f} s; {left:.0f} s left, "
                                                              f"--confirm-max {args.confirm_max:.0f} s"}
            continue
        search.confirm = attempt(search, best["seq"], full_layers, runner, clock, method, deadline, args, log)
        record()


def summarize(search: Search, args) -> dict:
    best, failure = search.best(), search.first_failure()
    summary: dict[str, Any] = {
        "config": search.config, "budget": search.budget, "cap_gib": round(search.cap_bytes / GIB, 2),
        "layers": args.layers, "trials": len(search.trials), "stopped": search.stopped, "spent_s": search.spent_s,
        "max_ok": best["seq"] if best else None, "first_failed": failure["seq"] if failure else None,
        "failed_because": failure["reason"] if failure else None,
        "planner_max": search.planner.get("max_seq"), "planner_error": search.planner.get("error"),
        "unsloth": UNSLOTH_MAX.get(search.budget) if search.config == "qlora" else None,
        "target": TARGET.get(search.budget) if search.config == "qlora" else None,
    }
    if best:
        peak = best.get("peak_gib")
        summary.update(tokens_per_s=best.get("tokens_per_s"), tokens_per_s_from=best.get("tokens_per_s_from"),
                       tokens_per_s_full_depth_est=best.get("tokens_per_s_full_depth_est"), peak_gib=peak,
                       peak_set_by_compile=best.get("peak_set_by_compile"),
                       step_gib=e2e.compiled_step_gib(best.get("compiled_memory_gib")),
                       outside_allocator_gib=best.get("outside_allocator_gib"),
                       host_full_depth_gib=best["host_full_depth_gib"],
                       host_exceeds_ram=best["host_full_depth_gib"] * GIB > host_memory().get("MemTotal", float("inf")))
        if summary["planner_max"]:
            summary["planner_max_error_pct"] = round(100.0 * (summary["planner_max"] - best["seq"]) / best["seq"], 1)
        peak_at = search.planner.get("peak_at")
        if peak_at is not None and peak:
            predicted = peak_at(best["seq"]) / GIB
            summary["planner_peak_gib"] = round(predicted, 2)
            summary["planner_peak_error_pct"] = round(100.0 * (predicted - peak) / peak, 1)
    confirm = search.confirm
    if confirm:
        summary["confirm"] = {key: confirm.get(key) for key in ("outcome", "reason", "seq", "layers", "tokens_per_s",
                                                                "tokens_per_s_from", "peak_gib")}
    if failure and best:
        summary["bracket_pct"] = round(100.0 * (failure["seq"] - best["seq"]) / best["seq"], 1)
    return summary


# ==================================================================================================
# Report


def _fmt(value, spec: str = ",") -> str:
    return "–" if value is None else format(value, spec)


def markdown(run: dict) -> str:
    env, args = run["environment"], run["args"]
    smoke = args["smoke"]
    card = env.get("gpu") or next((t.get("device_kind") for s in run["searches"] for t in s["trials"] if t.get("device_kind")), "?")
    full_layers = SMOKE_LAYERS if smoke else 32
    layers = args["layers"]
    depth = f"all {full_layers} layers" if layers >= full_layers else (
        f"{layers} of {full_layers} decoder layers, the other {full_layers - layers} layers' device memory held by a filler")
    model = f"tiny Llama ({SMOKE_LAYERS} layers; CPU: reference ops)" if smoke else MODEL
    title = f"## long context {env.get('date_utc', '')[:16].replace('T', ' ')} UTC — {card}"
    if smoke:
        title += " — SMOKE (CPU, tiny model, SIMULATED budgets)"
    versions = (f"jax {env.get('jax') or '?'}; commit {env.get('commit') or '?'}; host RAM "
                f"{env.get('host', {}).get('MemTotal', 0) / GIB:.0f} GiB; "
                f"`python3 bench/long_context.py {' '.join(env.get('argv', []))}`")
    notes = (f"{model}, batch 1, use_gradient_checkpointing=\"unsloth\", MLP tiled, chunked loss head, cuDNN attention; "
             f"qlora = NF4 base + LoRA r=32, bf16 = bf16 base + LoRA r=16, all 7 projections; a trial is one training "
             f"step (AdamW) that must finish with a finite loss. Depth: {depth}. Cap: {run.get('cap_method', '?')}; "
             f"allocator = budget - {args['reserve_gib']} GiB (80 GB = 81,559 MiB, else GiB). Peak: peak_bytes_in_use, "
             f"filler included (the {full_layers}-layer model's; ² set while compiling, by XLA's autotuning). tok/s: S / the second step at that depth (¹ the first "
             f"step); \"{full_layers} layers\" scales it by depth (est.). Check: one trial at all {full_layers} layers at "
             f"max S. Host: pinned memory the {full_layers}-layer model's offloaded layer inputs need at max S. Bracket: "
             f"to 5 % or {args['min_gap']:,} tokens.")
    header = (f"| config | budget | cap GiB | max S ok | first S failed (why) | bracket | tok/s | tok/s {full_layers} "
              f"layers (est.) | peak GiB | {full_layers}-layer check | planner max S (err) | planner peak GiB (err) | "
              "host GiB | Unsloth | target | trials | stopped |")
    lines = [title, "", versions, "", notes, "", header,
             "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---|"]
    for summary in run["summaries"]:
        failed = _fmt(summary["first_failed"])
        if summary.get("failed_because"):
            failed += f" ({summary['failed_because'][:60]})"
        rate = _fmt(summary.get("tokens_per_s"), ",.0f") + ("¹" if summary.get("tokens_per_s_from") == "step 1" else "")
        planner = "–" if summary.get("planner_max") is None else (
            f"{summary['planner_max']:,} ({summary['planner_max_error_pct']:+.1f} %)" if "planner_max_error_pct" in summary
            else f"{summary['planner_max']:,}")
        planner_peak = "–" if "planner_peak_gib" not in summary else (
            f"{summary['planner_peak_gib']:.2f} ({summary['planner_peak_error_pct']:+.1f} %)")
        confirm = summary.get("confirm") or {}
        if confirm.get("outcome") == "ok":
            check = (f"ok: {confirm['tokens_per_s']:,.0f} tok/s{'¹' if confirm.get('tokens_per_s_from') == 'step 1' else ''}, "
                     f"{confirm.get('peak_gib')} GiB")
        elif confirm:
            check = f"{confirm.get('outcome')}: {(confirm.get('reason') or '')[:50]}"
        else:
            check = "–"
        target, unsloth = (None, None) if smoke else (summary.get("target"), summary.get("unsloth"))
        verdict = _fmt(target)
        if target and summary.get("max_ok") is not None:
            verdict += " met" if summary["max_ok"] >= target else " NOT met"
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in [
            summary["config"], f"{summary['budget']} GB", _fmt(summary["cap_gib"], ".2f"), _fmt(summary["max_ok"]),
            failed, "–" if "bracket_pct" not in summary else f"{summary['bracket_pct']:.1f} %", rate,
            _fmt(summary.get("tokens_per_s_full_depth_est"), ",.0f"),
            _fmt(summary.get("peak_gib"), ".2f") + ("²" if summary.get("peak_set_by_compile") else ""), check,
            planner, planner_peak,
            _fmt(summary.get("host_full_depth_gib"), ".1f") + (" (> RAM)" if summary.get("host_exceeds_ram") else ""),
            _fmt(unsloth), verdict,
            str(summary["trials"]), summary["stopped"][:70],
        ]) + " |")
    lines.append("")
    return "\n".join(lines)


def report(run: dict, args, log) -> None:
    text = markdown(run)
    log("\n" + text)
    if args.from_json is None:
        (Path(args.out) / "long_context.md").write_text(text)
    if args.results_md:
        e2e.append_results_md(args.results_md, text, log)


# ==================================================================================================
# CLI


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.from_json:
        run = json.loads(Path(args.from_json).read_text())
        report(run, args, e2e.Log(Path(os.devnull)))
        return 0
    base_env = dict(os.environ)
    # The parent runs the planner on the CPU and must not take the GPU the children need.
    os.environ["JAX_PLATFORMS"] = "cpu"
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "long_context.log").unlink(missing_ok=True)
    log = e2e.Log(out_dir / "long_context.log")
    started = time.time()
    deadline = started + args.deadline
    run: dict[str, Any] = {"environment": environment(), "args": {k: v for k, v in vars(args).items() if k != "child"},
                           "searches": [], "summaries": []}
    env_info = run["environment"]
    log(f"== long context: {env_info.get('gpu', 'no nvidia-smi')}, host RAM "
        f"{env_info['host'].get('MemTotal', 0) / GIB:.0f} GiB; out {out_dir}{'; SMOKE (CPU)' if args.smoke else ''}")

    def record() -> None:
        run["total_s"] = round(time.time() - started, 1)
        (out_dir / "long_context.json").write_text(json.dumps(run, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="long_context_") as scratch:
        runner = Runner(args, log, Path(scratch), base_env)
        if args.dry_run:
            method, probes = CapMethod("dry run", env_info.get("total_bytes") or H100_80GB_BYTES,
                                       int(args.reserve_gib * GIB)), []
        else:
            method, probes = probe_cap(runner, env_info.get("total_bytes"), log)
        run["cap_method"], run["probes"] = method.name, probes
        hidden = shape_of(args.smoke)["hidden_size"]
        full_layers = shape_of(args.smoke)["num_hidden_layers"]
        clock = Clock(args, hidden)
        searches = []
        for config_name in args.configs:
            for budget in args.budgets:
                cap = budget * SMOKE_BYTES_PER_GB if args.smoke else method.cap_bytes(budget)
                planner = {"error": "--no-planner"} if args.no_planner else planner_prediction(config_name, cap, args.smoke)
                if args.start:
                    start = args.start
                elif planner.get("max_seq"):
                    start = min(args.max_seq, max(args.min_seq, round_down(planner["max_seq"], args.round)))
                else:
                    start = args.doubling_start
                search = Search(config_name, budget, cap, planner, start)
                if planner.get("max_seq") == 0 and not args.start:
                    search.stopped = "not run: the planner says no length fits (weights and optimizer state alone)"
                searches.append(search)
                log(f"== {config_name} {budget} GB: cap {cap / GIB:.2f} GiB, planner "
                    f"{planner.get('max_seq', planner.get('error'))}, "
                    + (search.stopped if search.stopped else
                       f"first S {start:,}, estimated trial {clock.trial_s(start, args.layers):.0f} s; the "
                       f"{full_layers}-layer model needs {host_bytes_full_depth(start, args.smoke) / GIB:.0f} GiB of "
                       "pinned host memory there"))
        to_run = [search for search in searches if not search.stopped]
        estimates = {id(search): 2.5 * clock.trial_s(search.start, args.layers) for search in to_run}
        # Time held back for the trials at the real depth, where one is affordable at all.
        confirm_estimates = [clock.trial_s(search.start, full_layers) for search in to_run]
        held_back = sum(estimate for estimate in confirm_estimates if estimate <= args.confirm_max)
        if args.layers >= full_layers:
            held_back = 0.0
        total_estimate = sum(estimates.values()) + held_back
        log(f"== estimate: {total_estimate:.0f} s for {len(to_run)} searches at ~2.5 trials each"
            + (f" and {held_back:.0f} s of {full_layers}-layer confirmations" if held_back else "")
            + f"; --deadline {args.deadline:.0f} s"
            + (" (later searches may not run: split the call)" if total_estimate > args.deadline else ""))
        run["searches"] = [{"config": s.config, "budget": s.budget, "trials": s.trials} for s in searches]
        if args.dry_run:
            to_run = []
        for index, search in enumerate(to_run):
            left = deadline - held_back - time.time()
            pending = sum(estimates[id(other)] for other in to_run[index:])
            share = left * estimates[id(search)] / pending
            log(f"== search {search.config} {search.budget} GB: {share:.0f} s of the {left:.0f} s left")
            run_search(search, runner, clock, method, share, deadline - held_back, args, log, record)
        if args.layers < full_layers and args.confirm_max > 0 and not args.dry_run:
            run_confirmations(to_run, runner, clock, method, deadline, args, log, record)
    run["summaries"] = [summarize(search, args) for search in searches]
    for search in searches:
        search.planner.pop("peak_at", None)
    run["planner"] = {f"{s.config} {s.budget}": s.planner for s in searches}
    record()
    report(run, args, log)
    log(f"\nresults: {out_dir / 'long_context.json'}  total {run['total_s']} s")
    return 0


def _list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    values = [value.strip() for value in text.split(",") if value.strip()]
    bad = [value for value in values if allowed is not None and value not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad} not in {', '.join(allowed)}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=lambda s: _list(s, tuple(CONFIGS)), default=list(CONFIGS))
    parser.add_argument("--budgets", type=lambda s: [int(b) for b in _list(s)], default=[80, 24, 16],
                        help="GB: 80 is an H100 80GB's 81,559 MiB, any other B is B GiB")
    parser.add_argument("--layers", default="2", help="decoder layers a trial runs (the rest held by a filler); 'full' = 32")
    parser.add_argument("--deadline", type=float, default=560.0, help="seconds for the whole call")
    parser.add_argument("--trial-timeout", type=float, default=300.0, help="seconds per trial, a failure past it")
    parser.add_argument("--second-step-max", type=float, default=45.0,
                        help="run a second, timed step only when a step is estimated under this many seconds")
    parser.add_argument("--confirm-max", type=float, default=120.0,
                        help="after the searches, rerun each longest length at all 32 layers where the trial is "
                             "estimated under this many seconds (0: never)")
    parser.add_argument("--max-trials", type=int, default=12, help="per configuration and budget")
    parser.add_argument("--start", type=int, default=None, help="first length of every search (default: the planner's)")
    parser.add_argument("--no-planner", action="store_true", help="search by doubling from --doubling-start")
    parser.add_argument("--doubling-start", type=int, default=16384, help="first length without a planner")
    parser.add_argument("--min-seq", type=int, default=1024)
    parser.add_argument("--max-seq", type=int, default=1 << 21)
    parser.add_argument("--round", type=int, default=1024, help="lengths are multiples of this")
    parser.add_argument("--min-gap", type=int, default=2048, help="a bracket this narrow is done (or 5 %%)")
    parser.add_argument("--reserve-gib", type=float, default=1.0,
                        help="card memory outside XLA's allocator (CUDA context, libraries)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/fastft_long_context"))
    parser.add_argument("--results-md", default=None, help="append the dated section to this file (bench/RESULTS.md)")
    parser.add_argument("--from-json", default=None, help="render a long_context.json instead of running")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the caps, the planner's starting lengths and the time estimate; run nothing "
                             "(without nvidia-smi: as on an H100 80GB)")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny model, simulated budgets")
    parser.add_argument("--_child", dest="child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    full_layers = SMOKE_LAYERS if args.smoke else 32
    args.layers = full_layers if args.layers == "full" else int(args.layers)
    if not 1 <= args.layers <= full_layers:
        parser.error(f"--layers must be in [1, {full_layers}] or 'full'")
    if args.smoke:
        defaults = {"round": 128, "min_gap": 256, "min_seq": 128, "doubling_start": 512, "max_seq": 8192,
                    "deadline": 400.0, "trial_timeout": 120.0, "second_step_max": 30.0, "confirm_max": 60.0}
        for name, value in defaults.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        if args.budgets == parser.get_default("budgets"):
            args.budgets = [80, 16]
        if args.out == parser.get_default("out"):
            args.out = "/tmp/fastft_long_context_smoke"
    if args.min_seq % args.round or args.min_seq < args.round:
        parser.error("--min-seq must be a positive multiple of --round")
    return args


if __name__ == "__main__":
    sys.exit(main())

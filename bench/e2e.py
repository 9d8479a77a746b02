"""Whole LoRA training steps, fastft-jax against the PyTorch peers (HF+PEFT, Liger, Unsloth), on one
card in one call.

Shapes: qwen2.5-1.5b, qwen2.5-7b, llama3-8b, with the HF config dicts of shared/peers/peer_bench.py
(checked against it whenever that file is found), so both sides train the same architecture.

fastft-jax side, one subprocess per configuration (so every configuration starts from an empty
device, its memory peak is its own, and an out-of-memory or a crash costs only that row):
  - weights: --weights random (default) draws bf16 weights on the device (the scheme of
    fastft_jax.model.random_params, one layer at a time so that the float32 draws never push the
    device peak above the training step's); the peers then train their own random checkpoint of
    the same shape (speed does not depend on the values). --weights ckpt loads the checkpoint that
    peer_bench.py builds (ROOT/<model>, built first if missing) through
    FastLanguageModel.from_pretrained, the project's own loader, so both sides train the same
    weights; the load costs about a minute per fastft-jax row at 8B.
  - FastLanguageModel.get_peft_model: LoRA r=16, alpha=16, dropout 0 on all 7 projections; lora_b
    is drawn small and non-zero so that every gradient is realistic (PEFT starts it at zero).
  - the train step is SFTTrainer's own (_build_train_step on a trainer shell: accumulate_gradients,
    torch-style clip at 1.0, optax AdamW lr 2e-4 constant, jit donating adapters and optimiser
    state), so that what is timed is what `trainer.train()` runs.
  - rows: "padded" is batch x seq random tokens, no padding, no segment ids (attention "auto" picks
    cuDNN); "packed" cuts each row into --segments sequences at random points (segment ids,
    positions restarting at 0, no label across a boundary; attention "auto" picks the flash kernel).
  - measured: trace+lower and XLA compile time (jit(...).lower(...).compile()), the first step,
    then --warmup steps, then --steps timed steps, each ended by block_until_ready; tokens/s =
    batch*seq / median step. Peak device memory is memory_stats()["peak_bytes_in_use"] after the
    timed steps (the weights' creation stays below it by construction); the compiled step's
    memory_analysis() is recorded too. Then a bf16 8192^3 jnp.dot, median of 10, gives the matmul
    peak of this card, for MFU.

FLOPs per token (flops_per_token below), N = parameters of the matmuls a token passes through: the
seven projections of every layer plus the lm_head (the embedding lookup is no matmul):
  - MFU, the issue's count: 4N (forward 2N + input gradients 2N; the frozen base gets no weight
    gradient) + 6 N_lora (forward, input and weight gradients of A and B) + attention.
  - attention per layer and token, causal: P (q, k) pairs per query token, P = (S+1)/2 for a full
    row and sum L(L+1)/2 / S over the segments of a packed row; forward 4·H·hd·P (QK^T and PV),
    backward 8·H·hd·P (dS, dQ, dK, dV), so 12·H·hd·P. Flash kernels recompute QK^T in the
    backward; that is not counted.
  - HFU adds what gradient checkpointing recomputes: the decoder layers' forward again (2 N_layers +
    2 N_lora + the attention forward), for checkpointing full and unsloth.
  - "6N" (full fine-tuning's count, for reference): 6N + attention.

Peers (--peers hf_peft,liger,unsloth,...): shared/peers/peer_bench.py (carried as .peers/, or
--peers-dir), after this model's fastft-jax rows, with the same model, batch, seq and steps, on
ROOT/<model> (the checkpoint --weights ckpt loads). With the peers' wheels in <peers-dir>/wheels it runs through peer_bench.sh (which
installs them); without them peer_bench.py runs directly and only hf_peft can work. Peers train
padded rows only; their MFU uses the same FLOP count and this run's matmul peak.

Output: a markdown table at the end; $OUT/e2e.jsonl (one line per finished row), $OUT/e2e.json
(rewritten after every row), $OUT/e2e.log (everything printed), $OUT/RESULTS_section.md; with
--results-md PATH the section is appended there as well. --from-json FILE re-renders a finished
run (e.g. append a GPU run's section to bench/RESULTS.md locally).

Run from the repository root:
  python3 bench/e2e.py                                     # 3 models + llama3-8b unsloth, ~5 min
  python3 bench/e2e.py --model llama3-8b --peers hf_peft,liger,unsloth
  python3 bench/e2e.py --model llama3-8b --checkpointing full,unsloth --kernels auto,reference
  python3 bench/e2e.py --smoke                             # CPU check of the script, < 60 s
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()

# The peers' table (shared/peers/peer_bench.py MODELS), copied so that the fastft-jax side runs
# without the peers; check_shapes_match_peers() refuses to run if the two ever differ.
SHAPES = {
    "tiny": dict(arch="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                 rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=4096,
                 rms_norm_eps=1e-6),
    "tiny-llama": dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                       rope_theta=500000.0, tie_word_embeddings=False,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                         rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768,
                         rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=32768,
                       rms_norm_eps=1e-6),
    "llama3-8b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      rope_theta=500000.0, tie_word_embeddings=False,
                      max_position_embeddings=8192, rms_norm_eps=1e-5),
}
# The anchor batches (batch x 2048 tokens).
DEFAULT_BATCH = {"qwen2.5-1.5b": 4, "qwen2.5-7b": 2, "llama3-8b": 2, "tiny": 2, "tiny-llama": 2}
# peer_bench's offline tokenizer puts its special tokens at ids 0, 1, 2.
EOS_ID, BOS_ID, PAD_ID = 0, 1, 2
LORA_RANK, LORA_ALPHA, LEARNING_RATE = 16, 16.0, 2e-4
CHECKPOINTING = {"none": False, "full": True, "unsloth": "unsloth", "selective": "selective"}
KERNEL_PRESETS = ("auto", "reference", "pallas")
ATTENTION_CHOICES = ("preset", "auto", "cudnn", "pallas", "xla", "reference", "hopper")
PEER_NAMES = {"hf_peft": "HF+PEFT", "liger": "Liger", "unsloth": "Unsloth", "unsloth4": "Unsloth 4-bit",
              "hf_qlora": "HF QLoRA"}
PEER_CKPT_ROOT = "/tmp/peer_bench_ckpt"
# What a fastft-jax row carries from its spec, also when it failed.
SPEC_FIELDS = ("label", "model", "batch", "seq", "steps", "warmup", "checkpointing", "kernels", "attention", "ops",
               "rows", "segments", "weights")


def hf_config(model: str) -> dict[str, Any]:
    """The config.json that peer_bench.make_config writes for this shape, as a plain dict."""
    spec = dict(SHAPES[model])
    arch = spec.pop("arch")
    rope_theta = spec.pop("rope_theta")
    config = dict(spec, model_type=arch, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                  hidden_act="silu", bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if arch == "qwen2":
        config["use_sliding_window"] = False
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def flops_per_token(model: str, pairs_per_token: float, rank: int = LORA_RANK) -> dict[str, float]:
    """Training FLOPs per token of LoRA on every projection (module docstring: the counts)."""
    shape = SHAPES[model]
    hidden, ffn = shape["hidden_size"], shape["intermediate_size"]
    layers, heads, kv_heads = shape["num_hidden_layers"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    projections = [(hidden, heads * head_dim), (hidden, kv_heads * head_dim), (hidden, kv_heads * head_dim),
                   (heads * head_dim, hidden), (hidden, ffn), (hidden, ffn), (ffn, hidden)]
    n_layers = layers * sum(d_in * d_out for d_in, d_out in projections)
    n_matmul = n_layers + hidden * shape["vocab_size"]
    n_lora = layers * sum(rank * (d_in + d_out) for d_in, d_out in projections)
    attention_forward = layers * 4 * heads * head_dim * pairs_per_token
    model_flops = 4 * n_matmul + 6 * n_lora + 3 * attention_forward
    return {
        "n_matmul": n_matmul,
        "n_lora": n_lora,
        "model": model_flops,
        "recompute": 2 * n_layers + 2 * n_lora + attention_forward,
        "six_n": 6 * n_matmul + 3 * attention_forward,
    }


def percent(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(100.0 * numerator / denominator, 2)


# ==================================================================================================
# The child: one fastft-jax configuration in its own process.


def random_rows(seed: int, batch: int, seq: int, vocab: int, segments: int, count: int):
    """`count` step batches of random tokens; with segments > 1 every row is cut into that many
    sequences at random points (the cuts are the same in every step, so the FLOPs are too).
    Returns the batches as numpy StepInputs fields and the causal pairs per token."""
    import numpy as np

    rng = np.random.default_rng(seed)
    positions = np.empty((batch, seq), np.int32)
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ends = []
    pairs = 0
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), segments - 1, replace=False)) if segments > 1 else []
        bounds = [0, *map(int, cuts), seq]
        for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            positions[row, start:end] = np.arange(end - start)
            segment_ids[row, start:end] = index
            segment_ends.append((row, end - 1))
            pairs += (end - start) * (end - start + 1) // 2
    batches = []
    for _ in range(count):
        input_ids = rng.integers(3, vocab, (batch, seq), dtype=np.int32)
        labels = np.roll(input_ids, -1, axis=1)
        for row, last in segment_ends:  # no label crosses into the next sequence
            labels[row, last] = -100
        batches.append((input_ids, labels, positions, segment_ids))
    return batches, pairs / (batch * seq)


def device_random_params(config, seed: int, dtype):
    """random_params' scheme, with each stacked layer leaf filled one layer at a time in place (a
    donated dynamic_update_slice). Eagerly, random_params holds a whole stacked leaf in float32
    twice (7.5 GB each for llama3-8b's gate_proj), and a jitted lax.map over the layers keeps a
    second stacked copy; either would set the device peak that this bench reports."""
    import jax
    import jax.numpy as jnp

    from fastft_jax.model import random_params

    params = random_params(dataclasses.replace(config, num_layers=0), seed, dtype)
    one_layer = dataclasses.replace(config, num_layers=1)
    # random_params' embedding and head are dead code here; XLA drops them.
    draw_layer = jax.jit(lambda index: random_params(one_layer, seed + 1 + index, dtype)["layers"])
    write_layer = jax.jit(
        lambda stacked, layer, index: jax.tree.map(
            lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, index, axis=0), stacked, layer),
        donate_argnums=0)
    stacked = jax.tree.map(lambda leaf: jnp.zeros((config.num_layers, *leaf.shape[1:]), leaf.dtype),
                           jax.eval_shape(draw_layer, 0))
    for index in range(config.num_layers):
        stacked = write_layer(stacked, draw_layer(index), index)
    params["layers"] = stacked
    return params


def build_ops_config(spec: dict):
    from fastft_jax import ops

    if spec["kernels"] == "auto":
        ops_config = ops.OpsConfig.from_env()
    else:
        ops_config = ops.OpsConfig(**{name: spec["kernels"] for name in ops.OP_NAMES})
    overrides = dict(spec["ops"])
    if spec["attention"] != "preset":
        overrides["attention"] = spec["attention"]
    return dataclasses.replace(ops_config, **overrides).validated()


def memory_gib() -> dict[str, float | None]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {key: (round(stats[key] / 2**30, 3) if key in stats else None)
            for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def matmul_peak_tflops(size: int, iters: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(7))
    a = jax.random.normal(keys[0], (size, size), jnp.bfloat16)
    b = jax.random.normal(keys[1], (size, size), jnp.bfloat16)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    for _ in range(3):
        dot(a, b).block_until_ready()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        samples.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(samples) / 1e12


def run_config(spec: dict, result: dict) -> None:
    """One configuration; fills result as it goes, so a failure keeps what was measured before it."""
    import jax
    import jax.numpy as jnp
    import optax

    from convert.hf import model_config_from_hf
    from fastft_jax.api import FastLanguageModel
    from fastft_jax.data import DataConfig
    from fastft_jax.model import CausalLM
    from fastft_jax.trainer import SFTTrainer, StepInputs, TrainingArguments, learning_rate_schedule

    device = jax.devices()[0]
    result.update(device_kind=device.device_kind, platform=device.platform, jax_version=jax.__version__)
    ops_config = build_ops_config(spec)
    packed = spec["rows"] == "packed"
    resolved = ops_config.describe()
    if resolved["attention"] == "auto":
        resolved["attention"] = "pallas" if packed else "cudnn"
    result["ops_resolved"] = resolved
    config = model_config_from_hf(hf_config(spec["model"]), where=f"bench shape {spec['model']}")
    compute_dtype = jnp.bfloat16

    start = time.perf_counter()
    if spec["weights"] == "ckpt":
        model, _tokenizer = FastLanguageModel.from_pretrained(
            spec["ckpt_dir"], max_seq_length=spec["seq"], dtype="bfloat16", kernels=ops_config)
        shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                        "head_dim", "tie_word_embeddings", "qkv_bias", "rope_theta")
        differing = [f for f in shape_fields if getattr(model.config, f) != getattr(config, f)]
        if differing:
            raise RuntimeError(f"{spec['ckpt_dir']}/config.json differs from the {spec['model']} shape in {differing}")
    else:
        params = device_random_params(config, spec["seed"], compute_dtype)
        model = CausalLM(config, params, dtype=compute_dtype, max_seq_length=spec["seq"], ops_config=ops_config)
        del params
    model = FastLanguageModel.get_peft_model(
        model, r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
        use_gradient_checkpointing=CHECKPOINTING[spec["checkpointing"]], random_state=spec["seed"])
    model.set_lora_params(_nonzero_lora_b(model.lora_params(), jax.random.PRNGKey(spec["seed"] + 99)))
    base = model.base_params()
    jax.block_until_ready(base)
    result["weights_s"] = round(time.perf_counter() - start, 2)
    result["memory_after_weights_gib"] = memory_gib()
    result["base_params"] = int(sum(leaf.size for leaf in jax.tree.leaves(base)))
    result["lora_params"] = model.num_parameters(trainable_only=True)

    total_steps = 1 + spec["warmup"] + spec["steps"]
    batches, pairs_per_token = random_rows(spec["seed"] + 1, spec["batch"], spec["seq"], config.vocab_size,
                                           spec["segments"] if packed else 1, total_steps)
    step_inputs = [StepInputs(*(jnp.asarray(array)[None] for array in batch)) for batch in batches]
    result["pairs_per_token"] = pairs_per_token

    args = TrainingArguments(learning_rate=LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0,
                             max_steps=total_steps, max_grad_norm=1.0, bf16=True, save_strategy="no")
    # A trainer shell: SFTTrainer.__init__ needs a tokenizer and a dataset, but the step it builds
    # reads only these four attributes, and timing its own step keeps the bench honest.
    trainer = SFTTrainer.__new__(SFTTrainer)
    trainer.model, trainer.args = model, args
    trainer.data_config = DataConfig(max_seq_length=spec["seq"], packing=packed)
    trainer.optimizer = optax.adamw(learning_rate_schedule(args, total_steps), b1=args.adam_beta1,
                                    b2=args.adam_beta2, eps=args.adam_epsilon, weight_decay=args.weight_decay)
    train_step = trainer._build_train_step()
    lora = model.lora_params()
    opt_state = trainer.optimizer.init(lora)
    seed_key = jax.random.PRNGKey(spec["seed"])

    start = time.perf_counter()
    lowered = train_step.lower(lora, opt_state, base, step_inputs[0], jnp.int32(0), seed_key)
    result["lower_s"] = round(time.perf_counter() - start, 2)
    redraw = spec["weights"] == "random"
    if redraw:
        # XLA's GEMM autotuner allocates the operands of the GEMMs it times while compiling. With
        # the weights already on the device, that transient would raise the process's peak above
        # what the step needs (0.3-3 GiB on llama3-8b), so the step compiles on an empty device and
        # the same weights are drawn again (same seed, same values) afterwards.
        base_structure = jax.tree.structure(base)
        model = trainer = train_step = None
        del base
        gc.collect()
        result["memory_before_compile_gib"] = memory_gib()
    start = time.perf_counter()
    compiled = lowered.compile()
    result["compile_s"] = round(time.perf_counter() - start, 2)
    if redraw:
        base = device_random_params(config, spec["seed"], compute_dtype)
        if jax.tree.structure(base) != base_structure:
            raise RuntimeError("the redrawn weights differ in structure from the ones the step was lowered with")
        jax.block_until_ready(base)
    from bench.timing import compiled_memory_gib

    result["compiled_memory_gib"] = compiled_memory_gib(compiled)
    result["memory_after_compile_gib"] = memory_gib()  # XLA's autotuning allocates on the device too
    print(f"compiled: lower {result['lower_s']} s, compile {result['compile_s']} s", flush=True)

    times, losses = [], []
    for step, inputs in enumerate(step_inputs):
        start = time.perf_counter()
        lora, opt_state, metrics = compiled(lora, opt_state, base, inputs, jnp.int32(step), seed_key)
        jax.block_until_ready((lora, opt_state, metrics))
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
        phase = "first" if step == 0 else ("warm" if step <= spec["warmup"] else "timed")
        print(f"step {step + 1}/{total_steps} {phase} {1e3 * times[-1]:.1f} ms loss {losses[-1]:.4f}", flush=True)
    result["memory_gib"] = memory_gib()

    timed = times[1 + spec["warmup"]:]
    median = statistics.median(timed)
    result.update(
        first_step_s=round(times[0], 3),
        step_times_s=[round(t, 5) for t in times],
        median_step_s=round(median, 5),
        tokens_per_s=round(spec["batch"] * spec["seq"] / median, 1),
        losses=[round(loss, 5) for loss in losses],
        loss_first=round(losses[0], 5),
        loss_last=round(losses[-1], 5),
    )
    if spec.get("profile_dir"):
        with jax.profiler.trace(spec["profile_dir"], create_perfetto_trace=True):
            for step in range(2):
                lora, opt_state, metrics = compiled(lora, opt_state, base, step_inputs[-1], jnp.int32(step), seed_key)
            jax.block_until_ready((lora, opt_state, metrics))
        result["profile_dir"] = spec["profile_dir"]
        try:  # the per-op-class split of the two traced steps (bench/profile_summary.py)
            from bench.profile_summary import print_summary, summarise

            result["profile"] = summarise(Path(spec["profile_dir"]))
            print_summary(result["profile"], f"{spec['model']} {spec.get('checkpointing')} (2 steps)")
        except Exception as error:  # a trace the parser cannot read must not lose the row
            result["profile_error"] = f"{type(error).__name__}: {error}"[:400]

    del lora, opt_state, metrics, base, model, trainer, train_step, compiled, lowered, step_inputs
    gc.collect()
    peak = matmul_peak_tflops(spec["matmul_size"])
    flops = flops_per_token(spec["model"], pairs_per_token)
    rate = result["tokens_per_s"]
    # "selective" keeps every matmul output, so its backward recomputes no matmul.
    recompute = flops["recompute"] if spec["checkpointing"] not in ("none", "selective") else 0.0
    result.update(
        matmul_peak_tflops=round(peak, 1),
        flops_per_token=flops,
        mfu_pct=percent(flops["model"] * rate / 1e12, peak),
        hfu_pct=percent((flops["model"] + recompute) * rate / 1e12, peak),
        mfu_6n_pct=percent(flops["six_n"] * rate / 1e12, peak),
        ok=all(math.isfinite(loss) for loss in losses),
    )
    if not result["ok"]:
        result["error"] = f"non-finite loss: {losses}"


def _nonzero_lora_b(lora: dict, key) -> dict:
    """lora_b drawn N(0, 0.01^2): PEFT's zero start would leave lora_a's gradient zero."""
    import jax

    layers = {}
    for index, (name, adapter) in enumerate(sorted(lora["layers"].items())):
        lora_b = adapter["lora_b"]
        layers[name] = {"lora_a": adapter["lora_a"],
                        "lora_b": 0.01 * jax.random.normal(jax.random.fold_in(key, index), lora_b.shape, lora_b.dtype)}
    return {**lora, "layers": layers}


def child_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    start = time.time()
    result = {"kind": "fastft-jax", "ok": False, **{key: spec[key] for key in SPEC_FIELDS}}
    try:
        run_config(spec, result)
    except BaseException as err:  # noqa: BLE001 - an OOM or a kernel failure is a result too
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-6000:])
        print(result["traceback"], file=sys.stderr, flush=True)
    result["wall_s"] = round(time.time() - start, 2)
    Path(result_path).write_text(json.dumps(result))
    return 0 if result.get("ok") else 1


# ==================================================================================================
# The parent: plans the rows, runs children and peers, collects, reports. It never imports jax.


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")


def run_streaming(cmd: list[str], label: str, timeout: float, env: dict, log: Log, cwd: Path = REPO):
    """Run cmd in its own process group, prefixing its output; kill the group at the timeout.
    Returns (exit code, last lines, seconds, timed out)."""
    start = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    fired = threading.Event()

    def kill():
        fired.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(max(1.0, timeout), kill)
    timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(f"[{label}] {line}")
        code = proc.wait()
    finally:
        timer.cancel()
    if fired.is_set():
        log(f"[{label}] <<killed after {timeout:.0f} s>>")
    return code, list(tail), time.time() - start, fired.is_set()


def find_peers_dir(explicit: str | None) -> Path | None:
    candidates = [Path(explicit)] if explicit else [REPO / ".peers", REPO.parent / "shared" / "peers",
                                                    REPO / "shared" / "peers"]
    return next((path.resolve() for path in candidates if (path / "peer_bench.py").is_file()), None)


def check_shapes_match_peers(peers_dir: Path, models: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("peer_bench", peers_dir / "peer_bench.py")
    peer_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer_bench)
    for model in models:
        if peer_bench.MODELS.get(model) != SHAPES[model]:
            raise SystemExit(f"{model}: bench/e2e.py's shape differs from {peers_dir}/peer_bench.py's; copy theirs")


def child_env(args) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if args.xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    return env


def peer_command(args, peers_dir: Path, model: str, modes: str, out_dir: Path, ckpt_dir: Path,
                 seconds: float) -> tuple[list[str], dict]:
    """peer_bench.sh (installs the carried wheels) when they are there, else peer_bench.py itself."""
    env = dict(os.environ, OUT=str(out_dir))
    common = ["--model", model, "--batch", str(batch_of(args, model)), "--seq", str(args.seq),
              "--steps", str(args.steps), "--warmup", str(args.peer_warmup), "--modes", modes,
              "--ckpt-dir", str(ckpt_dir), "--deadline", str(int(seconds)),
              "--mode-timeout", str(int(min(args.config_timeout, seconds)))]
    if args.smoke:
        common += ["--device", "cpu"]
    wheels = Path(os.environ.get("WHEELS_DIR", peers_dir / "wheels"))
    # The wheels are CPython 3.12 builds for the GPU machine; the CPU smoke test runs hf_peft alone.
    if modes and not args.smoke and (peers_dir / "peer_bench.sh").is_file() and any(wheels.glob("*.whl")):
        return ["bash", str(peers_dir / "peer_bench.sh"), *common], env
    return [sys.executable, str(peers_dir / "peer_bench.py"), "--out", str(out_dir), *common], env


def batch_of(args, model: str) -> int:
    return args.batch or DEFAULT_BATCH[model]


@dataclasses.dataclass
class Job:
    kind: str  # "build" (the peers' checkpoint), "jax" (one fastft-jax row) or "peers"
    model: str
    spec: dict | None = None


def plan(args, peers_dir: Path | None) -> list[Job]:
    use_ckpt = args.weights == "ckpt"
    jobs = []
    for model in args.models:
        combos = list(itertools.product(args.checkpointing, args.kernels, args.attention, args.rows))
        for extra in args.extra:
            extra_model, checkpointing, rows = (extra.split(":") + [args.rows[0]])[:3]
            combo = (checkpointing, args.kernels[0], args.attention[0], rows)
            if extra_model == model and combo not in combos:
                combos.append(combo)
        if use_ckpt:
            jobs.append(Job("build", model))
        for checkpointing, kernels, attention, rows in combos:
            label = f"{model} b{batch_of(args, model)}x{args.seq} ckpt={checkpointing} kernels={kernels}"
            label += (f" attn={attention}" if attention != "preset" else "") + f" {rows}"
            jobs.append(Job("jax", model, dict(
                label=label, model=model, batch=batch_of(args, model), seq=args.seq, steps=args.steps,
                warmup=args.warmup, checkpointing=checkpointing, kernels=kernels, attention=attention,
                ops=args.ops, rows=rows, segments=args.segments, seed=args.seed, matmul_size=args.matmul_size,
                weights="ckpt" if use_ckpt else "random", ckpt_dir=str(Path(args.ckpt_root) / model))))
        if args.peers:
            jobs.append(Job("peers", model))
    return jobs


def environment(args) -> dict:
    from importlib import metadata

    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(),
                            "argv": sys.argv[1:], "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "torch", "transformers",
                 "peft", "triton"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True)
        info["gpu"] = query.stdout.strip() or query.stderr.strip()
    if shutil.which("git"):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        info["commit"] = commit.stdout.strip() or None
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.from_json:
        summary = json.loads(Path(args.from_json).read_text())
        report(summary, args, Log(Path(os.devnull)))
        return 0

    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("e2e.jsonl", "e2e.log"):
        (out_dir / stale).unlink(missing_ok=True)
    log = Log(out_dir / "e2e.log")
    peers_dir = find_peers_dir(args.peers_dir)
    if peers_dir is not None:
        check_shapes_match_peers(peers_dir, args.models)
    elif args.peers or args.weights == "ckpt":
        log(f"!! no peer_bench.py in --peers-dir / .peers / ../shared/peers: the peers (and their checkpoint) "
            f"cannot run; copy shared/peers to .peers and carry it")
    summary = {"environment": environment(args), "args": {k: v for k, v in vars(args).items() if k != "child"},
               "peers_dir": str(peers_dir) if peers_dir else None, "rows": []}
    log(f"== fastft-jax e2e: {summary['environment'].get('gpu', 'no nvidia-smi')}; jax "
        f"{summary['environment'].get('jax')}; out {out_dir}")
    jobs = plan(args, peers_dir)
    log("== plan: " + "; ".join(job.spec["label"] if job.spec else f"{job.kind} {job.model}" for job in jobs))
    started = time.time()
    deadline = started + args.deadline
    env = child_env(args)
    ckpt_failed: set[str] = set()

    def record(row: dict) -> None:
        summary["rows"].append(row)
        line = {k: v for k, v in row.items() if k not in ("traceback", "log_tail", "step_times_s", "losses")}
        with open(out_dir / "e2e.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")
        (out_dir / "e2e.json").write_text(json.dumps(summary, indent=1))

    for job in jobs:
        left = deadline - time.time() - 5
        ckpt_dir = Path(args.ckpt_root) / job.model
        if job.kind == "build":
            if peers_dir is None:
                if not (ckpt_dir / "config.json").is_file():
                    ckpt_failed.add(job.model)
                continue
            if left < 60:
                log(f"== skipping the {job.model} checkpoint build: {left:.0f} s left")
                ckpt_failed.add(job.model)
                continue
            log(f"== checkpoint {ckpt_dir} (peer_bench.py builds it unless it is already there)")
            cmd, peer_env = peer_command(args, peers_dir, job.model, "", out_dir / "peers" / f"{job.model}-build",
                                         ckpt_dir, left)
            code, tail, seconds, _ = run_streaming(cmd, f"build {job.model}", left, peer_env, log)
            if code != 0 or not (ckpt_dir / "config.json").is_file():
                log(f"!! checkpoint build failed (rc {code}); fastft-jax falls back to random weights on the device")
                ckpt_failed.add(job.model)
            summary.setdefault("checkpoints", {})[job.model] = {"dir": str(ckpt_dir), "rc": code,
                                                                "seconds": round(seconds, 1)}
        elif job.kind == "jax":
            spec = dict(job.spec)
            if spec["weights"] == "ckpt" and job.model in ckpt_failed:
                spec["weights"] = "random"
            if left < 30:
                record({"kind": "fastft-jax", **{key: spec[key] for key in SPEC_FIELDS},
                        "ok": False, "error": f"skipped: --deadline {args.deadline:.0f} s reached"})
                continue
            stem = "".join(c if c.isalnum() or c in "-._" else "_" for c in spec["label"])
            if args.profile:
                spec["profile_dir"] = str(out_dir / "profile" / stem)
            spec_path, result_path = out_dir / f".spec_{stem}.json", out_dir / f".result_{stem}.json"
            spec_path.write_text(json.dumps(spec))
            result_path.unlink(missing_ok=True)
            timeout = min(args.config_timeout, left)
            log(f"== {spec['label']} (weights {spec['weights']}, timeout {timeout:.0f} s)")
            code, tail, seconds, timed_out = run_streaming(
                [sys.executable, str(HERE), "--_child", str(spec_path), str(result_path)], spec["label"], timeout, env, log)
            row = json.loads(result_path.read_text()) if result_path.is_file() else None
            if row is None:
                why = f"timeout after {seconds:.0f} s" if timed_out else f"process exited rc={code} without a result"
                row = {"kind": "fastft-jax", **{key: spec[key] for key in SPEC_FIELDS}, "ok": False, "error": why}
            if not row.get("ok"):
                row["log_tail"] = "\n".join(tail[-25:])
            row["process_s"] = round(seconds, 1)
            spec_path.unlink(missing_ok=True)
            result_path.unlink(missing_ok=True)
            record(row)
            log(f"== {short_row(row)}")
        else:
            if peers_dir is None:
                record({"kind": "peer", "model": job.model, "mode": args.peers, "ok": False,
                        "error": "peer_bench.py not found"})
                continue
            if left < 60:
                record({"kind": "peer", "model": job.model, "mode": args.peers, "ok": False,
                        "error": f"skipped: --deadline {args.deadline:.0f} s reached"})
                continue
            peer_out = out_dir / "peers" / job.model
            log(f"== peers {args.peers} on {job.model} ({left:.0f} s left)")
            cmd, peer_env = peer_command(args, peers_dir, job.model, args.peers, peer_out, ckpt_dir, left)
            code, tail, seconds, _ = run_streaming(cmd, f"peers {job.model}", left, peer_env, log)
            result_file = peer_out / f"peer_bench_{job.model}_b{batch_of(args, job.model)}_s{args.seq}.json"
            runs = json.loads(result_file.read_text()).get("runs", []) if result_file.is_file() else []
            if not runs:
                runs = [{"mode": args.peers, "ok": False, "error": f"peer_bench rc={code}, no results",
                         "log_tail": "\n".join(tail[-25:])}]
            for run in runs:
                run = {k: v for k, v in run.items() if k not in ("traceback",)}
                record({"kind": "peer", **run, "model": job.model, "batch": batch_of(args, job.model),
                        "seq": args.seq, "rows": "padded"})
    for stale in out_dir.glob(".spec_*.json"):
        stale.unlink()
    summary["total_s"] = round(time.time() - started, 1)
    (out_dir / "e2e.json").write_text(json.dumps(summary, indent=1))
    report(summary, args, log)
    log(f"\nresults: {out_dir / 'e2e.json'}  total {summary['total_s']} s")
    return 0 if all(row.get("ok") for row in summary["rows"]) else 1


# ==================================================================================================
# Reporting


def short_row(row: dict) -> str:
    if not row.get("ok"):
        return f"{row.get('label', row.get('mode'))}: FAILED {row.get('error', '')[:200]}"
    return (f"{row['label']}: {row['tokens_per_s']:,.0f} tok/s, peak {row['memory_gib']['peak_bytes_in_use']} GiB, "
            f"compile {row['lower_s'] + row['compile_s']:.1f} s, MFU {row.get('mfu_pct')} %")


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table_rows(summary: dict) -> tuple[list[list[str]], float | None]:
    """Markdown cells per row, and the matmul peak the peers' MFU uses (median over this run)."""
    peaks = [row["matmul_peak_tflops"] for row in summary["rows"] if row.get("matmul_peak_tflops")]
    peak = statistics.median(peaks) if peaks else None
    unsloth = {(row["model"], row["batch"], row["seq"]): row["tokens_per_s"] for row in summary["rows"]
               if row.get("kind") == "peer" and row.get("mode") == "unsloth" and row.get("ok")}
    cells = []
    for row in summary["rows"]:
        key = (row.get("model"), row.get("batch"), row.get("seq"))
        rate = row.get("tokens_per_s") if row.get("ok") else None
        ratio = None
        if rate and key in unsloth and row.get("rows") == "padded":
            ratio = rate / unsloth[key]
        if row.get("kind") == "peer":
            name = f"{PEER_NAMES.get(row.get('mode'), row.get('mode'))} ({row.get('model')} b{row.get('batch')}x{row.get('seq')})"
            peak_gib = row.get("peak_mem_gib")
            warmup_overhead = (row["first_step_s"] - row["median_step_s"]) if row.get("first_step_s") and rate else None
            flops = flops_per_token(row["model"], (row["seq"] + 1) / 2)["model"] if row.get("model") in SHAPES else None
            mfu = percent(flops * rate / 1e12, peak) if rate and flops else None
            compile_s, note = warmup_overhead, "" if row.get("ok") else row.get("error", "")
            step_gib = None
        else:
            name = f"fastft-jax {row.get('label')}"
            peak_gib = (row.get("memory_gib") or {}).get("peak_bytes_in_use")
            step_gib = compiled_step_gib(row.get("compiled_memory_gib"))
            compile_s = (row["lower_s"] + row["compile_s"]) if "compile_s" in row else None
            mfu, note = row.get("mfu_pct"), "" if row.get("ok") else row.get("error", "")
            if row.get("ok") and row.get("weights") == "random":
                note = "random weights on device"
        note = " ".join(str(note).split())[:120].replace("|", "/")
        cells.append([name, _fmt(rate, ",.0f"), _fmt(peak_gib, ".2f"), _fmt(step_gib, ".2f"), _fmt(compile_s, ".1f"), _fmt(mfu, ".1f"),
                      _fmt(ratio, ".2f") + ("×" if ratio else ""), note])
    return cells, peak


def compiled_step_gib(analysis: dict | None) -> float | None:
    """Device memory the compiled step needs: its arguments (weights, adapters, optimiser state,
    batch), outputs and temporaries, less the donated buffers its outputs reuse."""
    if not analysis:
        return None
    return analysis["argument"] + analysis["output"] + analysis["temp"] - analysis["alias"]


def markdown(summary: dict) -> str:
    cells, peak = table_rows(summary)
    lines = ["| config | tok/s | peak GiB | step GiB | compile s | MFU % | vs Unsloth | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    env = summary["environment"]
    card = next((row.get("device_kind") for row in summary["rows"] if row.get("device_kind")), None)
    gpu = env.get("gpu") or card or "?"
    versions = ", ".join(f"{name} {env[name]}" for name in ("jax", "jaxlib", "flax", "optax", "torch",
                                                             "transformers", "peft") if env.get(name))
    args = summary["args"]
    from_ckpt = sorted({row["model"] for row in summary["rows"] if row.get("kind") == "fastft-jax"
                        and row.get("ok") and row.get("weights") == "ckpt"})
    checkpoint_note = (f"fastft-jax loads the peers' checkpoint ({', '.join(from_ckpt)}; {args['ckpt_root']}/<model>) "
                       "through FastLanguageModel.from_pretrained; rows noted 'random weights on device' draw their own"
                       if from_ckpt else "fastft-jax draws random bf16 weights on the device; the peers (if any) load "
                       "their own random checkpoint of the same shape")
    header = [
        f"## e2e {env.get('date_utc', '')[:16].replace('T', ' ')} UTC — {gpu}",
        "",
        f"{versions}; commit {env.get('commit') or '?'}; `python3 bench/e2e.py {' '.join(env.get('argv', []))}`",
        "",
        f"LoRA r={LORA_RANK}, alpha={int(LORA_ALPHA)} on q,k,v,o,gate,up,down; AdamW lr {LEARNING_RATE} (fastft-jax also "
        f"clips at 1.0, as its trainer does; the peers do not clip); random tokens; {args['steps']} timed steps after "
        f"{args['warmup']} (fastft-jax, plus the first) / {args['peer_warmup']} (peers) warm-up steps, median. "
        f"Weights: {checkpoint_note}. Peak: jax peak_bytes_in_use / torch max_memory_allocated (jax's includes "
        f"XLA's compile-time autotuning buffers). Step: what the compiled step needs on the device, arguments + "
        f"outputs + temporaries - donated (XLA memory_analysis). "
        f"Compile: fastft-jax trace+lower+XLA compile; peers: first step minus a median step (torch.compile, "
        f"autotuning). MFU: (4N + 6N_lora + attention) FLOPs per token over the bf16 matmul peak measured in this "
        f"run ({_fmt(peak, '.3g')} TFLOP/s, bf16 jnp.dot {args['matmul_size']}³). vs Unsloth: tokens/s over Unsloth's, padded rows only.",
        "",
    ]
    return "\n".join(header + lines) + "\n"


def report(summary: dict, args, log: Log) -> None:
    text = markdown(summary)
    log("\n" + text)
    if args.from_json is None:
        (Path(args.out) / "RESULTS_section.md").write_text(text)
    if args.results_md:
        append_results_md(args.results_md, text, log)


def append_results_md(results_md: str | Path, text: str, log) -> None:
    """Append a dated section to a results file (bench/RESULTS.md), creating it if needed."""
    path = Path(results_md)
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with open(path, "a") as handle:
        handle.write("\n" + text)
    log(f"appended to {path}")


# ==================================================================================================
# CLI


def _list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    values = [value.strip() for value in text.split(",") if value.strip()]
    bad = [value for value in values if allowed is not None and value not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad} not in {', '.join(allowed)}")
    return values


def _extras(text: str) -> list[str]:
    extras = _list(text)
    for extra in extras:
        parts = extra.split(":")
        if not (2 <= len(parts) <= 3 and parts[0] in SHAPES and parts[1] in CHECKPOINTING
                and parts[2:] in ([], ["padded"], ["packed"])):
            raise argparse.ArgumentTypeError(f"--extra {extra!r}: expected MODEL:{'|'.join(CHECKPOINTING)}[:padded|packed]")
    return extras


def _ops(text: str) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in _list(text))
    # Numbers (mlp_tile_tokens=2048, loss_chunk_tokens=...) go to OpsConfig as ints.
    return {key.strip(): int(value) if value.strip().isdigit() else value.strip() for key, value in pairs.items()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", dest="models", type=lambda s: _list(s, tuple(SHAPES)),
                        default=["qwen2.5-1.5b", "qwen2.5-7b", "llama3-8b"], help="comma list of shapes")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: 4 for qwen2.5-1.5b, else 2)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--checkpointing", type=lambda s: _list(s, tuple(CHECKPOINTING)), default=["full"],
                        help="comma list of none,full,unsloth")
    parser.add_argument("--extra", type=_extras, default=["llama3-8b:unsloth"],
                        help="comma list of MODEL:CHECKPOINTING[:ROWS] rows added after the sweep of that model, "
                             "when that model is in --model ('' for none)")
    parser.add_argument("--kernels", type=lambda s: _list(s, KERNEL_PRESETS), default=["auto"],
                        help="comma list of presets: auto (OpsConfig.from_env()), reference, pallas")
    parser.add_argument("--attention", type=lambda s: _list(s, ATTENTION_CHOICES), default=["preset"],
                        help="comma list overriding the preset's attention: auto,cudnn,pallas,xla,reference")
    parser.add_argument("--ops", type=_ops, default={}, help="per-op overrides for every row, e.g. cross_entropy=reference")
    parser.add_argument("--rows", type=lambda s: _list(s, ("padded", "packed")), default=["padded"])
    parser.add_argument("--packed", action="store_true", help="same as --rows padded,packed")
    parser.add_argument("--segments", type=int, default=8, help="sequences per packed row")
    parser.add_argument("--weights", choices=("random", "ckpt"), default="random",
                        help="random: drawn on the device; ckpt: ROOT/<model> (built by peer_bench.py if missing), "
                             "loaded by FastLanguageModel.from_pretrained, the weights the peers load")
    parser.add_argument("--ckpt-root", default=PEER_CKPT_ROOT, help="checkpoints live in ROOT/<model> (peer_bench's default)")
    parser.add_argument("--peers", default="", help="comma list of peer_bench modes: hf_peft,liger,unsloth,unsloth4,hf_qlora")
    parser.add_argument("--peers-dir", default=None, help="holds peer_bench.py (default .peers, then ../shared/peers)")
    parser.add_argument("--peer-warmup", type=int, default=3, help="peers' warm-up steps (Unsloth compiles in the first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole call; later rows are skipped")
    parser.add_argument("--config-timeout", type=float, default=300.0, help="seconds per fastft-jax row / peer mode")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS of the fastft-jax rows")
    parser.add_argument("--profile", action="store_true", help="jax.profiler trace of 2 more steps per row into OUT/profile")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/fastft_e2e"))
    parser.add_argument("--results-md", default=None, help="append the dated section to this file (bench/RESULTS.md)")
    parser.add_argument("--from-json", default=None, help="render an e2e.json instead of running")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny shapes, < 60 s")
    parser.add_argument("--_child", dest="child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.packed:
        args.rows = ["padded", "packed"]
    if args.smoke:
        args.models = ["tiny", "tiny-llama"] if args.models == parser.get_default("models") else args.models
        for name, value in (("seq", 128), ("steps", 2), ("warmup", 1), ("peer_warmup", 1), ("batch", 2),
                            ("matmul_size", 256)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        if args.extra == parser.get_default("extra"):
            args.extra = ["tiny:full:packed", "tiny-llama:unsloth"]
        args.out = args.out if args.out != parser.get_default("out") else "/tmp/fastft_e2e_smoke"
    if args.steps < 1 or args.warmup < 0 or args.seq < 2 or (args.batch is not None and args.batch < 1):
        parser.error("need --steps >= 1, --warmup >= 0, --seq >= 2, --batch >= 1")
    if args.segments < 1 or args.segments > args.seq:
        parser.error("--segments must be in [1, seq]")
    return args


if __name__ == "__main__":
    sys.exit(main())

"""Scaling out on several GPUs of one host: data parallel and FSDP through fastft_jax.sharding.

Rows (each in its own process, so that every row starts from empty devices and an out-of-memory
costs only that row):
  - llama3-8b on 1 GPU, and with mesh data=2 (and fsdp=2, for reference): the same per-device
    batch, so tokens/s per GPU of data=2 against the 1-GPU figure is the data-parallel
    efficiency (the issue asks >= 90%).
  - a Llama-shaped model whose 16-bit weights do not fit one GPU (default 48B: Llama-3-70B's
    widths with 54 layers, 96.6 GB of bf16; with --big-layers auto the depth grows until the
    weights exceed 1.15x one GPU's memory, for H200s), FSDP over every GPU, LoRA r=16.
Weights are random bf16 drawn directly on the devices, shard by shard and one layer at a time
(jit with out_shardings: no device ever holds a whole leaf, no host copy). The step is
SFTTrainer's own (_build_train_step on a trainer shell, as bench/e2e.py does): LoRA r=16,
alpha=16 on all 7 projections, AdamW, torch-style clipping, the shardings of
fastft_jax.sharding.PARTITION_RULES, traced under jax.set_mesh. Random tokens, padded rows
(no segment ids).

Under FSDP the model's layer scan (fastft_jax/model.py) runs each decoder layer per device on its
own rows (sharding.batch_local) and gathers the layer's weight shards whole as the layer starts:
FSDP's per-layer all-gather, inside the loop. Data-only meshes need nothing of the kind: the
trainer runs the whole loss per device.

Measured per row: compile time, the first step, --warmup steps, then --steps timed steps (each
ended by block_until_ready); tokens/s = global batch x seq / median step, and per GPU; the
largest device memory peak; the compiled step's memory analysis; MFU against a bf16 matmul peak
measured in the same run (bench/e2e.py's FLOP count).

Output: a table at the end, $OUT/multi_gpu.json (rewritten after every row), $OUT/multi_gpu.log.

    python3 bench/multi_gpu.py                       # every row (may take longer than 10 min)
    python3 bench/multi_gpu.py --rows 8b-1,8b-data,8b-fsdp    # the same in two shorter calls
    python3 bench/multi_gpu.py --rows big-fsdp
    python3 bench/multi_gpu.py --rows 8b-1,8b-data --batch 4
    python3 bench/multi_gpu.py --smoke               # CPU, 2 virtual devices, tiny shapes, < 90 s
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()


def _e2e():
    """bench/e2e.py's shapes, FLOP count, random rows and matmul peak (no jax at import)."""
    spec = importlib.util.spec_from_file_location("bench_e2e", HERE.parent / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


E2E = _e2e()
# Llama-3-70B's widths (hidden 8192, ffn 28672, 64 heads on 8 KV heads, vocab 128256) at a depth
# chosen per run: 54 layers is 48.3B parameters.
BIG_BASE = dict(arch="llama", hidden_size=8192, num_hidden_layers=54, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                max_position_embeddings=8192, rms_norm_eps=1e-5)
ROWS = {
    # name: (model, mesh, default checkpointing)
    "8b-1": ("llama3-8b", None, "unsloth"),
    "8b-data": ("llama3-8b", {"data": -1}, "unsloth"),
    "8b-fsdp": ("llama3-8b", {"fsdp": -1}, "unsloth"),
    "big-fsdp": ("big", {"fsdp": -1}, "full"),
}
SMOKE_MODEL = "tiny-llama"


def parameter_count(shape: dict) -> int:
    hidden, ffn, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = hidden // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * ffn + 2 * hidden
    head = 0 if shape["tie_word_embeddings"] else hidden * shape["vocab_size"]
    return layers * per_layer + hidden * shape["vocab_size"] + head + hidden


def big_shape(layers: int) -> dict:
    return dict(BIG_BASE, num_hidden_layers=layers)


# nvidia-smi's memory.total of an H100 80GB, in MiB (bench/long_context.py's H100_80GB_BYTES).
H100_80GB_MIB = 81_559


def device_memory_fraction(gigabytes: float) -> float:
    """The allocator fraction that leaves `gigabytes` of GPU 0's memory.total to XLA (80 -> an H100 80GB)."""
    query = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, check=True)
    total_mib = float(query.stdout.split()[0])
    cap_mib = H100_80GB_MIB if gigabytes == 80 else gigabytes * 1e9 / 2**20
    if cap_mib > total_mib:
        raise SystemExit(f"--device-memory {gigabytes:g} GB is more than the GPU's {total_mib / 1024:.1f} GiB")
    return cap_mib / total_mib


def auto_big_layers(device_bytes: int, margin: float = 1.15) -> int:
    """The fewest layers (at least 54) whose bf16 weights exceed margin x one device's memory."""
    layers = BIG_BASE["num_hidden_layers"]
    while 2 * parameter_count(big_shape(layers)) < margin * device_bytes:
        layers += 1
    return layers


# ==================================================================================================
# The child: one row in its own process.


def sharded_random_params(config, mesh, seed: int, dtype):
    """fastft_jax.model.random_params' scheme (norms 1 + 0.1 N, biases 0.02 N, embedding
    N / sqrt(hidden), projections N / sqrt(fan_in)), drawn on the devices already split by PARTITION_RULES: each
    stacked leaf starts as sharded zeros and every layer is drawn and written in place by one
    jitted call (donated), so no device holds more than its shard plus one layer's draw."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from convert.hf import tensor_specs
    from fastft_jax.sharding import leaf_sharding

    key = jax.random.PRNGKey(seed)
    tree: dict = {}
    for index, spec in enumerate(tensor_specs(config)):
        name = "/".join(spec.path)
        shape = ((config.num_layers,) if spec.stacked else ()) + spec.shape
        sharding = leaf_sharding(name, shape, mesh)
        leaf_key = jax.random.fold_in(key, index)

        def draw(draw_key, part_shape, spec=spec):
            values = jax.random.normal(draw_key, part_shape, jnp.float32)
            if spec.path[-1].endswith("norm"):
                values = 1.0 + 0.1 * values
            elif spec.path[-1] == "bias":
                values = 0.02 * values
            elif spec.path == ("embed",):
                values = values / math.sqrt(spec.shape[-1])
            else:
                values = values / math.sqrt(spec.shape[0])
            return values.astype(dtype)

        if spec.stacked:
            layer_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
            write = jax.jit(
                lambda stacked, layer, leaf_key=leaf_key, spec=spec, draw=draw, layer_sharding=layer_sharding:
                    stacked.at[layer].set(jax.lax.with_sharding_constraint(
                        draw(jax.random.fold_in(leaf_key, layer), spec.shape), layer_sharding)),
                donate_argnums=0, out_shardings=sharding)
            leaf = jax.jit(lambda shape=shape: jnp.zeros(shape, dtype), out_shardings=sharding)()
            for layer in range(config.num_layers):
                leaf = write(leaf, jnp.int32(layer))
        else:
            leaf = jax.jit(lambda leaf_key=leaf_key, shape=shape, draw=draw: draw(leaf_key, shape),
                           out_shardings=sharding)()
        node = tree
        for part in spec.path[:-1]:
            node = node.setdefault(part, {})
        node[spec.path[-1]] = leaf
        jax.block_until_ready(leaf)
    return tree


def memory_by_device() -> list[dict]:
    import jax

    rows = []
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        rows.append({key: (round(stats[key] / 2**30, 3) if key in stats else None)
                     for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")})
    return rows


def run_row(spec: dict, result: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from convert.hf import model_config_from_hf
    from fastft_jax import FastLanguageModel, sharding
    from fastft_jax.data import DataConfig
    from fastft_jax.model import CausalLM
    from fastft_jax.ops import OpsConfig
    from fastft_jax.trainer import SFTTrainer, StepInputs, TrainingArguments, learning_rate_schedule

    devices = jax.devices()
    result.update(device_kind=devices[0].device_kind, platform=devices[0].platform, jax_version=jax.__version__,
                  device_count=len(devices))
    mesh = sharding.make_mesh(spec["mesh"])
    shards = sharding.batch_shards(mesh)
    result["mesh_shape"] = dict(mesh.shape)
    if spec["model"] == "big":
        layers = spec["big_layers"]
        if layers == "auto":
            limit = (devices[0].memory_stats() or {}).get("bytes_limit") or 80 * 2**30
            layers = auto_big_layers(limit)
        E2E.SHAPES["big"] = big_shape(int(layers))
    shape = E2E.SHAPES[spec["model"]]
    result["parameters"] = parameter_count(shape)
    result["bf16_weights_gib"] = round(2 * parameter_count(shape) / 2**30, 2)
    config = model_config_from_hf(E2E.hf_config(spec["model"]), where=f"bench shape {spec['model']}")

    start = time.perf_counter()
    dtype = jnp.bfloat16 if devices[0].platform == "gpu" else jnp.float32
    params = sharded_random_params(config, mesh, spec["seed"], dtype)
    model = CausalLM(config, params, dtype=dtype, max_seq_length=spec["seq"], ops_config=OpsConfig.from_env())
    del params
    model = FastLanguageModel.get_peft_model(
        model, r=E2E.LORA_RANK, lora_alpha=E2E.LORA_ALPHA, lora_dropout=0.0,
        use_gradient_checkpointing=E2E.CHECKPOINTING[spec["checkpointing"]], random_state=spec["seed"])
    # lora_b drawn N(0, 0.01^2): PEFT's zero start would leave lora_a's gradient zero.
    model.set_lora_params(jax.tree_util.tree_map_with_path(
        lambda path, leaf: 0.01 * jax.random.normal(jax.random.PRNGKey(len(path)), leaf.shape, leaf.dtype)
        if sharding.path_name(path).endswith("lora_b") else leaf, model.lora_params()))
    result["weights_s"] = round(time.perf_counter() - start, 2)
    result["lora_params"] = model.num_parameters(trainable_only=True)

    global_batch = spec["batch"] * shards
    total_steps = 1 + spec["warmup"] + spec["steps"]
    batches, pairs_per_token = E2E.random_rows(spec["seed"] + 1, global_batch, spec["seq"], config.vocab_size, 1,
                                               total_steps)
    args = TrainingArguments(learning_rate=E2E.LEARNING_RATE, lr_scheduler_type="constant", max_steps=total_steps,
                             max_grad_norm=1.0, bf16=dtype == jnp.bfloat16, save_strategy="no", mesh=spec["mesh"],
                             per_device_train_batch_size=spec["batch"])
    # A trainer shell, as bench/e2e.py: the step it builds is the one trainer.train() runs.
    trainer = SFTTrainer.__new__(SFTTrainer)
    trainer.model, trainer.args = model, args
    trainer.data_config = DataConfig(max_seq_length=spec["seq"], packing=False)
    trainer.optimizer = optax.adamw(learning_rate_schedule(args, total_steps), b1=args.adam_beta1,
                                    b2=args.adam_beta2, eps=args.adam_epsilon, weight_decay=args.weight_decay)
    train_step = trainer._build_train_step()  # places the model on the mesh
    base, lora = model.base_params(), model.lora_params()
    opt_state = jax.jit(trainer.optimizer.init, out_shardings=trainer.opt_state_shardings)(lora)
    seed_key = sharding.place(jax.random.PRNGKey(spec["seed"]), sharding.replicated(trainer.mesh))
    step_inputs = [sharding.place_batch(StepInputs(*(array[None] for array in batch)), trainer.batch_sharding)
                   for batch in batches]
    result["memory_after_weights_gib"] = memory_by_device()
    result["base_specs"] = {sharding.path_name(path): str(leaf.sharding.spec)
                            for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]}

    with jax.set_mesh(trainer.mesh):
        start = time.perf_counter()
        lowered = train_step.lower(lora, opt_state, base, step_inputs[0], np.int32(0), seed_key)
        result["lower_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        compiled = lowered.compile()
        result["compile_s"] = round(time.perf_counter() - start, 2)
    from bench.timing import compiled_memory_gib

    result["compiled_memory_gib"] = compiled_memory_gib(compiled)
    hlo = compiled.as_text()
    result["collectives"] = {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
                             for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")}
    print(f"compiled: lower {result['lower_s']} s, compile {result['compile_s']} s; {result['collectives']}", flush=True)

    times, losses = [], []
    for step, inputs in enumerate(step_inputs):
        start = time.perf_counter()
        lora, opt_state, metrics = compiled(lora, opt_state, base, inputs, np.int32(step), seed_key)
        jax.block_until_ready((lora, opt_state, metrics))
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
        print(f"step {step + 1}/{total_steps} {1e3 * times[-1]:.1f} ms loss {losses[-1]:.4f}", flush=True)
    result["memory_gib"] = memory_by_device()
    result["peak_memory_gib"] = max((row["peak_bytes_in_use"] or 0) for row in result["memory_gib"])
    timed = times[1 + spec["warmup"]:]
    median = statistics.median(timed)
    tokens_per_s = global_batch * spec["seq"] / median
    del lora, opt_state, metrics, base, model, trainer, train_step, compiled, lowered, step_inputs
    peak = E2E.matmul_peak_tflops(spec["matmul_size"])
    flops = E2E.flops_per_token(spec["model"], pairs_per_token)
    result.update(
        global_batch=global_batch,
        first_step_s=round(times[0], 3),
        step_times_s=[round(t, 5) for t in times],
        median_step_s=round(median, 5),
        tokens_per_s=round(tokens_per_s, 1),
        tokens_per_s_per_device=round(tokens_per_s / mesh.devices.size, 1),
        losses=[round(loss, 5) for loss in losses],
        matmul_peak_tflops=round(peak, 1),
        mfu_pct=E2E.percent(flops["model"] * tokens_per_s / mesh.devices.size / 1e12, peak),
        ok=all(math.isfinite(loss) for loss in losses),
    )


def child_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = {"ok": False, **spec}
    start = time.time()
    try:
        run_row(spec, result)
    except BaseException as err:  # noqa: BLE001 - an OOM is a result too
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-6000:])
        print(result["traceback"], file=sys.stderr, flush=True)
    result["wall_s"] = round(time.time() - start, 2)
    Path(result_path).write_text(json.dumps(result))
    return 0 if result.get("ok") else 1


# ==================================================================================================
# The parent: never imports jax.


def table(results: list[dict]) -> str:
    baseline = next((r for r in results if r.get("ok") and r["row"].endswith("-1")), None)
    lines = ["| row | model | params | mesh | per-device batch x seq | tokens/s | tokens/s per GPU | vs 1 GPU | "
             "peak GiB/GPU | MFU % | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("ok"):
            lines.append(f"| {r['row']} | {r['model']} | | {r.get('mesh')} | | failed: "
                         f"{(r.get('error') or '')[:80]} | | | | | |")
            continue
        ratio = ""
        if baseline is not None and r["model"] == baseline["model"] and r is not baseline:
            ratio = f"{100 * r['tokens_per_s_per_device'] / baseline['tokens_per_s_per_device']:.1f}%"
        mesh = " x ".join(f"{k}={v}" for k, v in r["mesh_shape"].items())
        lines.append(
            f"| {r['row']} | {r['model']} | {r['parameters'] / 1e9:.1f}B | {mesh} | {r['batch']} x {r['seq']} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_per_device']:.0f} | {ratio} | {r['peak_memory_gib']:.1f} | "
            f"{r['mfu_pct']} | {r['compile_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8b-1,8b-data,8b-fsdp,big-fsdp", help=f"of {', '.join(ROWS)}")
    parser.add_argument("--batch", type=int, default=2, help="per-device batch (rows) of the 8b rows")
    parser.add_argument("--big-batch", type=int, default=2, help="per-device batch of the big row")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--checkpointing", default=None, choices=sorted(E2E.CHECKPOINTING),
                        help="override every row's (8b: unsloth, big: full)")
    parser.add_argument("--big-layers", default="auto", help="layers of the big model, or auto (exceed one GPU by 15%%)")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--timeout", type=float, default=540, help="seconds per row")
    parser.add_argument("--device-memory", type=float, default=None,
                        help="cap each GPU's allocator at this many GB (80: an H100 80GB's 81,559 MiB), so a "
                             "bigger card runs the issue's '2 x 80 GB' case; the auto depth follows the cap")
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 virtual devices, tiny shapes")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)

    out = Path(os.environ.get("OUT") or REPO / "bench" / "results" / "multi_gpu")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "multi_gpu.log"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
               PYTHONUNBUFFERED="1")
    if args.smoke:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    elif args.device_memory:
        env.pop("XLA_CLIENT_MEM_FRACTION", None)  # jaxlib refuses both names at once
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{device_memory_fraction(args.device_memory):.4f}"
        print(f"== each GPU capped at {args.device_memory:g} GB: XLA_PYTHON_CLIENT_MEM_FRACTION="
              f"{env['XLA_PYTHON_CLIENT_MEM_FRACTION']}", flush=True)
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    results: list[dict] = []
    for row in args.rows.split(","):
        model, mesh, checkpointing = ROWS[row]
        spec = dict(row=row, model=model, mesh=mesh, checkpointing=args.checkpointing or checkpointing,
                    batch=args.big_batch if model == "big" else args.batch, seq=args.seq, steps=args.steps,
                    warmup=args.warmup, seed=0, big_layers=args.big_layers,
                    matmul_size=args.matmul_size)
        if args.smoke:
            spec.update(model=SMOKE_MODEL, seq=64, steps=2, warmup=1, matmul_size=256, batch=2)
        spec_path, result_path = out / f"{row}.spec.json", out / f"{row}.result.json"
        spec_path.write_text(json.dumps(spec))
        result_path.unlink(missing_ok=True)
        print(f"== {row}: {spec}", flush=True)
        start = time.time()
        with open(log_path, "a") as log:
            try:
                proc = subprocess.run([sys.executable, str(HERE), "--child", str(spec_path), str(result_path)],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      errors="replace", timeout=args.timeout)
                output = proc.stdout
            except subprocess.TimeoutExpired as err:
                output = (err.stdout or "") if isinstance(err.stdout, str) else ""
                output += f"\n<<killed after {args.timeout:.0f} s>>"
            log.write(f"== {row}\n{output}\n")
        print("\n".join(output.splitlines()[-12:]), flush=True)
        result = json.loads(result_path.read_text()) if result_path.exists() else \
            {**spec, "ok": False, "error": "no result (killed or crashed)", "tail": output[-3000:]}
        result["row_wall_s"] = round(time.time() - start, 1)
        results.append(result)
        (out / "multi_gpu.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "multi_gpu.md").write_text(text + "\n")
    print("\n" + text)
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

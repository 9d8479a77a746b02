"""Decode speed of fastft_jax.generate against transformers' generate, on one card in one call.

Shape: llama3-8b (bench/e2e.py's SHAPES, the peers' HF config), bf16, random weights on both sides
(speed does not depend on the values): fastft-jax draws them with e2e.device_random_params
(fastft_jax.model.random_params' scheme), transformers builds AutoModelForCausalLM.from_config on
the GPU (sdpa attention, its default dynamic cache). Each side runs in its own process, so each
starts from an empty card. Prompts: --prompt-len random tokens, no padding, batch 1 and 32.

What is timed (median of --iters runs, each ended by block_until_ready / cuda.synchronize):
  - generate_s: a whole greedy generate of --new-tokens tokens with stopping off (fastft-jax:
    eos_token_id=[], the fused prefill + lax.while_loop program; transformers: min_new_tokens =
    max_new_tokens).
  - prefill_s: the prompt pass and the first token (fastft-jax: the jitted prefill alone;
    transformers: generate with max_new_tokens=1).
  - decode tokens/s = batch * (new_tokens - 1) / (generate_s - prefill_s): the decode steps alone,
    the issue's number. fastft-jax also times its single jitted decode step driven from Python
    (what stream_generate and the CLI run): step_loop tokens/s.
  - batch-1 bound: a decode step must read every weight a token passes through (the seven
    projections of every layer, the norms and the lm_head; the embedding lookup reads one row).
    bound tokens/s = copy bandwidth / weight bytes, where the copy bandwidth is that of a jitted
    x + 1 over a --copy-gib bf16 array (read + write counted) on the same card. pct_of_bound =
    decode tokens/s / bound tokens/s (the issue asks >= 70% at batch 1). The KV cache read per
    step is reported beside it (the decode step attends over the whole preallocated cache).
  - a bf16 sanity check: the tokens of the fused generate equal those of the step loop, and the
    full-sequence forward's argmax agrees with the generated tokens (bf16 near-ties may flip a few).
  - --decode-matmul pallas,reference times every fastft-jax row once per mode of the op seam's
    "decode_matmul" (pallas: the decode step's projections read each layer's weight in place in the
    stacked array, pallas_kernels/stacked_matmul.py; reference: sliced out of the stack, as before),
    in one process on the same weights, the two modes of a row back to back. NF4 rows take the
    sliced path under either mode.

Output: a table at the end; $OUT/decode.json (or --out). Run from the repository root:
  python3 bench/decode.py                      # llama3-8b, batch 1 and 32, both sides (~5 min)
  python3 bench/decode.py --sides jax --batches 1
  python3 bench/decode.py --sides jax --decode-matmul pallas,reference   # the stacked-matmul kernel vs slices
  python3 bench/decode.py --sides jax --layer-unroll 1,0   # a device loop over the layers vs straight-line code
  python3 bench/decode.py --sides jax --grouped 0,1        # q/k/v and gate/up in one launch each
  python3 bench/decode.py --smoke              # CPU check of the script, tiny shape, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(REPO))

from e2e import SHAPES, device_random_params, hf_config  # noqa: E402


def median_seconds(run: Callable[[], Any], iters: int) -> float:
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# -- fastft-jax side ---------------------------------------------------------------------------------
def decode_weight_bytes(params: dict, tied: bool) -> int:
    """What one decode step reads of the weights: everything but the embedding table, of which a
    token reads one row (unless it is also the lm_head)."""
    import jax

    read = {key: value for key, value in params.items() if key != "embed" or tied}
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(read)))


def nf4_params(params: dict) -> dict:
    """The seven projections of every layer quantized to NF4 (bitsandbytes' scheme, double-quantized
    absmax), one layer at a time on the device; norms, embedding and lm_head stay bf16."""
    from convert.hf import PROJECTIONS
    from convert.quant import quantize_nf4, stack_layers

    layers = dict(params["layers"])
    for name in PROJECTIONS:
        kernels = layers[name]["kernel"]
        layers[name] = dict(layers[name], kernel=stack_layers(
            [quantize_nf4(kernels[index].T) for index in range(kernels.shape[0])]))
    return dict(params, layers=layers)


def measure_jax(model, batch: int, spec: dict, row: dict, full: bool) -> None:
    """Prefill, fused generate and (full=True) the step loop and the forward check, into row."""
    import jax
    import numpy as np

    from fastft_jax import generate as generate_module

    prompt = np.random.default_rng(spec["seed"] + batch).integers(
        0, model.config.vocab_size, (batch, spec["prompt_len"]), dtype=np.int32)
    settings = dict(max_new_tokens=spec["new_tokens"], eos_token_id=[])
    # The jitted pieces generate() is made of, timed one by one (private names: this is their bench).
    prepared = generate_module._setup(model, prompt, None, spec["new_tokens"], False, 1.0, 1.0, 0, [], None, False, 0)
    base, lora = model.base_params(), model.lora_params()

    def prefill():
        return jax.block_until_ready(generate_module._prefill_jit(base, lora, *prepared.arrays, static=prepared.static))

    start = time.perf_counter()
    prefill()
    row["prefill_compile_s"] = round(time.perf_counter() - start, 1)
    row["prefill_s"] = median_seconds(prefill, spec["iters"])

    start = time.perf_counter()
    tokens = generate_module.generate(model, prompt, **settings)
    row["generate_compile_s"] = round(time.perf_counter() - start, 1)
    row["generate_s"] = median_seconds(lambda: generate_module.generate(model, prompt, **settings), spec["iters"])
    steps = spec["new_tokens"] - 1
    row["decode_tokens_per_s"] = round(batch * steps / (row["generate_s"] - row["prefill_s"]), 1)
    row["generate_tokens_per_s"] = round(batch * spec["new_tokens"] / row["generate_s"], 1)
    cache_shape = (model.config.num_layers, batch, prompt.shape[1] + prepared.added_columns + steps,
                   model.config.num_kv_heads, model.config.head_dim)
    row["kv_cache_bytes_read_per_step"] = 2 * int(np.prod(cache_shape)) * np.dtype(model.dtype).itemsize
    row["cache_len"] = cache_shape[2]
    if not full:
        return

    # The step loop (stream_generate's and the CLI's): the same jitted step, dispatched from Python.
    def step_loop(state):
        for _ in range(steps):
            state = generate_module._decode_step_jit(base, lora, state, static=prepared.static)
        return jax.block_until_ready(state)

    start = time.perf_counter()
    step_loop(prefill())
    row["step_compile_s"] = round(time.perf_counter() - start, 1)
    samples = []
    for _ in range(spec["iters"]):
        state = prefill()
        begin = time.perf_counter()
        looped = step_loop(state)
        samples.append(time.perf_counter() - begin)
    row["step_loop_tokens_per_s"] = round(batch * steps / statistics.median(samples), 1)
    row["same_tokens_as_step_loop"] = bool((np.asarray(looped.tokens)[:, -tokens.shape[1]:] == tokens).all())
    del looped, state
    if batch == 1:
        logits = np.asarray(model(tokens[:, :-1]), np.float32)[:, spec["prompt_len"] - 1:]
        row["forward_argmax_agreement"] = round(float((logits.argmax(-1) == tokens[:, spec["prompt_len"]:]).mean()), 3)


def run_jax(spec: dict, result: dict, save: Callable[[], None]) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from convert.hf import model_config_from_hf
    from fastft_jax.lora import LoRAConfig, init_lora_params
    from fastft_jax.model import CausalLM
    from fastft_jax.ops import OpsConfig

    device = jax.devices()[0]
    result.update(device=device.device_kind, platform=device.platform, jax_version=jax.__version__)
    from bench.timing import copy_ceiling_gbps

    result["copy_GBps"] = round(copy_ceiling_gbps(spec["copy_gib"], 1, max(spec["iters"], 5)), 1)
    print(f"copy bandwidth {result['copy_GBps']} GB/s", flush=True)

    config = model_config_from_hf(hf_config(spec["model"]), where=f"bench shape {spec['model']}")
    start = time.perf_counter()
    params = device_random_params(config, spec["seed"], jnp.bfloat16)
    jax.block_until_ready(params)
    result["weights_s"] = round(time.perf_counter() - start, 1)
    result["weight_bytes"] = decode_weight_bytes(params, config.tie_word_embeddings)
    result["bound_tokens_per_s_batch1"] = round(result["copy_GBps"] * 1e9 / result["weight_bytes"], 2)
    ops_config_base = OpsConfig.from_env()
    result["ops_prefill"] = ops_config_base.describe(packed_rows=False)

    def build(variant: str, decode_matmul: str, layer_unroll: int | str):
        """The model of a row, and the weight bytes its decode step reads."""
        max_length = spec["prompt_len"] + spec["new_tokens"]
        ops_config = dataclasses.replace(ops_config_base, decode_matmul=decode_matmul,
                                         layer_unroll=layer_unroll).validated()
        if variant == "nf4":
            quantized = nf4_params(params)
            return (CausalLM(config, quantized, dtype=jnp.bfloat16, max_seq_length=max_length, ops_config=ops_config),
                    decode_weight_bytes(quantized, config.tie_word_embeddings))
        model = CausalLM(config, params, dtype=jnp.bfloat16, max_seq_length=max_length, ops_config=ops_config)
        weight_bytes = result["weight_bytes"]
        if variant == "lora":
            # r=16 on all seven projections, B non-zero so that the adapter does its real work.
            lora_config = LoRAConfig(r=16, alpha=16.0)
            lora = init_lora_params(config, lora_config, spec["seed"])
            key = jax.random.PRNGKey(spec["seed"] + 1)
            lora["layers"] = {
                name: dict(adapter, lora_b=0.01 * jax.random.normal(jax.random.fold_in(key, index), adapter["lora_b"].shape))
                for index, (name, adapter) in enumerate(sorted(lora["layers"].items()))
            }
            model.attach_lora(lora_config, lora)
            weight_bytes += sum(leaf.nbytes for leaf in jax.tree.leaves(lora))
        return model, weight_bytes

    rows = result.setdefault("rows", [])

    plan = [("base", batch) for batch in spec["batches"]] + [(variant, 1) for variant in spec["variants"]]
    plan = [(variant, batch, mode, unroll, grouped) for variant, batch in plan for mode in spec["decode_matmul"]
            for unroll in spec.get("layer_unroll", ["auto"]) for grouped in spec.get("grouped", ["default"])]
    from fastft_jax import generate as generate_module

    grouped_default = generate_module.GROUPED_PROJECTIONS

    for variant, batch, mode, unroll, grouped in plan:
        row: dict[str, Any] = {"variant": variant, "batch": batch, "decode_matmul": mode, "layer_unroll": unroll,
                               "grouped": grouped}
        rows.append(row)
        # Read while tracing: a row with the other setting must not reuse the last row's programs.
        generate_module.GROUPED_PROJECTIONS = grouped_default if grouped == "default" else bool(grouped)
        row["grouped_resolved"] = generate_module.GROUPED_PROJECTIONS
        jax.clear_caches()
        try:
            model, weight_bytes = build(variant, mode, unroll)
            row["decode_matmul_resolved"] = model.ops_config.resolve("decode_matmul")
            row["weight_bytes"] = int(weight_bytes)
            measure_jax(model, batch, spec, row, full=variant == "base")
            if batch == 1:
                copy_bytes_per_s = result["copy_GBps"] * 1e9
                row["bound_tokens_per_s"] = round(copy_bytes_per_s / weight_bytes, 2)
                row["pct_of_bound"] = round(100 * row["decode_tokens_per_s"] * weight_bytes / copy_bytes_per_s, 1)
                row["pct_of_bound_with_cache"] = round(
                    100 * row["decode_tokens_per_s"] * (weight_bytes + row["kv_cache_bytes_read_per_step"])
                    / copy_bytes_per_s, 1)
            del model
            row["ok"] = True
        except Exception as err:  # noqa: BLE001 - an OOM at batch 32 is a result too
            row.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        print(json.dumps(row), flush=True)
        save()


# -- transformers side -------------------------------------------------------------------------------
def run_hf(spec: dict, result: dict, save: Callable[[], None]) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    result.update(device=torch.cuda.get_device_name() if on_gpu else "cpu", torch_version=torch.__version__,
                  transformers_version=transformers.__version__)
    settings = hf_config(spec["model"])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    result["attention"] = model.config._attn_implementation

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize()

    rows = result.setdefault("rows", [])
    for batch in spec["batches"]:
        row: dict[str, Any] = {"batch": batch}
        rows.append(row)
        try:
            prompt = torch.as_tensor(np.random.default_rng(spec["seed"] + batch).integers(
                0, config.vocab_size, (batch, spec["prompt_len"])), device=device)
            mask = torch.ones_like(prompt)

            def generate(new_tokens: int):
                with torch.no_grad():
                    out = model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=config.pad_token_id)
                synchronize()
                return out

            generate(spec["new_tokens"])  # warm-up: cuBLAS handles, sdpa kernels
            row["prefill_s"] = median_seconds(lambda: generate(1), spec["iters"])
            row["generate_s"] = median_seconds(lambda: generate(spec["new_tokens"]), spec["iters"])
            steps = spec["new_tokens"] - 1
            row["decode_tokens_per_s"] = round(batch * steps / (row["generate_s"] - row["prefill_s"]), 1)
            row["generate_tokens_per_s"] = round(batch * spec["new_tokens"] / row["generate_s"], 1)
            row["ok"] = True
        except Exception as err:  # noqa: BLE001
            row.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        save()


def child_main(side: str, spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"side": side, "ok": False}
    start = time.time()

    def save():  # after every row, so that a kill at the timeout keeps what was measured
        Path(result_path).write_text(json.dumps(result, indent=1))

    try:
        (run_jax if side == "jax" else run_hf)(spec, result, save)
        result["ok"] = all(row.get("ok") for row in result.get("rows", []))
    except BaseException as err:  # noqa: BLE001 - a crash is a result too
        result.update(error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-4000:])
        print(result["traceback"], file=sys.stderr, flush=True)
    result["wall_s"] = round(time.time() - start, 1)
    save()
    return 0 if result["ok"] else 1


# -- driver ------------------------------------------------------------------------------------------
def table(summary: dict) -> str:
    sides = {side["side"]: side for side in summary["sides"]}
    jax_side, hf_side = sides.get("jax", {}), sides.get("hf", {})
    hf_rows = {row["batch"]: row for row in hf_side.get("rows", [])}

    def fmt(value, spec):
        if isinstance(value, (int, float)):
            return format(value, spec)
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)

    lines = [
        f"{summary['model']} bf16, prompt {summary['prompt_len']}, {summary['new_tokens']} new tokens (decode = the "
        f"{summary['new_tokens'] - 1} steps after the first token); {jax_side.get('device', hf_side.get('device', '?'))}; "
        f"copy bandwidth {jax_side.get('copy_GBps', '?')} GB/s",
        "weights  | decode_matmul | batch | fastft-jax decode tok/s | step loop tok/s | HF decode tok/s | ours/HF "
        "| % of bound (+cache) | prefill ms ours/HF",
        "-------- | ------------- | ----- | ----------------------- | --------------- | --------------- | ------- "
        "| ------------------- | ------------------",
    ]
    jax_rows = jax_side.get("rows", [])
    jax_rows = jax_rows + [{"variant": "base", "batch": batch} for batch in hf_rows
                           if not any(row["batch"] == batch and row["variant"] == "base" for row in jax_rows)]
    for ours in jax_rows:
        batch = ours["batch"]
        theirs = hf_rows.get(batch, {}) if ours["variant"] == "base" else {}
        ratio = (ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
                 if ours.get("decode_tokens_per_s") and theirs.get("decode_tokens_per_s") else None)
        bound = (f"{fmt(ours.get('pct_of_bound'), '.1f')}% ({fmt(ours.get('pct_of_bound_with_cache'), '.1f')}%)"
                 if "pct_of_bound" in ours else "-")
        prefill = "/".join(fmt(1e3 * row["prefill_s"] if "prefill_s" in row else None, ".1f") for row in (ours, theirs))
        mode = ours.get("decode_matmul", "-")
        if ours.get("decode_matmul_resolved") not in (None, mode):
            mode = f"{mode}->{ours['decode_matmul_resolved']}"
        if ours.get("layer_unroll", "auto") != "auto":
            mode = f"{mode} u{ours['layer_unroll']}"
        if ours.get("grouped_resolved", ours.get("grouped")):
            mode = f"{mode} g"
        lines.append(
            f"{ours['variant']:8s} | {mode:13s} | {batch:5d} | {fmt(ours.get('decode_tokens_per_s'), '23.1f')} | "
            f"{fmt(ours.get('step_loop_tokens_per_s'), '15.1f')} | {fmt(theirs.get('decode_tokens_per_s'), '15.1f')} | "
            f"{fmt(ratio, '7.2f')} | {bound:19s} | {prefill}"
        )
        for side, row in (("fastft-jax", ours), ("HF", theirs)):
            if row and "ok" in row and not row["ok"]:
                lines.append(f"         {side} {ours['variant']} batch {batch} failed: {row.get('error', '?')[:300]}")
    lines.append("weights: base = bf16; lora = bf16 + un-merged LoRA r=16 on all 7 projections; nf4 = 4-bit "
                 "projections. % of bound = decode tok/s x weight bytes read per step / copy bandwidth (batch 1).")
    for side in summary["sides"]:
        if side.get("error"):
            lines.append(f"{side['side']} failed: {side['error'][:300]}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,32", type=lambda text: [int(item) for item in text.split(",")])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=129, help="tokens per generate; decode steps = this - 1")
    parser.add_argument("--variants", default="lora,nf4", type=lambda text: [item for item in text.split(",") if item],
                        help="extra fastft-jax rows at batch 1: lora (un-merged r=16), nf4 (4-bit base); '' for none")
    parser.add_argument("--decode-matmul", default="auto", type=lambda text: [item for item in text.split(",") if item],
                        help="fastft-jax rows once per decode_matmul mode of the op seam, e.g. pallas,reference "
                             "(default auto: the seam's choice)")
    parser.add_argument("--layer-unroll", default="auto",
                        type=lambda text: [item if item == "auto" else int(item) for item in text.split(",")],
                        help="fastft-jax rows once per kernels.layer_unroll: 1 = a device loop over the layers, "
                             "0 = every layer unrolled (straight-line decode step), auto = the default, e.g. 1,0")
    parser.add_argument("--grouped", default="default",
                        type=lambda text: [item if item == "default" else int(item) for item in text.split(",")],
                        help="fastft-jax rows once per generate.GROUPED_PROJECTIONS (q/k/v and gate/up in one "
                             "launch each on the stacked kernel), e.g. 0,1; default: the module's setting")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--copy-gib", type=float, default=2.0)
    parser.add_argument("--sides", default="jax,hf", type=lambda text: text.split(","))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=560.0,
                        help="seconds for all sides together (the GPU call's limit is 600); a side is killed past it")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/fastft_decode"))
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [mode for mode in args.decode_matmul if mode not in ("auto", "reference", "pallas")]
    if unknown or not args.decode_matmul:
        parser.error(f"--decode-matmul {','.join(args.decode_matmul)}: use auto, reference and/or pallas")
    if args.smoke:
        args.model, args.batches, args.prompt_len, args.new_tokens = "tiny-llama", [1, 3], 8, 9
        args.iters, args.copy_gib = 2, 0.01
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {key: getattr(args, key) for key in (
        "model", "batches", "variants", "decode_matmul", "layer_unroll", "grouped", "prompt_len", "new_tokens", "iters", "copy_gib",
        "seed")}
    spec_path = out / "decode_spec.json"
    spec_path.write_text(json.dumps(spec))
    summary = dict(spec, sides=[])
    deadline = time.time() + args.budget
    for side in args.sides:
        result_path = out / f"decode_{side}.json"
        result_path.unlink(missing_ok=True)
        command = [sys.executable, str(HERE), "--child", side, str(spec_path), str(result_path)]
        print(f"== {side}: {' '.join(command)}", flush=True)
        timeout = max(10.0, deadline - time.time())
        try:
            subprocess.run(command, cwd=REPO, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"== {side} killed after {timeout:.0f} s", flush=True)
        result = (json.loads(result_path.read_text()) if result_path.is_file()
                  else {"side": side, "ok": False, "error": "no result (timed out or crashed)"})
        if "wall_s" not in result:
            result.update(ok=False, error=result.get("error", f"killed after {timeout:.0f} s"))
        summary["sides"].append(result)
        (out / "decode.json").write_text(json.dumps(summary, indent=1))
    summary["table"] = table(summary)
    (out / "decode.json").write_text(json.dumps(summary, indent=1))
    print("\n" + summary["table"])
    return 0 if all(side.get("ok") for side in summary["sides"]) else 1


if __name__ == "__main__":
    sys.exit(main())

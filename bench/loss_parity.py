"""Loss parity: the kernel path against the pure-jnp reference over 50 training steps of a real packed
dataset, with a bf16-noise yardstick measured in the same call (issue 8's last target).

What runs, all through the public API, each run in its own process (same checkpoint, seed and data):
  - checkpoint: convert.tiny.write_tiny_checkpoint with the --model shape of bench/e2e.py's SHAPES
    (qwen2.5-1.5b by default: Qwen2 architecture, real sizes, random weights of std 1/sqrt(fan_in),
    bf16) and convert.tiny's byte-level BPE tokenizer; written once to --ckpt-root/<model> and
    reused. --smoke uses convert.tiny's own tiny qwen2.
  - FastLanguageModel.from_pretrained(kernels=OpsConfig.from_env()), get_peft_model: LoRA r=16,
    alpha=16, dropout 0 on all 7 projections (PEFT's init: B = 0), "unsloth" checkpointing.
  - SFTTrainer on examples/data/reasoning.jsonl with examples/quickstart.yaml's data section (the
    medical chain-of-thought template, loss on the response only), packing=True, max_seq_length
    2048 (smoke: 512, the quickstart's: the template alone is ~150 tokens), --batch rows per step, AdamW lr --lr, linear decay after 5 warm-up steps,
    clip 1.0, seed 3407, logging_steps=1. The per-step losses come from the run's metrics.jsonl.
  - runs (--kernels sets what the kernel runs use: unset = FASTFT_KERNELS unset, i.e. "auto"; --smoke
    defaults to "pallas", since on the CPU "auto" is the reference):
      auto          bf16, the kernel path: on a GPU the Pallas kernels, flash attention, the chunked loss.
      reference     bf16, FASTFT_KERNELS=reference: every op the pure-jnp reference.
      float32       the reference path in float32 (the bf16 checkpoint's weights, exactly): the
                    "truth" both bf16 runs approximate.
      auto-float32  the kernel path in float32.

Two verdicts, both required:
  exact    max_step |auto-float32 - float32| / |float32| <= 1e-4. In float32 every kernel equals its
           reference to ~1e-6 per gradient (tests/, bench/grad_parity.py), so a wrong gradient shows
           here at once, with no bf16 rounding to hide behind.
  noise    the kernel path is no farther from the float32 run than the reference path is:
           mean_step |auto - float32| <= 1.5 x mean_step |reference - float32|. "Within bf16 noise" is
           what the reference's own bf16 rounding does to the curve.

Why not |auto - reference| against a perturbed-weights run (this bench's first yardstick, which
failed on an H200 on 2026-11-28: 0.16 at step 5 against 0.0023): re-rounding the weights by one ulp
leaves almost every rounding decision of the step as it was, so that run's curve stays correlated
with the reference's; the kernel path rounds differently at every op. One gradient of either path
differs from the other by ~2 % in its worst leaf (bench/grad_parity.py on the GPU: 2.4e-2 auto vs
reference, and 2.4e-2 from the XLA LoRA matmul order alone), and AdamW's early steps move every
element by about lr whatever its gradient's size, so the signs of the small, noise-dominated elements
of a random-weight model's gradients become full-size steps: two bf16 paths part after the first
real update whichever is right. Their distance from float32 tells which is closer to the truth.

Output ($OUT, flat, 3 files): loss_parity.json (per-step losses of the three runs, differences,
verdict, environment), loss_parity.png (both curves, and |auto - reference| beside the yardstick;
skipped if matplotlib is missing), loss_parity.log. --results-md FILE appends a dated section.

    python3 bench/loss_parity.py                       # GPU, qwen2.5-1.5b, 2 x 2048, 50 steps, ~5 min
    python3 bench/loss_parity.py --model qwen2.5-7b --batch 1
    python3 bench/loss_parity.py --smoke               # CPU (interpret mode), tiny qwen2, 512 tokens, 20 steps
    python3 bench/loss_parity.py --from-json $OUT/loss_parity.json --results-md bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.e2e import SHAPES, Log, append_results_md, run_streaming  # noqa: E402  (e2e imports no jax at module level)

DATA_PATH = REPO / "examples" / "data" / "reasoning.jsonl"
DATA_YAML = REPO / "examples" / "quickstart.yaml"
RUNS = {  # name: (kernel path?, compute dtype)
    "auto": (True, "bfloat16"),
    "reference": (False, "bfloat16"),
    "float32": (False, "float32"),
    "auto-float32": (True, "float32"),
}
LORA_RANK, LORA_ALPHA, SEED = 16, 16.0, 3407
EXACT_BOUND = 1e-4  # float32 kernel path vs float32 reference, relative, any step
NOISE_FACTOR = 1.5  # mean |auto - float32| <= NOISE_FACTOR x mean |reference - float32|
# --bisect: the ops the bf16 kernel path takes from a kernel on a GPU (ops.GPU_AUTO_CHOICE; attention
# on packed rows is the flash kernel). Each gets two more bf16 runs: the kernel path with that op alone
# back on its reference ("auto-<op>"), and the reference path with that op alone on its kernel
# ("reference+<op>"), so the op whose rounding moves the curve away from float32 is named.
BISECT_OPS = {"rms_norm": "pallas", "rope": "pallas", "lora_linear": "xla", "cross_entropy": "pallas",
              "attention": "pallas", "dequant": "pallas"}


# ==================================================================================================
# Children: the checkpoint writer and one training run. Only they import jax / torch.


def build_checkpoint(model: str, out_dir: Path, smoke: bool) -> None:
    from convert.tiny import write_tiny_checkpoint

    if smoke:
        write_tiny_checkpoint(out_dir, arch="qwen2", size="tiny", seed=SEED, dtype="bfloat16", force=True)
        return
    shape = dict(SHAPES[model])
    arch = shape.pop("arch")
    tie = shape.pop("tie_word_embeddings")
    # The tokenizer is convert.tiny's (about 500 ids); the embedding keeps the real vocabulary size.
    write_tiny_checkpoint(out_dir, arch=arch, size="tiny", seed=SEED, dtype="bfloat16", force=True,
                          tie_word_embeddings=tie, **shape)


def run_training(spec: dict, result: dict) -> None:
    import jax
    import yaml

    from fastft_jax import ops
    from fastft_jax.api import FastLanguageModel
    from fastft_jax.data import DataConfig
    from fastft_jax.trainer import SFTTrainer, TrainingArguments

    device = jax.devices()[0]
    result.update(device_kind=device.device_kind, platform=device.platform, jax_version=jax.__version__)
    ops_config = ops.OpsConfig.from_env()
    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(spec["ckpt_dir"], max_seq_length=spec["seq"],
                                                         dtype=spec["dtype"], kernels=ops_config,
                                                         load_in_4bit=spec.get("load_in_4bit", False))
    model = FastLanguageModel.get_peft_model(model, r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             use_gradient_checkpointing="unsloth", random_state=spec["seed"])
    result["load_s"] = round(time.perf_counter() - start, 1)
    data_section = dict(yaml.safe_load(DATA_YAML.read_text())["data"])
    data_section.update(path=str(DATA_PATH), packing=True, max_seq_length=spec["seq"])
    data_config = DataConfig.from_dict(data_section, where=f"{DATA_YAML}: data")
    args = TrainingArguments(
        output_dir=spec["run_dir"], overwrite_output_dir=True, per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec.get("schedule_steps", spec["steps"]), learning_rate=spec["lr"], warmup_steps=5,
        lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        seed=spec["seed"], bf16=spec["dtype"] == "bfloat16", plot_loss=False)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, args=args, data_config=data_config)
    # A shorter run (the float32 kernel path's --exact-steps) stops early on the full run's learning-rate
    # schedule: with max_steps of its own its linear decay differs from the 8th step on (an H200 run
    # that did so matched float32 to 1.5e-7 through step 7, then parted by the schedule alone).
    trainer.total_steps = spec["steps"]
    result["ops_resolved"] = model.ops_config.describe(packed_rows=True)
    result["data"] = str(trainer.train_data.stats)
    start = time.perf_counter()
    output = trainer.train()
    result["train_s"] = round(time.perf_counter() - start, 1)
    records = [json.loads(line) for line in (Path(spec["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    result.update(losses=[record["loss"] for record in steps], grad_norms=[record["grad_norm"] for record in steps],
                  epochs=steps[-1]["epoch"] if steps else None, global_step=output.global_step,
                  peak_memory_gib=steps[-1].get("peak_memory_gib") if steps else None)
    result["ok"] = len(steps) == spec["steps"] and all(math.isfinite(loss) for loss in result["losses"])
    if not result["ok"]:
        result["error"] = f"{len(steps)} logged steps of {spec['steps']}, losses {result['losses'][:5]}..."


def child_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = {"run": spec.get("run"), "ok": False}
    start = time.time()
    try:
        if spec["kind"] == "checkpoint":
            build_checkpoint(spec["model"], Path(spec["ckpt_dir"]), spec["smoke"])
            result["ok"] = True
        else:
            run_training(spec, result)
    except BaseException as err:  # noqa: BLE001 - a failure is a result too
        result.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
        print(traceback.format_exc()[-6000:], file=sys.stderr, flush=True)
    result["wall_s"] = round(time.time() - start, 1)
    Path(result_path).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


# ==================================================================================================
# Parent: checkpoint, three runs, comparison, report. It never imports jax.


def child(args, spec: dict, label: str, env_kernels: str | None, log: Log, timeout: float) -> dict:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / f"{label}.spec.json", work / f"{label}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("FASTFT_KERNELS", None)
    if env_kernels:
        env["FASTFT_KERNELS"] = env_kernels
    if spec.get("dtype") == "float32":
        # Full float32 matmuls (a GPU would otherwise run float32 matmuls in TF32, a 10-bit mantissa).
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(spec_path), str(result_path)]
    code, tail, seconds, timed_out = run_streaming(cmd, label, timeout, env, log)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {
        "run": label, "ok": False, "error": f"timeout after {seconds:.0f} s" if timed_out else f"rc={code}, no result"}
    if not result.get("ok"):
        result["log_tail"] = "\n".join(tail[-20:])
    result["process_s"] = round(seconds, 1)
    return result


def gap(runs: dict, name: str, against: str) -> dict | None:
    """Per-step |name - against| of two finished runs' losses, with its summaries."""
    losses, reference = runs.get(name, {}).get("losses"), runs.get(against, {}).get("losses")
    if not losses or not reference:
        return None
    # zip: the float32 kernel path runs --exact-steps, the first steps of the others' curve.
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    relative = [d / max(abs(r), 1e-12) for d, r in zip(diffs, reference)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return {"abs": diffs, "max_abs": max(diffs), "mean_abs": sum(diffs) / len(diffs), "max_abs_step": worst + 1,
            "max_rel": max(relative), "first_step_abs": diffs[0], "last_step_abs": diffs[-1]}


def compare(runs: dict) -> dict:
    gaps = {"auto_vs_reference": gap(runs, "auto", "reference"),
            "auto_vs_float32": gap(runs, "auto", "float32"),
            "reference_vs_float32": gap(runs, "reference", "float32"),
            "exact": gap(runs, "auto-float32", "float32")}
    exact, auto32, ref32 = gaps["exact"], gaps["auto_vs_float32"], gaps["reference_vs_float32"]
    verdict = {
        "exact": None if exact is None else bool(exact["max_rel"] <= EXACT_BOUND),
        "noise": None if auto32 is None or ref32 is None else bool(auto32["mean_abs"] <= NOISE_FACTOR * ref32["mean_abs"]),
    }
    verdict["pass"] = verdict["exact"] is True and verdict["noise"] is True
    bisect = {name: gap(runs, name, "float32") for name in runs if name == "auto-again" or name.startswith(("auto-", "reference+"))
              and name != "auto-float32"}
    return dict(gaps, verdict=verdict, bisect={name: g for name, g in bisect.items() if g})


def bisect_lines(summary: dict) -> list[str]:
    """One line per bisection run: its mean distance from float32 beside the two paths'."""
    comparison = summary.get("comparison") or {}
    rows = comparison.get("bisect") or {}
    if not rows:
        return []
    lines = ["| run | FASTFT_KERNELS | mean abs vs float32 | max abs vs float32 (step) |", "|---|---|---:|---:|"]
    named = [("auto", comparison.get("auto_vs_float32")), ("reference", comparison.get("reference_vs_float32"))]
    for name, g in named + sorted(rows.items()):
        if g:
            kernels = summary["runs"].get(name, {}).get("kernels_env") or "(unset)"
            lines.append(f"| {name} | `{kernels}` | {g['mean_abs']:.4g} | {g['max_abs']:.4g} ({g['max_abs_step']}) |")
    return lines


def verdict_line(summary: dict) -> str:
    comparison = summary.get("comparison") or {}
    verdict = comparison.get("verdict") or {}
    exact, auto32, ref32 = (comparison.get(key) for key in ("exact", "auto_vs_float32", "reference_vs_float32"))
    parts = []
    parts.append("exact: run missing" if exact is None else
                 f"exact {'ok' if verdict['exact'] else 'FAILED'}: max |auto-float32 - float32| / |float32| "
                 f"{exact['max_rel']:.2e} (bound {EXACT_BOUND:g}, step {exact['max_abs_step']})")
    parts.append("noise: run missing" if auto32 is None or ref32 is None else
                 f"noise {'ok' if verdict['noise'] else 'FAILED'}: mean |auto - float32| {auto32['mean_abs']:.4g} vs "
                 f"mean |reference - float32| {ref32['mean_abs']:.4g} (bound {NOISE_FACTOR:g}x; max "
                 f"{auto32['max_abs']:.4g} vs {ref32['max_abs']:.4g})")
    auto_ref = comparison.get("auto_vs_reference")
    if auto_ref:
        parts.append(f"|auto - reference| max {auto_ref['max_abs']:.4g} (step {auto_ref['max_abs_step']})")
    return f"{'PASS' if verdict.get('pass') else 'FAIL'}: " + "; ".join(parts)


def table(summary: dict) -> str:
    runs = summary["runs"]
    names = [name for name in RUNS if runs.get(name, {}).get("losses")]
    steps = max((len(runs[name]["losses"]) for name in names), default=0)
    comparison = summary.get("comparison") or {}
    extra = [("|auto-f32|", comparison.get("auto_vs_float32")), ("|ref-f32|", comparison.get("reference_vs_float32")),
             ("|auto32-f32|", comparison.get("exact"))]

    def cell(values, index, spec=".5f"):
        return format(values[index], spec) if values and index < len(values) else "–"

    lines = ["| step | " + " | ".join(names + [label for label, _ in extra]) + " |",
             "|---:|" + "---:|" * (len(names) + len(extra))]
    for index in range(steps):
        lines.append("| " + " | ".join([str(index + 1)] + [cell(runs[name]["losses"], index) for name in names]
                                       + [cell((g or {}).get("abs"), index, ".2e") for _, g in extra]) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    env, args = summary["environment"], summary["args"]
    auto = summary["runs"].get("auto", {})
    card = auto.get("device_kind") or summary["runs"].get("reference", {}).get("device_kind") or "?"
    kernels = ", ".join(f"{op}={impl}" for op, impl in (auto.get("ops_resolved") or {}).items())
    failures = [f"{name}: {run.get('error', '')[:200]}" for name, run in summary["runs"].items() if not run.get("ok")]
    lines = [
        f"## loss parity {env['date_utc'][:16].replace('T', ' ')} UTC — {card}",
        "",
        f"jax {auto.get('jax_version') or env.get('jax', '?')}; commit {env.get('commit') or '?'}; "
        f"`python3 bench/loss_parity.py {' '.join(env.get('argv', []))}`",
        "",
        f"{args['model']} shape, random bf16 weights (convert.tiny)"
        f"{', quantized to NF4 on load (QLoRA)' if args.get('load_in_4bit') else ''}, LoRA r={LORA_RANK} on all 7 projections, "
        f"{args['steps']} steps of {args['batch']} x {args['seq']} packed tokens of examples/data/reasoning.jsonl "
        f"(quickstart template), lr {args['lr']}, seed {SEED}. Kernel path: {kernels or '?'}. The float32 runs "
        f"compute in float32 from the same bf16 weights; verdicts in the module docstring.",
        "",
        f"**{verdict_line(summary)}**",
        "",
    ]
    if failures:
        lines += ["Failed runs: " + "; ".join(failures), ""]
    bisection = bisect_lines(summary)
    if bisection:
        lines += ["Bisection (bf16 runs, distance of each curve from the float32 reference's):", "", *bisection, ""]
    for step_block in (table(summary),):
        lines += ["<details><summary>per-step losses</summary>", "", step_block, "", "</details>", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no plot"
    runs, comparison = summary["runs"], summary.get("comparison") or {}
    if not any(run.get("losses") for run in runs.values()):
        return "no run finished; no plot"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), dpi=120, sharex=True)
    styles = {"float32": dict(color="black", linewidth=2.2), "reference": dict(color="tab:blue"),
              "auto": dict(color="tab:red", linestyle="--"), "auto-float32": dict(color="gray", linestyle=":")}
    for name, style in styles.items():
        losses = runs.get(name, {}).get("losses")
        if losses:
            top.plot(range(1, len(losses) + 1), losses, label=name, **style)
    top.set_ylabel("training loss")
    top.set_title(f"{summary['args']['model']}{' NF4' if summary['args'].get('load_in_4bit') else ''}: kernel path (auto) "
                  f"vs reference, {summary['args']['batch']} x "
                  f"{summary['args']['seq']} packed")
    top.grid(alpha=0.3)
    top.legend()
    for key, label, color in (("auto_vs_float32", "|auto - float32| (bf16 kernel path)", "tab:red"),
                              ("reference_vs_float32", "|reference - float32| (bf16 reference: the noise)", "tab:blue"),
                              ("exact", "|auto-float32 - float32| (exactness)", "gray")):
        gap_values = comparison.get(key)
        if gap_values:
            bottom.plot(range(1, len(gap_values["abs"]) + 1), [max(d, 1e-9) for d in gap_values["abs"]], label=label,
                        color=color, marker="o", markersize=2.5)
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("absolute loss difference (0 drawn at 1e-9)")
    bottom.set_title(verdict_line(summary).split(":")[0], loc="left")
    bottom.grid(alpha=0.3, which="both")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def environment(argv: list[str]) -> dict:
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(), "python": platform.python_version(),
           "argv": argv, "host": platform.node()}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    try:
        env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                    text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        env["gpu"] = None
    return env


def report(summary: dict, args, log: Log) -> None:
    text = markdown(summary)
    log("\n" + table(summary))
    bisection = bisect_lines(summary)
    if bisection:
        log("\n" + "\n".join(bisection))
    log("\n" + verdict_line(summary))
    if args.results_md:
        append_results_md(args.results_md, text, log)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.from_json:
        summary = json.loads(Path(args.from_json).read_text())
        report(summary, args, Log(Path(os.devnull)))
        return 0 if summary["comparison"]["verdict"]["pass"] else 1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "loss_parity.log"
    log_path.unlink(missing_ok=True)
    log = Log(log_path)
    started = time.time()
    summary = {"args": {k: getattr(args, k) for k in ("model", "batch", "seq", "steps", "exact_steps", "lr", "smoke", "bisect",
                                                              "load_in_4bit")},
               "environment": environment(sys.argv[1:]), "runs": {}}

    ckpt_dir = Path(args.ckpt_root) / ("tiny-qwen2" if args.smoke else args.model)
    if not (ckpt_dir / "config.json").is_file():
        log(f"== writing the checkpoint {ckpt_dir}")
        built = child(args, {"kind": "checkpoint", "model": args.model, "ckpt_dir": str(ckpt_dir),
                             "smoke": args.smoke}, "checkpoint", None, log, args.deadline)
        if not built.get("ok"):
            log(f"checkpoint failed: {built.get('error')}\n{built.get('log_tail', '')}")
            return 1
        summary["checkpoint_s"] = built["wall_s"]
    kernel_env = args.kernels if args.kernels is not None else ("pallas" if args.smoke else None)
    plan = [(name, kernel_env if kernel_path else "reference", dtype) for name, (kernel_path, dtype) in RUNS.items()]
    if args.bisect:
        # The float32 kernel path is the exactness check, not the bisection's; a second auto run
        # measures how far two runs of one path part (nondeterministic reductions), the bisection's floor.
        plan = [run for run in plan if run[0] != "auto-float32"] + [("auto-again", kernel_env, "bfloat16")]
        base = kernel_env or "auto"
        plan += [(f"auto-{op}", f"{base},{op}=reference", "bfloat16") for op in BISECT_OPS]
        plan += [(f"reference+{op}", f"reference,{op}={mode}", "bfloat16") for op, mode in BISECT_OPS.items()]
    for name, kernels, dtype in plan:
        left = args.deadline - (time.time() - started)
        if left < 30:
            summary["runs"][name] = {"run": name, "ok": False, "error": f"skipped: --deadline {args.deadline:.0f} s reached"}
            continue
        run_dir = Path(args.work_dir) / name
        shutil.rmtree(run_dir, ignore_errors=True)
        steps = min(args.steps, args.exact_steps) if name == "auto-float32" else args.steps
        spec = {"kind": "train", "run": name, "ckpt_dir": str(ckpt_dir), "run_dir": str(run_dir), "seq": args.seq,
                "batch": args.batch, "steps": steps, "schedule_steps": args.steps, "lr": args.lr, "seed": SEED,
                "dtype": dtype, "load_in_4bit": args.load_in_4bit}
        log(f"== run {name}: FASTFT_KERNELS={kernels or '(unset)'}, {dtype}, {steps} steps "
            f"({left:.0f} s left)")
        result = child(args, spec, name, kernels, log, left)
        result["kernels_env"] = kernels
        summary["runs"][name] = result
        log(f"== {name}: " + (f"{result['train_s']} s training, loss {result['losses'][0]:.4f} -> "
                              f"{result['losses'][-1]:.4f}" if result.get("ok") else f"FAILED {result.get('error')}"))
    if summary["runs"].get("reference", {}).get("ok"):
        summary["comparison"] = compare(summary["runs"])
    summary["total_s"] = round(time.time() - started, 1)
    note = plot(summary, out_dir / "loss_parity.png")
    if note:
        log(note)
    (out_dir / "loss_parity.json").write_text(json.dumps(summary, indent=1))
    report(summary, args, log)
    log(f"results: {out_dir}/loss_parity.json, loss_parity.png; total {summary['total_s']} s")
    return 0 if (summary.get("comparison") or {}).get("verdict", {}).get("pass") else 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-1.5b", choices=[m for m in SHAPES if not m.startswith("tiny")])
    parser.add_argument("--batch", type=int, default=2, help="packed rows per step")
    parser.add_argument("--seq", type=int, default=2048, help="max_seq_length (tokens per packed row)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ckpt-root", default="/tmp/loss_parity_ckpt", help="checkpoints live in ROOT/<model>")
    parser.add_argument("--work-dir", default="/tmp/loss_parity_work", help="the runs' output_dir and metrics.jsonl")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole call; later runs skipped")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/loss_parity"))
    parser.add_argument("--results-md", default=None, help="append the dated section to this file (bench/RESULTS.md)")
    parser.add_argument("--from-json", default=None, help="report a finished run's loss_parity.json instead of running")
    parser.add_argument("--kernels", default=None, help="FASTFT_KERNELS of the kernel-path runs (default: unset, "
                        "i.e. auto; with --smoke: pallas)")
    parser.add_argument("--exact-steps", type=int, default=25,
                        help="steps of the float32 kernel path (its 1e-4 bound holds from the first step or not at all; "
                             "a GPU runs its float32 kernels without tensor cores, ~3.6 s a step)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="QLoRA: every run quantizes the same checkpoint to NF4 (the float32 runs compute in "
                             "float32 from the same 4-bit codes), so only the kernels and the compute dtype differ")
    parser.add_argument("--bisect", action="store_true",
                        help="instead of the float32 kernel path, bf16 runs that swap one op at a time (BISECT_OPS)")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny qwen2, 512 tokens")
    parser.add_argument("--_child", dest="child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in (("seq", 512), ("steps", 20), ("lr", 3e-3), ("deadline", 110.0)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.model = "tiny-qwen2"
        if args.out == parser.get_default("out"):
            args.out = "/tmp/loss_parity_smoke"
        if args.work_dir == parser.get_default("work_dir"):
            args.work_dir = "/tmp/loss_parity_smoke_work"
    if args.steps < 1 or args.batch < 1 or args.seq < 16:
        parser.error("need --steps >= 1, --batch >= 1, --seq >= 16")
    return args


if __name__ == "__main__":
    sys.exit(main())

"""Gradient parity of the kernel path, op by op, on one packed batch: which op makes "auto" differ
from the reference? (bench/loss_parity.py showed the 50-step curves part at step 3, the first step
whose adapters are not the initial ones.)

One loss-and-gradient of the training loss (trainer.token_loss_sum: decoder, LoRA on all 7
projections with a random nonzero B, chunked loss over response-only labels) on packed rows, for:
  reference            every op the pure-jnp reference;
  <op>=<mode>          the reference with that one op switched (rms_norm=pallas, attention=pallas, ...);
  auto                 whatever OpsConfig picks on this backend (on a GPU: the kernels);
each under the checkpointing modes given. Reported per run: the loss's relative difference from the
reference run in the same dtype, and the largest relative difference (||g - g_ref|| / ||g_ref||) over
the LoRA gradient leaves, with the leaf that has it.

In float32 (--dtype float32, matmuls at "highest") any op whose gradient differs by more than ~1e-5
is wrong, not rounded. In bfloat16 the yardstick is the reference's own error against the float32
reference: a correct kernel's error against float32 is of the same size.

    python3 bench/grad_parity.py --model qwen2.5-1.5b --layers 4 --dtype float32,bfloat16   # GPU
    python3 bench/grad_parity.py --model tiny --seq 256 --runs all-pallas                    # CPU, interpret mode
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.e2e import SHAPES, hf_config, random_rows  # noqa: E402
from convert.hf import model_config_from_hf  # noqa: E402
from fastft_jax import ops  # noqa: E402
from fastft_jax.lora import LoRAConfig, init_lora_params  # noqa: E402
from fastft_jax.model import random_params  # noqa: E402
from fastft_jax.trainer import LossSetup, StepInputs, token_loss_sum  # noqa: E402

SINGLE_OPS = ("rms_norm=pallas", "rope=pallas", "swiglu=pallas", "lora_linear=xla", "lora_linear=pallas",
              "cross_entropy=pallas", "attention=pallas")
CHECKPOINTING = {"none": False, "full": True, "selective": "selective", "unsloth": "unsloth"}


def packed_batch(vocab: int, batch: int, seq: int, segments: int, prompt_share: float, seed: int) -> StepInputs:
    """Random tokens in packed rows, each sequence's first prompt_share of labels ignored (a response-only loss)."""
    (input_ids, labels, positions, segment_ids), = random_rows(seed, batch, seq, vocab, segments, 1)[0]
    labels = labels.copy()
    labels[positions < (positions.max() * prompt_share)] = -100
    # The tail of every row is padding (segment 0), as the packer leaves it.
    pad = max(1, seq // 50)
    segment_ids = segment_ids.copy()
    segment_ids[:, -pad:] = 0
    labels[:, -pad:] = -100
    return StepInputs(*(jnp.asarray(a)[None] for a in (input_ids, labels, positions, segment_ids)))


def attention_check(seq: int, groups: list[int], dtypes: list[str], head_dim: int = 128, kv_heads: int = 2) -> list[dict]:
    """The attention kernel alone on the packed batch's segments, per GQA ratio: output and dq/dk/dv
    against the float32 reference's (relative norm of the difference)."""
    from pallas_kernels.attention import attention_reference, flash_attention

    segment_ids = packed_batch(1000, 1, seq, 5, 0.3, seed=3).segment_ids[0]
    rows = []
    for dtype_name in dtypes:
        for group in groups:
            keys = jax.random.split(jax.random.PRNGKey(group), 4)
            shapes = [(1, seq, kv_heads * group, head_dim), (1, seq, kv_heads, head_dim), (1, seq, kv_heads, head_dim),
                      (1, seq, kv_heads * group, head_dim)]
            q, k, v, d_out = (jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes))

            def loss(fn):
                return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * d_out)

            def ours(q, k, v):
                return flash_attention(q, k, v, causal=True, segment_ids=segment_ids)

            def reference(q, k, v):
                return attention_reference(q, k, v, causal=True, segment_ids=segment_ids)

            cast = [x.astype(dtype_name) for x in (q, k, v)]
            row = {"dtype": dtype_name, "group": group, "seq": seq}
            try:
                got = [jax.jit(ours)(*cast)] + list(jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(*cast))
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {error}"[:300]
                print(f"attention {dtype_name} group {group}: FAILED {row['error']}", flush=True)
                rows.append(row)
                continue
            upcast = [x.astype(jnp.float32) for x in cast]
            want = [jax.jit(reference)(*upcast)] + list(jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(*upcast))
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                row[name] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            print(f"attention {dtype_name} group {group} seq {seq}: " + "  ".join(
                f"{name} {row[name]:.2e}" for name in ("out", "dq", "dk", "dv")), flush=True)
            rows.append(row)
    return rows


def run(lora, base, micro, setup) -> tuple[float, dict]:
    step = jax.jit(jax.value_and_grad(token_loss_sum), static_argnums=(5,))
    micro = jax.tree.map(lambda a: a[0], micro)
    normalizer = jnp.maximum(jnp.sum(micro.labels != -100), 1).astype(jnp.float32)
    loss, grads = step(lora, base, micro, normalizer, None, setup)
    return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


def compare(loss, grads, ref_loss, ref_grads) -> dict:
    worst, where = 0.0, ""
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        rel = float(np.linalg.norm(g - g_ref) / max(np.linalg.norm(g_ref), 1e-30))
        if not np.isfinite(rel) or rel > worst:
            worst, where = rel, jax.tree_util.keystr(path)
    return {"loss_rel": abs(loss - ref_loss) / abs(ref_loss), "grad_rel_max": worst, "grad_worst_leaf": where}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-1.5b", choices=tuple(SHAPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--checkpointing", default="unsloth,none")
    parser.add_argument("--runs", default="auto,singles", help="auto, singles, all-pallas, or OP=MODE entries")
    parser.add_argument("--attention-groups", default="1,2,4,6,7",
                        help="GQA ratios for the attention kernel alone (empty: skip)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/grad_parity"))
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")

    hf = dict(hf_config(args.model), num_hidden_layers=args.layers)
    config = model_config_from_hf(hf)
    lora_config = LoRAConfig(r=16, alpha=16.0)
    lora = init_lora_params(config, lora_config, seed=1)
    key = jax.random.PRNGKey(2)
    # A nonzero B (as after a few steps), so that the gradients through A and the adapter's forward are exercised.
    # crc32, not hash(): str hashes change from process to process, and the draw must not.
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.02 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(p).encode()) % 2**31),
                                              x.shape)
        if "lora_b" in jax.tree_util.keystr(p) else x, lora)
    micro = packed_batch(config.vocab_size, args.batch, args.seq, args.segments, 0.3, seed=3)

    names = []
    for entry in args.runs.split(","):
        names += {"singles": list(SINGLE_OPS)}.get(entry, [entry])
    backend = jax.default_backend()
    print(f"grad parity: {args.model} with {args.layers} layers, {args.batch} x {args.seq} packed "
          f"({args.segments} segments a row), backend {backend}, jax {jax.__version__}", flush=True)
    attention_rows = []
    if args.attention_groups:
        attention_rows = attention_check(args.seq, [int(g) for g in args.attention_groups.split(",")],
                                         args.dtype.split(","))
    results = []
    float32_reference: dict = {}
    for dtype_name in args.dtype.split(","):
        dtype = jnp.dtype(dtype_name)
        base = random_params(config, seed=0, dtype=dtype)
        for ckpt_name in args.checkpointing.split(","):
            def setup_for(ops_config):
                return LossSetup(config, lora_config, ops_config.validated(), dtype, CHECKPOINTING[ckpt_name],
                                 use_segments=True)

            reference_ops = ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES})
            start = time.perf_counter()
            ref_loss, ref_grads = run(lora, base, micro, setup_for(reference_ops))
            print(f"[{dtype_name} ckpt={ckpt_name}] reference loss {ref_loss:.6f} ({time.perf_counter() - start:.1f} s)",
                  flush=True)
            if dtype_name == "float32" and ckpt_name == args.checkpointing.split(",")[0]:
                float32_reference = {"loss": ref_loss, "grads": ref_grads}
            row = {"dtype": dtype_name, "checkpointing": ckpt_name, "run": "reference", "loss": ref_loss}
            if float32_reference and dtype_name != "float32":
                row["vs_float32_reference"] = compare(ref_loss, ref_grads, float32_reference["loss"],
                                                      float32_reference["grads"])
            results.append(row)
            reference_row = row
            for name in names:
                if name == "auto":
                    ops_config = ops.OpsConfig()
                elif name == "all-pallas":
                    ops_config = ops.OpsConfig(**{op: "pallas" for op in ops.OP_NAMES if op != "lora_linear"},
                                               lora_linear="pallas")
                else:
                    op, mode = name.split("=")
                    ops_config = dataclasses.replace(reference_ops, **{op: mode})
                start = time.perf_counter()
                try:
                    loss, grads = run(lora, base, micro, setup_for(ops_config))
                except Exception as error:  # noqa: BLE001 - one failing op must not hide the others
                    print(f"[{dtype_name} ckpt={ckpt_name}] {name}: FAILED {type(error).__name__}: {error}"[:400], flush=True)
                    results.append({"dtype": dtype_name, "checkpointing": ckpt_name, "run": name, "error": str(error)[:400]})
                    continue
                row = {"dtype": dtype_name, "checkpointing": ckpt_name, "run": name, "loss": loss,
                       "vs_reference": compare(loss, grads, ref_loss, ref_grads)}
                if float32_reference and dtype_name != "float32":
                    row["vs_float32_reference"] = compare(loss, grads, float32_reference["loss"],
                                                          float32_reference["grads"])
                results.append(row)
                diff = row["vs_reference"]
                extra = ""
                if "vs_float32_reference" in row:
                    extra = (f"; vs float32: grad {row['vs_float32_reference']['grad_rel_max']:.2e} (the reference's "
                             f"{reference_row['vs_float32_reference']['grad_rel_max']:.2e})")
                print(f"[{dtype_name} ckpt={ckpt_name}] {name:22s} loss rel {diff['loss_rel']:.2e}  grad rel max "
                      f"{diff['grad_rel_max']:.2e} at {diff['grad_worst_leaf']}{extra} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_parity.json").write_text(json.dumps(
        {"args": vars(args), "backend": backend, "jax": jax.__version__,
         "device": str(jax.devices()[0].device_kind), "attention": attention_rows, "results": results}, indent=1))
    print(f"wrote {out / 'grad_parity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FSDP's layer scan gathers one layer's weights at a time, inside the loop.

The training step is compiled on 2 virtual CPU devices in ONE subprocess, started with
XLA_FLAGS=--xla_force_host_platform_device_count=2 (the flag must be set before jax starts, and the
rest of the suite stays single-device): `python -m tests.test_fsdp_memory OUT_DIR`. For each
checkpointing mode it builds SFTTrainer's own step (_build_train_step on a trainer shell, as
bench/multi_gpu.py does) for a Llama-shaped model of SHALLOW and of DEEP layers on mesh fsdp=2,
reads the compiled step's temporaries (memory_analysis), runs one step of the DEEP model, and runs
the same step on one device; the tests below read OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 2
SHALLOW, DEEP = 4, 8
# hidden 384, 6 heads of 64 on 2 KV heads, MLP 1152, vocab 1000: every projection's input axis and
# LoRA rank split over 2 devices; the sizes are not powers of 2.
SHAPE = dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1152, vocab_size=1000)
RANK, ROWS_PER_DEVICE, SEQ = 16, 1, 24
MODES = {"full": True, "none": False, "selective": "selective"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_memory")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    result = out / "result.json"
    proc = subprocess.run([sys.executable, "-m", "tests.test_fsdp_memory", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not result.exists():
        pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(result.read_text())


@pytest.mark.parametrize("mode", list(MODES))
def test_fsdp_temporaries_do_not_grow_by_weights_with_depth(compiled, mode):
    """Temporaries of the DEEP step minus the SHALLOW step's stay under one layer's full weights.

    What may grow with depth besides the arguments: the LoRA gradients and the optimizer's update
    temporaries (a few [layers, ...] stacks of adapter shards: r (in + out) against in x out per
    projection, 0.5 % of a layer per added layer here), and without recomputation ("none") the
    activations kept for the backward (1 row of 24 tokens per device: 1.6 % of a layer per added
    layer). DEEP - SHALLOW = 4 added layers stay far under one layer's weights. Anything that copies
    the stacked weight shards instead (as XLA did when it gathered each [1, in, out] slice before
    squeezing the layer axis: a transposed copy of every stacked shard, made before the loop) adds
    at least a layer's shard per added layer, 4 x 1/2 = 2 layers' weights; a backward that keeps
    each layer's gathered weights adds 4."""
    memory = compiled["memory"][mode]
    growth = memory[str(DEEP)]["temp_bytes"] - memory[str(SHALLOW)]["temp_bytes"]
    layer_bytes = compiled["layer_weight_bytes"]
    assert growth < layer_bytes, (mode, growth / layer_bytes, memory)
    # The weights are arguments, sharded: half of the model's weights per device.
    assert memory[str(DEEP)]["argument_bytes"] > DEEP * layer_bytes / DEVICES


@pytest.mark.parametrize("mode", list(MODES))
def test_fsdp_step_equals_one_device(compiled, mode):
    """The step's loss and gradient norm on fsdp=2 equal one device's (float32). (The adapters after
    one AdamW step are not compared: its first update is about lr x sign(gradient), which float32
    rounding flips for gradients near zero.)"""
    step = compiled["step"][mode]
    assert step["loss_rel"] <= 1e-5 and step["grad_norm_rel"] <= 1e-5, step


def test_weights_are_gathered_one_layer_at_a_time_on_their_first_axis(compiled):
    """Every all-gather of floating values in the step gathers one layer's slice of a stacked weight
    (2-D: no layer axis) or the loss head, on its first, most-major axis: layouts the weights
    already have, so no layout change reaches the stacked shards. (The token ids are gathered for
    the embedding lookup, whose table is split on hidden.)"""
    gathers = [gather for gather in compiled["all_gathers"] if gather["dtype"].startswith(("f", "bf"))]
    assert gathers, compiled["all_gathers"]
    assert all(len(gather["shape"]) == 2 and gather["dimension"] == 0 for gather in gathers), gathers


def test_single_device_layers_trace_unchanged():
    """Under a one-device mesh the decoder traces exactly as without a mesh: no FSDP gather, no
    shard_map, no extra checkpoint."""
    import jax
    import jax.numpy as jnp

    from fastft_jax import sharding
    from fastft_jax.model import decoder_hidden

    model = _model(SHALLOW, int(np.random.default_rng().integers(1 << 20)), use_gradient_checkpointing=False)
    ids = jnp.zeros((2, SEQ), jnp.int32)

    def loss(lora, base):
        hidden = decoder_hidden(base, lora, ids, None, None, config=model.config, lora_config=model.lora_config,
                                ops_config=model.ops_config, compute_dtype=jnp.float32, gradient_checkpointing=False)
        return hidden.sum()

    step = jax.grad(loss)
    plain = _primitive_names(jax.make_jaxpr(step)(model.lora_params(), model.base_params()).jaxpr)
    with jax.set_mesh(sharding.make_mesh(None)):
        meshed = _primitive_names(jax.make_jaxpr(step)(model.lora_params(), model.base_params()).jaxpr)
    assert meshed == plain
    assert "all_gather" not in plain and "shard_map" not in plain


def _primitive_names(jaxpr) -> list[str]:
    """Every equation's primitive, in order, with those of the jaxprs inside (scan bodies, remat)."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    names += _primitive_names(inner)
    return names


# -- the subprocess ----------------------------------------------------------------------------------


def _model(layers: int, seed: int, use_gradient_checkpointing):
    import jax.numpy as jnp

    from convert.hf import model_config_from_hf
    from fastft_jax import FastLanguageModel
    from fastft_jax.model import CausalLM, random_params
    from fastft_jax.ops import OpsConfig

    hf = dict(SHAPE, model_type="llama", num_hidden_layers=layers, hidden_act="silu", rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, max_position_embeddings=4096,
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    config = model_config_from_hf(hf, where="tests/test_fsdp_memory.py")
    model = CausalLM(config, random_params(config, seed, jnp.float32), dtype=jnp.float32, max_seq_length=SEQ,
                     ops_config=OpsConfig.from_env())
    return FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                            use_gradient_checkpointing=use_gradient_checkpointing, random_state=seed)


def _step(layers: int, mode, mesh, seed: int, tokens: np.ndarray):
    """SFTTrainer's step for a fresh model (its adapters' B drawn non-zero, so that A gets a
    gradient), compiled for `mesh`, and its inputs."""
    import jax
    import optax

    from fastft_jax import sharding
    from fastft_jax.data import DataConfig
    from fastft_jax.trainer import SFTTrainer, StepInputs, TrainingArguments, learning_rate_schedule

    model = _model(layers, seed, mode)
    model.set_lora_params(jax.tree_util.tree_map_with_path(
        lambda path, leaf: 0.02 * jax.random.normal(jax.random.PRNGKey(seed + len(path)), leaf.shape, leaf.dtype)
        if sharding.path_name(path).endswith("lora_b") else leaf, model.lora_params()))
    devices = 1 if mesh is None else DEVICES
    args = TrainingArguments(learning_rate=1e-3, lr_scheduler_type="constant", max_steps=1, max_grad_norm=1.0,
                             save_strategy="no", mesh=mesh, per_device_train_batch_size=ROWS_PER_DEVICE * DEVICES // devices)
    trainer = SFTTrainer.__new__(SFTTrainer)
    trainer.model, trainer.args = model, args
    trainer.data_config = DataConfig(max_seq_length=SEQ, packing=False)
    trainer.optimizer = optax.adamw(learning_rate_schedule(args, 1))
    train_step = trainer._build_train_step()
    lora = model.lora_params()
    opt_state = jax.jit(trainer.optimizer.init, out_shardings=trainer.opt_state_shardings)(lora)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)
    inputs = sharding.place_batch(StepInputs(tokens[None], tokens[None], positions[None], np.zeros_like(tokens)[None]),
                                  trainer.batch_sharding)
    seed_key = sharding.place(jax.random.PRNGKey(seed), sharding.replicated(trainer.mesh))
    arguments = (lora, opt_state, model.base_params(), inputs, np.int32(0), seed_key)
    with jax.set_mesh(trainer.mesh):
        compiled = train_step.lower(*arguments).compile()
    return model, compiled, arguments


def _all_gathers(hlo: str) -> list[dict]:
    import re

    gathers = []
    for match in re.finditer(r"= (\w+)\[([\d,]*)\]\{[\d,]*\} all-gather(?:-start)?\(.*?dimensions=\{(\d+)\}", hlo):
        gathers.append({"dtype": match.group(1), "shape": [int(size) for size in match.group(2).split(",") if size],
                        "dimension": int(match.group(3))})
    return gathers


def _relative(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _run(out: Path) -> dict:
    import jax

    assert jax.device_count() == DEVICES, jax.devices()
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 20))
    tokens = rng.integers(3, SHAPE["vocab_size"], (ROWS_PER_DEVICE * DEVICES, SEQ)).astype(np.int32)
    result: dict = {"memory": {}, "step": {}}
    for name, mode in MODES.items():
        result["memory"][name] = {}
        for layers in (SHALLOW, DEEP):
            model, compiled, arguments = _step(layers, mode, {"fsdp": DEVICES}, seed, tokens)
            analysis = compiled.memory_analysis()
            result["memory"][name][str(layers)] = {"temp_bytes": int(analysis.temp_size_in_bytes),
                                                  "argument_bytes": int(analysis.argument_size_in_bytes)}
        if name == "full":
            base = model.base_params()
            result["layer_weight_bytes"] = sum(leaf[0].nbytes for leaf in jax.tree.leaves(base["layers"]))
            result["all_gathers"] = _all_gathers(compiled.as_text())
        metrics = compiled(*arguments)[2]
        _, single, single_arguments = _step(DEEP, mode, None, seed, tokens)
        single_metrics = single(*single_arguments)[2]
        result["step"][name] = {key: float(metrics[key]) for key in ("loss", "grad_norm")}
        result["step"][name].update(
            loss_rel=_relative(metrics["loss"], single_metrics["loss"]),
            grad_norm_rel=_relative(metrics["grad_norm"], single_metrics["grad_norm"]))
    return result


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    (out_dir / "result.json").write_text(json.dumps(_run(out_dir)))

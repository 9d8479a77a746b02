"""Meshes, partition rules and multi-device training on 4 virtual CPU devices.

The multi-device scenarios run in ONE subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be set before jax starts, and
the rest of the suite stays single-device): `python -m tests.test_sharding CHECKPOINT OUT_DIR`.
It trains the same 10 steps on one device, on data=2 x fsdp=2, on fsdp=4 and on data=4, resumes
the fsdp=4 run's step-5 checkpoint on 1 and on 2 devices, exports from the sharded model, trains
NF4 weights sharded, runs one decoder layer per device, and tries bad meshes; the tests below
read its OUT_DIR/result.json. A second test runs the CLI as two processes (jax.distributed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 4
STEPS = 10
RESUME_AT = 5


# -- single device: config checks and rules --------------------------------------------------------


def test_mesh_config_errors_name_the_numbers():
    from fastft_jax.sharding import resolve_mesh_shape
    from fastft_jax.trainer import TrainingArguments

    with pytest.raises(ConfigError, match="unknown axis 'tensor'.*data, fsdp"):
        TrainingArguments(mesh={"data": 2, "tensor": 2})
    with pytest.raises(ConfigError, match="more than one -1"):
        TrainingArguments(mesh={"data": -1, "fsdp": -1})
    with pytest.raises(ConfigError, match=r"training.mesh.fsdp must be a positive integer or -1 \(all remaining devices\), got 0"):
        TrainingArguments(mesh={"fsdp": 0})
    with pytest.raises(ConfigError, match="asks for 3 devices.*8 are present"):
        resolve_mesh_shape({"data": 3}, 8)
    with pytest.raises(ConfigError, match="asks for 6 devices.*4 are present"):
        resolve_mesh_shape({"data": -1, "fsdp": 6}, 4)
    assert resolve_mesh_shape({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2}
    assert resolve_mesh_shape({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8}
    assert resolve_mesh_shape(None, 8) == {"data": 1, "fsdp": 1}


def test_yaml_mesh_is_checked_before_any_work(tmp_path, capsys):
    """training.mesh in YAML: an unknown axis fails at load, a mesh the devices cannot hold fails in
    run() before the dataset or the model (model.name here does not even exist) is touched."""
    from fastft_jax.train import load_run_config, main

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {tmp_path / 'absent'}}}\ndata: {{path: {tmp_path / 'absent.jsonl'}}}\n"
                      "training: {mesh: {data: -1, fsdp: 1}}\n")
    assert load_run_config(config).training.mesh == {"data": -1, "fsdp": 1}
    with pytest.raises(ConfigError, match="unknown axis 'model'"):
        load_run_config(config, ["training.mesh={model: 2}"])
    import jax

    too_many = jax.device_count() + 1
    assert main(["--config", str(config), "--set", f"training.mesh={{fsdp: {too_many}}}"]) == 2
    assert f"asks for {too_many} devices" in capsys.readouterr().err


def test_partition_rules():
    from jax.sharding import PartitionSpec as P

    from fastft_jax.sharding import partition_spec

    rng = np.random.default_rng()
    fsdp = int(rng.choice([2, 4]))
    layers, hidden, inner, vocab, rank = 3, 8 * fsdp, 24 * fsdp, 40 * fsdp + fsdp, 8
    assert partition_spec("embed", (vocab, hidden), fsdp) == P(None, "fsdp")
    assert partition_spec("embed", (vocab, hidden + 1), fsdp) == P("fsdp", None)
    assert partition_spec("lm_head", (hidden, vocab), fsdp) == P("fsdp", None)
    assert partition_spec("lm_head", (hidden + 1, vocab), fsdp) == P(None, "fsdp")
    assert partition_spec("final_norm", (hidden,), fsdp) == P()
    assert partition_spec("layers/input_norm", (layers, hidden), fsdp) == P()
    assert partition_spec("layers/q_proj/bias", (layers, hidden), fsdp) == P()
    # Stacked kernels on the first axis of a layer's slice (in) where the fsdp size divides it, else
    # on out; never on the layer axis. LoRA B likewise on r, else on out.
    assert partition_spec("layers/gate_proj/kernel", (layers, hidden, inner), fsdp) == P(None, "fsdp", None)
    assert partition_spec("layers/down_proj/kernel", (layers, inner, hidden), fsdp) == P(None, "fsdp", None)
    assert partition_spec("layers/down_proj/kernel", (layers, inner + 1, hidden), fsdp) == P(None, None, "fsdp")
    assert partition_spec("layers/down_proj/kernel", (fsdp, inner + 1, hidden + 1), fsdp) == P()
    assert partition_spec("layers/q_proj/lora_a", (layers, hidden, rank), fsdp) == P(None, "fsdp", None)
    assert partition_spec("layers/q_proj/lora_b", (layers, rank, inner), fsdp) == P(None, "fsdp", None)
    assert partition_spec("layers/q_proj/lora_b", (layers, rank + 1, inner), fsdp) == P(None, None, "fsdp")
    assert partition_spec("layers/q_proj/lora_b", (layers, rank + 1, inner + 1), fsdp) == P()
    # Quantized kernels (any other leaf of a projection): codes and block scales shard on their one
    # axis; a per-layer scalar offset has no axis to shard and is replicated.
    assert partition_spec("layers/up_proj/kernel/codes", (layers, hidden * inner // 2), fsdp) == P(None, "fsdp")
    assert partition_spec("layers/up_proj/kernel/absmax", (layers, hidden * inner // 64), fsdp) == P(None, "fsdp")
    assert partition_spec("layers/up_proj/kernel/nested_offset", (layers,), fsdp) == P()
    assert partition_spec("something_new", (hidden, hidden), fsdp) == P()
    assert partition_spec("layers/q_proj/kernel", (layers, hidden, inner), 1) == P()


def test_initialize_distributed_reads_the_environment():
    from fastft_jax.sharding import initialize_distributed

    calls = []
    record = lambda **kwargs: calls.append(kwargs)  # noqa: E731
    assert not initialize_distributed({}, record) and not calls
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert initialize_distributed(env, record)
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)]
    assert initialize_distributed({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, record) and calls[-1] == {}
    assert not initialize_distributed({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, record)
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID"):
        initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, record)
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID=2 is not in 0..1"):
        initialize_distributed({**env, "JAX_PROCESS_ID": "2"}, record)


# -- two processes (one "host" each, 2 virtual devices apiece) ------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_yaml(tmp_path: Path, checkpoint: Path, name: str, training: dict) -> Path:
    import yaml

    from tests.test_trainer import TEMPLATE, make_rows

    data_file = tmp_path / "rows.jsonl"
    if not data_file.exists():
        data_file.write_text("".join(json.dumps(row) + "\n" for row in make_rows(16, np.random.default_rng())))
    config = {
        "model": {"name": str(checkpoint), "max_seq_length": 48, "dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16, "use_gradient_checkpointing": False, "random_state": 7},
        "data": {"path": str(data_file), "text_field": None, "template": TEMPLATE, "response_marker": "### Response:",
                 "train_on_responses_only": True, "padding": "max_length"},
        "training": {"output_dir": str(tmp_path / name), "max_steps": 4, "logging_steps": 1, "save_steps": 2,
                     "learning_rate": 2e-3, "seed": 11, "plot_loss": False, **training},
        "export": {"merged": True},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _logged_losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def test_two_processes_train_like_one(tiny_checkpoints, tmp_path):
    """The CLI on 2 processes x 2 devices (jax.distributed from JAX_* variables, gloo on the CPU):
    the same losses as one device, one set of sharded checkpoints, and only process 0 logs and
    exports (after gathering the arrays that span both processes)."""
    from fastft_jax.train import main

    checkpoint = tiny_checkpoints["llama"]
    config = _run_yaml(tmp_path, checkpoint, "two", {"mesh": {"data": 2, "fsdp": 2}, "per_device_train_batch_size": 1})
    port = _free_port()
    procs = []
    for index in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": str(ROOT), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(index)}
        procs.append(subprocess.Popen([sys.executable, "-m", "fastft_jax.train", "--config", str(config)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "fastft_jax: done" in outputs[0] and "fastft_jax: done" not in outputs[1]
    assert "step=1" in outputs[0] and "step=1" not in outputs[1]
    two = tmp_path / "two"
    assert (two / "checkpoint-2" / "trainer_state.json").exists() and (two / "checkpoint-4").exists()
    assert (two / "merged_model" / "config.json").exists() and (two / "lora_model" / "adapter_config.json").exists()

    one = _run_yaml(tmp_path, checkpoint, "one", {"per_device_train_batch_size": 4})
    assert main(["--config", str(one)]) == 0
    assert _relative(_logged_losses(two), _logged_losses(tmp_path / "one")) <= 1e-5


# -- 4 virtual devices, one subprocess ---------------------------------------------------------------


@pytest.fixture(scope="module")
def scenarios(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    result = out / "result.json"
    proc = subprocess.run([sys.executable, "-m", "tests.test_sharding", str(tiny_checkpoints["llama"]), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not result.exists():
        pytest.fail(f"scenario subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(result.read_text())


def _relative(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def test_meshes_give_the_single_device_losses(scenarios):
    single = scenarios["losses"]["single"]
    assert len(single) == STEPS and single[-1] < single[0]
    for name in ("data2_fsdp2", "fsdp4", "data4"):
        assert _relative(scenarios["losses"][name], single) <= 1e-5, (name, scenarios["losses"][name], single)
    assert _relative(scenarios["eval_loss"]["fsdp4"], scenarios["eval_loss"]["single"]) <= 1e-5


def test_weights_adapters_and_optimizer_state_are_sharded(scenarios):
    specs = scenarios["specs"]
    assert specs["layers/gate_proj/kernel"] == [None, "fsdp", None]
    assert specs["layers/q_proj/lora_a"] == [None, "fsdp", None]
    assert specs["layers/q_proj/lora_b"] == [None, "fsdp", None]
    assert specs["layers/input_norm"] == []
    assert specs["adam_mu/layers/q_proj/lora_a"] == specs["layers/q_proj/lora_a"]
    assert specs["adam_nu/layers/down_proj/lora_b"] == specs["layers/down_proj/lora_b"]
    assert scenarios["checkpoint_sharded_arrays"] >= 3 * 14  # lora, mu, nu of 7 projections x (a, b)
    assert scenarios["checkpoint_mesh_shapes"] == [[1, DEVICES]]


def test_checkpoint_from_4_devices_resumes_on_1_and_2(scenarios):
    expected = scenarios["losses"]["fsdp4"][RESUME_AT:]
    for name in ("resumed_on_1", "resumed_on_2"):
        resumed = scenarios["losses"][name]
        assert len(resumed) == STEPS - RESUME_AT
        assert _relative(resumed, expected) <= 1e-5, (name, resumed, expected)


def test_export_from_the_sharded_model(scenarios):
    export = scenarios["export"]
    assert export["base_was_sharded"]
    assert export["adapter_tensors"] > 0 and export["adapter_rel"] == 0.0
    assert export["merged_tensors"] > 0 and export["merged_rel"] == 0.0
    assert export["gguf_tensors"] > 0 and export["gguf_vs_merged_rel"] <= 1e-3  # f16 rounding


def test_4bit_weights_shard_and_train_alike(scenarios):
    qlora = scenarios["qlora"]
    assert _relative(qlora["losses"]["fsdp4"], qlora["losses"]["single"]) <= 1e-5, qlora["losses"]
    specs = qlora["specs"]
    assert specs["kernel/codes"] == [None, "fsdp"] and specs["kernel/absmax"] == [None, "fsdp"], specs


def test_layer_runs_per_device_with_gathered_weights(scenarios):
    hint = scenarios["layer_hint"]
    assert hint["weights_sharded"]
    assert hint["value_rel"] <= 1e-5 and hint["out_rel"] <= 1e-5 and hint["grad_rel"] <= 1e-5, hint
    assert hint["dropout_rows_differ"]


def test_bad_meshes_get_clear_errors(scenarios):
    errors = scenarios["errors"]
    assert "asks for 3 devices" in errors["data3"] and "4 are present" in errors["data3"]
    assert "asks for 8 devices" in errors["fsdp8"]
    assert "asks for 6 devices" in errors["data2_fsdp3"]
    assert "unknown axis 'tensor'" in errors["tensor"]


# -- the subprocess ----------------------------------------------------------------------------------


def _run_scenarios(checkpoint: Path, out: Path) -> dict:
    import jax
    from safetensors.numpy import load_file

    from fastft_jax.sharding import path_name
    from tests.test_trainer import build, data_config, losses, make_rows

    assert jax.device_count() == DEVICES, jax.devices()
    rows = make_rows(24, np.random.default_rng())
    # 6 eval rows: on 4 devices the eval batch is padded to 8 with empty rows.
    data = data_config(padding="max_length", max_seq_length=48, eval_fraction=0.25)
    common = dict(max_steps=STEPS, learning_rate=2e-3, warmup_steps=2, weight_decay=0.01, gradient_accumulation_steps=2,
                  data=data)
    result: dict = {"losses": {}, "eval_loss": {}}
    models = {}
    # The global batch is per_device_train_batch_size x devices: 4 rows in every run.
    for name, mesh, per_device in (("single", None, 4), ("data2_fsdp2", {"data": 2, "fsdp": 2}, 1),
                                   ("fsdp4", {"fsdp": 4}, 1), ("data4", {"data": 4}, 1)):
        extra = {}
        if name in ("single", "fsdp4"):
            extra = dict(save_strategy="steps", save_steps=RESUME_AT, eval_strategy="steps", eval_steps=STEPS)
        model, tokenizer, trainer = build(checkpoint, out / name, rows, mesh=mesh, per_device_train_batch_size=per_device,
                                          per_device_eval_batch_size=2, **common, **extra)
        trainer.train()
        result["losses"][name] = losses(trainer)
        evals = [record["eval_loss"] for record in trainer.log_history if "eval_loss" in record]
        if evals:
            result["eval_loss"][name] = evals[-1]
        models[name] = (model, tokenizer, trainer)

    model, _, trainer = models["fsdp4"]
    specs = {path_name(path): list(leaf.sharding.spec) for path, leaf in
             jax.tree_util.tree_flatten_with_path((model.base_params(), model.lora_params()))[0]}
    specs = {key.split("/", 1)[1]: value for key, value in specs.items()}
    adam = trainer.opt_state_shardings[0]
    for moment in ("mu", "nu"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(adam, moment))[0]:
            specs[f"adam_{moment}/{path_name(path)}"] = list(leaf.spec)
    result["specs"] = specs
    # orbax records each saved array's sharding: the checkpoint holds the fsdp=4 layout, not a gathered copy.
    saved = json.loads((out / "fsdp4" / "out" / f"checkpoint-{RESUME_AT}" / "state" / "_sharding").read_text())
    saved = [json.loads(value) for value in saved.values()]
    result["checkpoint_sharded_arrays"] = sum("fsdp" in entry["partition_spec"] for entry in saved)
    result["checkpoint_mesh_shapes"] = sorted({tuple(entry["shape"]) for entry in saved})

    for name, mesh, per_device in (("resumed_on_1", None, 4), ("resumed_on_2", {"fsdp": 2}, 2)):
        _, _, resumed = build(checkpoint, out / name, rows, mesh=mesh, per_device_train_batch_size=per_device,
                              resume_from_checkpoint=str(out / "fsdp4" / "out" / f"checkpoint-{RESUME_AT}"), **common)
        resumed.train()
        result["losses"][name] = losses(resumed)[-(STEPS - RESUME_AT):]

    # Export from the sharded fsdp=4 model, and from a single-device model holding the same adapter
    # values (training on another mesh differs in float32 rounding, which Adam amplifies in the
    # weights though not in the losses; the export must not add any difference of its own).
    single_model, tokenizer, _ = models["single"]
    export: dict = {"base_was_sharded": any(
        "fsdp" in tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(model.base_params()))}
    single_model.set_lora_params(jax.device_put(jax.tree.map(np.asarray, model.lora_params()), jax.devices()[0]))
    for tag, source in (("sharded", model), ("single", single_model)):
        source.save_pretrained(out / f"adapter_{tag}")
        source.save_pretrained_merged(out / f"merged_{tag}", tokenizer)
    adapter = load_file(out / "adapter_sharded" / "adapter_model.safetensors")
    adapter_ref = load_file(out / "adapter_single" / "adapter_model.safetensors")
    export["adapter_tensors"] = len(adapter)
    export["adapter_rel"] = max(_relative(adapter[key], adapter_ref[key]) for key in adapter_ref)
    merged, merged_ref = {}, {}
    for tag, target in (("sharded", merged), ("single", merged_ref)):
        for file in sorted((out / f"merged_{tag}").glob("*.safetensors")):
            target.update(load_file(file))
    export["merged_tensors"] = len(merged)
    export["merged_rel"] = max(_relative(merged[key], merged_ref[key]) for key in merged_ref)
    import gguf

    gguf_file = model.save_pretrained_gguf(out / "gguf_sharded", tokenizer, quantization_method="f16")
    reader = gguf.GGUFReader(str(gguf_file))
    export["gguf_tensors"] = len(reader.tensors)
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    export["gguf_vs_merged_rel"] = _relative(
        np.asarray(embed.data, np.float32).reshape(merged_ref["model.embed_tokens.weight"].shape),
        merged_ref["model.embed_tokens.weight"])
    result["export"] = export

    result["layer_hint"] = _layer_hint_scenario(checkpoint)
    result["qlora"] = _qlora_scenario(checkpoint, out, rows, data)
    errors = {}
    for name, mesh in (("data3", {"data": 3}), ("fsdp8", {"fsdp": 8}), ("data2_fsdp3", {"data": 2, "fsdp": 3}),
                       ("tensor", {"tensor": 4})):
        try:
            build(checkpoint, out / f"bad_{name}", rows, mesh=mesh, **common)
            errors[name] = "no error"
        except ConfigError as err:
            errors[name] = str(err)
    result["errors"] = errors
    return result


def _qlora_scenario(checkpoint: Path, out: Path, rows: list, data) -> dict:
    """4-bit (NF4) base weights: the codes and block scales shard over fsdp like any projection
    leaf, and 6 steps on fsdp=4 give the single-device losses."""
    import jax

    from fastft_jax import FastLanguageModel, SFTTrainer, TrainingArguments
    from fastft_jax.sharding import path_name
    from tests.test_trainer import losses

    result: dict = {"losses": {}}
    for name, mesh, per_device in (("single", None, 4), ("fsdp4", {"fsdp": DEVICES}, 1)):
        model, tokenizer = FastLanguageModel.from_pretrained(checkpoint, dtype="float32", max_seq_length=64,
                                                             load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False,
                                                 random_state=7)
        args = TrainingArguments(output_dir=str(out / f"qlora_{name}"), per_device_train_batch_size=per_device,
                                 max_steps=6, learning_rate=2e-3, logging_steps=1, save_strategy="no", seed=11,
                                 plot_loss=False, mesh=mesh)
        trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=rows, args=args, data_config=data)
        trainer.train()
        result["losses"][name] = losses(trainer)
    result["specs"] = {path_name(path): list(leaf.sharding.spec) for path, leaf in
                       jax.tree_util.tree_flatten_with_path(model.base_params()["layers"]["gate_proj"])[0]}
    return result


def _layer_hint_scenario(checkpoint: Path) -> dict:
    """sharding.batch_local around one decoder layer, as the model's layer scan uses it under FSDP:
    on fsdp=4, with the layer's weights passed in as shards and gathered whole inside, each device
    runs the layer on its own row; output and LoRA gradients equal the unsharded layer's. With
    dropout, devices draw different masks."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from fastft_jax import FastLanguageModel, sharding
    from fastft_jax.model import LAYER_WEIGHTS, decoder_layer

    model, _ = FastLanguageModel.from_pretrained(checkpoint, dtype="float32", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             random_state=int(np.random.default_rng().integers(1 << 20)))
    config, lora_config, ops_config = model.config, model.lora_config, model.ops_config
    key = jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30)))
    layer = jax.tree.map(lambda leaf: leaf[1], model.base_params()["layers"])
    layer_lora = jax.tree.map(lambda leaf: leaf[1] + 0.05 * jax.random.normal(key, leaf.shape[1:]),
                              model.lora_params()["layers"])
    hidden = jax.random.normal(jax.random.fold_in(key, 1), (DEVICES, 12, config.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (DEVICES, 12))

    stacks = (model.base_params()["layers"], model.lora_params()["layers"])

    def loss(layer_lora, layer, hidden, local, lora_config=lora_config, rng=None):
        run = lambda h, p, lo, pos, seg, r: decoder_layer(h, p, lo, pos, seg, config, lora_config, ops_config, r)  # noqa: E731
        if local:
            specs = {1: sharding.layer_slice_specs(stacks[0], "layers"), 2: sharding.layer_slice_specs(stacks[1], "layers")}
            run = sharding.batch_local(run, (True, False, False, True, True, False), rng_arg=5, sharded_specs=specs,
                                       gathered_name=LAYER_WEIGHTS)
        out = run(hidden, layer, layer_lora, positions, None, rng)
        return jnp.sum(jnp.sin(out)), out

    reference = jax.value_and_grad(loss, has_aux=True)(layer_lora, layer, hidden, False)
    mesh = sharding.make_mesh({"fsdp": DEVICES})
    with jax.set_mesh(mesh):
        placed_layer, placed_lora = (
            sharding.place(tree, jax.tree.map(lambda spec: NamedSharding(mesh, spec), sharding.layer_slice_specs(stack, "layers")))
            for tree, stack in ((layer, stacks[0]), (layer_lora, stacks[1])))
    placed_hidden = jax.device_put(hidden, sharding.batch_sharding(mesh, leading_axes=0))
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(3, 4))
        local = step(placed_lora, placed_layer, placed_hidden, True)
        # Dropout: the same input row on every device must meet different masks.
        same_rows = jax.device_put(jnp.broadcast_to(hidden[:1], hidden.shape), sharding.batch_sharding(mesh, 0))
        dropped = jax.jit(loss, static_argnums=(3, 4))(
            placed_lora, placed_layer, same_rows, True, dataclasses.replace(lora_config, dropout=0.5), key)[1]
    (value, out), grads = reference
    (local_value, local_out), local_grads = local
    return {
        "weights_sharded": "fsdp" in tuple(placed_layer["gate_proj"]["kernel"].sharding.spec),
        # The loss is a sum of sines that may nearly cancel: its float32 error is bounded relative to
        # the sum of the terms' magnitudes, not to the (possibly small) sum itself.
        "value_rel": float(abs(local_value - value) / jnp.sum(jnp.abs(jnp.sin(out)))),
        "out_rel": _relative(local_out, out),
        "grad_rel": max(_relative(a, b) for a, b in zip(jax.tree.leaves(local_grads), jax.tree.leaves(grads))),
        "dropout_rows_differ": bool(not np.allclose(np.asarray(dropped[0]), np.asarray(dropped[1]))),
    }


if __name__ == "__main__":
    checkpoint_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    (out_dir / "result.json").write_text(json.dumps(_run_scenarios(checkpoint_dir, out_dir)))

"""`python -m fastft_jax`: versions, devices, and a tiny forward pass through every op of the seam,
each Pallas kernel checked against its reference. Exit 0 when all is well, 1 otherwise."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def main() -> int:
    import fastft_jax
    from convert import quant
    from convert.hf import PROJECTIONS, ModelConfig
    from fastft_jax import ops
    from fastft_jax.lora import LoRAConfig, init_lora_params
    from fastft_jax.model import CausalLM, random_params
    from pallas_kernels._common import use_interpret

    print(f"fastft_jax {fastft_jax.__version__}")
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "safetensors"):
        print(f"  {package:17s} {_version(package)}")
    print(f"  backend           {jax.default_backend()}")
    for device in jax.devices():
        print(f"  device            {device.device_kind} ({device.platform}:{device.id})")
    print(f"  pallas kernels    {'interpret mode (no GPU)' if use_interpret() else 'native (Triton on GPU)'}")
    from pallas_kernels.attention_hopper import hopper_attention_available

    print(f"  hopper attention  {'sm90 GPU: kernels.attention=hopper can run (opt-in)' if hopper_attention_available() else 'not available (needs an H100/H200)'}")
    print("  4-bit (QLoRA)     available: NF4 in bitsandbytes' layout (load_in_4bit=True), int8 (load_in_8bit=True); "
          "dequant kernel checked below")

    config = ModelConfig(
        model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        tie_word_embeddings=False, qkv_bias=True, qk_norm=False, max_position_embeddings=64,
    )
    params = random_params(config, seed=0, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 12)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 7 + [2] * 5], 2, axis=0), jnp.int32)
    positions = jnp.asarray(np.repeat([list(range(7)) + list(range(5))], 2, axis=0), jnp.int32)

    failures = []

    # The same weights with the seven projections in NF4, for the dequant op.
    quantized_params = jax.tree.map(lambda leaf: leaf, params)
    for name in PROJECTIONS:
        kernel = quantized_params["layers"][name]["kernel"]
        quantized_params["layers"][name]["kernel"] = quant.quantize_stacked(np.asarray(kernel), "nf4")

    def build_model(ops_config, weights=params):
        model = CausalLM(config, weights, dtype=jnp.float32, max_seq_length=64, ops_config=ops_config)
        lora_config = LoRAConfig(r=4, alpha=8.0)
        lora = init_lora_params(config, lora_config, seed=1)
        # B starts at zero; make it non-zero so the LoRA path shows in the logits.
        lora["layers"]["q_proj"]["lora_b"] = 0.1 * jnp.ones_like(lora["layers"]["q_proj"]["lora_b"])
        model.attach_lora(lora_config, lora)
        return model

    all_reference = ops.OpsConfig(**{name: "reference" for name in ops.OP_NAMES})
    reference = build_model(all_reference)(input_ids, positions=positions, segment_ids=segment_ids)
    if not np.all(np.isfinite(np.asarray(reference))):
        failures.append("reference forward produced non-finite logits")
    print("\nop seam (Pallas kernel vs pure-jnp reference, float32):")
    for op in ops.OP_NAMES:
        single = dataclasses.replace(all_reference, **{op: "pallas"})
        try:
            model = build_model(single)
            if op == "cross_entropy":
                from pallas_kernels.cross_entropy import fused_linear_cross_entropy_reference
                from fastft_jax.model import decoder_hidden, lm_head_weight

                hidden = decoder_hidden(params, None, input_ids, positions, segment_ids, config=config, lora_config=None,
                                        ops_config=single, compute_dtype=jnp.float32).reshape(-1, config.hidden_size)
                labels = jnp.roll(input_ids, -1, axis=1).reshape(-1)
                out = ops.cross_entropy(hidden, lm_head_weight(params, config), labels, 1.0 * labels.size, single)
                ref = fused_linear_cross_entropy_reference(hidden, lm_head_weight(params, config), labels)
            elif op == "dequant":
                kernel = quantized_params["layers"]["gate_proj"]["kernel"].layer(0)
                if not np.array_equal(np.asarray(ops.dequantize(kernel, jnp.float32, single)),
                                      np.asarray(quant.dequantize_reference(kernel, jnp.float32))):
                    raise AssertionError("the NF4 dequant kernel differs from its reference")
                out = build_model(single, quantized_params)(input_ids, positions=positions, segment_ids=segment_ids)
                ref = build_model(all_reference, quantized_params)(input_ids, positions=positions, segment_ids=segment_ids)
            elif op == "decode_matmul":  # the decode step's matmul on the stacked [layers, in, out] kernels
                from pallas_kernels.stacked_matmul import stacked_matmul, stacked_matmul_reference

                stacked = params["layers"]["gate_proj"]["kernel"]
                rows = jax.random.normal(jax.random.PRNGKey(2), (3, stacked.shape[1]), jnp.float32)
                out = stacked_matmul(rows, stacked, jnp.int32(config.num_layers - 1))
                ref = stacked_matmul_reference(rows, stacked, jnp.int32(config.num_layers - 1))
            else:
                out = model(input_ids, positions=positions, segment_ids=segment_ids)
                ref = reference
            error = _relative_error(out, ref)
            status = "ok" if error <= 1e-5 else "MISMATCH"
            if status != "ok":
                failures.append(f"{op}: relative error {error:.2e}")
            print(f"  {op:14s} {status:8s} rel. error {error:.1e}")
        except Exception as err:  # noqa: BLE001 - report every failing op, then exit 1
            failures.append(f"{op}: {type(err).__name__}: {err}")
            print(f"  {op:14s} FAILED   {type(err).__name__}: {err}")
            traceback.print_exc(limit=2)
    print(f"\nkernel choice here: {ops.OpsConfig.from_env().describe()}")
    if failures:
        print("\nfastft_jax self-check FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nfastft_jax is installed correctly")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: tiny HF checkpoints built by the tests themselves, with transformers, seeded."""

from __future__ import annotations

import numpy as np
import pytest

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# name -> write_tiny_checkpoint arguments. Together they cover tied and untied embeddings, GQA
# (4 query heads on 2 KV heads), a qwen3 head_dim other than hidden/heads, and llama3 rope scaling.
CHECKPOINTS = {
    "llama": dict(arch="llama", tie_word_embeddings=False, rope_scaling=LLAMA3_SCALING),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen3": dict(arch="qwen3", tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Build each tiny checkpoint once per session; returns {name: directory}."""
    from convert.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    built = {}
    for name, kwargs in CHECKPOINTS.items():
        built[name] = write_tiny_checkpoint(root / name, seed=int(np.random.default_rng().integers(1 << 20)), **kwargs)
    return built


def relative_error(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def torch_logits(checkpoint_dir, input_ids: np.ndarray) -> np.ndarray:
    """transformers' float32 eager logits for int ids [batch, seq]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(input_ids, dtype=torch.long)).logits.float().numpy()

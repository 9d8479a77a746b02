"""Checkpoint formats: safetensors, HF names and configs, PEFT, GGUF, and tiny test checkpoints."""

"""Checkpoint formats: HF safetensors import/export, our Orbax model directory, Q-Zoom parts, load_pretrained."""

"""Shipped checkpoints (safetensors carrying their config)."""

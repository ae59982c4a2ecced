"""Converters from other model formats to transformers checkpoints."""

"""Converters: other model formats to transformers checkpoints (gguf, ct2_whisper), and a loaded model's linear
layers to faster or smaller forms (hqq, packed_linear, sharing linear_layers)."""

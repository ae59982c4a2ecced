"""Model-family runners that drive a model's own modules step by step where the core runner's registered
attention function is not enough (Whisper today: an encoder pass, cross-attention K/V kept per row, and
the family's decoding rules), over the core's scheduler, engine and sampler."""

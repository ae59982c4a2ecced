"""What tests and benchmarks share: the real server in a subprocess, the engine in-process, tiny
random-weight models, and synthesised speech."""

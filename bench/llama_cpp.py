"""llama.cpp's `llama-server` on the same model as Batchwise, as an optional baseline: what CPU users run (Ollama,
LM Studio and the llama-cpp-python servers wrap it). It is built once with cmake from the llama.cpp tree vendored
in the `llama-cpp-python` sdist on PyPI (about 12 minutes on 2 cores), and that tree's `convert_hf_to_gguf.py`
writes the GGUFs (Q8_0, BF16, F32) of Batchwise's model folder; both are kept in --model-cache-dir's
`llama.cpp` folder, outside the repository.

    python -m bench.llama_cpp --build          # fetch, build, convert; prints the server's path
    python -m bench.run_all --llama-cpp q8_0,bf16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import model_manager
from config import Config, parse_config
from tests.helpers.server_process import free_port, serving

GGUF_TYPES = ("q8_0", "bf16", "f32")


def home(config: Config) -> Path:
    return Path(config.model_cache_dir) / "llama.cpp"


def source_tree(config: Config) -> Path:
    """The llama.cpp tree vendored in llama-cpp-python's sdist, unpacked once."""
    unpacked = home(config) / "source"
    tree = next(unpacked.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if tree is not None:
        return tree
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", download,
                        "llama-cpp-python"], check=True)
        sdist = next(Path(download).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(unpacked, filter="data")
    return next(unpacked.glob("llama_cpp_python-*/vendor/llama.cpp"))


def server_binary(config: Config) -> Path:
    """llama-server, built once (LLAMA_SERVER names a binary built elsewhere)."""
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    build = home(config) / "build"
    binary = build / "bin" / "llama-server"
    if not binary.exists():
        tree = source_tree(config)
        subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"], check=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count())],
                       check=True)
    return binary


def gguf(config: Config, kind: str) -> Path:
    """The served model's folder as a GGUF of `kind` (q8_0, bf16, f32), converted once."""
    folder = Path(model_manager.model_source(config))
    target = home(config) / f"{folder.name}-{kind}.gguf"
    if not target.exists():
        converter = source_tree(config) / "convert_hf_to_gguf.py"
        subprocess.run([sys.executable, str(converter), str(folder), "--outtype", kind, "--outfile", str(target)],
                       check=True)
    return target


@contextmanager
def running_llama_server(server_args: list[str], kind: str, slots: int, env: dict[str, str],
                         log_path: Path) -> Iterator[str]:
    """Yield the base URL of a healthy llama-server on the GGUF of `kind`, with `slots` parallel sequences and as
    many threads as Batchwise's torch uses (the machine's CPUs)."""
    config = parse_config(server_args)
    port = free_port()
    context = slots * 1024  # llama-server splits its context between the slots
    command = [str(server_binary(config)), "-m", str(gguf(config, kind)), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(context), "-t", str(os.cpu_count()), "--cont-batching"]
    print(f"server: {' '.join(command)} (log: {log_path})", flush=True)
    with serving(command, port, log_path, env) as base_url:
        yield base_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build llama-server and convert the model to GGUF, once.")
    parser.add_argument("--build", action="store_true", help="fetch the sources, build, convert")
    parser.add_argument("--server-args", default="", help="main.py flags naming the model")
    parser.add_argument("--types", default=",".join(GGUF_TYPES), help="GGUF types to convert to")
    args = parser.parse_args(argv)
    config = parse_config(args.server_args.split())
    if args.build:
        print(server_binary(config))
        for kind in args.types.split(","):
            print(gguf(config, kind))


if __name__ == "__main__":
    main()

"""`transformers serve --continuous-batching` on the same model folder, device and dtype as Batchwise: the
server users would otherwise pick, as a subprocess on a free loopback port."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import model_manager
from config import parse_config
from tests.helpers.server_process import free_port, serving


def transformers_command(model: str, device: str, dtype: str, port: int) -> list[str]:
    cli = Path(sys.executable).with_name("transformers")
    return [str(cli), "serve", "--continuous-batching", "--device", device, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", model]


@contextmanager
def running_transformers_serve(server_args: list[str], env: dict[str, str],
                               log_path: Path) -> Iterator[tuple[str, str]]:
    """Yield (base URL, model name) of a healthy `transformers serve` for the model Batchwise's flags name."""
    config = parse_config(server_args)
    model = str(model_manager.model_source(config))
    port = free_port()
    command = transformers_command(model, config.device, str(config.dtype).removeprefix("torch."), port)
    print(f"server: {' '.join(command)} (log: {log_path})", flush=True)
    with serving(command, port, log_path, env) as base_url:
        yield base_url, model

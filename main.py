"""Batchwise entry point: parse the configuration, build the app, serve it with uvicorn."""

import logging
import os
import sys

# MKL's strict reproducible mode makes a row's matmul result independent of how many rows share
# the batch, so greedy output does not depend on who else is being served. Must precede torch.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import uvicorn  # noqa: E402

from app import create_app  # noqa: E402
from config import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    logging.basicConfig(level=config.loglevel.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.loglevel.lower())


if __name__ == "__main__":
    main()

"""Batchwise entry point: parse the configuration, build the app, serve it with uvicorn."""

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys

import uvicorn
from transformers.utils import logging as transformers_logging

from api.state import ServerState
from app import create_app
from config import parse_config

logger = logging.getLogger("batchwise")
RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and whatever fields the call passed in `extra`
    (request_id, prompt_tokens, ttft_s, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update({key: value for key, value in vars(record).items() if key not in RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str) -> dict | None:
    """The root logger's handler; returns uvicorn's log_config (None: its loggers go through the root's)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
        logging.captureWarnings(True)
        transformers_logging.disable_default_handler()  # transformers' records go through ours instead
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()  # progress bars are not log lines
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    return None if log_format == "json" else uvicorn.config.LOGGING_CONFIG


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM: answer 503 to new requests and let running ones finish (up to the grace
    period) before uvicorn's own shutdown. A second signal, or Ctrl-C, stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_seconds: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_seconds = grace_seconds
        self.drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.drain_task is not None:
            return super().handle_exit(sig, frame)
        logger.info("SIGTERM: draining for up to %.0f s before shutting down", self.grace_seconds)
        self.drain_task = asyncio.get_running_loop().create_task(self.drain_then_exit(sig, frame))

    async def drain_then_exit(self, sig: int, frame) -> None:
        await self.state.drain(self.grace_seconds)
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    if config.batch_invariant:
        # MKL's reproducible mode gives a matmul row the same result however many rows share it (from 4 rows:
        # the runner pads to that). MKL reads it at its first call, which no import has made yet.
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    uvicorn_logging = configure_logging(config.loglevel, config.log_format)
    app = create_app(config)
    server_config = uvicorn.Config(app, host=config.host, port=config.port,
                                   log_level=config.uvicorn_log_level or config.loglevel.lower(),
                                   log_config=uvicorn_logging, timeout_graceful_shutdown=5)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        DrainingServer(server_config, app.state.server, config.shutdown_grace).run()


if __name__ == "__main__":
    main()

"""Convert a model file once and keep the result: later starts load the converted folder in seconds."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

logger = logging.getLogger("batchwise.model")


def cached_conversion(source: Path, cache_dir: Path, name: str, convert: Callable[[Path], object],
                      version: int) -> Path:
    """`convert(folder)` once into cache_dir/<name>-<key>, keyed on the source file's path, size and mtime
    and the converter's version; a staging folder is renamed into place only when the conversion is
    complete, so an interrupted one is never used."""
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v{version}".encode())
    target = cache_dir / f"{name}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        logger.info("using the converted copy of %s at %s", source, target)
        return target
    logger.info("converting %s once (later starts load %s in seconds)", source, target)
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # unique across containers too, where every replica's server is pid 1 over one shared cache volume
    staging = cache_dir / f".{target.name}.partial-{uuid.uuid4().hex}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s in %.1f s", source, time.perf_counter() - started)
    return target

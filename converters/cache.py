"""Convert a model file once and keep the result: later starts load the converted folder in seconds.

A converted copy is keyed on what the source file holds (its SHA-256, with the converter's version), not on where
it lies: a reinstall, a new virtual environment or a copy of the same file finds the copy already made. Copies
of the same name that no start has used for STALE_AFTER_DAYS are removed, so a file that changes (a newer model,
a newer converter) leaves no pile of copies behind."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

logger = logging.getLogger("batchwise.model")

STALE_AFTER_DAYS = 7


def cached_conversion(source: Path, cache_dir: Path, name: str, convert: Callable[[Path], object],
                      version: int) -> Path:
    """`convert(folder)` once into cache_dir/<name>-<key>, keyed on the source file's content and the converter's
    version; a staging folder is renamed into place only when the conversion is complete, so an interrupted one
    is never used."""
    target = cache_dir / f"{name}-{content_key(source, version)}"
    if (target / "config.json").is_file():
        logger.info("using the converted copy of %s at %s", source, target)
    else:
        convert_into(source, target, convert)
    os.utime(target)  # last used now: copies unused for a while are removed
    remove_stale_copies(cache_dir, name, keep=target)
    return target


def content_key(source: Path, version: int) -> str:
    with source.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256")
    digest.update(f":v{version}".encode())
    return digest.hexdigest()[:12]


def convert_into(source: Path, target: Path, convert: Callable[[Path], object]) -> None:
    logger.info("converting %s once (later starts load %s in seconds)", source, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    # unique across containers too, where every replica's server is pid 1 over one shared cache volume
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex}"
    try:
        convert(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s in %.1f s", source, time.perf_counter() - started)


def remove_stale_copies(cache_dir: Path, name: str, keep: Path) -> None:
    """Other converted copies of `name`, and staging folders an interrupted conversion left, unused for
    STALE_AFTER_DAYS."""
    copy = re.compile(rf"\.?{re.escape(name)}-[0-9a-f]{{12}}(\.partial-[0-9a-f]+)?")
    oldest = time.time() - STALE_AFTER_DAYS * 86400
    for folder in cache_dir.iterdir():
        if folder != keep and copy.fullmatch(folder.name) and folder.is_dir() and folder.stat().st_mtime < oldest:
            logger.info("removing %s, a converted copy unused for %d days", folder, STALE_AFTER_DAYS)
            shutil.rmtree(folder, ignore_errors=True)

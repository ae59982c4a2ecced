"""Convert a model file once and keep the result: later starts load the converted folder in seconds.

A converted copy is keyed on what its inputs hold (their SHA-256, with the converter's version), not on where
they lie: a reinstall, a new virtual environment or a copy of the same files finds the copy already made
(hashing costs each start about 70 ms for the embedded model's 93 MiB, a few seconds for a multi-GB file). A
start that uses a copy marks it used; copies of the same name that no start has used for STALE_AFTER_DAYS are
removed, so inputs that change (a newer model, a newer converter) leave no pile of copies behind. A server
running longer than that keeps its weights: a removed copy's files stay readable while they are open."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

logger = logging.getLogger("batchwise.model")

STALE_AFTER_DAYS = 7


def cached_conversion(source: Path, cache_dir: Path, name: str, convert: Callable[[Path], object],
                      version: int, also_read: Sequence[Path] = ()) -> Path:
    """`convert(folder)` once into cache_dir/<name>-<key>, keyed on the content of `source` and of the other files
    the conversion reads (`also_read`) and on the converter's version; a staging folder is renamed into place
    only when the conversion is complete, so an interrupted one is never used."""
    target = cache_dir / f"{name}-{content_key([source, *also_read], version)}"
    if (target / "config.json").is_file():
        logger.info("using the converted copy of %s at %s", source, target)
    else:
        convert_into(source, target, convert)
    try:
        os.utime(target)  # used now
    except OSError:  # a read-only cache: nothing to mark, nothing to remove
        return target
    remove_stale_copies(cache_dir, name, keep=target)
    return target


def content_key(files: Sequence[Path], version: int) -> str:
    digest = hashlib.sha256(f"v{version}".encode())
    for file in files:
        digest.update(f":{file.name}:".encode())
        with file.open("rb") as opened:
            digest.update(hashlib.file_digest(opened, "sha256").digest())
    return digest.hexdigest()[:12]


def convert_into(source: Path, target: Path, convert: Callable[[Path], object]) -> None:
    logger.info("converting %s once (later starts load %s in seconds)", source, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        convert(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s in %.1f s", source, time.perf_counter() - started)


def staging_folder(target: Path) -> Path:
    # unique across containers too, where every replica's server is pid 1 over one shared cache volume
    return target.parent / f".{target.name}.partial-{uuid.uuid4().hex}"


def remove_stale_copies(cache_dir: Path, name: str, keep: Path | None = None) -> None:
    """Other converted copies of `name`, and staging folders an interrupted conversion or removal left, unused
    for STALE_AFTER_DAYS. A copy is first renamed to a staging name (atomic: no start ever finds half a copy
    under its key; a removal cut short is finished by a later start), then removed; another process's start
    doing the same at once makes the entry vanish, which is skipped."""
    pattern = re.compile(rf"\.?{re.escape(name)}-[0-9a-f]{{12}}(\.partial-[0-9a-f]+)?")
    oldest = time.time() - STALE_AFTER_DAYS * 86400
    for folder in cache_dir.iterdir():
        if folder == keep or not pattern.fullmatch(folder.name):
            continue
        try:
            if not folder.is_dir() or folder.stat().st_mtime >= oldest:
                continue
            doomed = folder if folder.name.startswith(".") else folder.rename(staging_folder(folder))
        except OSError:  # gone already, or not ours to move
            continue
        logger.info("removing %s: unused for %d days", folder, STALE_AFTER_DAYS)
        shutil.rmtree(doomed, ignore_errors=True)

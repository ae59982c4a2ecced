"""The converted-model cache: one copy per file content, found again from anywhere, stale copies removed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from converters.cache import STALE_AFTER_DAYS, cached_conversion


class Converter:
    """A conversion that writes the source's bytes reversed (a real, if small, conversion), counting its runs."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.runs = 0

    def __call__(self, folder: Path) -> None:
        self.runs += 1
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "weights.bin").write_bytes(self.source.read_bytes()[::-1])


def model_file(folder: Path, content: bytes = bytes(range(256)) * 4096) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(content)
    return folder / "model.bin"


def convert(source: Path, cache: Path, converter: Converter | None = None, version: int = 1,
            also_read: Sequence[Path] = ()) -> Path:
    return cached_conversion(source, cache, "model", converter or Converter(source), version, also_read)


def test_the_same_file_anywhere_is_converted_once(tmp_path):
    """A reinstall puts the same file in a new folder with a new mtime: it finds the copy already made."""
    cache = tmp_path / "cache"
    source = model_file(tmp_path / "env1")
    converter = Converter(source)
    first = convert(source, cache, converter)
    reinstalled = model_file(tmp_path / "env2")
    os.utime(reinstalled, ns=(1_000_000_000, 1_000_000_000))
    assert convert(reinstalled, cache, converter) == first and converter.runs == 1
    assert (first / "weights.bin").read_bytes() == source.read_bytes()[::-1]
    assert [p.name for p in cache.iterdir()] == [first.name]  # no staging folder left behind


def test_other_content_or_converter_version_is_converted_again(tmp_path):
    cache = tmp_path / "cache"
    source = model_file(tmp_path / "env")
    settings = tmp_path / "env" / "config.json"
    settings.write_text('{"layers": 4}')
    first = convert(source, cache, also_read=[settings])
    content = bytearray(source.read_bytes())
    content[len(content) // 2] ^= 1  # one bit in the middle
    source.write_bytes(bytes(content))
    changed = convert(source, cache, also_read=[settings])
    newer_converter = convert(source, cache, version=2, also_read=[settings])
    settings.write_text('{"layers": 5}')
    other_settings = convert(source, cache, version=2, also_read=[settings])
    assert len({first, changed, newer_converter, other_settings}) == 4
    assert (changed / "weights.bin").read_bytes() == bytes(content)[::-1]


def test_copies_unused_for_a_while_are_removed(tmp_path):
    cache = tmp_path / "cache"
    old_source = model_file(tmp_path / "old", b"old weights")
    old = convert(old_source, cache)
    recent = convert(model_file(tmp_path / "recent", b"recent weights"), cache)
    other_name = cached_conversion(old_source, cache, "another", Converter(old_source), 1)
    interrupted = cache / f".{old.name}.partial-0123abcd"
    interrupted.mkdir()
    similar_name = cache / "model-v2-0123456789ab"
    similar_name.mkdir()
    week_ago = time.time() - (STALE_AFTER_DAYS + 1) * 86400
    for folder in (old, other_name, interrupted, similar_name):
        os.utime(folder, (week_ago, week_ago))
    os.utime(recent, (time.time() - 86400,) * 2)

    used = convert(model_file(tmp_path / "new", b"new weights"), cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([recent.name, other_name.name, similar_name.name,
                                                             used.name])

    assert convert(tmp_path / "recent" / "model.bin", cache) == recent  # using a copy keeps it
    assert recent.stat().st_mtime > time.time() - 60

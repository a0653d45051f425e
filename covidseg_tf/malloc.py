"""The malloc a training process runs with, chosen before TensorFlow loads.

TensorFlow's CPU runtime allocates through the C library's malloc, and oneDNN's tensors through TensorFlow's own
pool unless ``TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1``. Which pair is best was measured (bench/RESULTS.md, "Issue 26,
sixth run"): tcmalloc with the tensors taken from it has the lowest training peak, and its step is no slower than
with glibc's malloc, the default of any Python process, which peaks highest; jemalloc is in between. The arithmetic
is the same with each.

A library must be loaded before the program starts (``LD_PRELOAD``), so the training CLIs re-execute themselves
once with it (`reexec_for_training`, first thing in their `launch()`, which ``python -m`` and the console scripts
call); a process started with ``LD_PRELOAD`` set (by hand, a launcher, or that re-execution) is left as it is.
``COVIDSEG_MALLOC`` chooses: ``auto`` (the default: tcmalloc, else jemalloc, else nothing), ``none`` (glibc's
malloc), or the path of a library to preload.

    >>> training_env({"COVIDSEG_MALLOC": "none"})
    {}
    >>> training_env({"COVIDSEG_MALLOC": "libtcmalloc_minimal.so.4", "LD_PRELOAD": "other.so"})
    {'LD_PRELOAD': 'libtcmalloc_minimal.so.4:other.so', 'TF_ONEDNN_USE_SYSTEM_ALLOCATOR': '1'}
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger("covidseg_tf.malloc")

#: The variable that chooses: "auto", "none" or a library path.
CHOICE = "COVIDSEG_MALLOC"
#: The libraries "auto" looks for (ctypes.util.find_library names), best first.
PREFERRED = ("tcmalloc_minimal", "tcmalloc", "jemalloc")


def _installed() -> str | None:
    """The first of `PREFERRED` the dynamic linker finds (its file name, which LD_PRELOAD resolves), or None."""
    return next((lib for name in PREFERRED if (lib := ctypes.util.find_library(name))), None)


def training_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables a training process should add to `environ`: LD_PRELOAD with the chosen library first, and
    TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 when it is a tcmalloc; {} for "none", or when nothing is installed."""
    choice = environ.get(CHOICE, "auto")
    lib = _installed() if choice == "auto" else None if choice == "none" else choice
    if not lib:
        return {}
    if "/" in lib and not os.path.isfile(lib):
        raise ValueError(f"{CHOICE}={lib}: no such file (give auto, none or the path of a malloc library)")
    env = {"LD_PRELOAD": ":".join(filter(None, (lib, environ.get("LD_PRELOAD"))))}
    if "tcmalloc" in os.path.basename(lib):
        env["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = "1"
    return env


def reexec_for_training() -> None:
    """Replace this process by the same command with `training_env` added (``os.execve`` of ``sys.orig_argv``),
    once: a process started with LD_PRELOAD set is left alone (a launcher or the user chose), as is one where "none"
    is chosen. Call it first in a training CLI's `launch()`, before TensorFlow is imported."""
    if os.environ.get("LD_PRELOAD"):
        return
    try:
        env = training_env()
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not env:
        return
    log.debug("re-executing with %s", env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **env})

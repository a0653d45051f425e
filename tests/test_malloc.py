"""covidseg_tf.malloc: the training CLIs re-execute themselves once with tcmalloc (else jemalloc) preloaded."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covidseg_tf import malloc

REPO = Path(__file__).resolve().parents[1]
SHOW_ENV = ("from covidseg_tf.malloc import reexec_for_training; reexec_for_training(); import os; "
            "print(os.environ.get('LD_PRELOAD', '') + '|' + os.environ.get('TF_ONEDNN_USE_SYSTEM_ALLOCATOR', ''))")


def _run(code_or_args: str | list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc.CHOICE,
                                                             "TF_ONEDNN_USE_SYSTEM_ALLOCATOR")}
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                          timeout=120)


def test_training_env_prefers_tcmalloc_and_takes_tensorflows_tensors_from_it_only():
    assert malloc.training_env({"COVIDSEG_MALLOC": "none"}) == {}
    assert malloc.training_env({"COVIDSEG_MALLOC": "libjemalloc.so.2", "LD_PRELOAD": "a.so"}) == {
        "LD_PRELOAD": "libjemalloc.so.2:a.so"}  # jemalloc keeps TensorFlow's own pool (not measured faster)
    installed = [lib for name in malloc.PREFERRED if (lib := ctypes.util.find_library(name))]
    expected = {} if not installed else {"LD_PRELOAD": installed[0], **(
        {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"} if "tcmalloc" in installed[0] else {})}
    assert malloc.training_env({}) == expected


def test_a_named_library_that_does_not_exist_is_an_error_naming_it(tmp_path: Path):
    with pytest.raises(ValueError, match=f"COVIDSEG_MALLOC={tmp_path}/missing.so: no such file"):
        malloc.training_env({"COVIDSEG_MALLOC": str(tmp_path / "missing.so")})


@pytest.mark.parametrize("command", [["-m", "covidseg_tf.train", "--help"], ["-m", "covidseg_tf.demo", "--help"],
                                     ["-c", "from covidseg_tf.train import launch; launch()", "--help"],
                                     ["-c", "from covidseg_tf.demo import launch; launch()", "--help"]],
                         ids=["train", "demo", "covidseg-train", "covidseg-demo"])
def test_the_training_commands_restart_before_anything_else(tmp_path: Path, command: list[str]):
    """`python -m` and the console scripts (which call `launch`) go through the re-execution first: a missing
    library stops them with one line before argparse or TensorFlow."""
    proc = _run(command, COVIDSEG_MALLOC=str(tmp_path / "missing.so"))
    assert proc.returncode == 1 and proc.stderr.strip().endswith("missing.so: no such file (give auto, none or the "
                                                                 "path of a malloc library)"), proc.stderr[-500:]


def test_the_process_reexecutes_once_with_the_library_preloaded(tmp_path: Path):
    lib = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("jemalloc")
    if lib is None:  # the loader ignores a file it cannot preload (one warning line); the variables are still set
        lib = str(tmp_path / "libtcmalloc_stand_in.so")
        Path(lib).write_bytes(b"")
    proc = _run(SHOW_ENV, COVIDSEG_MALLOC=lib)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.strip() == f"{lib}|{'1' if 'tcmalloc' in lib else ''}"
    # chosen by the user or a launcher: left alone; "none": glibc's malloc
    assert _run(SHOW_ENV, LD_PRELOAD=lib).stdout.strip() == f"{lib}|"
    assert _run(SHOW_ENV, COVIDSEG_MALLOC="none").stdout.strip() == "|"

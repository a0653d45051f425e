"""The package turns TensorFlow's oneDNN kernels on (TF leaves them off on CPUs without AVX-512 VNNI/BF16 or AMX)
unless the user chose otherwise: checked in fresh processes, since TF reads the variable once, at its import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

PROBE = ("import covidseg_tf, tensorflow\n"
         "from tensorflow.python.util import _pywrap_util_port as p\n"
         "print('ONEDNN', int(p.IsMklEnabled()))\n")


def _onednn_in_fresh_process(value: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = value
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("ONEDNN "))
    return line.split()[1] == "1"


@pytest.mark.parametrize("value, expected", [(None, True), ("0", False), ("1", True)])
def test_import_sets_onednn_default_and_keeps_the_users_choice(value, expected):
    assert _onednn_in_fresh_process(value) is expected

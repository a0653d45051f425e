"""pyproject.toml's console scripts: one per CLI, each naming the entry `python -m covidseg_tf.<module>` runs and
returning an exit code (checked from the metadata: the package is not reinstalled)."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
CLIS = ("train", "evaluate", "tune", "predict", "batch_predict", "export", "ensemble", "serve_client", "demo",
        "viewer")


def _target(name: str):
    module, _, attr = SCRIPTS[name].partition(":")
    return importlib.import_module(module), attr


def test_one_console_script_per_cli():
    assert set(SCRIPTS) == {"covidseg-" + cli.replace("_", "-") for cli in CLIS}
    for cli in CLIS:
        assert SCRIPTS["covidseg-" + cli.replace("_", "-")].startswith(f"covidseg_tf.{cli}:")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_runs_the_module_entry_and_returns_an_exit_code(name: str):
    """A console script runs `sys.exit(f())`: f must return an int or None (a dict would exit 1 after printing
    it), and be the function the module's `__main__` block runs."""
    module, attr = _target(name)
    f = getattr(module, attr)
    assert callable(f)
    returns = typing.get_type_hints(f).get("return")
    assert returns in (int, type(None), typing.NoReturn), f"{SCRIPTS[name]} returns {returns}, not an exit code"
    main_block = inspect.getsource(module).split('if __name__ == "__main__":')[1]
    assert re.search(rf"\b{attr}\b", main_block), f"python -m {module.__name__} does not run {attr}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help_is_the_modules_help(name: str):
    """`<script> --help` through the entry as the generated script calls it exits 0 with `python -m`'s help."""
    module, attr = _target(name)
    script = (f"import sys; from {module.__name__} import {attr}; sys.argv[0] = {name!r}; "
              f"sys.exit({attr}())")
    via_script = subprocess.run([sys.executable, "-c", script, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
    assert via_script.returncode == 0, via_script.stderr[-2000:]
    assert via_script.stdout.startswith("usage: ")
    via_module = subprocess.run([sys.executable, "-m", module.__name__, "--help"], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
    assert via_module.returncode == 0
    assert via_script.stdout == via_module.stdout

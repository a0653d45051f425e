"""The training recipes preload jemalloc when it is installed (recipes/jemalloc.sh; issue 26)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINING_RECIPES = sorted((REPO / "recipes").glob("train_v*.sh"))


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: p.name)
def test_training_recipes_source_jemalloc(recipe: Path):
    lines = recipe.read_text().splitlines()
    sourced = [i for i, line in enumerate(lines) if line.startswith("source recipes/jemalloc.sh")]
    first_python = next(i for i, line in enumerate(lines) if "python " in line)
    assert sourced and sourced[0] < first_python, f"{recipe.name} does not source recipes/jemalloc.sh before Python"


def _ld_preload(env: dict[str, str]) -> str:
    out = subprocess.run(["bash", "-c", 'set -euo pipefail; source recipes/jemalloc.sh; echo "${LD_PRELOAD:-}"'],
                         cwd=REPO, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_jemalloc_is_preloaded_when_present(tmp_path: Path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    assert _ld_preload({"JEMALLOC": str(lib)}) == str(lib)
    assert _ld_preload({"JEMALLOC": str(lib), "LD_PRELOAD": "/other.so"}) == f"{lib}:/other.so"
    assert _ld_preload({"JEMALLOC": "none"}) == ""
    assert _ld_preload({"JEMALLOC": str(tmp_path / "missing.so")}) == ""  # a warning, and glibc's malloc

"""Following the README from the repository root leaves `git status` clean and the shipped models the defaults.

Every output folder a README command names (--out, --output, --export-dir, --workdir, --data_dir/--data-dir) must
be git-ignored when it lies inside the repository and must never be saved_models/; commands that do not name one
write to defaults that are checked the same way. predict's and evaluate's default models are the committed
version folders.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from covidseg_tf import demo, evaluate, predict, train
from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL, SAVED_MODELS

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FLAGS = ("--out", "--output", "--export-dir", "--workdir", "--data_dir", "--data-dir")


def readme_commands() -> list[list[str]]:
    """The `python -m covidseg_tf.*` / `tfds build` commands of the README's bash blocks, as argv lists."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                argv = shlex.split(part)
                if argv[:2] == ["python", "-m"] and argv[2].startswith("covidseg_tf") or argv[:2] == ["tfds", "build"]:
                    commands.append(argv)
    return commands


def git_ignored(path: Path) -> bool:
    probe = path / "probe.file"
    return subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO).returncode == 0


def output_dirs(argv: list[str]) -> list[str]:
    """The folders a command writes into: those it names, else its parser's defaults."""
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS]
    if named or argv[:2] == ["tfds", "build"]:
        return named
    module = argv[2].rsplit(".", 1)[-1]
    parser = {"train": train.build_parser, "evaluate": evaluate.build_parser, "demo": demo.build_parser}.get(module)
    if parser is None:
        return []
    defaults = parser().parse_known_args(["--stage", "lung"] if module == "train" else [])[0]
    return [str(getattr(defaults, "output", None) or "runs/lung") if module == "train" else
            str(getattr(defaults, "out", None) or defaults.workdir)]


def test_readme_has_the_commands_this_test_reads():
    modules = {argv[2] for argv in readme_commands() if argv[0] == "python"}
    assert {"covidseg_tf.train", "covidseg_tf.evaluate", "covidseg_tf.predict", "covidseg_tf.export",
            "covidseg_tf.demo"} <= modules, modules


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a[:4]))
def test_readme_command_writes_only_to_ignored_folders(argv):
    for out in output_dirs(argv):
        if out.startswith(("~", "/", "$")) or "://" in out:
            continue  # outside the repository (home, absolute, a variable or a bucket URL)
        path = (REPO / out).resolve()
        assert SAVED_MODELS != path and SAVED_MODELS not in path.parents, f"{' '.join(argv)} writes into saved_models/"
        assert git_ignored(path), f"{' '.join(argv)} writes into {out}, which git does not ignore"


def test_training_exports_into_its_run_folder_by_default():
    args = train.build_parser().parse_args(["--stage", "lung", "--output", "runs/x"])
    assert args.export_dir is None  # train.run exports to <output>/saved_models then (tests/test_train.py runs it)


def test_predict_and_evaluate_default_to_the_committed_shipped_versions():
    for parser in (predict.build_parser, evaluate.build_parser):
        args = parser().parse_known_args(["x.png", "--out", "o"] if parser is predict.build_parser else [])[0]
        assert (Path(args.lung_model), Path(args.infection_model)) == (DEFAULT_LUNG_MODEL, DEFAULT_INFECTION_MODEL)
    for model in (DEFAULT_LUNG_MODEL, DEFAULT_INFECTION_MODEL):
        pb = (model / "saved_model.pb").relative_to(REPO)
        assert subprocess.run(["git", "ls-files", "--error-unmatch", str(pb)], cwd=REPO,
                              capture_output=True).returncode == 0, f"{pb} is not committed"

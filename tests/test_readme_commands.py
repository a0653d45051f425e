"""The commands of README.md and docs/*.md exist as written, and following them leaves `git status` clean.

Every command of a page's bash blocks (and every inline `python -m covidseg_tf...` span) is read as an argv list:
`python -m covidseg_tf.X` / `python -m tfds_covidqu.X`, the console scripts `covidseg-*`, `tfds build`, and
`python bench/X.py` / `bash bench|recipes/X.sh`. Each module's parser knows every `--flag` a command gives it
(batch_predict hands the rest to Beam, whose options must know them); each script exists and names its flags.
Every output folder a command names (--out, --output, --export-dir, --workdir, --data_dir/--data-dir) must be
git-ignored when it lies inside the repository and must never be saved_models/; commands that do not name one
write to defaults that are checked the same way. The pages' relative links, the code they name and the console
scripts they mention exist. predict's and evaluate's default models are the committed version folders.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from covidseg_tf import demo, evaluate, predict, train
from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL, SAVED_MODELS

REPO = Path(__file__).resolve().parents[1]
DOC_PAGES = ("training", "evaluation", "prediction", "serving", "batch", "performance", "viewer")
PAGES = [REPO / "README.md", *(REPO / "docs" / f"{name}.md" for name in DOC_PAGES)]
OUTPUT_FLAGS = ("--out", "--output", "--export-dir", "--workdir", "--data_dir", "--data-dir")
SCRIPT_PREFIX = "covidseg-"
PROJECT_NAME = "covidseg-tf"  # the project, not a console script


def page_name(page: Path) -> str:
    return str(page.relative_to(REPO))


def as_module_argv(argv: list[str]) -> list[str]:
    """A console script `covidseg-batch-predict ...` as the `python -m covidseg_tf.batch_predict ...` it stands for."""
    if argv and argv[0].startswith(SCRIPT_PREFIX):
        return ["python", "-m", "covidseg_tf." + argv[0][len(SCRIPT_PREFIX):].replace("-", "_"), *argv[1:]]
    return argv


def is_checked_command(argv: list[str]) -> bool:
    if argv[:2] == ["python", "-m"] and len(argv) > 2:  # not a placeholder such as covidseg_tf.<module>
        return bool(re.fullmatch(r"(covidseg_tf|tfds_covidqu)(\.\w+)+", argv[2]))
    if argv[:1] == ["python"] and len(argv) > 1:
        return argv[1].startswith("bench/")
    if argv[:1] == ["bash"] and len(argv) > 1:
        return argv[1].startswith(("bench/", "recipes/"))
    return argv[:2] == ["tfds", "build"] or bool(argv) and argv[0].startswith(SCRIPT_PREFIX)


def page_commands(page: Path) -> list[list[str]]:
    """The commands of a page's bash blocks and inline `python -m covidseg_tf...` spans, as argv lists."""
    text = page.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`(python -m (?:covidseg_tf|tfds_covidqu)\.[^`]*)`", outside.replace("\n", " "))
    commands = []
    for line in lines:
        line = line.split(" #")[0].strip()
        for part in line.split("&&"):
            argv = shlex.split(part)
            if is_checked_command(argv):
                commands.append(argv)
    return commands


def all_commands() -> list[tuple[str, list[str]]]:
    return [(page_name(page), argv) for page in PAGES if page.exists() for argv in page_commands(page)]


def command_id(item: tuple[str, list[str]]) -> str:
    page, argv = item
    return f"{page}: {' '.join(argv[:4])}"


def git_ignored(path: Path) -> bool:
    probe = path / "probe.file"
    return subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO).returncode == 0


def output_dirs(argv: list[str]) -> list[str]:
    """The folders a command writes into: those it names, else its parser's defaults."""
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS]
    if named or argv[:2] == ["tfds", "build"] or argv[:2] != ["python", "-m"]:
        return named
    module = argv[2].rsplit(".", 1)[-1]
    parser = {"train": train.build_parser, "evaluate": evaluate.build_parser, "demo": demo.build_parser}.get(module)
    if parser is None or not argv[2].startswith("covidseg_tf."):
        return []
    defaults = parser().parse_known_args(["--stage", "lung"] if module == "train" else [])[0]
    return [str(getattr(defaults, "output", None) or "runs/lung") if module == "train" else
            str(getattr(defaults, "out", None) or defaults.workdir)]


class _Captured(BaseException):
    """Raised instead of parsing, carrying the parser a CLI's main() built (a BaseException: no `except
    Exception` in a main() swallows it)."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def cli_parser(module_name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser `python -m <module_name>` parses its command line with, taken from its main()."""
    module = importlib.import_module(module_name)

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        try:
            module.main([])
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{module_name}.main() parsed no command line with argparse")


def beam_option_strings() -> set[str]:
    """Every flag Beam's PipelineOptions know (the options batch_predict hands on)."""
    from apache_beam.options import pipeline_options

    parser = argparse.ArgumentParser(allow_abbrev=False)
    for options in pipeline_options.PipelineOptions.__subclasses__():
        try:
            options._add_argparse_args(parser)
        except argparse.ArgumentError:
            pass  # a flag two option classes share: it is known either way
    return set(parser._option_string_actions)


def given_flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def test_readme_has_the_commands_this_test_reads():
    modules = {as_module_argv(argv)[2] for argv in page_commands(REPO / "README.md") if argv[0] != "tfds"}
    assert {"covidseg_tf.train", "covidseg_tf.evaluate", "covidseg_tf.predict", "covidseg_tf.export",
            "covidseg_tf.demo", "covidseg_tf.serve_client", "covidseg_tf.batch_predict"} <= modules, modules


def test_every_docs_page_exists_and_has_commands():
    for page in PAGES[1:]:
        assert page.exists(), f"{page_name(page)} is missing"
        assert page_commands(page), f"{page_name(page)} has no command this test reads"
    modules = {argv[2] for _, argv in all_commands() if argv[:2] == ["python", "-m"]}
    assert {"covidseg_tf.train", "covidseg_tf.tune", "covidseg_tf.evaluate", "covidseg_tf.predict",
            "covidseg_tf.export", "covidseg_tf.serve_client", "covidseg_tf.batch_predict",
            "tfds_covidqu.audit"} <= modules, modules


@pytest.mark.parametrize("item", all_commands(), ids=command_id)
def test_command_writes_only_to_ignored_folders(item):
    page, argv = item
    argv = as_module_argv(argv)
    for out in output_dirs(argv):
        if out.startswith(("~", "/", "$")) or "://" in out:
            continue  # outside the repository (home, absolute, a variable or a bucket URL)
        path = (REPO / out).resolve()
        assert SAVED_MODELS != path and SAVED_MODELS not in path.parents, \
            f"{page}: {' '.join(argv)} writes into saved_models/"
        assert git_ignored(path), f"{page}: {' '.join(argv)} writes into {out}, which git does not ignore"


@pytest.mark.parametrize("item", [(p, a) for p, a in all_commands() if a[:2] != ["tfds", "build"]], ids=command_id)
def test_command_and_its_flags_exist(item, monkeypatch):
    page, argv = item
    argv = as_module_argv(argv)
    flags = given_flags(argv)
    if argv[:2] == ["python", "-m"]:
        known = set(cli_parser(argv[2], monkeypatch)._option_string_actions)
        unknown = [f for f in flags if f not in known]
        if argv[2] == "covidseg_tf.batch_predict":  # its other flags are Beam pipeline options
            unknown = [f for f in unknown if f not in beam_option_strings()]
        assert not unknown, f"{page}: {argv[2]} has no flag {', '.join(unknown)}"
    else:
        script = REPO / argv[1]
        assert script.is_file(), f"{page}: {argv[1]} does not exist"
        source = script.read_text() + (REPO / "bench" / "common.py").read_text()
        missing = [f for f in flags if f not in source]
        assert not missing, f"{page}: {argv[1]} names no flag {', '.join(missing)}"


def test_console_scripts_the_pages_name_are_declared():
    named = {m for page in PAGES for m in re.findall(r"\bcovidseg-[a-z][a-z-]*[a-z]\b", page.read_text())}
    named.discard(PROJECT_NAME)
    assert named, "the pages name no console script"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})
    for name in sorted(named):
        module = as_module_argv([name])[2]
        target, _, attr = scripts.get(name, "").partition(":")
        assert target == module, f"pyproject.toml declares {name} as {scripts.get(name)!r}, not {module}:<entry>"
        assert callable(getattr(importlib.import_module(module), attr, None)), f"{module} has no {attr}()"


def code_references(text: str) -> set[str]:
    """The package paths (`covidseg_tf/x.py`, `covidseg_tf/inference/`) and dotted names (`covidseg_tf.x.Y`)
    inside the code spans of a page."""
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    refs = set()
    for span in spans:
        refs |= set(re.findall(r"\b(?:covidseg_tf|tfds_covidqu)(?:/[\w.]+)+/?|\b(?:covidseg_tf|tfds_covidqu)(?:\.\w+)+",
                               span))
    return refs


def resolves(ref: str) -> bool:
    if "/" in ref:
        return (REPO / ref).exists()
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_the_code_a_page_names_exists(page):
    missing = sorted(ref for ref in code_references(page.read_text()) if not resolves(ref))
    assert not missing, f"{page_name(page)} names code that does not exist: {missing}"


def module_map_paths() -> set[Path]:
    """The files and folders README's module map names: repository paths, or paths inside covidseg_tf/."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    paths = set()
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.M):
        for span in re.findall(r"`([^`]+)`", row):
            paths.add(REPO / span if (REPO / span.split("/")[0]).exists() else REPO / "covidseg_tf" / span)
    return paths


def test_the_module_map_names_every_module_and_only_modules_that_exist():
    listed = module_map_paths()
    missing = sorted(str(p.relative_to(REPO)) for p in listed if not p.exists())
    assert not missing, f"README's module map lists {missing}, which do not exist"
    modules = {p for p in (REPO / "covidseg_tf").rglob("*.py") if p.name != "__init__.py"}
    unlisted = sorted(str(p.relative_to(REPO)) for p in modules if p not in listed)
    assert not unlisted, f"README's module map does not list {unlisted}"


def heading_anchors(page: Path) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page_name(page)} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in heading_anchors(file), f"{page_name(page)} links to {target}: no such heading"


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

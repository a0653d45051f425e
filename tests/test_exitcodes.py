"""The command-line tools' exit codes (covidseg_tf.exitcodes): a Ctrl-C is one line and exit 130 in every tool, a
model that cannot be loaded is a usage error (2) in every tool that takes one, and each --help lists the codes.

Every case runs the tool's real ``python -m`` entry (`runpy`, ``__main__``) in ONE fresh process (TensorFlow is
imported once): a function the tool calls once its flags are parsed is patched to raise KeyboardInterrupt, as a
Ctrl-C in the middle of the work does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from covidseg_tf import exitcodes

REPO = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import contextlib, importlib, io, json, logging, runpy, sys, warnings
    warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (a module run twice)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    results = {}
    for name, module, argv, target in json.loads(sys.argv[1]):
        undo = None
        if target:
            owner_name, attr = target.rsplit(".", 1)
            try:
                owner = importlib.import_module(owner_name)
            except ImportError:  # a class attribute: module.Class.attr
                mod_name, cls = owner_name.rsplit(".", 1)
                owner = getattr(importlib.import_module(mod_name), cls)
            undo = (owner, attr, getattr(owner, attr))
            setattr(owner, attr, interrupt)
        err = io.StringIO()
        logging.root.handlers.clear()  # each tool's logging.basicConfig writes to this case's stderr
        sys.argv = [module, *argv]
        code = 0
        with contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException as e:
                code = f"escaped {type(e).__name__}"
        if undo:
            setattr(*undo)
        results[name] = {"code": code, "stderr": err.getvalue()}
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("exitcodes")
    from PIL import Image

    Image.new("L", (64, 64), 90).save(tmp / "x.png")
    missing = str(tmp / "missing.keras")
    models = ["--lung-model", missing, "--infection-model", missing]
    cases = [  # name, module, argv, what raises KeyboardInterrupt (None: run as given)
        ("predict_ctrl_c", "covidseg_tf.predict", [str(tmp / "x.png"), "--out", str(tmp / "p")],
         "covidseg_tf.imageio.find_images"),
        ("batch_predict_ctrl_c", "covidseg_tf.batch_predict", [str(tmp / "x.png"), "--output", str(tmp / "b")],
         "covidseg_tf.batch_predict.run"),
        ("serve_client_ctrl_c", "covidseg_tf.serve_client", [str(tmp / "x.png"), "--out", str(tmp / "s")],
         "urllib.request.urlopen"),
        ("train_ctrl_c", "covidseg_tf.train", ["--stage", "lung", "--encoder-weights", "none", "--output",
                                               str(tmp / "t")], "covidseg_tf.models.choose_encoder_weights"),
        ("export_ctrl_c", "covidseg_tf.export", [*models, "--out", str(tmp / "e")],
         "covidseg_tf.inference.stages.load_stage"),
        ("evaluate_ctrl_c", "covidseg_tf.evaluate", ["--out", str(tmp / "v")],
         "covidseg_tf.inference.predictor.Predictor.load"),
        ("tune_ctrl_c", "covidseg_tf.tune", ["--out", str(tmp / "u.json")],
         "covidseg_tf.inference.predictor.Predictor.load"),
        ("demo_ctrl_c", "covidseg_tf.demo", ["--workdir", str(tmp / "d")], "covidseg_tf.data.load_builder"),
        ("ensemble_ctrl_c", "covidseg_tf.ensemble", ["--members", missing, missing, "--out", str(tmp / "n.keras")],
         "covidseg_tf.inference.stages.load_stage"),
        ("predict_model", "covidseg_tf.predict", [str(tmp / "x.png"), "--out", str(tmp / "p2"), *models], None),
        ("batch_predict_model", "covidseg_tf.batch_predict", [str(tmp / "x.png"), "--output", str(tmp / "b2"),
                                                              *models], None),
        ("export_model", "covidseg_tf.export", [*models, "--out", str(tmp / "e2")], None),
        ("evaluate_model", "covidseg_tf.evaluate", [*models, "--out", str(tmp / "v2")], None),
        ("tune_model", "covidseg_tf.tune", [*models, "--out", str(tmp / "u2.json")], None),
        ("train_model", "covidseg_tf.train", ["--stage", "infection", "--lung-model", missing, "--output",
                                              str(tmp / "t2")], None),
    ]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert line, proc.stderr[-3000:]
    return json.loads(line[-1][len("RESULTS "):])


TOOLS = ["predict", "batch_predict", "serve_client", "train", "export", "evaluate", "tune", "demo", "ensemble"]


@pytest.mark.parametrize("tool", TOOLS)
def test_ctrl_c_is_one_line_and_exit_130(outcomes, tool):
    """Issue 23: a Ctrl-C printed a KeyboardInterrupt traceback; now one line naming the tool, exit 130."""
    result = outcomes[f"{tool}_ctrl_c"]
    assert result["code"] == exitcodes.INTERRUPTED == 130, result
    assert "Traceback" not in result["stderr"] and "KeyboardInterrupt" not in result["stderr"], result["stderr"]
    lines = [ln for ln in result["stderr"].splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"python -m covidseg_tf.{tool}: interrupted (Ctrl-C)"), result


@pytest.mark.parametrize("tool", ["predict", "batch_predict", "export", "evaluate", "tune", "train"])
def test_a_model_that_cannot_be_loaded_is_a_usage_error_everywhere(outcomes, tool):
    result = outcomes[f"{tool}_model"]
    assert result["code"] == exitcodes.USAGE == 2, result
    assert "missing.keras" in result["stderr"] and "Traceback" not in result["stderr"], result["stderr"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_lists_the_exit_codes(tool, capsys):
    from importlib import import_module

    module = import_module(f"covidseg_tf.{tool}")
    if hasattr(module, "build_parser"):
        text = module.build_parser().format_help()
    else:  # export and serve_client build their parser inside parse_args
        with pytest.raises(SystemExit) as e:
            module.parse_args(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
    assert "130 interrupted" in text and "exit" in text, text[-600:]

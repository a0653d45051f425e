"""Version numbering and atomic writes of `covidseg_tf.export`, plus its command line (one tiny export)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from covidseg_tf import exitcodes, export

REPO = Path(__file__).resolve().parents[1]


def test_next_version_ignores_non_integer_names(tmp_path):
    assert export.next_version_dir(tmp_path / "missing") == 1
    for name in ("1", "3", "7abc", ".tmp-x", "10.bak"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version folder")
    assert export.next_version_dir(tmp_path) == 4


def test_write_version_never_overwrites(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "keep").write_text("old")

    def writer(d: Path) -> None:
        (d / "saved_model.pb").write_text("new")

    assert export.write_version(tmp_path, writer) == tmp_path / "2"
    assert export.write_version(tmp_path, writer) == tmp_path / "3"
    assert (tmp_path / "1" / "keep").read_text() == "old"
    assert (tmp_path / "3" / "saved_model.pb").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3"]  # no temporary folder left


def test_write_version_skips_a_number_taken_meanwhile(tmp_path, monkeypatch):
    """If another writer claims the number between the scan and the rename, the next number is used."""
    real = export.next_version_dir
    calls = {"n": 0}

    def racing(base: Path) -> int:
        calls["n"] += 1
        if calls["n"] == 1:  # someone else publishes version 1 right after our scan
            (Path(base) / "1").mkdir()
            (Path(base) / "1" / "saved_model.pb").write_text("theirs")
            return 1
        return real(base)

    monkeypatch.setattr(export, "next_version_dir", racing)
    path = export.write_version(tmp_path, lambda d: (d / "saved_model.pb").write_text("ours"))
    assert path == tmp_path / "2" and path.joinpath("saved_model.pb").read_text() == "ours"
    assert (tmp_path / "1" / "saved_model.pb").read_text() == "theirs"


def test_write_version_failure_leaves_nothing(tmp_path):
    def broken(d: Path) -> None:
        (d / "partial").write_text("x")
        raise RuntimeError("export failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        export.write_version(tmp_path, broken)
    assert list(tmp_path.iterdir()) == []


def test_temp_dir_is_beside_the_versions(tmp_path):
    seen = {}
    export.write_version(tmp_path, lambda d: seen.setdefault("tmp", d))
    assert seen["tmp"].parent == tmp_path and seen["tmp"].name.startswith(".tmp")


def test_export_stage_rejects_wrong_models():
    import keras

    free = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    with pytest.raises(ValueError, match="free input size"):
        export.export_stage(free, "lung", "/nonexistent")
    with pytest.raises(ValueError, match="multiple of 32"):
        export.export_stage(free, "lung", "/nonexistent", image_size=50)
    four = keras.Sequential([keras.Input((32, 32, 4)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    with pytest.raises(ValueError, match="3 input channels"):
        export.export_stage(four, "lung", "/nonexistent")
    with pytest.raises(ValueError, match="stage must be"):
        export.export_stage(four, "cascade", "/nonexistent")
    with pytest.raises(ValueError, match="takes 32 px, not an image size of 64"):
        export.export_stage(four, "infection", "/nonexistent", image_size=64)


def test_free_size_model_exports_at_the_given_size(tmp_path):
    """A model built with a (None, None) input is served at `image_size` (tiny stand-in model: fast export)."""
    import keras
    import numpy as np
    import tensorflow as tf

    free = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(1, 3, padding="same",
                                                                                activation="sigmoid")])
    path = export.export_stage(free, "lung", tmp_path, image_size=32, warmup=False)
    fn = tf.saved_model.load(str(path)).signatures["predict_pixels"]
    assert fn.structured_input_signature[1]["pixels"].shape.as_list() == [None, 32, 32, 3]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    assert np.max(np.abs(fn(pixels=x)["lung_prob"].numpy() - free(x).numpy())) <= 1e-5


def test_cli_help_shows_examples_and_defaults():
    proc = subprocess.run([sys.executable, "-m", "covidseg_tf.export", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0
    assert "--lung-model" in proc.stdout and "examples:" in proc.stdout and "default: saved_models" in proc.stdout


def test_cli_missing_model_file_is_a_clear_error(tmp_path, caplog):
    code = export.main(["--lung-model", str(tmp_path / "nope.keras"), "--infection-model",
                        str(tmp_path / "nope2.keras"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "nope.keras" in caplog.text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_cli_out_that_is_a_file_is_a_usage_error_before_the_models_load(tmp_path, monkeypatch, capsys, where):
    """Issue 23: `export --out FILE` ended in NotADirectoryError after the models were loaded and frozen (18 s);
    now one `error:` line naming --out, exit 2, before any model is read."""
    from covidseg_tf.inference import stages

    def no_load(*args, **kwargs):
        raise AssertionError("models loaded")

    monkeypatch.setattr(stages, "load_stage", no_load)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" if where == "a_file" else tmp_path / "file" / "models"
    code = export.main(["--lung-model", str(tmp_path / "l.keras"), "--infection-model", str(tmp_path / "i.keras"),
                        "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"python -m covidseg_tf.export: error: --out {out}: "), err
    assert "is a file, not a folder" in lines[0] and "models loaded" not in err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_cli_refuses_a_saved_model_folder(tmp_path, caplog):
    (tmp_path / "lung" / "1").mkdir(parents=True)
    code = export.main(["--lung-model", str(tmp_path / "lung"), "--infection-model", str(tmp_path / "i.keras"),
                        "--out", str(tmp_path / "out")])
    assert code == 2
    assert "export takes the .keras file" in caplog.text and not (tmp_path / "out").exists()


def test_cli_exports_next_version_from_keras_files(tmp_path):
    """`python -m covidseg_tf.export` from .keras files: writes the next free version of the chosen servable."""
    from covidseg_tf.models import build_unet

    lung = build_unet("efficientnetb0", (64, 64, 3), encoder_weights=None)
    inf = build_unet("efficientnetb0", (64, 64, 4), encoder_weights=None)
    lung.save(tmp_path / "lung.keras")
    inf.save(tmp_path / "infection.keras")
    out = tmp_path / "saved_models"
    (out / "lung" / "1").mkdir(parents=True)
    (out / "lung" / "1" / "saved_model.pb").write_text("an older version")
    code = export.main(["--lung-model", str(tmp_path / "lung.keras"), "--infection-model",
                        str(tmp_path / "infection.keras"), "--out", str(out), "--only", "lung", "--no-warmup"])
    assert code == 0
    assert (out / "lung" / "1" / "saved_model.pb").read_text() == "an older version"
    assert (out / "lung" / "2" / "saved_model.pb").stat().st_size > 1000
    assert (out / "lung" / "2" / "assets.extra" / "covidseg_export.json").is_file()
    assert not (out / "lung" / "2" / "assets.extra" / "tf_serving_warmup_requests").exists()
    assert not (out / "cascade").exists() and not (out / "infection").exists()


def test_models_config_lists_the_three_servables():
    import re

    text = (REPO / "saved_models" / "models.config").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    found = re.findall(r'name:\s*"(\w+)"\s*base_path:\s*"([^"]+)"\s*model_platform:\s*"tensorflow"', body)
    assert found == [(name, f"/models/{name}") for name in export.SERVABLES]
    assert body.count("{") == body.count("}") == 4


def test_models_config_parses_with_tensorflow_serving_protos():
    """With TF Serving's own protos: tensorflow-serving-api, which the README's test command and .ci/run install
    with --no-deps (skipped where it is not installed)."""
    config_pb2 = pytest.importorskip("tensorflow_serving.config.model_server_config_pb2")
    from google.protobuf import text_format

    config = text_format.Parse((REPO / "saved_models" / "models.config").read_text(), config_pb2.ModelServerConfig())
    assert [(c.name, c.base_path) for c in config.model_config_list.config] == [
        (name, f"/models/{name}") for name in export.SERVABLES]


def test_help_keeps_example_lines_and_states_each_default_once(capsys):
    """Reproduction: `export --help` ran its examples into one paragraph and printed "(default: ...) (default:
    None)"."""
    with pytest.raises(SystemExit) as e:
        export.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[lines.index("examples:") + 1:] == [
        "  python -m covidseg_tf.export --lung-model runs/lung/model.keras \\",
        "      --infection-model runs/infection/model.keras --out saved_models/",
        "  python -m covidseg_tf.export --lung-model L.keras --infection-model I.keras --only cascade",
        "  python -m covidseg_tf.export --lung-model L.keras --infection-model I.keras --tflite   # + stage.tflite",
        "  python -m covidseg_tf.export --lung-model L.keras --infection-model I.keras --tflite int8 \\",
        "      --calibration-dir train_pngs/   # Stage 1 int8, Stage 2 float32 stage.tflite",
        "  python -m covidseg_tf.export --from saved_models --out saved_models_fp32   # shipped bf16 -> fp32",
        "  python -m covidseg_tf.predict --lung-model saved_models/lung/5/stage.tflite \\",
        "      --infection-model saved_models/infection/5 xray.png   # int8 Stage 1, bf16 Stage 2",
        "then serve them:",
        "  docker run -p 8501:8501 -v $PWD/saved_models:/models tensorflow/serving "
        "--model_config_file=/models/models.config",
        "refused (exit 2, nothing written): a model that is not a .keras file, an --out that is a file or cannot be "
        "written, a bad --decision file, a --calibration-dir that is missing, holds no image or an unreadable one, a "
        "--from folder that holds no servable or one that is not bf16",
        exitcodes.EPILOG,
    ]
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and ") (default:" not in flat
    for default in ("(default: saved_models)", "(default: lung infection cascade)", "(default: fp32)",
                    "(default: lung:", "(default: 64)"):
        assert flat.count(default) == 1, default

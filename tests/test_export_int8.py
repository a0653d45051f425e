"""`export --tflite int8`: the int8 TFLite export target (issue 26). By default Stage 1 is written in int8 and Stage 2
in float32 (the set that passes bench/int8_gate.py's accuracy gate), calibrated on the X-ray files of
--calibration-dir; the manifest records each stage.tflite's precision, and `Predictor.load` / predict run them.

Tiny stage models (1x1 convolutions, 64 px) and phantom chest images keep each export to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import conv_cascade, normalized_conv_stage, phantom
from PIL import Image

from covidseg_tf import export, predict
from covidseg_tf.inference import ExportManifest, Predictor, load_stage
from covidseg_tf.inference.stages import EXPORT_INFO, TFLITE_FILE, TFLiteExport, TFLiteStage

SIZE = 64
CALIBRATION = 4  # of the 9 phantoms in the calibration folder: every 2nd


def normalized_lung_stage() -> keras.Model:
    """A Stage-1 model with the encoder's input preprocessing (Rescaling 1/255, then Normalization), which int8
    keeps in float32, and a 1x1 convolution computing `conv_cascade`'s lung rule: grey < 100 is lung
    (sigmoid(-0.1 (grey - 100)))."""
    model, conv, mean, variance = normalized_conv_stage(SIZE, 3, "lung_norm")
    std = np.sqrt(variance)
    conv.set_weights([(-0.1 / 3 * 255 * std).astype(np.float32).reshape(1, 1, 3, 1),
                      np.array([10.0 - 0.1 / 3 * 255 * mean.sum()], np.float32)])
    return model


def write_pngs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` phantom chest images of assorted sizes as 8-bit grey PNGs in `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"xray_{i:02d}.png"
        Image.fromarray(phantom(80 + 8 * i, 72 + 4 * i, seed + i)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two stage models as .keras files: the lung stage with input preprocessing, `conv_cascade`'s infection."""
    tmp = tmp_path_factory.mktemp("int8_models")
    paths = {"lung": tmp / "lung.keras", "infection": tmp / "infection.keras"}
    normalized_lung_stage().save(paths["lung"])
    conv_cascade(SIZE)[1].save(paths["infection"])
    return paths


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    write_pngs(folder / "covid", 5)
    write_pngs(folder / "normal", 4, seed=10)
    (folder / "README.txt").write_text("not an image: skipped")
    return folder


@pytest.fixture(scope="module")
def exported(models, calibration_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`export --tflite int8` with the default --int8-stages (lung) and a recorded decision."""
    out = tmp_path_factory.mktemp("int8_export") / "saved_models"
    code = export.main(["--lung-model", str(models["lung"]), "--infection-model", str(models["infection"]),
                        "--out", str(out), "--only", "lung", "infection", "--tflite", "int8",
                        "--calibration-dir", str(calibration_dir), "--calibration-images", str(CALIBRATION),
                        "--no-warmup", "--min-infection-percent", "5"])
    assert code == 0
    return {"out": out, "lung": out / "lung" / "1", "infection": out / "infection" / "1"}


@pytest.fixture(scope="module")
def greys() -> list[np.ndarray]:
    return [phantom(90, 70, 20), phantom(64, 128, 21)]


def test_calibration_files_take_every_kth_sorted_file(calibration_dir):
    chosen = export.calibration_files(calibration_dir, CALIBRATION)
    every = sorted(calibration_dir.rglob("*.png"))
    assert len(every) == 9 and chosen == every[::2][:CALIBRATION]
    assert export.calibration_files(calibration_dir, 100) == every  # fewer files than asked: all of them
    both = [calibration_dir / "normal", calibration_dir / "covid", calibration_dir / "covid"]  # several folders
    assert export.calibration_files(both, 3) == [every[0], every[3], every[6]]
    pixels = export.read_calibration(chosen[:2], SIZE)
    assert pixels.shape == (2, SIZE, SIZE, 3) and pixels.dtype == np.float32
    gray = np.asarray(Image.open(chosen[0]))
    predictor = Predictor(*conv_cascade(SIZE))  # the predictor's own model pixels: the same preprocessing
    np.testing.assert_array_equal(pixels[0], predictor.model_pixels(gray).numpy())


def test_int8_lung_and_float32_infection_tflite_are_written_and_recorded(exported):
    lung, infection = (TFLiteStage(exported[s] / TFLITE_FILE, threads=1) for s in ("lung", "infection"))
    assert (lung.precision, infection.precision) == ("int8", "fp32")  # int8 tensors in the lung file, none in the other
    assert lung.stage == "lung" and infection.stage == "infection"
    for stage in ("lung", "infection"):
        assert (exported[stage] / "saved_model.pb").is_file()
    raw = {s: json.loads((exported[s] / EXPORT_INFO).read_text())["tflite"] for s in ("lung", "infection")}
    assert raw["lung"] == {"file": TFLITE_FILE, "precision": "int8",
                           "bytes": (exported["lung"] / TFLITE_FILE).stat().st_size,
                           "calibration_images": CALIBRATION, "float_layers": ["rescaling", "normalization"]}
    assert raw["infection"] == {"file": TFLITE_FILE, "precision": "fp32",
                                "bytes": (exported["infection"] / TFLITE_FILE).stat().st_size}
    manifest = ExportManifest.read(exported["lung"])
    assert isinstance(manifest.tflite, TFLiteExport) and manifest.tflite.calibration_images == CALIBRATION
    assert manifest.precision == "fp32"  # the SavedModel's own precision is unchanged
    assert not (exported["out"] / "cascade").exists()


def test_predictor_loads_the_int8_tflite_and_predicts_like_the_saved_models(exported, greys):
    tflite = Predictor.load(exported["lung"] / TFLITE_FILE, exported["infection"] / TFLITE_FILE)
    saved = Predictor.load(exported["lung"], exported["infection"])
    assert isinstance(tflite.lung_model, TFLiteStage) and tflite.lung_model.precision == "int8"
    assert load_stage(exported["lung"] / TFLITE_FILE, stage="lung").format == "tflite"
    assert tflite.decision == saved.decision and tflite.decision.min_infection_percent == 5  # the recorded one
    a, b = tflite.predict(greys), saved.predict(greys)
    assert [p.lung.shape for p in a] == [p.infection.shape for p in a] == [g.shape for g in greys]
    for p, q in zip(a, b):
        assert p.assessed and p.lung.any() and p.infection.any()
        assert (p.lung != q.lung).mean() < 0.01 and (p.infection != q.infection).mean() < 0.01
        assert p.severity_total == pytest.approx(q.severity_total, abs=1.0)


def test_predict_json_reports_each_stage_file_format_and_precision(exported, greys, tmp_path):
    Image.fromarray(greys[0]).save(tmp_path / "xray.png")
    code = predict.main([str(tmp_path / "xray.png"), "--out", str(tmp_path / "preds"), "--quiet",
                         "--lung-model", str(exported["lung"] / TFLITE_FILE),
                         "--infection-model", str(exported["infection"] / TFLITE_FILE)])
    assert code == 0
    models = json.loads((tmp_path / "preds" / "xray.json").read_text())["models"]
    assert (models["lung"]["format"], models["lung"]["precision"]) == ("tflite", "int8")
    assert (models["infection"]["format"], models["infection"]["precision"]) == ("tflite", "fp32")


def test_int8_infection_calibrates_on_images_with_their_stage1_masks(models, calibration_dir, tmp_path, monkeypatch):
    """--int8-stages infection: Stage 2 calibrates on `optimize.calibration_pixels` of the Stage-1 model under the
    exported decision (its lung threshold here 0.4)."""
    calls = []
    real = export.calibration_pixels

    def spy(lung_model, pixels, decision):
        calls.append((lung_model.name, np.shape(pixels), decision))
        return real(lung_model, pixels, decision)

    monkeypatch.setattr(export, "calibration_pixels", spy)
    out = tmp_path / "saved_models"
    code = export.main(["--lung-model", str(models["lung"]), "--infection-model", str(models["infection"]),
                        "--out", str(out), "--only", "infection", "--tflite", "int8", "--int8-stages", "infection",
                        "--calibration-dir", str(calibration_dir), "--calibration-images", "3", "--threshold", "0.4",
                        "--no-warmup"])
    assert code == 0
    [(name, shape, decision)] = calls
    assert name == "lung_norm" and shape == (3, SIZE, SIZE, 3) and decision.threshold == 0.4
    version = out / "infection" / "1"
    assert TFLiteStage(version / TFLITE_FILE, threads=1).precision == "int8"
    entry = ExportManifest.read(version).tflite
    assert (entry.precision, entry.calibration_images, entry.float_layers) == ("int8", 3, [])
    assert ExportManifest.read(version).decision.threshold == 0.4
    assert not (out / "lung").exists()


def test_plain_tflite_stays_float32():
    args = export.parse_args(["--lung-model", "l.keras", "--infection-model", "i.keras", "--tflite"])
    assert (args.tflite, args.int8_stages) == ("fp32", [])
    args = export.parse_args(["--lung-model", "l.keras", "--infection-model", "i.keras"])
    assert (args.tflite, args.int8_stages) == (None, [])
    args = export.parse_args(["--lung-model", "l.keras", "--infection-model", "i.keras", "--tflite", "int8",
                              "--calibration-dir", "d"])
    assert (args.tflite, args.int8_stages, args.calibration_images) == ("int8", ["lung"], 64)


@pytest.mark.parametrize("flags, message", [
    (["--tflite", "int8"], "--tflite int8 needs --calibration-dir DIR"),
    (["--int8-stages", "lung"], "--int8-stages applies to --tflite int8 only"),
    (["--tflite", "--int8-stages", "infection"], "--int8-stages applies to --tflite int8 only"),
    (["--tflite", "fp32", "--calibration-dir", "d"], "--calibration-dir applies to --tflite int8 only"),
    (["--calibration-images", "8"], "--calibration-images applies to --tflite int8 only"),
    (["--tflite", "int8", "--calibration-dir", "d", "--calibration-images", "0"], "must be at least 1"),
    (["--tflite", "int8", "--calibration-dir", "d", "--only", "infection", "cascade"],
     "writes none of the --int8-stages (lung)"),
    (["--tflite", "int4"], "invalid choice: 'int4'"),
])
def test_int8_flags_without_their_companions_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        export.parse_args(["--lung-model", "l.keras", "--infection-model", "i.keras", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "a_file", "no_images"])
def test_unusable_calibration_dir_is_named_before_the_models_load(case, tmp_path, monkeypatch, caplog):
    from covidseg_tf.inference import stages

    def no_load(*args, **kwargs):
        raise AssertionError("models loaded")

    monkeypatch.setattr(stages, "load_stage", no_load)
    folder = tmp_path / "calibration"
    if case == "a_file":
        folder.write_text("not a folder")
    elif case == "no_images":
        folder.mkdir()
        (folder / "notes.txt").write_text("no X-ray here")
    out = tmp_path / "out"
    code = export.main(["--lung-model", str(tmp_path / "l.keras"), "--infection-model", str(tmp_path / "i.keras"),
                        "--out", str(out), "--tflite", "int8", "--calibration-dir", str(folder)])
    assert code == 2
    want = {"missing": "no such folder", "a_file": "not a folder", "no_images": "no X-ray image file"}[case]
    assert f"--calibration-dir {folder}: {want}" in caplog.text and "models loaded" not in caplog.text
    assert not out.exists()


def test_unreadable_calibration_image_is_named_and_nothing_is_written(models, tmp_path, caplog):
    folder = tmp_path / "calibration"
    write_pngs(folder, 2)
    (folder / "xray_01.png").write_bytes(b"a text file named .png")
    out = tmp_path / "out"
    code = export.main(["--lung-model", str(models["lung"]), "--infection-model", str(models["infection"]),
                        "--out", str(out), "--tflite", "int8", "--calibration-dir", str(folder), "--no-warmup"])
    assert code == 2
    assert f"--calibration-dir: {folder / 'xray_01.png'}: " in caplog.text
    assert not out.exists()

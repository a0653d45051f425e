"""covidseg_tf.evaluate: metric-variant aggregation on hand-made masks, and a small run on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covidseg_tf.evaluate import Scores
from covidseg_tf.report import pick_figure_rows
from tfds_covidqu.covid_qu_ex.sources import CLASS_NAMES

COVID, NONCOVID, NORMAL = 0, 1, 2


def masks_from(*pixel_lists, size=4) -> np.ndarray:
    """(B, size, size, 1) masks with the listed flat pixel indices set."""
    m = np.zeros((len(pixel_lists), size * size), np.float32)
    for i, px in enumerate(pixel_lists):
        m[i, list(px)] = 1
    return m.reshape(len(pixel_lists), size, size, 1)


@pytest.fixture()
def hand_made() -> Scores:
    # img0 COVID: truth 4 px, prediction 2 of them  -> Dice 2*2/6, IoU 2/4
    # img1 Non-COVID: empty truth, empty prediction  -> 1, 1
    # img2 Normal: empty truth, 1 false-positive px -> 0, 0
    # img3 COVID: truth 2 px, prediction 2 other px -> 0, 0
    y_true = masks_from([0, 1, 2, 3], [], [], [8, 9])
    y_pred = masks_from([0, 1], [], [5], [10, 11])
    s = Scores(CLASS_NAMES)
    s.add(y_true[:2], y_pred[:2], [COVID, NONCOVID], loss=[0.5, 0.1])  # two batches
    s.add(y_true[2:], y_pred[2:], [NORMAL, COVID], loss=[0.3, 0.9])
    return s


def test_scores_pooled_per_image_and_covid_only(hand_made):
    r = hand_made.summary()
    assert [r[k]["n"] for k in ("all", "COVID-19", "Non-COVID", "Normal")] == [4, 2, 1, 1]
    # pooled over all: I = 2, P = 2 + 1 + 2 = 5, T = 4 + 2 = 6
    assert r["all"]["dice_pooled"] == pytest.approx(2 * 2 / 11)
    assert r["all"]["iou_pooled"] == pytest.approx(2 / 9)
    assert r["all"]["dice_per_image_mean"] == pytest.approx((4 / 6 + 1 + 0 + 0) / 4)
    assert r["all"]["iou_per_image_mean"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    # COVID-19 only: pooled I = 2, P = 4, T = 6; per image (2/3 + 0) / 2
    assert r["COVID-19"]["dice_pooled"] == pytest.approx(4 / 10)
    assert r["COVID-19"]["iou_pooled"] == pytest.approx(2 / 8)
    assert r["COVID-19"]["dice_per_image_mean"] == pytest.approx(1 / 3)
    assert r["COVID-19"]["loss"] == pytest.approx(0.7)
    # empty truth: empty prediction is perfect, a false positive is 0 both ways
    assert r["Non-COVID"]["dice_pooled"] == 1.0 and r["Non-COVID"]["dice_per_image_mean"] == 1.0
    assert r["Normal"]["dice_pooled"] == 0.0 and r["Normal"]["iou_per_image_mean"] == 0.0
    assert r["all"]["loss"] == pytest.approx(0.45)


def test_scores_missing_class_has_no_numbers():
    s = Scores(CLASS_NAMES)
    s.add(masks_from([1]), masks_from([1]), [COVID])
    r = s.summary()
    assert r["Normal"] == {"n": 0}
    assert r["COVID-19"]["dice_pooled"] == 1.0 and r["COVID-19"]["loss"] is None


def test_scores_match_metrics_module():
    from covidseg_tf import metrics

    rng = np.random.default_rng(0)
    y_true = (rng.random((5, 16, 16, 1)) > 0.7).astype(np.float32)
    y_pred = (rng.random((5, 16, 16, 1)) > 0.6).astype(np.float32)
    y_true[2] = 0
    s = Scores(CLASS_NAMES)
    s.add(y_true, y_pred, [0] * 5)
    r = s.summary()["all"]
    assert r["dice_pooled"] == pytest.approx(float(metrics.pooled_dice(y_true, y_pred)), rel=1e-5)
    assert r["iou_pooled"] == pytest.approx(float(metrics.pooled_iou(y_true, y_pred)), rel=1e-5)
    assert r["dice_per_image_mean"] == pytest.approx(float(np.mean(metrics.dice_per_image(y_true, y_pred))), rel=1e-5)
    assert (metrics.dice_from_counts(0, 0, 0), metrics.iou_from_counts(0, 0, 0)) == (1.0, 1.0)


def test_pick_figure_rows_spreads_mild_to_severe():
    fractions = {i: f for i, f in enumerate([0.0, 0.5, 0.05, 0.3, 0.9, 0.01, 0.2, 0.7, 0.0, 0.4])}
    rows = pick_figure_rows(fractions, k=4)
    assert rows == [5, 6, 1, 4]  # ranks 0, 2, 5, 7 (linspace 0..7 rounded) of the 8 infected images by fraction
    assert pick_figure_rows({0: 0.0, 1: 0.2}, k=4) == [1]


# ------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    from covidseg_tf.models import build_unet

    d = tmp_path_factory.mktemp("models")
    build_unet("efficientnetb0", input_shape=(64, 64, 3), encoder_weights=None, name="lung").save(d / "lung.keras")
    build_unet("efficientnetb0", input_shape=(64, 64, 4), encoder_weights=None, name="inf").save(d / "inf.keras")
    return d / "lung.keras", d / "inf.keras"


def test_evaluate_cli_on_synthetic(synthetic_data_dir, tiny_models, tmp_path):
    from PIL import Image

    from covidseg_tf.evaluate import main

    lung, inf = tiny_models
    out = tmp_path / "report"
    report = main(["--lung-model", str(lung), "--infection-model", str(inf), "--data-dir", str(synthetic_data_dir),
                   "--split", "validation", "--limit", "8", "--batch-size", "3", "--out", str(out), "--quiet"])
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "fig1_validation.png"}
    saved = json.loads((out / "report.json").read_text())
    assert saved["image_size"] == 64 and saved["limit"] == 8
    assert (saved["lung_model"], saved["infection_model"]) == (str(lung), str(inf))
    res = saved["results"]["validation"]
    assert set(res) >= {"lung", "infection_cascade", "infection_gt_lung", "severity_mae_covid"}
    for variant in ("lung", "infection_cascade", "infection_gt_lung"):
        assert res[variant]["all"]["n"] == 8
        assert sum(res[variant][c]["n"] for c in ("COVID-19", "Non-COVID", "Normal")) == 8
        for row in res[variant].values():
            if row["n"]:
                for k in ("dice_pooled", "dice_per_image_mean", "iou_pooled", "iou_per_image_mean"):
                    assert 0.0 <= row[k] <= 1.0, (variant, k, row[k])
                assert np.isfinite(row["loss"]) and row["loss"] >= 0
    assert 0.0 <= res["severity_mae_covid"] <= 100.0
    md = (out / "report.md").read_text()
    assert "Table I" in md and "Table II" in md and "fig1_validation.png" in md
    from covidseg_tf.report import CLASS_HEADER, SUMMARY_HEADER

    assert md.count(SUMMARY_HEADER) == 2 and md.count(CLASS_HEADER) == 2
    rows = [ln for ln in md.splitlines() if ln.startswith("| validation |")]
    summary_rows = [ln for ln in rows if ln.count("|") == SUMMARY_HEADER.count("|")]
    class_rows = [ln for ln in rows if ln.count("|") == CLASS_HEADER.count("|")]
    assert len(summary_rows) == 3  # lung, infection cascade, infection with GT lungs
    assert len(class_rows) == sum(1 for v in ("lung", "infection_cascade", "infection_gt_lung")
                                  for c in ("COVID-19", "Non-COVID", "Normal") if res[v][c]["n"])
    lung_row = next(ln for ln in summary_rows if "Stage 1" in ln).split("|")
    assert float(lung_row[4]) == pytest.approx(res["lung"]["all"]["dice_pooled"], abs=1e-4)
    assert float(lung_row[6]) == pytest.approx(res["lung"]["COVID-19"]["dice_per_image_mean"], abs=1e-4)
    fig = Image.open(out / "fig1_validation.png")
    assert fig.mode == "RGB" and fig.width > 4 * 64
    assert 1 <= len(res["figure_rows"]) <= 6
    assert report["results"] == saved["results"]


def test_evaluate_saved_models_match_keras_and_report_version_folders(synthetic_data_dir, tiny_models, tmp_path):
    from covidseg_tf.evaluate import main
    from covidseg_tf.export import export_stage
    from covidseg_tf.inference import load_stage

    base = tmp_path / "saved_models"
    for path, stage in zip(tiny_models, ("lung", "infection")):
        export_stage(load_stage(path), stage, base)
    common = ["--data-dir", str(synthetic_data_dir), "--limit", "4", "--batch-size", "2", "--no-figure", "--quiet"]
    keras_report = main(["--lung-model", str(tiny_models[0]), "--infection-model", str(tiny_models[1]),
                         "--out", str(tmp_path / "keras")] + common)
    saved_report = main(["--lung-model", str(base / "lung"), "--infection-model", str(base / "infection" / "1"),
                         "--out", str(tmp_path / "saved")] + common)
    saved = json.loads((tmp_path / "saved" / "report.json").read_text())
    assert saved["lung_model"] == str(base / "lung" / "1")  # the version folder actually used
    assert saved["infection_model"] == str(base / "infection" / "1")
    assert f"`{base / 'lung' / '1'}`" in (tmp_path / "saved" / "report.md").read_text()
    # the same models: same scores (a pixel whose probability is within round-off of the threshold aside)
    for variant in ("lung", "infection_cascade", "infection_gt_lung"):
        want = keras_report["results"]["validation"][variant]["all"]
        got = saved_report["results"]["validation"][variant]["all"]
        assert got["n"] == want["n"] == 4
        for k in ("dice_pooled", "iou_pooled", "dice_per_image_mean"):
            assert got[k] == pytest.approx(want[k], abs=1e-3), (variant, k)
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), variant


def test_evaluate_default_models_and_missing_default_error(tmp_path, monkeypatch):
    from covidseg_tf import config, evaluate

    args = evaluate.build_parser().parse_args([])
    assert (args.lung_model, args.infection_model) == (config.DEFAULT_LUNG_MODEL, config.DEFAULT_INFECTION_MODEL)
    monkeypatch.setattr(config, "DEFAULT_LUNG_MODEL", tmp_path / "saved_models" / "lung")
    with pytest.raises(FileNotFoundError, match="--lung-model/--infection-model") as err:
        evaluate.main(["--out", str(tmp_path / "out"), "--quiet"])
    assert str(tmp_path / "saved_models" / "lung") in str(err.value) and "covidseg_tf.export" in str(err.value)


def test_evaluate_rejects_cascade_saved_model_as_lung_model(tmp_path):
    from covidseg_tf.evaluate import main

    version = tmp_path / "cascade" / "1"
    (version / "assets.extra").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    (version / "assets.extra" / "covidseg_export.json").write_text(json.dumps({"servable": "cascade"}))
    with pytest.raises(ValueError, match="cascade SavedModel"):
        main(["--lung-model", str(tmp_path / "cascade"), "--out", str(tmp_path / "out"), "--quiet"])


def test_evaluate_cli_ends_a_builder_data_error_with_one_line(monkeypatch, tmp_path):
    """The builder's own CovidQuExDataError (here: --manual-dir is a file but no zip) is one error line."""
    import sys

    from covidseg_tf import evaluate
    from covidseg_tf.inference import Predictor

    not_zip = tmp_path / "covidqu.zip"
    not_zip.write_bytes(b"not a zip")
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, *args, **kwargs: None))  # no models needed
    monkeypatch.setattr(sys, "argv", ["evaluate", "--dataset", "covid_qu_ex/infection", "--data-dir",
                                      str(tmp_path / "tfds"), "--manual-dir", str(not_zip), "--out",
                                      str(tmp_path / "out"), "--quiet"])
    with pytest.raises(SystemExit) as e:
        evaluate.cli()
    assert e.value.code == (f"error: manual_dir {not_zip} is a file but not a readable zip (incomplete download?); "
                            "it takes the Kaggle zip itself or a folder holding the zip or its extracted files")

"""covidseg_tf.predict: every input kind, broken files, outputs never over inputs (the input files come from
conftest.py; reading them is tested in test_imageio.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BAD, GOOD, H, W
from PIL import Image

from covidseg_tf.imageio import read_xray


def test_plan_outputs_never_hits_inputs_nor_itself(tmp_path):
    from covidseg_tf.predict import plan_outputs

    d = tmp_path / "in"
    d.mkdir()
    a_png, a_dcm = d / "a.png", d / "a.dcm"
    clash = d / "b_lung.png"  # an input that looks like an output of b.png
    b_png = d / "b.png"
    for p in (a_png, a_dcm, clash, b_png):
        p.write_bytes(b"")
    files = [a_png, a_dcm, b_png, clash]
    plan = plan_outputs(files, [d], d.parent)  # --out = the parent of the input folder
    suffixes = ("_lung.png", "_infection.png", "_overlay.png", ".json")
    outs = [plan[f].parent / (plan[f].name + s) for f in files for s in suffixes]
    assert len(set(outs)) == len(outs)
    assert not {o.resolve() for o in outs} & {f.resolve() for f in files}
    assert plan[a_png].name == "a_png" and plan[a_dcm].name == "a_dcm"
    assert plan[b_png].name == "b-1"  # b_lung.png is an input


# ------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """Untrained efficientnetb0 U-Nets at 64 px saved as .keras (lung: 3 channels, infection: 4)."""
    from covidseg_tf.models import build_unet

    d = tmp_path_factory.mktemp("models")
    lung = build_unet("efficientnetb0", input_shape=(64, 64, 3), encoder_weights=None, name="lung")
    inf = build_unet("efficientnetb0", input_shape=(64, 64, 4), encoder_weights=None, name="infection")
    lung.save(d / "lung.keras")
    inf.save(d / "infection.keras")
    return d / "lung.keras", d / "infection.keras"


def check_outputs(stem: Path, src: Path, shape: tuple[int, int]) -> dict:
    for s in ("_lung.png", "_infection.png"):
        m = np.asarray(Image.open(stem.parent / (stem.name + s)))
        assert m.shape == shape and set(np.unique(m)) <= {0, 255}
    ov = Image.open(stem.parent / (stem.name + "_overlay.png"))
    assert ov.mode == "RGB" and ov.size == (shape[1], shape[0])
    rec = json.loads((stem.parent / (stem.name + ".json")).read_text())
    assert rec["file"] == str(src)
    assert rec["size"] == {"height": shape[0], "width": shape[1]}
    lung = np.asarray(Image.open(stem.parent / (stem.name + "_lung.png"))) > 0
    inf = np.asarray(Image.open(stem.parent / (stem.name + "_infection.png"))) > 0
    assert rec["lung_area_px"] == lung.sum() and rec["infection_area_px"] == inf.sum()
    assert not (inf & ~lung).any()  # infection only inside the lung
    for k in ("left", "right", "total"):
        assert 0.0 <= rec["severity"][k] <= 100.0
    assert rec["severity"]["grade"] in ("none", "mild", "moderate", "severe")
    assert len(rec["models"]["lung"]["sha256"]) == 64 and rec["models"]["image_size"] == 64
    return rec


def test_predict_cli_every_kind_bad_files_skipped_exit_1(inputs, tiny_models, tmp_path, caplog):
    from covidseg_tf.predict import main

    lung, inf = tiny_models
    folder = inputs["png8_gray"].parent
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    with caplog.at_level(logging.ERROR):
        rc = main([str(folder), "--out", str(out), "--lung-model", str(lung), "--infection-model", str(inf), "--quiet"])
    assert rc == 1
    for kind in BAD:
        assert any(inputs[kind].name in r.getMessage() for r in caplog.records), kind
    for kind in GOOD:
        src = inputs[kind]
        rel = src.parent.relative_to(folder)
        check_outputs(out / folder.name / rel / src.stem, src, (H, W))
    assert not list((out / folder.name / "bad").glob("*.json"))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # inputs untouched


def test_predict_cli_all_good_exit_0_and_out_inside_input_folder(inputs, tiny_models, tmp_path):
    from covidseg_tf.predict import main

    lung, inf = tiny_models
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(inputs["png8_gray"], d / "a.png")
    shutil.copy(inputs["dicom_mono1"], d / "a.dcm")
    args = ["--out", str(d / "preds"), "--lung-model", str(lung), "--infection-model", str(inf), "--quiet"]
    assert main([str(d)] + args) == 0
    check_outputs(d / "preds" / "imgs" / "a_png", d / "a.png", (H, W))
    check_outputs(d / "preds" / "imgs" / "a_dcm", d / "a.dcm", (H, W))
    # a second run does not pick up its own outputs as inputs
    assert main([str(d)] + args) == 0
    assert len(list((d / "preds").rglob("*.json"))) == 2


def test_predict_cli_refuses_input_folder_inside_out_and_keeps_explicit_files(inputs, tiny_models, tmp_path, caplog):
    from covidseg_tf.predict import main

    lung, inf = tiny_models
    out = tmp_path / "out"
    (out / "imgs").mkdir(parents=True)
    src = out / "imgs" / "x.png"
    shutil.copy(inputs["png8_gray"], src)
    (out / "imgs" / "x_lung.png").write_bytes(b"not ours")  # a file that looks like an output
    args = ["--out", str(out), "--lung-model", str(lung), "--infection-model", str(inf), "--quiet"]
    with caplog.at_level(logging.ERROR):
        assert main([str(out / "imgs")] + args) == 1
    assert "inside --out" in caplog.text
    # an explicit file inside --out is processed next to itself without touching any input
    assert main([str(src), "--out", str(out / "imgs")] + args[2:]) == 0
    assert (out / "imgs" / "x_lung.png").read_bytes() == b"not ours"
    assert src.read_bytes() == inputs["png8_gray"].read_bytes()
    check_outputs(out / "imgs" / "x-1", src, (H, W))


def test_predict_cli_missing_model_is_a_clear_error(inputs, tmp_path, caplog):
    from covidseg_tf.predict import main

    with caplog.at_level(logging.ERROR):
        rc = main([str(inputs["png8_gray"]), "--out", str(tmp_path), "--lung-model", str(tmp_path / "no.keras"),
                   "--infection-model", str(tmp_path / "no2.keras")])
    assert rc == 1
    assert "no.keras" in caplog.text and "covidseg_tf.train" in caplog.text


def test_predict_real_pngs_io(shared_covidqu, tiny_models, tmp_path):
    """A few real COVID-QU-Ex PNGs go through the whole I/O path (untrained models: no accuracy claim)."""
    from covidseg_tf.predict import main

    lung, inf = tiny_models
    imgs = sorted((shared_covidqu / "Infection Segmentation Data" / "Infection Segmentation Data" / "Test" /
                   "COVID-19" / "images").glob("*.png"))[:3]
    assert imgs
    out = tmp_path / "out"
    assert main([str(p) for p in imgs] + ["--out", str(out), "--lung-model", str(lung), "--infection-model",
                                          str(inf), "--quiet"]) == 0
    for p in imgs:
        shape = read_xray(p).shape
        assert shape == (256, 256)
        check_outputs(out / p.stem, p, shape)


# ------------------------------------------------------------------------------------------ SavedModel folders
@pytest.fixture(scope="module")
def tiny_saved_models(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """`tiny_models` exported as fp32 stage SavedModels; returns the TF Serving base folders (lung, infection)."""
    from covidseg_tf.cascade import load_model
    from covidseg_tf.export import export_stage

    base = tmp_path_factory.mktemp("saved_models")
    for path, stage in zip(tiny_models, ("lung", "infection")):
        export_stage(load_model(path), stage, base)
    return base / "lung", base / "infection"


def test_predict_cli_saved_model_folders(inputs, tiny_saved_models, tmp_path):
    from covidseg_tf.predict import main

    lung, inf = tiny_saved_models
    out = tmp_path / "out"
    src = inputs["png8_gray"]
    # base folder for Stage 1, version folder for Stage 2
    assert main([str(src), "--out", str(out), "--lung-model", str(lung), "--infection-model", str(inf / "1"),
                 "--quiet"]) == 0
    rec = check_outputs(out / src.stem, src, (H, W))
    for name, version in (("lung", lung / "1"), ("infection", inf / "1")):
        m = rec["models"][name]
        assert m["path"] == str(version) and m["format"] == "savedmodel"
        assert m["precision"] == "fp32" and m["image_size"] == 64
        assert m["bytes"] == sum(f.stat().st_size for f in version.rglob("*") if f.is_file())
        assert m["bytes"] > (version / "saved_model.pb").stat().st_size
        assert m["sha256"] == hashlib.sha256((version / "saved_model.pb").read_bytes()).hexdigest()


def test_predict_saved_model_same_masks_as_keras(tiny_models, tiny_saved_models):
    """The exported stages segment like the .keras models (pixels near the threshold aside: untrained nets)."""
    from covidseg_tf.cascade import Cascade

    gray = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # model size: no resizing
    keras_pred = Cascade.load(*tiny_models).predict([gray])[0]
    saved_pred = Cascade.load(*tiny_saved_models).predict([gray])[0]
    for k in ("lung", "infection"):
        differ = (getattr(keras_pred, k) != getattr(saved_pred, k)).mean()
        assert differ < 0.01, (k, differ)
    assert 0 < keras_pred.lung.mean() < 1


def test_predict_defaults_are_the_repo_saved_models(inputs, tiny_saved_models, tmp_path, monkeypatch):
    from covidseg_tf import config, predict

    repo = Path(__file__).resolve().parents[1]
    assert config.DEFAULT_LUNG_MODEL == repo / "saved_models" / "lung" / "1"  # the shipped version, pinned
    assert config.DEFAULT_INFECTION_MODEL == repo / "saved_models" / "infection" / "1"
    args = predict.build_parser().parse_args(["x.png", "--out", "o"])
    assert (args.lung_model, args.infection_model) == (config.DEFAULT_LUNG_MODEL, config.DEFAULT_INFECTION_MODEL)
    # without --lung-model/--infection-model the defaults are what runs
    monkeypatch.setattr(predict, "DEFAULT_LUNG_MODEL", tiny_saved_models[0])
    monkeypatch.setattr(predict, "DEFAULT_INFECTION_MODEL", tiny_saved_models[1])
    assert predict.main([str(inputs["png8_gray"]), "--out", str(tmp_path), "--quiet"]) == 0
    rec = json.loads((tmp_path / "png8_gray.json").read_text())
    assert rec["models"]["lung"]["path"] == str(tiny_saved_models[0] / "1")


def test_predict_cli_missing_default_models_say_what_to_do(inputs, tmp_path, monkeypatch, caplog):
    from covidseg_tf import predict

    monkeypatch.setattr(predict, "DEFAULT_LUNG_MODEL", tmp_path / "saved_models" / "lung")
    monkeypatch.setattr(predict, "DEFAULT_INFECTION_MODEL", tmp_path / "saved_models" / "infection")
    with caplog.at_level(logging.ERROR):
        assert predict.main([str(inputs["png8_gray"]), "--out", str(tmp_path / "out")]) == 1
    assert str(tmp_path / "saved_models" / "lung") in caplog.text
    assert "covidseg_tf.export" in caplog.text and "--lung-model/--infection-model" in caplog.text


@pytest.mark.parametrize("case", ["empty_base", "cascade_as_lung", "not_a_saved_model", "infection_as_lung"])
def test_predict_cli_bad_model_folders(inputs, tiny_saved_models, tmp_path, caplog, case):
    from covidseg_tf.predict import main

    lung, inf = tiny_saved_models
    bad = tmp_path / "bad"
    bad.mkdir()
    if case == "empty_base":
        expect = "is empty"
    elif case == "cascade_as_lung":  # a cascade version as export writes it (servable "cascade"), graph reused
        shutil.copytree(lung / "1", bad / "1")
        info_file = bad / "1" / "assets.extra" / "covidseg_export.json"
        info_file.write_text(json.dumps(dict(json.loads(info_file.read_text()), servable="cascade")))
        expect = "cascade SavedModel"
    elif case == "not_a_saved_model":
        (bad / "model.keras").write_bytes(b"")
        expect = "no saved_model.pb"
    else:
        bad = inf
        expect = "not a lung stage model"
    with caplog.at_level(logging.ERROR):
        rc = main([str(inputs["png8_gray"]), "--out", str(tmp_path / "out"), "--lung-model", str(bad),
                   "--infection-model", str(inf), "--quiet"])
    assert rc == 1
    assert expect in caplog.text and str(bad) in caplog.text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.json"))

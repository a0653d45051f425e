"""covidseg_tf.predict: every input kind, broken files, outputs never over inputs (the input files come from
conftest.py; reading them is tested in test_imageio.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import BAD, GOOD, H, W, skip_if_sigint_ignored
from PIL import Image

from covidseg_tf import nonxray
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
    if rec["assessed"]:
        assert rec["reason"] is None
        for k in ("left", "right", "total"):
            assert 0.0 <= rec["severity"][k] <= 100.0
        assert rec["severity"]["grade"] in ("none", "mild", "moderate", "severe")
    else:  # the input gate refused it (untrained models find no plausible lungs): no finding, empty masks
        assert rec["assessed"] is False and rec["reason"], rec
        assert all(rec["severity"][k] is None for k in ("left", "right", "total", "grade"))
        assert not lung.any() and not inf.any()
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
    # a second run does not pick up its own outputs as inputs (and replaces them only when told to: a usage error)
    assert main([str(d)] + args) == 2
    assert main([str(d)] + args + ["--overwrite"]) == 0
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
        assert main([str(out / "imgs")] + args) == 2  # a usage error
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
    assert rc == 2  # a usage error (exitcodes.USAGE), as in export and train
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
    from covidseg_tf.export import export_stage
    from covidseg_tf.inference import load_stage

    base = tmp_path_factory.mktemp("saved_models")
    for path, stage in zip(tiny_models, ("lung", "infection")):
        export_stage(load_stage(path), stage, base)
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
    from covidseg_tf.inference import Predictor
    from covidseg_tf.inference.predictor import run_stages

    gray = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # model size: no resizing
    masks = []  # the stages' masks (Predictor.predict would empty them: the input gate refuses noise)
    for paths in (tiny_models, tiny_saved_models):
        c = Predictor.load(*paths)
        stages = run_stages(c.lung_model, c.infection_model, c.model_pixels(gray)[None], c.threshold)
        masks.append({"lung": stages["lung_prob"].numpy() >= c.threshold,
                      "infection": stages["infection_prob"].numpy() >= c.decision.infection_threshold})
    keras_masks, saved_masks = masks
    for k in ("lung", "infection"):
        differ = (keras_masks[k] != saved_masks[k]).mean()
        assert differ < 0.01, (k, differ)
    assert 0 < keras_masks["lung"].mean() < 1


def test_predict_defaults_are_the_repo_saved_models(inputs, tiny_saved_models, tmp_path, monkeypatch):
    from covidseg_tf import config, predict

    repo = Path(__file__).resolve().parents[1]
    assert config.DEFAULT_LUNG_MODEL == repo / "saved_models" / "lung" / "5"  # the shipped version, pinned
    assert config.DEFAULT_INFECTION_MODEL == repo / "saved_models" / "infection" / "5"
    args = predict.build_parser().parse_args(["x.png", "--out", "o"])
    assert (args.lung_model, args.infection_model) == (config.DEFAULT_LUNG_MODEL, config.DEFAULT_INFECTION_MODEL)
    # without --lung-model/--infection-model the defaults are what runs
    monkeypatch.setattr(config, "DEFAULT_LUNG_MODEL", tiny_saved_models[0])
    monkeypatch.setattr(config, "DEFAULT_INFECTION_MODEL", tiny_saved_models[1])
    assert predict.main([str(inputs["png8_gray"]), "--out", str(tmp_path), "--quiet"]) == 0
    rec = json.loads((tmp_path / "png8_gray.json").read_text())
    assert rec["models"]["lung"]["path"] == str(tiny_saved_models[0] / "1")


def test_predict_cli_missing_default_models_say_what_to_do(inputs, tmp_path, monkeypatch, caplog):
    from covidseg_tf import config, predict

    monkeypatch.setattr(config, "DEFAULT_LUNG_MODEL", tmp_path / "saved_models" / "lung")
    monkeypatch.setattr(config, "DEFAULT_INFECTION_MODEL", tmp_path / "saved_models" / "infection")
    with caplog.at_level(logging.ERROR):
        assert predict.main([str(inputs["png8_gray"]), "--out", str(tmp_path / "out")]) == 2
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
    assert rc == 2
    assert expect in caplog.text and str(bad) in caplog.text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.json"))


# ------------------------------------------------------------------------------- bad input, big input, reruns
def patched_png(height: int, width: int) -> bytes:
    """A tiny PNG whose IHDR (CRC fixed up) declares height x width: a decompression bomb's header."""
    import io
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def conv_models(tmp_path_factory) -> tuple[Path, Path]:
    """helpers.conv_cascade as .keras files: stage models that load in about a second (the CLI tests below are
    about files, not segmentation)."""
    from helpers import conv_cascade

    d = tmp_path_factory.mktemp("conv_models")
    for model, stage in zip(conv_cascade(64), ("lung", "infection")):
        model.save(d / f"{stage}.keras")
    return d / "lung.keras", d / "infection.keras"


def run(inputs: list[Path], out: Path, models: tuple[Path, Path], *extra: str) -> int:
    from covidseg_tf.predict import main

    return main([str(p) for p in inputs] + ["--out", str(out), "--lung-model", str(models[0]),
                                           "--infection-model", str(models[1]), "--quiet", *extra])


def test_predict_refuses_a_huge_image_from_its_header_and_goes_on(inputs, conv_models, tmp_path, caplog):
    """The issue's 12000 x 12000 PNG: refused from its header (no decoding, no hang), named with the limit, no
    partial outputs; the other input is processed; exit code 1."""
    import time

    big = tmp_path / "b.png"
    big.write_bytes(patched_png(12000, 12000))
    good = tmp_path / "good.png"
    shutil.copy(inputs["png8_gray"], good)
    out = tmp_path / "o"
    t0 = time.time()
    with caplog.at_level(logging.ERROR):
        assert run([big, good], out, conv_models) == 1
    assert time.time() - t0 < 120
    assert f"{big} is 12000x12000 pixels (height x width); each side must be 1..4096" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == sorted(f"good{s}" for s in
                                                           ("_lung.png", "_infection.png", "_overlay.png", ".json"))


def test_predict_loads_no_model_when_every_input_is_refused(tmp_path, monkeypatch, caplog):
    """Models are loaded for the first readable input: the issue's big image alone ends in about a second."""
    from covidseg_tf.inference import Predictor

    def no_load(*args, **kwargs):
        raise AssertionError("models loaded")

    monkeypatch.setattr(Predictor, "load", no_load)
    (tmp_path / "b.png").write_bytes(patched_png(12000, 12000))
    with caplog.at_level(logging.ERROR):
        assert run([tmp_path / "b.png"], tmp_path / "o", (tmp_path / "l.keras", tmp_path / "i.keras")) == 1
    assert "is 12000x12000 pixels" in caplog.text and "models loaded" not in caplog.text


@pytest.mark.parametrize("name, image, reason", [
    ("grey", np.full((256, 256), 128, np.uint8), "near-constant image"),
    ("two", np.array([[0, 255], [255, 0]], np.uint8), "too small: 2x2 pixels"),
    ("one", np.zeros((1, 1), np.uint8), "too small: 1x1 pixels"),
    ("strip", np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (3000, 1)), "extreme aspect ratio: 3000x300"),
    ("photo", nonxray.make("photo"), "not a frontal chest X-ray: a colour image: "),
    ("noise", nonxray.make("grey_noise"), "not a frontal chest X-ray: noise-like: "),
])
def test_predict_never_grades_what_cannot_be_a_chest_xray(conv_models, tmp_path, caplog, name, image, reason):
    """Uniform grey, 2x2, 1x1 and 10:1 images, a colour photograph, grey noise: "assessed": false with the reason,
    null severity and grade, empty masks at the input's size, a warning naming the file; not a failure (exit 0)."""
    src = tmp_path / f"{name}.png"
    Image.fromarray(image).save(src)
    with caplog.at_level(logging.WARNING):
        assert run([src], tmp_path / "o", conv_models) == 0
    rec = json.loads((tmp_path / "o" / f"{name}.json").read_text())
    assert rec["assessed"] is False and rec["reason"].startswith(reason), rec["reason"]
    assert rec["severity"] == {"left": None, "right": None, "total": None, "grade": None,
                               "unit": "percent of lung area infected"}
    assert rec["lung_area_px"] == rec["infection_area_px"] == 0
    lung = np.asarray(Image.open(tmp_path / "o" / f"{name}_lung.png"))
    assert lung.shape == image.shape[:2] and not lung.any()
    assert f"{src}: not assessed (input quality gate): {reason}" in caplog.text


def test_predict_records_input_sha256_and_assessed(conv_models, tmp_path):
    """A chest-X-ray-like phantom, also saved as RGB with a small red marker, is assessed and graded."""
    from helpers import phantom

    grey = phantom(90, 80, 3)
    marked = np.repeat(grey[..., None], 3, -1)
    marked[4:10, 4:14] = (220, 20, 20)
    for name, image in (("grey", grey), ("marked", marked)):
        src = tmp_path / f"{name}.png"
        Image.fromarray(image).save(src)
        assert run([src], tmp_path / "o", conv_models) == 0
        rec = json.loads((tmp_path / "o" / f"{name}.json").read_text())
        assert rec["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert rec["assessed"] is True and rec["reason"] is None, rec["reason"]
        assert rec["severity"]["grade"] in ("mild", "moderate", "severe") and rec["lung_area_px"] > 0


def test_predict_reruns_are_explicit(inputs, conv_models, tmp_path, caplog):
    """A second run refuses to write over the first one's outputs (naming the first file) before loading models;
    --overwrite replaces them and removes the outputs of an input that has become unreadable."""
    d = tmp_path / "in"
    d.mkdir()
    a, b = d / "a.png", d / "b.png"
    shutil.copy(inputs["png8_gray"], a)
    shutil.copy(inputs["png_rgb"], b)
    out = tmp_path / "o"
    assert run([d], out, conv_models) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with caplog.at_level(logging.ERROR):
        assert run([d], out, conv_models) == 2  # a usage error: nothing touched
    assert f"{out / 'in' / 'a_lung.png'} already exists (8 output file(s)" in caplog.text
    assert "--overwrite" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched

    b.write_bytes(b"no longer a PNG")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run([d], out, conv_models, "--overwrite") == 1  # b failed
    assert sorted(p.name for p in (out / "in").iterdir()) == ["a.json", "a_infection.png", "a_lung.png",
                                                              "a_overlay.png"]
    assert "removed 4 output(s) of an earlier run of" in caplog.text and str(b) in caplog.text
    assert (out / "in" / "a.json").stat().st_mtime_ns > before[out / "in" / "a.json"]
    assert not list(out.rglob("*.tmp-*"))


def test_predict_inputs_differing_by_case_or_extension_never_collide(inputs, conv_models, tmp_path):
    """good.PNG, good.png, Good.png and good.jpeg in one folder: four sets of outputs whose names differ even on a
    case-insensitive file system, each JSON naming its input."""
    from covidseg_tf.predict import plan_outputs

    d = tmp_path / "in"
    d.mkdir()
    names = ["good.PNG", "good.png", "Good.png", "good.jpeg"]
    for n in names:
        shutil.copy(inputs["png8_gray"] if not n.endswith("jpeg") else inputs["jpeg"], d / n)
    files = [d / n for n in names]
    plan = plan_outputs(files, [d], tmp_path / "o")
    outs = [str(plan[f]) + s for f in files for s in (".json", "_lung.png", "_infection.png", "_overlay.png")]
    assert len({o.casefold() for o in outs}) == len(outs) == 16
    assert plan[d / "good.jpeg"].name == "good_jpeg" and plan[d / "good.PNG"].name == "good_PNG"
    assert run([d], tmp_path / "o", conv_models) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "o" / "in").glob("*.json")]
    assert sorted(Path(r["file"]).name for r in records) == sorted(names)


def test_predict_interrupted_write_leaves_no_json(inputs, conv_models, tmp_path, monkeypatch):
    """Outputs are written under temporary names and renamed, the JSON last; a failure on the way leaves no JSON
    (the earlier one is removed first), no temporary file, and the input is reported as failed."""
    from covidseg_tf import predict

    src = inputs["png8_gray"]
    assert run([src], tmp_path, conv_models) == 0
    real_replace = os.replace

    def failing_replace(a, b):
        if str(b).endswith("_overlay.png"):
            raise OSError("disk full")
        return real_replace(a, b)

    monkeypatch.setattr(predict.os, "replace", failing_replace)
    assert run([src], tmp_path, conv_models, "--overwrite") == 1
    assert not (tmp_path / f"{src.stem}.json").exists() and not (tmp_path / f"{src.stem}_overlay.png").exists()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_overlay_cost_does_not_grow_with_the_input():
    """The outline is an O(H x W) erosion (equal to a minimum filter on a small case), and a 4096 x 4096 input
    gets its overlay at 2048 x 2048 (OVERLAY_MAX_SIDE): no rank filter whose cost grows with side^4."""
    from PIL import ImageFilter

    from covidseg_tf.predict import OVERLAY_MAX_SIDE, _erode, overlay

    rng = np.random.default_rng(0)
    m = rng.random((60, 70)) > 0.3
    m[10:50, 5:60] = True
    ref = np.asarray(Image.fromarray(np.pad(m, 2).astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5)))[2:-2, 2:-2]
    np.testing.assert_array_equal(_erode(m, 2), ref > 0)
    lung = np.zeros((4096, 4096), np.uint8)
    lung[500:3500, 300:1900] = 1
    inf = np.zeros_like(lung)
    inf[1000:2000, 400:1500] = 1
    out = overlay(np.full((4096, 4096), 100, np.uint8), lung, inf)
    assert out.shape == (OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE, 3) == (2048, 2048, 3) and out.dtype == np.uint8
    green = (0, 220, 90)
    assert tuple(out[250, 500]) == green and tuple(out[257, 500]) == green  # an 8 px outline at 2048 px
    assert tuple(out[258, 500]) != green and tuple(out[0, 0]) == (100, 100, 100)
    assert overlay(np.zeros((2048, 30), np.uint8), lung[:2048, :30], inf[:2048, :30]).shape == (2048, 30, 3)


@pytest.mark.parametrize("where", ["under_a_file", "proc", "read_only"])
def test_predict_unwritable_out_is_a_usage_error_before_any_model_loads(tmp_path, monkeypatch, capsys, where):
    """Issue 23: an --out that cannot be written was found only after the models were loaded and an image
    predicted; now one `error:` line and exit code 2 before anything loads."""
    from covidseg_tf import predict
    from covidseg_tf.inference import Predictor

    def no_load(*args, **kwargs):
        raise AssertionError("models loaded")

    monkeypatch.setattr(Predictor, "load", no_load)
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(tmp_path / "x.png")
    (tmp_path / "file.txt").write_text("x")
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    out = {"under_a_file": tmp_path / "file.txt" / "preds", "proc": Path("/proc/x"),
           "read_only": tmp_path / "ro" / "preds"}[where]
    capsys.readouterr()
    rc = predict.main([str(tmp_path / "x.png"), "--out", str(out), "--lung-model", str(tmp_path / "l.keras"),
                       "--infection-model", str(tmp_path / "i.keras"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and str(out) in lines[0], err
    assert "models loaded" not in err


# ------------------------------------------------------------------ issue 23: nothing skipped without a word
def _unlistable(monkeypatch, *folders: Path) -> None:
    """Make os.scandir (what the folder walk lists with) fail on `folders` as it does for a folder the user may not
    read (the tests run as root, for whom permissions do not bite)."""
    real = os.scandir
    denied = {str(f) for f in folders}

    def scandir(path=".", *args, **kwargs):
        if str(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)


def test_predict_names_every_path_it_cannot_use_and_exits_1(inputs, conv_models, tmp_path, monkeypatch, caplog):
    """Issue 23: a symlink loop, a dangling link, a FIFO named .png and a subfolder that cannot be listed were
    skipped without a word ("1 of 1 processed", exit 0). Each is now an error naming the path and counted as a
    failed input (exit 1); a link to a folder is a warning (not followed); the good image is processed."""
    d = tmp_path / "in"
    (d / "locked").mkdir(parents=True)
    shutil.copy(inputs["png8_gray"], d / "good.png")
    shutil.copy(inputs["png8_gray"], d / "locked" / "hidden.png")
    (d / "loop1.png").symlink_to("loop2.png")
    (d / "loop2.png").symlink_to("loop1.png")
    (d / "dangling.png").symlink_to("gone.png")
    os.mkfifo(d / "pipe.png")
    (d / "notes.txt").symlink_to("gone.txt")  # not an image name: not an input, not reported
    (tmp_path / "elsewhere").mkdir()
    (d / "linked").symlink_to(tmp_path / "elsewhere")
    _unlistable(monkeypatch, d / "locked")
    with caplog.at_level(logging.INFO):
        assert run([d], tmp_path / "o", conv_models) == 1
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    for name, why in (("loop1.png", "a symbolic link loop"), ("loop2.png", "a symbolic link loop"),
                      ("dangling.png", "a dangling symbolic link"), ("pipe.png", "not a regular file (a FIFO)"),
                      ("locked", "cannot list the folder (Permission denied)")):
        assert f"{d / name}: {why}" in errors, (name, errors)
    assert "notes.txt" not in caplog.text
    assert f"{d / 'linked'}: a symbolic link to a folder: not followed" in caplog.text
    assert "linked" not in errors
    assert "1 of 6 input(s) processed" in caplog.text
    assert (tmp_path / "o" / "in" / "good.json").is_file()


def test_predict_unlistable_folder_says_so_not_no_images_found(conv_models, tmp_path, monkeypatch, caplog):
    """Issue 23: a folder that cannot be listed said "no input images found"; now it says it cannot be listed and
    why (exit 1)."""
    d = tmp_path / "in"
    d.mkdir()
    Image.new("L", (40, 40), 7).save(d / "x.png")
    _unlistable(monkeypatch, d)
    with caplog.at_level(logging.ERROR):
        assert run([d], tmp_path / "o", conv_models) == 1
    assert f"{d}: cannot list the folder (Permission denied)" in caplog.text
    assert "no input images found" not in caplog.text


def test_predict_file_in_a_folder_it_may_not_enter_is_one_error(inputs, conv_models, tmp_path, monkeypatch,
                                                                  capsys, caplog):
    """Issue 23: an input inside a folder the user may not search made Path.is_dir() raise PermissionError (a
    traceback); now an error line naming the file, exit 1, and the other input is processed."""
    d = tmp_path / "private"
    d.mkdir()
    secret = d / "x.png"
    shutil.copy(inputs["png8_gray"], secret)
    good = tmp_path / "good.png"
    shutil.copy(inputs["png8_gray"], good)
    real = os.stat

    def stat(path, *args, **kwargs):  # EACCES on everything below the folder, as for a user without its x bit
        if str(path).startswith(str(d) + os.sep):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    with caplog.at_level(logging.ERROR):
        assert run([secret, good], tmp_path / "o", conv_models) == 1
    assert f"{secret}: cannot access it (Permission denied)" in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.undo()
    assert (tmp_path / "o" / "good.json").is_file()


def test_predict_model_that_is_no_zip_says_so(inputs, tmp_path, caplog):
    """Issue 23 item 10: a .keras model that exists but is no zip said "File not found"."""
    bad = tmp_path / "lung.keras"
    bad.write_text("not a model\n")
    with caplog.at_level(logging.ERROR):
        assert run([inputs["png8_gray"]], tmp_path / "o", (bad, bad)) == 2
    assert f"{bad}: not a Keras model: not a zip archive" in caplog.text
    assert "File not found" not in caplog.text


def test_predict_ctrl_c_is_one_line_and_exit_130(inputs, conv_models, tmp_path, monkeypatch, capsys):
    """Issue 23: Ctrl-C during predict printed a KeyboardInterrupt traceback (the outputs were consistent). Now one
    line saying how many inputs were done, exit code 130; the finished input's outputs are whole, the
    interrupted one left no JSON and no temporary file."""
    from covidseg_tf import predict

    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(inputs["png8_gray"], d / name)
    real = predict.write_outputs

    def write_outputs(encoded, **kwargs):  # Ctrl-C while the second input's files are written
        if any("b_" in Path(name).name for name in encoded):
            first = next(iter(encoded))
            Path(f"{first}.tmp-{os.getpid()}").write_bytes(b"partial")
            raise KeyboardInterrupt
        real(encoded, **kwargs)

    monkeypatch.setattr(predict, "write_outputs", write_outputs)
    capsys.readouterr()
    assert run([d], tmp_path / "o", conv_models) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["python -m covidseg_tf.predict: interrupted (Ctrl-C); 1 of 3 input(s) done; their outputs are "
                     "complete, the rest were not written (rerun with --overwrite)"], err
    check_outputs(tmp_path / "o" / "in" / "a", d / "a.png", (H, W))
    assert not (tmp_path / "o" / "in" / "b.json").exists()


def test_predict_sigint_in_a_real_process_exits_130_without_a_traceback(tmp_path, conv_models):
    """A real SIGINT to `python -m covidseg_tf.predict` in the middle of a folder: exit 130, no traceback, every
    JSON written stands next to its complete files."""
    import signal
    import subprocess
    import sys
    import time

    skip_if_sigint_ignored()

    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    n = 2000  # the gate refuses these fast: in a loaded suite the test itself may poll late, the signal must land
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(d / f"x{i:04d}.png")
    out = tmp_path / "o"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "covidseg_tf.predict", str(d), "--out", str(out), "--lung-model",
                             str(conv_models[0]), "--infection-model", str(conv_models[1]), "--quiet"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.rglob("*.json"))[:3][2:]:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert "python -m covidseg_tf.predict: interrupted (Ctrl-C);" in err
    done = sorted(out.rglob("*.json"))
    assert 3 <= len(done) < n
    for j in done:
        check_outputs(j.with_suffix(""), d / (j.stem + ".png"), (64, 64))
    assert not list(out.rglob("*.tmp-*"))

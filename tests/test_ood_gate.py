"""The input gate's out-of-distribution checks (covidseg_tf.limits; issue 23 item 4): colour measured alike by both
decoders, the lung-plausibility statistics on hand-made probability maps, the generated non-X-rays
(covidseg_tf.nonxray) refused with the right reason through `Predictor.predict` (tiny cascade for the checks that need
no trained model, the shipped models for all), and real Val images passing with the shipped models.

The SavedModel side: test_serving.py (colour photos, noise, a gradient, grey-as-RGB and a marked X-ray through the
exported cascade's serving_default, TF1 loader, agreeing with `Predictor.predict`) and test_export.py (serve_client
on a colour photo through an exported cascade).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import GOOD, conv_cascade, phantom
from PIL import Image

from covidseg_tf import limits, nonxray
from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL
from covidseg_tf.imageio import decode_image, read_xray
from covidseg_tf.inference import Predictor
from covidseg_tf.inference.preprocess import input_quality, lung_plausibility, to_model_pixels

S = 64
NOT_XRAY = "not a frontal chest X-ray: "
LAYOUT = Path("Infection Segmentation Data") / "Infection Segmentation Data"


# ----------------------------------------------------------------------------------------------- lung plausibility
def lungs(centres=((0.3, 0.5), (0.7, 0.5)), radii=(0.13, 0.3), inside: float = 0.98, outside: float = 0.01,
          size: int = S) -> np.ndarray:
    """A (size, size) lung probability map: ellipses of probability `inside` at `centres` (x, y fractions)."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    p = np.full((size, size), outside, np.float32)
    for cx, cy in centres:
        p[((x - cx) / radii[0]) ** 2 + ((y - cy) / radii[1]) ** 2 < 1] = inside
    return p


def far_left() -> np.ndarray:
    """Most of the lung at the image's left border, a strip just right of the middle (balance 1/7)."""
    m = np.full((S, S), 0.01, np.float32)
    m[16:48, 0:12] = m[16:48, 32:34] = 0.98
    return m


def plausibility(maps: list[np.ndarray]) -> dict[str, list]:
    out = lung_plausibility(tf.constant(np.stack(maps)[..., None]))
    return {k: [r.decode() for r in v.numpy()] if v.dtype == tf.string else v.numpy().tolist()
            for k, v in out.items()}


def test_lung_plausibility_statistics_of_two_lungs():
    q = plausibility([lungs()])
    assert q["plausible"] == [True] and q["reason"] == [""]
    assert q["lung_area"][0] == pytest.approx(2 * np.pi * 0.13 * 0.3, rel=0.05)
    assert q["lung_balance"][0] == pytest.approx(0.5, abs=0.01)
    assert q["lung_x"][0] == pytest.approx(0.5, abs=0.01) and q["lung_y"][0] == pytest.approx(0.5, abs=0.01)
    assert q["lung_confidence"][0] == 1.0
    one = plausibility([lungs(centres=((0.3, 0.4), (0.7, 0.4)), inside=0.7)])  # higher, and unsure
    assert one["lung_y"][0] == pytest.approx(0.4, abs=0.01) and one["lung_confidence"][0] == 0.0


def test_lung_plausibility_names_the_first_failing_check():
    cases = {  # map: expected reason prefix
        "two lungs": (lungs(), ""),
        "no lung": (np.zeros((S, S), np.float32), "lung area 0.0 % of the image < 1 %"),
        "all lung": (np.full((S, S), 0.99, np.float32), "lung area 100.0 % of the image > 80 %"),
        "one lung": (lungs(centres=((0.3, 0.5),)), "no two lungs: the emptier image half holds 0.0 % of"),
        "at the top": (lungs(radii=(0.13, 0.05), centres=((0.3, 0.05), (0.7, 0.05))), "lungs off centre: "),
        "far left": (far_left(), "lungs off centre: centroid at x 0.15, y 0.50 of the image (expected x 0.2..0.8"),
        "lukewarm": (lungs(inside=0.75), "the lung model is unsure: 0.0 % of the lung area at probability >= 0.9"),
        "lukewarm, tiny": (lungs(radii=(0.03, 0.05), inside=0.75), "lung area "),  # area is named first
    }
    q = plausibility([m for m, _ in cases.values()])
    for i, (name, (_, reason)) in enumerate(cases.items()):
        assert q["plausible"][i] == (reason == ""), (name, q["reason"][i])
        assert q["reason"][i].startswith(reason), (name, q["reason"][i])


def test_lung_confidence_bound_is_inclusive():
    """Confidence = share of the lung pixels at probability >= LUNG_SURE: exactly MIN_LUNG_CONFIDENCE passes."""
    base = lungs(inside=0.7)
    lung = np.argwhere(base >= limits.LUNG_CUTOFF)
    k = int(round(limits.MIN_LUNG_CONFIDENCE * len(lung) * 100)) // 100  # sure pixels for exactly the bound
    maps = []
    for sure in (k, k - 1):
        m = base.copy()
        m[tuple(lung[:sure].T)] = limits.LUNG_SURE
        maps.append(m)
    q = plausibility(maps)
    expected = [k / len(lung), (k - 1) / len(lung)]
    assert q["lung_confidence"] == pytest.approx(expected)
    assert q["plausible"] == [expected[0] >= limits.MIN_LUNG_CONFIDENCE, False]


# ----------------------------------------------------------------------------------------------- order of the checks
def gate(images: list[np.ndarray], colour: list[float], lung_prob: np.ndarray | None = None) -> dict[str, list]:
    pixels = tf.stack([to_model_pixels(tf.constant(g[:, :, None]), S) for g in images])
    q = input_quality(pixels, [g.shape for g in images], colour, lung_prob)
    return {k: [r.decode() for r in v.numpy()] if v.dtype == tf.string else v.numpy().tolist() for k, v in q.items()}


def test_gate_checks_in_documented_order():
    noise = nonxray.make("grey_noise")
    ramp = nonxray.make("gradient")
    x = phantom(96, 96)
    plausible = np.stack([lungs()] * 6)[..., None]
    implausible = np.zeros((6, S, S, 1), np.float32)
    q = gate([x, noise, noise, ramp, noise[:20], x], [0.0, 0.0, 0.5, 0.0, 0.5, 0.5], plausible)
    assert q["check"] == ["", "noise", "colour", "smooth", "size", "colour"]
    assert q["reason"][1].startswith(NOT_XRAY + "noise-like: roughness ")
    assert q["reason"][2] == NOT_XRAY + f"a colour image: 50.0 % of the pixels clearly coloured (chroma >= " \
                                        f"{limits.COLOUR_CHROMA}) > 10 %"
    assert q["reason"][3].startswith(NOT_XRAY + "no structure: detail ")
    assert q["assessed"] == [True, False, False, False, False, False]
    lungless = gate([x, noise], [0.0, 0.0], implausible[:2])
    assert lungless["check"] == ["lungs", "noise"]  # the pixel checks come before the lung checks
    assert lungless["reason"][0] == NOT_XRAY + "lung area 0.0 % of the image < 1 %"
    assert gate([x], [limits.MAX_COLOUR_SHARE])["assessed"] == [True]  # bound inclusive; no map: no lung check


def test_predict_wants_one_colour_share_per_image():
    with pytest.raises(ValueError, match="1 colour shares for 2 images"):
        Predictor(*conv_cascade(S), 0.5).predict([phantom(70, 70), phantom(70, 70)], colour=[0.0])


# ----------------------------------------------------------------------------------------------- colour at decode time
def png(image: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(image)
    if mode == "P":  # an adaptive palette: grey images keep grey entries
        im = im.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode:
        im = im.convert(mode)
    im.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def marked_xray() -> np.ndarray:
    rgb = np.repeat(phantom(100, 100, 4)[..., None], 3, -1)
    rgb[6:14, 6:30] = (40, 200, 40)  # a green label: 1.9 % of the image
    return rgb


def encodings() -> dict[str, tuple[bytes, str]]:
    """name: (file bytes, file name); the photo kinds are colourful, the others grey or almost."""
    photo, grey = nonxray.make("photo"), phantom(80, 100, 5)
    rgb_grey = np.repeat(grey[..., None], 3, -1)
    g16 = (grey.astype(np.int32) * 16).astype(np.uint16)
    return {
        "photo_png": (png(photo), "p.png"), "photo_jpeg": (jpeg(photo), "p.jpg"),
        "photo_rgba": (png(photo, "RGBA"), "p.png"), "photo_palette": (png(photo, "P"), "p.png"),
        "rgb_noise_png": (png(nonxray.make("rgb_noise")), "n.png"),
        "grey_png": (png(grey), "g.png"), "grey_jpeg": (jpeg(grey), "g.jpg"), "grey_rgb_png": (png(rgb_grey), "g.png"),
        "grey_rgb_jpeg": (jpeg(rgb_grey), "g.jpg"), "grey_palette": (png(rgb_grey, "P"), "g.png"),
        "grey16_png": (png(g16, "I;16"), "g.png"), "marked_png": (png(marked_xray()), "m.png"),
    }


def test_colour_share_is_measured_alike_by_both_decoders():
    """`imageio.decode_image` (predict, batch_predict) and `serving.colour_share` (the SavedModel) agree: exactly
    for PNG, within a few pixels in a thousand for JPEG (two libjpeg builds); photographs are far above the limit,
    grey images (also saved as RGB, JPEG or 16 bit) at 0, a grey X-ray with a small colour label far below."""
    from covidseg_tf import serving

    for name, (data, file) in encodings().items():
        python = decode_image(data, file).colour
        served = float(serving.colour_share(tf.constant(data)).numpy())
        assert served == pytest.approx(python, abs=0.005 if file.endswith(".jpg") else 1e-7), name
        if name.startswith(("photo", "rgb_noise")):
            assert python > 5 * limits.MAX_COLOUR_SHARE, name
        elif name == "marked_png":
            assert python == pytest.approx(8 * 24 / 100 ** 2) and python < limits.MAX_COLOUR_SHARE / 4
        else:
            assert python < 0.001, name


def test_decode_image_keeps_decode_xray_grey_pixels(inputs):
    """Every supported grey input kind (PNG 8 and 16 bit, RGB(A) of grey, JPEG, DICOM MONOCHROME1/2, windowed)
    decodes to the same grey pixels as before, with colour share 0; a colour file's grey is Pillow's luma."""
    for kind in GOOD:
        decoded = decode_image(inputs[kind].read_bytes(), str(inputs[kind]))
        assert decoded.colour == 0.0, kind
        np.testing.assert_array_equal(decoded.gray, read_xray(inputs[kind]))
    photo = nonxray.make("photo")
    np.testing.assert_array_equal(decode_image(png(photo), "p.png").gray,
                                  np.asarray(Image.fromarray(photo).convert("L")))


# ----------------------------------------------------------------------------------------------- the generated set
MODEL_FREE = [k for k in nonxray.REQUIRED if nonxray.EXPECTED[k] in ("colour", "noise", "smooth")]


def test_generated_set_is_seeded():
    a, b = nonxray.make_all(3), nonxray.make_all(3)
    assert all(np.array_equal(a[k], b[k]) for k in nonxray.KINDS)
    assert not np.array_equal(a["photo"], nonxray.make("photo", 4))
    with pytest.raises(ValueError, match="unknown non-X-ray kind 'cat'"):
        nonxray.make("cat")


def test_model_free_checks_refuse_the_generated_set_through_predictor_predict():
    """Colour photos, RGB and grey noise and gradients are refused whatever the models (a tiny 1x1-convolution
    cascade here), from their PNG bytes as predict reads them, with the expected reason, empty masks and severity
    0; a chest-X-ray-like phantom in the same batch is assessed."""
    predictor = Predictor(*conv_cascade(S), 0.5)
    names = [f"{kind}@{seed}" for kind in MODEL_FREE for seed in (0, 1)] + ["phantom"]
    files = [nonxray.encode_png(nonxray.make(n.split("@")[0], int(n.split("@")[1]))) for n in names[:-1]]
    files.append(png(phantom(120, 100, 1)))
    decoded = [decode_image(data, f"{name}.png") for data, name in zip(files, names)]
    preds = predictor.predict([d.gray for d in decoded], colour=[d.colour for d in decoded])
    checks = predictor.input_gate([d.gray for d in decoded], colour=[d.colour for d in decoded])["check"]
    words = {"colour": "a colour image: ", "noise": "noise-like: ", "smooth": "no structure: "}
    for name, pred, check in zip(names[:-1], preds, checks):
        expected = nonxray.EXPECTED[name.split("@")[0]]
        assert check == expected, (name, pred.reason)
        assert not pred.assessed and pred.reason.startswith(NOT_XRAY + words[expected]), (name, pred.reason)
        assert not pred.lung.any() and not pred.infection.any() and pred.severity_total == 0.0
    assert preds[-1].assessed and preds[-1].reason == "" and preds[-1].lung.any() and checks[-1] == ""


@pytest.fixture(scope="module")
def shipped() -> Predictor:
    if not (DEFAULT_LUNG_MODEL.is_dir() and DEFAULT_INFECTION_MODEL.is_dir()):
        pytest.skip(f"the shipped models are missing: {DEFAULT_LUNG_MODEL}, {DEFAULT_INFECTION_MODEL}")
    return Predictor.load(DEFAULT_LUNG_MODEL, DEFAULT_INFECTION_MODEL)


def test_shipped_models_refuse_every_generated_non_xray_with_the_expected_check(shipped):
    """Every required kind (text, checkerboards, CT- and MRI-like images need the trained lung model), two seeds,
    through `Predictor.predict` as predict runs it: refused by the check `nonxray.EXPECTED` names."""
    names, grays, colour = [], [], []
    for seed in (0, 1):
        for kind in nonxray.REQUIRED:
            d = decode_image(nonxray.encode_png(nonxray.make(kind, seed)), f"{kind}.png")
            names.append(f"{kind}@{seed}")
            grays.append(d.gray)
            colour.append(d.colour)
    preds = shipped.predict(grays, colour=colour)
    gate_checks = shipped.input_gate(grays, colour=colour)["check"]
    for name, pred, check in zip(names, preds, gate_checks):
        assert not pred.assessed and pred.reason.startswith(NOT_XRAY), (name, pred.reason)
        assert check == nonxray.EXPECTED[name.split("@")[0]], (name, pred.reason)
        assert pred.severity_total == 0.0 and not pred.lung.any()


def val_files(root: Path, every: int) -> list[Path]:
    files = sorted((root / LAYOUT / "Val").glob("*/images/*.png"))
    assert len(files) > 900
    return files[::every]


def test_real_val_sample_passes_with_the_shipped_models(shared_covidqu, shipped):
    """Every 8th real Val image (all classes) is assessed by the shipped models' gate (bench/ood_gate.py checks all
    4,660 Train and Val images and reports the margins; the slow test below re-checks them)."""
    files = val_files(shared_covidqu, 8)
    decoded = [decode_image(f.read_bytes(), str(f)) for f in files]
    q = shipped.input_gate([d.gray for d in decoded], colour=[d.colour for d in decoded])
    refused = [(str(f), r) for f, r, ok in zip(files, q["reason"], q["assessed"]) if not ok]
    assert not refused, refused[:3]
    # version 5's lung model: all of Val at least 0.53 (version 3's: one image at 0.333; bench/RESULTS.md)
    assert min(q["lung_confidence"]) > 1.1 * limits.MIN_LUNG_CONFIDENCE
    assert np.median(q["lung_confidence"]) > 2.5 * limits.MIN_LUNG_CONFIDENCE


@pytest.mark.slow
def test_all_real_train_and_val_images_pass_with_the_shipped_models(shared_covidqu, shipped):
    """All 4,660 real Train and Val images: no false refusal (a few minutes)."""
    files = sorted((shared_covidqu / LAYOUT).glob("Train/*/images/*.png")) + val_files(shared_covidqu, 1)
    assert len(files) == 4660
    refused = []
    for i in range(0, len(files), 64):
        decoded = [decode_image(f.read_bytes(), str(f)) for f in files[i:i + 64]]
        q = shipped.input_gate([d.gray for d in decoded], colour=[d.colour for d in decoded])
        refused += [(str(f), r) for f, r, ok in zip(files[i:i + 64], q["reason"], q["assessed"]) if not ok]
    assert not refused, refused[:5]

"""SavedModel export, proven the way TF Serving loads it: TF1 loader, tag `serve`, signature tensor names,
in a fresh process; plus `saved_model_cli show --all` and the warm-up records.

Each servable (lung, infection, cascade) is exported once per module (tiny EfficientNet-B0 U-Nets at 64 px,
no pretrained weights) and every case of that servable runs in ONE subprocess (fixtures below), so the tests
themselves only compare numbers.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_tf1
from PIL import Image

from covidseg_tf import export, nonxray, serving
from covidseg_tf.inference import Predictor
from covidseg_tf.inference.postprocess import severity
from covidseg_tf.inference.preprocess import input_quality
from covidseg_tf.models import build_unet

S = 64
THRESHOLD = 0.5
TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]



# ------------------------------------------------------------------------------------------------ test images


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def xray(h: int, w: int, seed: int = 0, rgb: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 128 + 80 * np.sin(x / 7.0) * np.cos(y / 5.0) + rng.normal(0, 10, (h, w))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.stack([img, img // 2, 255 - img], -1) if rgb else img


def lung_mask(h: int, w: int, value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 6 : 5 * h // 6, w // 8 : 3 * w // 8] = value
    m[h // 6 : 5 * h // 6, 5 * w // 8 : 7 * w // 8] = value
    return m


def patched_png_header(height: int, width: int) -> bytes:
    """A tiny PNG whose IHDR claims height x width (a decompression-bomb header; the CRC no longer matches)."""
    data = bytearray(png(np.zeros((4, 4), np.uint8)))
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    return bytes(data)


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


GOOD = [png(xray(50, 70, 1)), jpeg(xray(96, 80, 2, rgb=True))]  # different sizes, grey PNG + colour JPEG
GOOD_HW = [(50, 70), (96, 80)]
MASKS = [png(lung_mask(50, 70)), png(lung_mask(96, 80, value=1))]  # 0/255 and 0/1 masks
BAD = {
    "not_image": ([b"this is not an image"], "images[0] is not a PNG or JPEG"),
    "empty_batch": ([], "empty batch"),
    "bomb_header": ([patched_png_header(100_000, 100_000)], "each side must be 1..4096"),
    "wide_png": ([png(np.zeros((4, 4100), np.uint8))], "each side must be 1..4096"),
    "tall_jpeg": ([jpeg(np.zeros((4100, 8), np.uint8))], "each side must be 1..4096"),
    "truncated_png": ([serving.PNG_MAGIC + b"\0\0"], "truncated PNG"),
    "second_bad": ([GOOD[0], b"GIF89a...."], "images[1] is not a PNG or JPEG"),
    "corrupt_png": ([png(xray(20, 20))[:40] + b"\0" * 50], ""),  # valid header, broken data: decoder's error
}


def strings(items: list[bytes]) -> np.ndarray:
    return np.array(items, dtype=object).reshape([len(items)])


# ------------------------------------------------------------------------------------------------- fixtures


def sharpen(model: Any, x: np.ndarray, gain: float = 40.0) -> Any:
    """Rescale the last convolution so that logits become gain * (logit - t), t a logit near the median on `x`.

    An untrained U-Net outputs probabilities within a few hundredths of 0.5 and sets only ~1% of the pixels;
    sharpened, about half of the pixels of the test images are set and few lie near the threshold, so the
    mask comparisons below test something. t is the middle of the widest gap between neighbouring logits
    around the median, so no pixel of `x` sits at the threshold. Still an ordinary Keras model (weights only).
    """
    prob = np.clip(model(x, training=False).numpy().astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.sort(np.log(prob / (1 - prob)).ravel())
    mid = logits.size // 2
    i = mid - 50 + int(np.argmax(np.diff(logits[mid - 50 : mid + 51])))
    median = float(logits[i] + logits[i + 1]) / 2
    conv = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel, bias = conv.get_weights()
    conv.set_weights([kernel * gain, (bias - median) * gain])
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    keras.utils.set_random_seed(0)
    lung = build_unet("efficientnetb0", (S, S, 3), encoder_weights=None, name="lung_test")
    infection = build_unet("efficientnetb0", (S, S, 4), encoder_weights=None, name="infection_test")
    pixels = _pixels_of(GOOD)
    sharpen(lung, pixels)
    lung_mask = (lung(pixels, training=False).numpy() >= THRESHOLD).astype(np.float32)
    sharpen(infection, np.concatenate([pixels, lung_mask], -1))  # on the cascade's stage-2 input
    return {"lung": lung, "infection": infection}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("saved_models")


def _pixels_of(images: list[bytes]) -> np.ndarray:
    pixels, _ = serving.load_images(tf.constant(strings(images)), S)
    return pixels.numpy()


@pytest.fixture(scope="module")
def lung_path(models, base) -> Path:
    return export.export_stage(models["lung"], "lung", base, decision=THRESHOLD)


@pytest.fixture(scope="module")
def lung_run(lung_path, tmp_path_factory) -> dict[str, Any]:
    path = lung_path
    rng = np.random.default_rng(3)
    cases = {
        "default": {"signature": "serving_default", "feeds": {"images": strings(GOOD)}},
        "pixels": {"signature": "predict_pixels",
                   "feeds": {"pixels": rng.uniform(0, 255, (2, S, S, 3)).astype(np.float32)}},
    }
    cases.update({f"bad_{k}": {"signature": "serving_default", "feeds": {"images": strings(v[0])}}
                  for k, v in BAD.items()})
    cases.update(_warmup_cases(path))
    results = run_tf1(path, list(cases.values()), tmp_path_factory.mktemp("lung_run"))
    return {"path": path, "cases": cases, "results": dict(zip(cases, results))}


@pytest.fixture(scope="module")
def infection_path(models, base) -> Path:
    return export.export_stage(models["infection"], "infection", base, decision=THRESHOLD)


@pytest.fixture(scope="module")
def infection_run(infection_path, tmp_path_factory) -> dict[str, Any]:
    path = infection_path
    rng = np.random.default_rng(4)
    pixels = rng.uniform(0, 255, (2, S, S, 4)).astype(np.float32)
    pixels[..., 3] = (rng.uniform(size=(2, S, S)) > 0.4).astype(np.float32)
    cases = {
        "default": {"signature": "serving_default", "feeds": {"images": strings(GOOD), "lung_masks": strings(MASKS)}},
        "pixels": {"signature": "predict_pixels", "feeds": {"pixels": pixels}},
        "bad_mask_size": {"signature": "serving_default",
                          "feeds": {"images": strings(GOOD), "lung_masks": strings(MASKS[::-1])}},
        "bad_mask_count": {"signature": "serving_default",
                           "feeds": {"images": strings(GOOD), "lung_masks": strings(MASKS[:1])}},
        "bad_mask_bytes": {"signature": "serving_default",
                           "feeds": {"images": strings(GOOD[:1]), "lung_masks": strings([b"nope"])}},
    }
    cases.update(_warmup_cases(path))
    results = run_tf1(path, list(cases.values()), tmp_path_factory.mktemp("infection_run"))
    return {"path": path, "cases": cases, "results": dict(zip(cases, results))}


@pytest.fixture(scope="module")
def cascade_path(models, base) -> Path:
    return export.export_cascade(models["lung"], models["infection"], base, decision=THRESHOLD)


@pytest.fixture(scope="module")
def cascade_run(cascade_path, tmp_path_factory) -> dict[str, Any]:
    path = cascade_path
    rng = np.random.default_rng(5)
    cases = {
        "default": {"signature": "serving_default", "feeds": {"images": strings(GOOD)}},
        "pixels": {"signature": "predict_pixels",
                   "feeds": {"pixels": rng.uniform(0, 255, (3, S, S, 3)).astype(np.float32)}},
        "bad_bomb_header": {"signature": "serving_default", "feeds": {"images": strings(BAD["bomb_header"][0])}},
        "bad_empty_batch": {"signature": "serving_default", "feeds": {"images": strings([])}},
    }
    cases.update(_warmup_cases(path))
    results = run_tf1(path, list(cases.values()), tmp_path_factory.mktemp("cascade_run"))
    return {"path": path, "cases": cases, "results": dict(zip(cases, results))}


# --------------------------------------------------------------------------------------- warm-up decoding


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def wire_fields(buf: bytes) -> dict[int, list[Any]]:
    """Generic protobuf wire-format reader: {field number: [values]} (independent of serving.py's writer)."""
    out: dict[int, list[Any]] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    assert i == len(buf), "trailing bytes"
    return out


def read_warmup(path: Path) -> list[dict[str, Any]]:
    """Decode each PredictionLog record: model name, signature, inputs as numpy arrays."""
    from tensorflow.core.framework import tensor_pb2

    records = []
    for raw in tf.data.TFRecordDataset(str(path / "assets.extra" / serving.WARMUP_FILE)).as_numpy_iterator():
        log = wire_fields(raw)
        assert set(log) == {6}, "PredictionLog must hold exactly predict_log (6)"
        request = wire_fields(wire_fields(log[6][0])[1][0])  # PredictLog.request (1)
        spec = wire_fields(request[1][0])  # PredictRequest.model_spec (1)
        inputs = {}
        for entry in request[2]:  # PredictRequest.inputs (2), map entries key=1 value=2
            e = wire_fields(entry)
            inputs[e[1][0].decode()] = tf.make_ndarray(tensor_pb2.TensorProto.FromString(e[2][0]))
        records.append({"name": spec[1][0].decode(), "signature": spec[3][0].decode(), "inputs": inputs,
                        "raw": raw})
    return records


def _warmup_cases(path: Path) -> dict[str, dict[str, Any]]:
    return {f"warmup_{i}": {"signature": r["signature"], "feeds": r["inputs"]} for i, r in enumerate(read_warmup(path))}


# -------------------------------------------------------------------------------------------------- helpers


def ok(run: dict[str, Any], case: str) -> dict[str, np.ndarray]:
    result = run["results"][case]
    assert "outputs" in result, f"{case} failed: {result}"
    return result["outputs"]


def assert_masks_match(mask: np.ndarray, prob: np.ndarray, within: np.ndarray | None = None) -> None:
    expected = (prob >= THRESHOLD).astype(np.float32)
    if within is not None:
        expected = expected * (within > 0.5)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert np.array_equal(mask, expected)


COMPACT = {  # serving_default outputs: (B,) strings and scalars only, no dense maps (REST replies stay small)
    "lung": {"lung_mask_bytes", "height", "width"},
    "infection": {"infection_mask_bytes", "height", "width"},
    "cascade": {"lung_mask_bytes", "infection_mask_bytes", "severity_left", "severity_right", "severity_total",
                "height", "width", "assessed", "reason"},
}
MARGIN = 1e-4
"""Pixels whose resized probability is within MARGIN of the threshold are not compared: SavedModel and Keras
probabilities differ by <= TOL, and bilinear resizing (a convex combination) keeps that bound."""


def assert_compact(out: dict[str, np.ndarray], name: str, batch: int) -> None:
    assert set(out) == COMPACT[name]
    assert all(v.shape == (batch,) for v in out.values()), {k: v.shape for k, v in out.items()}


def expected_full_mask(prob_small: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The documented resize rule applied to a Keras probability map (S, S, 1): bilinear (no antialias) to the
    input size, then `>= threshold`. Returns (mask, decided) as (H, W) bools (decided: not within MARGIN)."""
    full = tf.image.resize(prob_small, hw, method="bilinear").numpy()[..., 0]
    decided = np.abs(full - THRESHOLD) > MARGIN
    assert decided.mean() > 0.99, "too many pixels at the threshold: the comparison would say little"
    return full >= THRESHOLD, decided


def check_png_mask(data: bytes, hw: tuple[int, int], expected: np.ndarray, decided: np.ndarray) -> np.ndarray:
    """A `_bytes` output is a uint8 0/255 PNG at the input size equal to `expected` on the decided pixels."""
    m = decode_png(data)
    assert m.shape == hw and m.dtype == np.uint8
    assert set(np.unique(m)) <= {0, 255}
    assert np.array_equal((m > 0)[decided], expected[decided])
    return m > 0


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["lung", "infection", "cascade"])
def test_export_writes_version(request, name, base):
    """Export (first use of the fixture) -> a numbered, complete version folder, no temporary folder left."""
    path = request.getfixturevalue(f"{name}_path")
    assert path == base / name / "1"
    assert (path / "saved_model.pb").is_file() and (path / "variables" / "variables.index").is_file()
    assert (path / "assets.extra" / serving.WARMUP_FILE).is_file()
    info = json.loads((path / "assets.extra" / "covidseg_export.json").read_text())
    assert info["servable"] == name and info["image_size"] == S and info["threshold"] == THRESHOLD
    assert not [p for p in (base / name).iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("name", ["lung", "infection", "cascade"])
def test_tf1_loader_runs_every_case(request, name):
    """All cases of a servable ran in a fresh process through the TF1 loader (first use of the fixture)."""
    run = request.getfixturevalue(f"{name}_run")
    assert len(run["results"]) == len(run["cases"]) >= 4
    for case, result in run["results"].items():
        assert ("error" in result) == case.startswith("bad_"), (case, result)


EXPECT_CLI = {
    "lung": ["inputs['images']", "inputs['pixels']", "outputs['lung_mask_bytes']", "outputs['lung_prob']",
             "outputs['height']", "(-1, 64, 64, 3)"],
    "infection": ["inputs['images']", "inputs['lung_masks']", "outputs['infection_mask_bytes']", "(-1, 64, 64, 4)"],
    "cascade": ["inputs['images']", "outputs['severity_total']", "outputs['severity_left']",
                "outputs['severity_right']", "outputs['lung_mask_bytes']", "outputs['infection_mask_bytes']"],
}


@pytest.mark.parametrize("name", ["lung", "infection", "cascade"])
def test_saved_model_cli_lists_signatures(request, name, base):
    path = request.getfixturevalue(f"{name}_path")  # the export itself is timed in test_export_writes_version
    proc = subprocess.run(["saved_model_cli", "show", "--all", "--dir", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "MetaGraphDef with tag-set: 'serve'" in out
    assert "signature_def['serving_default']" in out and "signature_def['predict_pixels']" in out
    for needle in EXPECT_CLI[name]:
        assert needle in out, f"{name}: {needle} missing"
    assert "output_0" not in out
    default = out.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    assert sorted(set(re.findall(r"outputs\['(\w+)'\]", default))) == sorted(COMPACT[name])
    assert "_prob" not in default and "(-1, 64, 64, 1)" not in default


def test_lung_default_signature_matches_keras(lung_run, models):
    """serving_default: only the input-size PNG mask and the size; the PNG is the Keras model's prediction
    resized to the input size and thresholded."""
    out = ok(lung_run, "default")
    assert_compact(out, "lung", 2)
    prob = models["lung"](_pixels_of(GOOD), training=False).numpy()
    assert [tuple(x) for x in zip(out["height"], out["width"])] == GOOD_HW
    for i, hw in enumerate(GOOD_HW):
        check_png_mask(out["lung_mask_bytes"][i], hw, *expected_full_mask(prob[i], hw))


def test_lung_pixels_signature_matches_keras(lung_run, models):
    out = ok(lung_run, "pixels")
    pixels = lung_run["cases"]["pixels"]["feeds"]["pixels"]
    assert np.max(np.abs(out["lung_prob"] - models["lung"](pixels, training=False).numpy())) <= TOL
    assert_masks_match(out["lung_mask"], out["lung_prob"])
    assert set(out) == {"lung_prob", "lung_mask"}


def test_image_decoding_feeds_raw_grey_pixels():
    """At the model size the signature's pixels are the file's grey values repeated to 3 channels."""
    grey = xray(S, S, 7)
    rgb = xray(S, S, 8, rgb=True)
    pixels, sizes = serving.load_images(tf.constant(strings([png(grey), png(rgb)])), S)
    assert np.array_equal(pixels.numpy()[0], np.repeat(grey[..., None], 3, -1).astype(np.float32))
    luma = tf.image.rgb_to_grayscale(rgb).numpy()[..., 0].astype(np.float32)
    assert np.max(np.abs(pixels.numpy()[1, ..., 0] - luma)) <= 1.0  # decoder's RGB -> grey conversion
    assert sizes.numpy().tolist() == [[S, S], [S, S]]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_invalid_argument(lung_run, case):
    result = lung_run["results"][f"bad_{case}"]
    assert result.get("error") == "InvalidArgumentError", result
    assert BAD[case][1] in result["message"]


def test_bad_input_eager_same_messages():
    """The same checks hold in eager code (no decode of the bomb: the error comes from the header)."""
    with pytest.raises(tf.errors.InvalidArgumentError, match="each side must be 1..4096"):
        serving.load_images(tf.constant(strings([patched_png_header(60_000, 60_000)])), S)
    with pytest.raises(tf.errors.InvalidArgumentError, match="is not a PNG or JPEG"):
        serving.load_images(tf.constant(strings([b"\x00" * 100])), S)


def test_infection_signatures_match_keras(infection_run, models):
    out = ok(infection_run, "default")
    assert_compact(out, "infection", 2)
    assert [tuple(x) for x in zip(out["height"], out["width"])] == GOOD_HW
    lung_small, _ = serving.load_masks(tf.constant(strings(MASKS)), tf.constant(GOOD_HW, tf.int32), S)
    x = np.concatenate([_pixels_of(GOOD), lung_small.numpy()], -1)
    prob = models["infection"](x, training=False).numpy()
    for i, hw in enumerate(GOOD_HW):
        lung = decode_png(MASKS[i]) > 0  # 0/255 and 0/1 masks
        mask, decided = expected_full_mask(prob[i], hw)
        inf = check_png_mask(out["infection_mask_bytes"][i], hw, mask & lung, decided)
        assert not (inf & ~lung).any()

    out = ok(infection_run, "pixels")
    assert set(out) == {"infection_prob", "infection_mask"}
    pixels = infection_run["cases"]["pixels"]["feeds"]["pixels"]
    assert np.max(np.abs(out["infection_prob"] - models["infection"](pixels, training=False).numpy())) <= TOL
    assert_masks_match(out["infection_mask"], out["infection_prob"], within=pixels[..., 3:4])


@pytest.mark.parametrize("case,message", [
    ("bad_mask_size", "sizes must match"),
    ("bad_mask_count", "one mask per image"),
    ("bad_mask_bytes", "lung_masks[0] is not a PNG or JPEG"),
])
def test_infection_bad_masks(infection_run, case, message):
    result = infection_run["results"][case]
    assert result.get("error") == "InvalidArgumentError", result
    assert message in result["message"]


def test_cascade_default_signature_matches_keras_cascade(cascade_run, models):
    """The served masks and severity follow the Keras models' probabilities by `postprocess.apply_decision`'s rule,
    after the input gate, whose verdict is the Python gate's (`preprocess.input_quality` on the Keras Stage 1's map and
    `imageio.decode_image`'s colour share): an image it refuses has empty masks and severity 0. (These untrained
    models give no plausible lungs, so both test images are refused here; test_serving.py checks assessed
    images with a cascade whose lung map is plausible.)"""
    from covidseg_tf.imageio import decode_image

    out = ok(cascade_run, "default")
    assert_compact(out, "cascade", 2)
    pixels = _pixels_of(GOOD)
    expected = Predictor(models["lung"], models["infection"], THRESHOLD).predict_pixels(pixels)
    colour = [decode_image(data, name).colour for data, name in zip(GOOD, ("a.png", "b.jpg"))]
    gate = input_quality(pixels, GOOD_HW, colour, expected["lung_prob"])
    assert out["assessed"].tolist() == gate["assessed"].numpy().tolist()
    assert [r.decode() for r in out["reason"]] == [r.decode() for r in gate["reason"].numpy()]
    assert out["reason"][1].decode().startswith("not a frontal chest X-ray: a colour image")  # the colour JPEG
    for i, hw in enumerate(GOOD_HW):
        lung_exp, lung_ok = expected_full_mask(expected["lung_prob"].numpy()[i], hw)
        inf_exp, inf_ok = expected_full_mask(expected["infection_prob"].numpy()[i], hw)
        if not out["assessed"][i]:
            assert not decode_png(out["lung_mask_bytes"][i]).any()
            assert not decode_png(out["infection_mask_bytes"][i]).any()
            assert decode_png(out["lung_mask_bytes"][i]).shape == hw
            assert all(out[key][i] == 0.0 for key in serving.SEVERITY_KEYS)
            continue
        lung = check_png_mask(out["lung_mask_bytes"][i], hw, lung_exp, lung_ok)
        inf = check_png_mask(out["infection_mask_bytes"][i], hw, inf_exp & lung_exp, inf_ok & lung_ok)
        assert not (inf & ~lung).any(), "infection PNG must lie inside the lung PNG"
        # severity is computed on exactly these input-size masks (as predict computes it) ...
        own = severity(lung[None, ..., None].astype(np.float32), inf[None, ..., None].astype(np.float32))
        # ... and on the Keras models' masks at the input size it differs only by the undecided pixels
        keras_sev = severity(lung_exp[None, ..., None].astype(np.float32),
                             (inf_exp & lung_exp)[None, ..., None].astype(np.float32))
        for key in serving.SEVERITY_KEYS:
            assert out[key][i] == pytest.approx(float(own[key][0]), abs=1e-4), key
            assert out[key][i] == pytest.approx(float(keras_sev[key][0]), abs=1.0), key
    assert out["height"].tolist() == [50, 96] and out["width"].tolist() == [70, 80]


def test_cascade_pixels_signature_matches_keras_cascade(cascade_run, models):
    out = ok(cascade_run, "pixels")
    pixels = cascade_run["cases"]["pixels"]["feeds"]["pixels"]
    expected = Predictor(models["lung"], models["infection"], THRESHOLD).predict_pixels(pixels)
    assert set(out) == set(expected)
    for key in ("lung_prob", "infection_prob"):
        assert np.max(np.abs(out[key] - expected[key].numpy())) <= TOL, key
    assert_masks_match(out["infection_mask"], out["infection_prob"], within=out["lung_mask"])


def test_cascade_bad_input(cascade_run):
    for case, message in (("bad_bomb_header", "each side must be 1..4096"), ("bad_empty_batch", "empty batch")):
        result = cascade_run["results"][case]
        assert result.get("error") == "InvalidArgumentError" and message in result["message"], result


@pytest.mark.parametrize("name", ["lung", "infection", "cascade"])
def test_warmup_records_parse_and_run(request, name):
    run = request.getfixturevalue(f"{name}_run")
    records = read_warmup(run["path"])
    assert [r["signature"] for r in records] == ["serving_default", "predict_pixels"]
    assert {r["name"] for r in records} == {name}
    assert records[1]["inputs"]["pixels"].shape == (1, S, S, 4 if name == "infection" else 3)
    assert set(records[0]["inputs"]) == ({"images", "lung_masks"} if name == "infection" else {"images"})
    for i in range(len(records)):
        outputs = ok(run, f"warmup_{i}")
        assert all(v.shape[0] == 1 for v in outputs.values())


def test_warmup_records_parse_with_tensorflow_serving_protos(lung_run, infection_run):
    """Cross-check the hand-encoded bytes with the real protos of tensorflow-serving-api, which the README's test
    command and .ci/run install with --no-deps (skipped where it is not installed)."""
    prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    for run in (lung_run, infection_run):
        for record in read_warmup(run["path"]):
            msg = prediction_log_pb2.PredictionLog.FromString(record["raw"])
            assert msg.WhichOneof("log_type") == "predict_log"
            req = msg.predict_log.request
            assert req.model_spec.name == record["name"]
            assert req.model_spec.signature_name == record["signature"]
            assert set(req.inputs) == set(record["inputs"])
            for key, value in record["inputs"].items():
                np.testing.assert_array_equal(tf.make_ndarray(req.inputs[key]), value)
            assert msg.SerializeToString(deterministic=True) == record["raw"]


def test_rest_client_end_to_end_with_exported_cascade(cascade_path, tmp_path):
    """serve_client -> a local HTTP stand-in that runs the exported cascade's serving_default and maps the
    outputs to JSON as TF Serving's REST API does (row format, `_bytes` as base64) -> masks and severity."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from covidseg_tf import serve_client

    loaded = tf.saved_model.load(str(cascade_path))
    fn = loaded.signatures["serving_default"]
    seen: dict[str, Any] = {}

    def to_json(key: str, value: np.ndarray) -> Any:
        if key.endswith("_bytes"):
            return {"b64": base64.b64encode(value).decode()}
        return value.decode() if isinstance(value, bytes) else value.tolist()  # other strings as JSON strings

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            images = [base64.b64decode(inst["images"]["b64"]) for inst in body["instances"]]
            try:
                out = {k: v.numpy() for k, v in fn(images=tf.constant(strings(images))).items()}
                reply, code = {"predictions": [{k: to_json(k, v[i]) for k, v in out.items()}
                                               for i in range(len(images))]}, 200
                seen["outputs"], seen["reply"] = out, reply
            except tf.errors.InvalidArgumentError as exc:
                reply, code = {"error": exc.message}, 400
            data = json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        (tmp_path / "x.jpg").write_bytes(GOOD[1])
        (tmp_path / "photo.png").write_bytes(nonxray.encode_png(nonxray.make("photo")))
        (tmp_path / "bad.png").write_bytes(patched_png_header(9000, 100))
        done, errors = serve_client.predict_files(url, "cascade", [tmp_path / f for f in ("x.jpg", "photo.png",
                                                                                           "bad.png")],
                                                  tmp_path / "out", timeout=120)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    assert len(done) == 2 and len(errors) == 1
    assert "HTTP 400" in errors[0] and "images[0] is 9000x100 pixels" in errors[0]
    out = seen["outputs"]  # of the last good request: the photo
    for name, hw in (("x", (96, 80)), ("photo", (256, 256))):  # both colour: the input gate refuses them
        summary = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert (summary["height"], summary["width"]) == hw
        assert summary["assessed"] is False
        assert summary["reason"].startswith("not a frontal chest X-ray: a colour image: "), summary["reason"]
        assert all(summary[k] is None for k in serving.SEVERITY_KEYS)  # zeros of a refused image are no finding
        for mask in ("lung_mask", "infection_mask"):
            data = decode_png((tmp_path / "out" / f"{name}_{mask}.png").read_bytes())
            assert data.shape == hw and not data.any()
    assert (tmp_path / "out" / "photo_lung_mask.png").read_bytes() == out["lung_mask_bytes"][0]
    row = seen["reply"]["predictions"][0]  # compact: base64 PNGs and numbers, no nested lists of dense maps
    assert set(row) == COMPACT["cascade"]
    assert all(isinstance(v, (dict, int, float, str)) for v in row.values())
    assert row["assessed"] is False and row["reason"] == summary["reason"] and row["severity_total"] == 0.0
    pngs = sum(len(row[k]["b64"]) for k in ("lung_mask_bytes", "infection_mask_bytes"))
    assert len(json.dumps(seen["reply"])) < pngs + 500

"""The cascade SavedModel's serving_default on bad and strange input, the way TF Serving runs it (TF1 loader, in a
fresh process): the input-quality gate (`assessed`, `reason`) agreeing with the Python path, corrupt images named
inside a batch, the size policy; plus a seeded fuzz of mutated PNG/JPEG/DICOM bytes through `imageio.decode_xray`
and through the serving signature (clean errors or valid results, never a crash, hang or unbounded memory).

The cascade here is tiny (two 1x1-convolution stages with fixed weights, exported in seconds): dark pixels are
lung, brighter pixels inside the lung are infection, far from the threshold, so both paths give the same masks.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from helpers import check_decode_outcomes, conv_cascade, phantom, run_fuzz, run_tf1, write_dicom
from PIL import Image

from covidseg_tf import limits, nonxray

S = 64


def png(array: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def cmyk_jpeg(gray: np.ndarray) -> bytes:
    """A valid 4-component (CMYK, Adobe) JPEG of a grey image, as print workflows write them: ink = 255 - grey."""
    ink = 255 - gray
    buf = io.BytesIO()
    Image.fromarray(np.stack([ink // 3, ink // 3, ink // 3, ink - ink // 3 * 3 + ink // 2], -1), "CMYK").save(
        buf, format="JPEG", quality=95)
    return buf.getvalue()


def corrupt(data: bytes, at: int = 60, length: int = 120) -> bytes:
    """The same header, broken data: `length` bytes from `at` overwritten."""
    return data[:at] + bytes((b + 97) % 256 for b in data[at:at + length]) + data[at + length:]


def strings(items: list[bytes]) -> np.ndarray:
    return np.array(items, dtype=object).reshape([len(items)])


NOT_XRAY = "not a frontal chest X-ray: "
MARKED = np.repeat(phantom(90, 90, 6)[..., None], 3, -1)
MARKED[5:12, 5:20] = (230, 30, 30)  # a small red annotation (2 % of the image) on a grey X-ray saved as RGB
GATE = {  # name: (encoded image, expected reason prefix or "" for assessed)
    "good_png": (png(phantom(96, 80, 1)), ""),
    "grey_256": (png(np.full((256, 256), 128, np.uint8)), "near-constant image"),
    "tiny_2x2": (png(np.array([[0, 255], [255, 0]], np.uint8)), "too small: 2x2 pixels"),
    "tiny_1x1": (png(np.zeros((1, 1), np.uint8)), "too small: 1x1 pixels"),
    "strip_3000x300": (png(phantom(3000, 300, 2)), "extreme aspect ratio: 3000x300 pixels"),
    "good_jpeg": (jpeg(phantom(40, 52, 3)), ""),  # small, but above MIN_SIDE
    # the out-of-distribution checks that need no trained model (covidseg_tf.nonxray; lungs: test_ood_gate.py)
    "photo_png": (png(nonxray.make("photo")), NOT_XRAY + "a colour image"),
    "photo_jpeg": (jpeg(nonxray.make("photo_small")), NOT_XRAY + "a colour image"),
    "rgb_noise": (png(nonxray.make("rgb_noise")), NOT_XRAY + "a colour image"),
    "grey_noise": (png(nonxray.make("grey_noise")), NOT_XRAY + "noise-like"),
    "gradient": (png(nonxray.make("gradient")), NOT_XRAY + "no structure"),
    "grey_as_rgb_png": (png(np.repeat(phantom(80, 96, 7)[..., None], 3, -1)), ""),  # colour type 2, chroma 0
    "grey_as_rgb_jpeg": (jpeg(np.repeat(phantom(80, 96, 8)[..., None], 3, -1)), ""),  # 3 components
    "red_marker": (png(MARKED), ""),
}


@pytest.fixture(scope="module")
def models() -> tuple[keras.Model, keras.Model]:
    return conv_cascade(S)


@pytest.fixture(scope="module")
def cascade_path(models, tmp_path_factory) -> Path:
    from covidseg_tf.export import export_cascade

    return export_cascade(*models, tmp_path_factory.mktemp("served"), decision=0.5, warmup=False)


@pytest.fixture(scope="module")
def tf1(cascade_path, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Every case below, through the TF1 loader in one fresh process."""
    good, good_jpeg = GATE["good_png"][0], GATE["good_jpeg"][0]
    cases = {
        "gate": [v[0] for v in GATE.values()],
        "corrupt_png": [good, corrupt(png(phantom(70, 60, 4)))],  # header fine, IDAT broken
        "corrupt_jpeg": [good, good_jpeg, jpeg(phantom(70, 60, 5))[:400]],  # scan data cut short
        "corrupt_first_of_two": [corrupt(png(phantom(70, 60, 4))), b"GIF89a not ours"],
        "bomb": [good, png(np.zeros((12000, 12000), np.uint8), optimize=True)],
        "side": [png(np.zeros((1, limits.MAX_SIDE + 1), np.uint8)), good],
        "cmyk": [good, cmyk_jpeg(phantom(96, 80, 7))],
    }
    results = run_tf1(cascade_path, [{"signature": "serving_default", "feeds": {"images": strings(v)}}
                                     for v in cases.values()], tmp_path_factory.mktemp("tf1"))
    return dict(zip(cases, results))


def test_gate_flags_what_cannot_be_a_chest_xray_in_the_saved_model(tf1):
    """A uniform grey image, 2x2 and 1x1 images, a 10:1 strip, colour photographs (PNG and JPEG), RGB and grey
    noise and a gradient are "not assessed" with their reason, empty masks at their own size and severity 0 (never
    a grade); real-looking images in the same batch are assessed, also when saved as RGB or with a small colour
    marker."""
    out = tf1["gate"]["outputs"]
    for i, (name, (data, reason)) in enumerate(GATE.items()):
        assert bool(out["assessed"][i]) == (reason == ""), name
        assert out["reason"][i].decode().startswith(reason), (name, out["reason"][i])
        h, w = np.asarray(Image.open(io.BytesIO(data))).shape[:2]
        assert (out["height"][i], out["width"][i]) == (h, w)
        lung = np.asarray(Image.open(io.BytesIO(out["lung_mask_bytes"][i])))
        assert lung.shape == (h, w)
        if reason:
            assert not lung.any() and not np.asarray(Image.open(io.BytesIO(out["infection_mask_bytes"][i]))).any()
            assert all(out[k][i] == 0.0 for k in ("severity_left", "severity_right", "severity_total")), name
        else:
            assert lung.mean() > 0.1 and out["severity_total"][i] > 0, name  # the phantom has lungs and infection


def test_gate_same_rule_in_python_and_saved_model(tf1, models):
    """`Predictor.predict` (predict, the batch predictor) gives the same flags, reasons, masks and severity, its
    colour share measured by `imageio.decode_image` as the SavedModel measures it."""
    from covidseg_tf.imageio import decode_image
    from covidseg_tf.inference import Predictor

    out = tf1["gate"]["outputs"]
    decoded = [decode_image(data, f"{name}.{'jpg' if 'jpeg' in name else 'png'}") for name, (data, _) in GATE.items()]
    preds = Predictor(*models, 0.5).predict([d.gray for d in decoded], colour=[d.colour for d in decoded])
    for i, (name, pred) in enumerate(zip(GATE, preds)):
        assert pred.assessed == bool(out["assessed"][i]), name
        assert pred.reason == out["reason"][i].decode(), name
        served = np.asarray(Image.open(io.BytesIO(out["lung_mask_bytes"][i]))) > 0
        assert (served != pred.lung.astype(bool)).mean() < 0.002, name  # JPEG decoders may differ by a grey level
        assert pred.severity_total == pytest.approx(float(out["severity_total"][i]), abs=0.5), name


@pytest.mark.parametrize("case, message", [
    ("corrupt_png", "images[1] is a corrupt PNG or JPEG"),
    ("corrupt_jpeg", "images[2] is a corrupt PNG or JPEG"),
    ("corrupt_first_of_two", "images[0] is a corrupt PNG or JPEG"),  # the first bad item in batch order
    ("bomb", "images[1] is 12000x12000 pixels (height x width); each side must be 1..4096"),
    ("side", f"images[0] is 1x{limits.MAX_SIDE + 1} pixels"),
])
def test_bad_items_are_named_through_the_tf1_loader(tf1, case, message):
    result = tf1[case]
    assert result.get("error") == "InvalidArgumentError", result
    assert message in result["message"], result["message"]


def test_cmyk_jpeg_is_served_with_predicts_grey_pixels(tf1, models):
    """Issue 23: the SavedModel refused a valid CMYK JPEG as "a corrupt PNG or JPEG" (TensorFlow's decoder cannot
    convert 4 components to 1) while predict (Pillow) read it. Now the served grey pixels are Pillow's within a
    grey level or two (libjpeg vs Pillow CMYK->RGB rounding) and so are the masks and severity."""
    import tensorflow as tf

    from covidseg_tf.imageio import decode_xray
    from covidseg_tf.inference import Predictor
    from covidseg_tf.serving import gray_pixels

    assert "outputs" in tf1["cmyk"], tf1["cmyk"]
    data = cmyk_jpeg(phantom(96, 80, 7))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    expected = decode_xray(data, "cmyk.jpg")
    served = gray_pixels(tf.constant(data)).numpy()[..., 0]
    assert served.shape == expected.shape == (96, 80)
    assert np.abs(served.astype(int) - expected).max() <= 2
    out = tf1["cmyk"]["outputs"]
    pred = Predictor(*models, 0.5).predict([expected])[0]
    assert (out["height"][1], out["width"][1]) == (96, 80) and bool(out["assessed"][1]) == pred.assessed
    lung = np.asarray(Image.open(io.BytesIO(out["lung_mask_bytes"][1]))) > 0
    assert (lung != pred.lung.astype(bool)).mean() < 0.002
    assert pred.severity_total == pytest.approx(float(out["severity_total"][1]), abs=0.5)


def test_tf1_and_tf2_loaders_agree_bit_for_bit(tf1, cascade_path):
    """At the same intra-op thread count (the default here, in both processes) the TF1 loader (TF Serving) and
    tf.saved_model.load give identical outputs; differences between them are differences of thread count."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(cascade_path)).signatures["serving_default"]
    out = fn(images=tf.constant(strings([v[0] for v in GATE.values()])))
    assert set(out) == set(tf1["gate"]["outputs"])
    for key, value in tf1["gate"]["outputs"].items():
        np.testing.assert_array_equal(out[key].numpy(), value, err_msg=key)


def test_serving_limits_are_the_one_size_policy():
    from covidseg_tf import export, serving

    assert serving.MAX_SIDE == limits.MAX_SIDE and serving.MAX_PIXELS == limits.MAX_PIXELS
    # recorded in covidseg_export.json (a re-export by `export --from` keeps its source's value)
    assert "max_side=manifest.max_side or serving.MAX_SIDE" in Path(export.__file__).read_text()


# ----------------------------------------------------------------------------------------------------- fuzzing
def dicom_bytes(tmp: Path, arr: np.ndarray, deflated: bool = False, **kw: Any) -> bytes:
    path = write_dicom(tmp / "x.dcm", arr, **kw)
    data = path.read_bytes()
    return deflate_dicom(data) if deflated else data


def deflate_dicom(data: bytes) -> bytes:
    """An explicit-VR-little-endian DICOM file re-encoded with the deflated transfer syntax."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def mutations(seeds: dict[str, bytes], count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` seeded mutants of the seed files: bit flips, overwritten runs, truncation, inserted bytes, and header
    sizes rewritten (PNG IHDR, JPEG SOF, DICOM Rows/Columns) to huge, zero or odd values."""
    rng = np.random.default_rng(seed)
    names = sorted(seeds)
    out = []
    for k in range(count):
        name = names[k % len(names)]
        data = bytearray(seeds[name])
        kind = k // len(names) % 5
        if kind == 0:
            for _ in range(int(rng.integers(1, 9))):
                i = int(rng.integers(0, len(data)))
                data[i] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            i = int(rng.integers(0, len(data)))
            n = int(rng.integers(1, 64))
            data[i:i + n] = rng.integers(0, 256, min(n, len(data) - i), dtype=np.uint8).tobytes()
        elif kind == 2:
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 3:
            i = int(rng.integers(0, len(data)))
            data[i:i] = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        else:
            data = bytearray(resize_header(bytes(data), int(rng.choice([0, 1, 31, 4096, 4097, 65535, 2**31 - 1])),
                                           int(rng.choice([0, 2, 300, 12000, 65535]))))
        out.append((f"{k:03d}_{kind}_{name}", bytes(data)))
    return out


def resize_header(data: bytes, height: int, width: int) -> bytes:
    """`data` with the image size in its header replaced (CRC of a PNG IHDR fixed up, so only the size lies)."""
    b = bytearray(data)
    if data.startswith(b"\x89PNG"):
        b[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    elif data.startswith(b"\xff\xd8"):
        i = data.find(b"\xff\xc0")
        if i > 0:
            b[i + 5:i + 9] = (height % 65536).to_bytes(2, "big") + (width % 65536).to_bytes(2, "big")
    else:  # DICOM explicit VR LE: (0028,0010) Rows, (0028,0011) Columns, US
        for tag, value in ((b"\x28\x00\x10\x00US\x02\x00", height), (b"\x28\x00\x11\x00US\x02\x00", width)):
            i = data.find(tag)
            if i > 0:
                b[i + 8:i + 10] = (value % 65536).to_bytes(2, "little")
    return bytes(b)


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory) -> list[tuple[str, bytes]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    g = phantom(48, 40, 6)
    seeds = {
        "gray.png": png(g), "rgb.png": png(np.stack([g, g // 2, 255 - g], -1)),
        "16bit.png": png(g.astype(np.uint16) * 16), "gray.jpg": jpeg(g), "rgb.jpg": jpeg(np.stack([g, g, g], -1)),
        "mono2.dcm": dicom_bytes(tmp, g.astype(np.uint16) * 16),
        "deflated.dcm": dicom_bytes(tmp, g.astype(np.uint16) * 16, deflated=True),
    }
    special = [  # the decompression bombs of the issue and their relatives
        ("bomb.png", png(np.zeros((12000, 12000), np.uint8), optimize=True)),
        ("bomb_deflated.dcm", deflate_dicom(dicom_bytes(tmp, np.zeros((12000, 12000), np.uint16)))),
        ("lying_rows.dcm", resize_header(seeds["mono2.dcm"], 4000, 4000)),
        ("empty.png", b""), ("magic_only.png", b"\x89PNG\r\n\x1a\n"), ("soi_only.jpg", b"\xff\xd8\xff"),
        ("dicm_only.dcm", b"\0" * 128 + b"DICM"),
    ]
    return special + mutations(seeds, 280)


def test_fuzz_decode_xray_clean_errors_or_valid_images(fuzz_inputs, tmp_path):
    """A few hundred mutated files: each is a 2-D uint8 image within the size policy or an XRayReadError naming
    the file; no other exception, no crash, under 3 GB of address space, each under 10 s."""
    run = run_fuzz("imageio", fuzz_inputs, tmp_path)
    outcomes = dict(zip((n for n, _ in fuzz_inputs), run["results"]))
    check_decode_outcomes(outcomes)
    assert "each side must be 1..4096" in outcomes["bomb.png"][1]
    assert "each side must be 1..4096" in outcomes["bomb_deflated.dcm"][1]
    kinds = [k for k, _, _ in outcomes.values()]
    assert 20 < kinds.count("ok") < len(kinds) - 20, "the mutations should give both outcomes"
    assert run["peak_mb"] < 1500, run["peak_mb"]


def test_fuzz_serving_signature_clean_errors_or_valid_results(fuzz_inputs, cascade_path, tmp_path):
    """The same bytes, one request each, to the exported cascade: a complete result (sizes within the policy,
    a bool `assessed`, severities in 0..100) or an InvalidArgument naming images[0]; never anything else."""
    run = run_fuzz("serving", fuzz_inputs, tmp_path, cascade_path)
    kinds = []
    for (name, _), (kind, detail, seconds) in zip(fuzz_inputs, run["results"]):
        kinds.append(kind)
        assert kind in ("ok", "InvalidArgumentError"), (name, detail)
        assert seconds < 20, (name, seconds)
        if kind == "ok":
            assert 1 <= detail["height"][0] <= limits.MAX_SIDE and 1 <= detail["width"][0] <= limits.MAX_SIDE
            assert detail["assessed"][0] in (True, False)
            assert all(0.0 <= detail[k][0] <= 100.0 for k in ("severity_left", "severity_right", "severity_total"))
        else:
            assert "images[0]" in detail, (name, detail)
    assert 20 < kinds.count("ok") < len(kinds) - 20
    assert run["peak_mb"] < 3000, run["peak_mb"]

"""covidseg_tf.imageio: every input kind read to the exact expected bytes, broken files named, folders expanded, and
the one rule for 16-bit input shared with the TFDS builder (tfds_covidqu/covid_qu_ex/sources.py)."""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from helpers import BAD, GOOD, H, W, gradient
from PIL import Image

from covidseg_tf import limits
from covidseg_tf.imageio import XRayReadError, decode_xray, find_images, header_size, is_dicom_bytes, read_xray


def stretched(arr: np.ndarray) -> np.ndarray:
    """The min..max stretch to 0..255 computed exactly (rational arithmetic, no floats); an exact tie (x.5)
    fails, so that the expectation never depends on the rounding mode."""
    lo, hi = int(arr.min()), int(arr.max())
    if hi == lo:
        return np.zeros(arr.shape, np.uint8)
    out = np.empty(arr.shape, np.uint8)
    for idx, v in np.ndenumerate(arr):
        x = Fraction((int(v) - lo) * 255, hi - lo)
        assert x - int(x) != Fraction(1, 2), "test image has an exact rounding tie; pick other values"
        out[idx] = int(x + Fraction(1, 2))
    return out


def windowed(g: np.ndarray, center: int, width: int, bits: int = 12) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window on a `bits`-bit unsigned image, exactly, then the min..max stretch."""
    y_max = 2**bits - 1
    c, w = Fraction(center) - Fraction(1, 2), width - 1
    y = np.empty(g.shape, dtype=object)
    for idx, v in np.ndenumerate(g):
        if v <= c - Fraction(w, 2):
            y[idx] = Fraction(0)
        elif v > c + Fraction(w, 2):
            y[idx] = Fraction(y_max)
        else:
            y[idx] = ((v - c) / w + Fraction(1, 2)) * y_max
    lo, hi = min(y.flat), max(y.flat)
    out = np.empty(g.shape, np.uint8)
    for idx, v in np.ndenumerate(y):
        x = (v - lo) * 255 / (hi - lo)
        assert x - int(x) != Fraction(1, 2)
        out[idx] = int(x + Fraction(1, 2))
    return out


def pillow_luma(path: Path) -> np.ndarray:
    """What Pillow itself decodes, as 8-bit luma (the reader's contract for 8-bit files)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def expected(kind: str, path: Path) -> np.ndarray:
    g12 = gradient(np.uint16, 4095)
    return {
        "png8_gray": lambda: gradient(),
        "png_rgb": lambda: gradient(),
        "png_rgba": lambda: gradient(),  # alpha (128) ignored
        "jpeg": lambda: pillow_luma(path),
        "jpeg_rgb": lambda: pillow_luma(path),
        "png16_gray": lambda: stretched(g12),  # 12-bit values in a 16-bit PNG: stretched to the full range
        "dicom_mono2": lambda: stretched(g12),
        "dicom_mono1": lambda: stretched(g12),  # stored inverted (4095 - v), shown with bone bright again
        "dicom_window": lambda: windowed(g12, 1024, 2048),
    }[kind]()


def test_is_dicom_bytes_by_extension_or_magic_bytes(inputs):
    """The one DICOM test (predict, the viewer): a .dcm / .dicom name, or "DICM" after the 128-byte preamble."""
    dicom, png = inputs["dicom_mono2"].read_bytes(), inputs["png8_gray"].read_bytes()
    assert is_dicom_bytes(dicom, "upload") and is_dicom_bytes(png, "x.DCM") and is_dicom_bytes(png, "x.dicom")
    assert not is_dicom_bytes(png, "x.png") and not is_dicom_bytes(b"", "upload")
    np.testing.assert_array_equal(decode_xray(dicom, "upload"), read_xray(inputs["dicom_mono2"]))  # read as DICOM


@pytest.mark.parametrize("kind", GOOD)
def test_read_xray_every_kind_gives_the_expected_bytes(inputs, kind):
    a = read_xray(inputs[kind])
    assert a.dtype == np.uint8 and a.shape == (H, W)
    np.testing.assert_array_equal(a, expected(kind, inputs[kind]))
    if kind.startswith("jpeg"):  # lossy, but the same picture: orientation and polarity kept
        assert np.abs(a.astype(int) - gradient().astype(int)).max() <= 8


def test_read_xray_dicom_window_saturates_above_the_window(inputs):
    a = read_xray(inputs["dicom_window"])
    g12 = gradient(np.uint16, 4095)
    # window 1024 +- 1024: stored values above 2047 are white, 0 stays black
    np.testing.assert_array_equal(a[g12 > 2047], 255)
    np.testing.assert_array_equal(a[g12 == 0], 0)


@pytest.mark.parametrize("kind, reason", [("bad_truncated", "cannot read as image"),
                                          ("bad_text", "not an image"),
                                          ("bad_nopixels", "DICOM file has no pixel data")])
def test_read_xray_bad_files_name_the_file_and_the_reason(inputs, kind, reason):
    assert kind in BAD
    with pytest.raises(XRayReadError) as e:
        read_xray(inputs[kind])
    assert str(e.value).startswith(f"{inputs[kind]}: {reason}"), str(e.value)


@pytest.mark.parametrize("content, detail, name", [(b"", "empty file, 0 bytes", "scan.png"),
                                                   (b"", "empty file, 0 bytes", "scan.dcm"),
                                                   (b"hello\n", "unknown format", "scan.png"),
                                                   (b"\x00" * 300, "unknown format", "scan.png")])
def test_zero_byte_and_non_image_files_are_named_not_an_image(tmp_path, content, detail, name):
    """Issue 23: such files reported `cannot identify image file <_io.BytesIO object at 0x...>` (and an empty .dcm
    pydicom's "File is missing DICOM File Meta Information header...")."""
    f = tmp_path / name
    f.write_bytes(content)
    for call in (lambda: read_xray(f), lambda: header_size(content, str(f))):
        with pytest.raises(XRayReadError) as e:
            call()
        assert str(e.value).startswith(f"{f}: not an image ({detail}") and "BytesIO" not in str(e.value)


def test_read_xray_names_links_and_fifos_it_cannot_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    for name, reason in (("pipe.png", "not a regular file (a FIFO)"), ("gone.png", "a dangling symbolic link"),
                         ("a.png", "a symbolic link loop")):
        with pytest.raises(XRayReadError) as e:
            read_xray(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {reason}"), str(e.value)


def test_read_xray_missing_file(tmp_path):
    with pytest.raises(XRayReadError) as e:
        read_xray(tmp_path / "nope.png")
    assert str(e.value) == f"{tmp_path / 'nope.png'}: no such file"


def test_find_images_recursive_known_extensions_and_exclude(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.DCM", "a/b/z.jpeg", "a/notes.txt", "a/out/old_overlay.png"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    files, missing = find_images([tmp_path / "a", tmp_path / "a" / "x.png", tmp_path / "gone.png"],
                                 exclude=tmp_path / "a" / "out")
    assert sorted(f.relative_to(tmp_path).as_posix() for f in files) == ["a/b/y.DCM", "a/b/z.jpeg", "a/x.png"]
    # a file named explicitly is taken even inside the excluded folder
    files, _ = find_images([tmp_path / "a" / "out" / "old_overlay.png"], exclude=tmp_path / "a" / "out")
    assert files == [tmp_path / "a" / "out" / "old_overlay.png"]
    assert missing == [tmp_path / "gone.png"]


# ----------------------------------------------------------------------------------------------- one 16-bit rule
def _sixteen_bit_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    random = rng.integers(17, 60001, (H, W)).astype(np.uint16)
    random[0, 0], random[0, 1] = 17, 60000  # max - min odd: no exact x.5 rounding ties
    twelve = rng.integers(100, 3901, (H, W)).astype(np.uint16)
    twelve[0, 0], twelve[0, 1] = 100, 3900 + 1  # 12-bit content (max - min = 3801, odd)
    return {
        "constant": np.full((H, W), 1234, np.uint16),
        "full_range": gradient(np.uint16, 65535),
        "12_bit": twelve,
        "random": random,
    }


@pytest.mark.parametrize("name", list(_sixteen_bit_images()))
def test_16bit_png_same_bytes_in_prediction_and_in_the_tfds_builder(tmp_path, name):
    from tfds_covidqu.covid_qu_ex import sources

    arr = _sixteen_bit_images()[name]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "I;16" and np.array_equal(np.asarray(im), arr)  # really a 16-bit gray PNG
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "x.png").write_bytes(data)
    (tmp_path / "mask.png").write_bytes(sources.encode_png(np.zeros((H, W), np.uint8)))

    predicted = read_xray(folder / "x.png")  # prediction's reader
    loaded = sources.load_example(sources.ExampleFiles(  # the builder's reader (what _generate_examples stores)
        sources.DirSource(tmp_path), "train", "COVID-19", "x.png", image="images/x.png", lung_mask="mask.png"))
    stored = np.asarray(Image.open(io.BytesIO(loaded.image_png)))

    want = stretched(arr)
    if name == "constant":
        np.testing.assert_array_equal(want, 0)
    np.testing.assert_array_equal(predicted, want)
    np.testing.assert_array_equal(loaded.image, want)
    np.testing.assert_array_equal(stored, want)
    np.testing.assert_array_equal(sources.to_gray8(sources.open_image(data, "x.png")), want)


def test_tfds_builder_does_not_import_covidseg_tf():
    """tfds_covidqu is a standalone TFDS builder folder: it keeps its own copy of the stretch."""
    code = ("import sys; sys.modules['covidseg_tf'] = None; import tfds_covidqu; "
            "from tfds_covidqu.covid_qu_ex import sources; print(sources.stretch_to_uint8([0, 1, 4]).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0, 64, 255]"


# ----------------------------------------------------------------------------------------------- size policy
def png_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def lying_png(height: int, width: int) -> bytes:
    """A 4 x 4 PNG whose IHDR (CRC fixed up) declares height x width: only the size lies."""
    import zlib

    data = bytearray(png_bytes(np.zeros((4, 4), np.uint8)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def deflated(data: bytes) -> bytes:
    """A DICOM file re-encoded with the deflated transfer syntax (the whole dataset zlib-compressed)."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, bytes]:
    """The issue's decompression bombs: a 12000 x 12000 PNG of zeros (optimize=True, ~140 kB) and a deflated
    12000 x 12000 DICOM (~280 kB)."""
    from helpers import write_dicom

    d = tmp_path_factory.mktemp("bombs")
    zeros = np.zeros((12000, 12000), np.uint16)
    return {"png": png_bytes(zeros.astype(np.uint8), optimize=True),
            "dicom": deflated(write_dicom(d / "big.dcm", zeros).read_bytes())}


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_decode_xray_refuses_a_decompression_bomb_from_its_header(bombs, kind):
    import time

    name = f"big.{'png' if kind == 'png' else 'dcm'}"
    t0 = time.time()
    with pytest.raises(XRayReadError) as e:
        decode_xray(bombs[kind], name)
    assert time.time() - t0 < 5  # no 144 MB decode, no unbounded inflation
    assert str(e.value) == (f"{name} is 12000x12000 pixels (height x width); each side must be 1..{limits.MAX_SIDE} "
                            "(checked from the file header; the image was not decoded)")


@pytest.mark.parametrize("case, data, name", [
    ("lying_png", lying_png(5000, 3000), "x.png"),  # declares 5000 x 3000, holds 4 x 4: refused before decoding
    ("wide_jpeg", None, "x.jpg"),
    ("rows_dicom", None, "x.dcm"),
])
def test_decode_xray_size_limit_every_format(tmp_path, case, data, name):
    from helpers import write_dicom

    if case == "wide_jpeg":
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, limits.MAX_SIDE + 1), np.uint8)).save(buf, format="JPEG")
        data = buf.getvalue()
    elif case == "rows_dicom":
        data = write_dicom(tmp_path / name, np.zeros((limits.MAX_SIDE + 1, 2), np.uint16)).read_bytes()
    with pytest.raises(XRayReadError, match=r"pixels \(height x width\); each side must be 1\.\.4096 \(checked from"):
        decode_xray(data, name)
    assert header_size(data, name) == {"lying_png": (5000, 3000), "wide_jpeg": (8, limits.MAX_SIDE + 1),
                                       "rows_dicom": (limits.MAX_SIDE + 1, 2)}[case]


def test_deflated_dicom_decodes_like_the_plain_one_and_inflates_bounded(inputs, tmp_path, monkeypatch):
    from covidseg_tf import imageio

    plain = inputs["dicom_mono2"].read_bytes()
    np.testing.assert_array_equal(decode_xray(deflated(plain), "x.dcm"), read_xray(inputs["dicom_mono2"]))
    assert header_size(deflated(plain), "x.dcm") == (H, W)
    monkeypatch.setattr(imageio, "MAX_INFLATED_BYTES", 1000)  # smaller than this file's dataset
    with pytest.raises(XRayReadError, match="deflated DICOM inflates to more than 1000 bytes"):
        decode_xray(deflated(plain), "x.dcm")


def test_multiframe_dicom_decodes_only_its_first_frame(tmp_path, monkeypatch):
    import pydicom
    from helpers import write_dicom

    frames = np.stack([gradient(np.uint16, 4095), 4095 - gradient(np.uint16, 4095), np.zeros((H, W), np.uint16)])
    path = write_dicom(tmp_path / "multi.dcm", frames[0])
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.save_as(path)
    calls = []
    real = pydicom.pixels.pixel_array
    monkeypatch.setattr("pydicom.pixels.pixel_array", lambda *a, **k: calls.append(k) or real(*a, **k))
    np.testing.assert_array_equal(read_xray(path), stretched(frames[0]))
    assert calls == [{"index": 0}]


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 300)])
def test_tiny_images_decode_for_the_quality_gate(shape):
    """Tiny images are no read error any more: the cascade's quality gate reports them "not assessed" (the old
    "expected a 2-D image, got (1, 1)" message was misleading)."""
    a = decode_xray(png_bytes(np.full(shape, 7, np.uint8)), "tiny.png")
    assert a.shape == shape and a.dtype == np.uint8


def j2k_dicom(path: Path, stream: bytes) -> Path:
    """A JPEG 2000 Lossless DICOM whose one encapsulated frame is `stream`."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG2000Lossless
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = H, W, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_with_a_bad_jpeg2000_stream_is_one_clean_error(tmp_path):
    """Issue 23: pydicom logged its decoder's 20-line traceback (ERROR, with exc_info) before our clean message.
    Now only the XRayReadError naming the file is left (a fresh process: the handlers a CLI has)."""
    path = j2k_dicom(tmp_path / "bad_j2k.dcm", b"\xff\x4f\xff\x51" + b"garbage" * 20)
    script = ("import logging, sys\n"
              "logging.basicConfig(level=logging.INFO)\n"
              "from covidseg_tf.imageio import XRayReadError, read_xray\n"
              "try:\n    read_xray(sys.argv[1])\n"
              "except XRayReadError as e:\n    print('CLEAN', e, file=sys.stderr)\n"
              "logging.getLogger('pydicom').warning('pydicom still speaks')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR:pydicom" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith(f"CLEAN {path}: cannot read as DICOM") and len(lines) == 2, proc.stderr  # one line
    assert "BytesIO" not in lines[0] and "pillow: cannot identify image file" in lines[0]
    assert lines[1] == "WARNING:pydicom:pydicom still speaks"  # the logger is quiet only during the decode

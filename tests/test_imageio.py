"""covidseg_tf.imageio: every input kind read to the exact expected bytes, broken files named, folders expanded."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import BAD, GOOD, H, W, gradient
from PIL import Image

from covidseg_tf.imageio import XRayReadError, find_images, read_xray


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
                                          ("bad_text", "cannot read as image"),
                                          ("bad_nopixels", "DICOM file has no pixel data")])
def test_read_xray_bad_files_name_the_file_and_the_reason(inputs, kind, reason):
    assert kind in BAD
    with pytest.raises(XRayReadError) as e:
        read_xray(inputs[kind])
    assert str(e.value).startswith(f"{inputs[kind]}: {reason}"), str(e.value)


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

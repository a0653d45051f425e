"""Reading chest X-rays from image files into 8-bit grayscale arrays.

`read_xray(path)` accepts

* PNG / JPEG / BMP / TIFF (anything Pillow opens): 8-bit images keep their values; 16-bit or 32-bit integer
  and float images are stretched linearly from their own min..max to 0..255 (`to_uint8`; a constant image gives
  zeros), so 12-bit content stored in 16-bit files uses the whole 8-bit range. The TFDS builder
  (`tfds_covidqu/covid_qu_ex/sources.py`, `to_gray8`) applies the same rule to 16-bit training images, giving
  the same bytes (tests/test_imageio.py); RGB / palette images are converted to luma (ITU-R 601, Pillow's "L");
  the alpha channel of RGBA / LA images is ignored; the EXIF orientation is applied; multi-frame files give their
  first frame.
* DICOM (by extension .dcm/.dicom or by the "DICM" magic bytes): the Modality LUT (rescale slope/intercept)
  and then the VOI LUT or window centre/width are applied (pydicom.pixels.apply_modality_lut /
  apply_voi_lut), the result is stretched min..max to 0..255 and MONOCHROME1 images (where high values are
  dark) are inverted so that bone is always bright. Multi-frame DICOMs give their first frame; colour DICOMs
  are converted to luma.

Any failure raises `XRayReadError` naming the file.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
KNOWN_EXTENSIONS = DICOM_EXTENSIONS | IMAGE_EXTENSIONS


class XRayReadError(ValueError):
    """An input file could not be read as an X-ray; the message names the file and the reason."""


def is_dicom(path: str | Path) -> bool:
    """True for a .dcm/.dicom name or a file with the DICOM preamble ("DICM" at byte 128)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linear min..max stretch of any numeric array to uint8 0..255 (a constant image gives zeros).

    `round((v - min) * 255 / (max - min))`; the one rule for high-bit-depth input, also copied (byte for byte) by
    `tfds_covidqu.covid_qu_ex.sources.stretch_to_uint8`, which must not import this package.
    """
    arr = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip(np.round((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an HxWx3(+) array (float)."""
    rgb = rgb[..., :3].astype(np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _read_dicom(source: io.BytesIO, name: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(source)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise XRayReadError(f"{name}: DICOM file has no pixel data")
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples > 1:  # colour DICOM: pixel_array is already RGB (pydicom converts YBR by default)
        return to_uint8(_luma(arr))
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds)  # no-op when there is no VOI LUT / window
    out = to_uint8(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    return out


def _read_pillow(source: io.BytesIO) -> np.ndarray:
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            img.seek(0)
            img.load()  # decode now: truncated / corrupt files fail here
            img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode == "L":
                return np.asarray(img, dtype=np.uint8).copy()
            if mode in ("LA", "1"):
                return np.asarray(img.convert("L"), dtype=np.uint8).copy()
            if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA", "LAB", "HSV"):
                return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8).copy()
            arr = np.asarray(img)  # I;16*, I, F: high bit depth
    if arr.ndim == 3:
        arr = _luma(arr)
    return to_uint8(arr)


def read_xray(path: str | Path) -> np.ndarray:
    """Read an X-ray image or DICOM file as an HxW uint8 grayscale array (see the module docstring).

    Raises:
        XRayReadError: the file is missing, unreadable, not an image, or has no pixel data.
    """
    path = Path(path)
    if not path.is_file():
        raise XRayReadError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise XRayReadError(f"{path}: cannot read: {e}") from e
    return decode_xray(data, str(path))


def decode_xray(data: bytes, name: str) -> np.ndarray:
    """The bytes of an X-ray image or DICOM file as an HxW uint8 grayscale array, by `read_xray`'s rules; `name`
    (a path or URL) decides DICOM by its extension (or the "DICM" magic bytes) and names the input in errors.

    Raises:
        XRayReadError: not an image, unreadable, or no pixel data.
    """
    dicom = Path(name).suffix.lower() in DICOM_EXTENSIONS or data[128:132] == b"DICM"
    try:
        arr = _read_dicom(io.BytesIO(data), name) if dicom else _read_pillow(io.BytesIO(data))
    except XRayReadError:
        raise
    except Exception as e:  # Pillow / pydicom raise many types; keep the reason, name the file
        kind = "DICOM" if dicom else "image"
        raise XRayReadError(f"{name}: cannot read as {kind}: {type(e).__name__}: {e}") from e
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise XRayReadError(f"{name}: expected a 2-D image, got an array of shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def find_images(paths: list[str | Path], exclude: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Expand files and folders (recursively, known extensions, sorted) into image paths.

    Returns (files, missing): explicitly named files are kept whatever their extension; folders contribute
    files with a known extension, except those under `exclude` (e.g. the output folder).
    """
    files: list[Path] = []
    missing: list[Path] = []
    seen: set[Path] = set()
    excl = exclude.resolve() if exclude is not None else None

    def add(p: Path, walked: bool = False) -> None:
        r = p.resolve()
        if r in seen:
            return
        if walked and excl is not None and (r == excl or excl in r.parents):
            return
        seen.add(r)
        files.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in KNOWN_EXTENSIONS:
                    add(f, walked=True)
        elif p.is_file():
            add(p)
        else:
            missing.append(p)
    return files, missing

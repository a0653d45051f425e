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

Size policy (`covidseg_tf.limits`, the same for the SavedModel): the image's height and width are read from
its header first (Pillow's lazy open: PNG IHDR, JPEG SOF, ...; DICOM Rows / Columns with pydicom's
``stop_before_pixels``) and an image above `limits.MAX_SIDE` pixels a side or `limits.MAX_PIXELS` pixels is
refused BEFORE its pixels are decoded (`header_size`, `decode_xray`). A multi-frame DICOM decodes its first
frame only. Small, near-constant or very elongated images are decoded: the cascade's quality gate reports them
"not assessed" (`covidseg_tf.inference.preprocess.input_quality`).

Colour (`decode_image`): a chest X-ray is grey, so before a colour file (RGB / RGBA / palette / CMYK ... image,
colour DICOM) becomes grey, the share of its clearly coloured pixels is measured (`colour_share`: chroma
max(R,G,B) - min(R,G,B) >= `limits.COLOUR_CHROMA`) and returned beside the grey image (`DecodedImage`); grey
files give 0. The grey image is the same as `decode_xray`'s; the input gate refuses a colourful file
(`covidseg_tf.limits`). The SavedModel measures the same (`covidseg_tf.serving.colour_share`).

Any failure raises `XRayReadError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidseg_tf.files import Unusable, path_problem, walk_files
from covidseg_tf.limits import COLOUR_CHROMA, MAX_INFLATED_BYTES, MAX_PIXELS, size_problem

log = logging.getLogger(__name__)

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
KNOWN_EXTENSIONS = DICOM_EXTENSIONS | IMAGE_EXTENSIONS


class XRayReadError(ValueError):
    """An input file could not be read as an X-ray; the message names the file and the reason."""


@dataclass(frozen=True)
class DecodedImage:
    """One decoded input (`decode_image`): its grey pixels and how colourful the file was.

    `gray` is the H x W uint8 image every tool runs on (`decode_xray`'s); `colour` is the share (0..1) of the
    file's pixels that are clearly coloured (`colour_share`), 0 for a grey file, for the input gate's colour check
    (`covidseg_tf.inference.preprocess.input_quality`).
    """

    gray: np.ndarray
    colour: float = 0.0
    dicom: Any = None
    """A DICOM input's header (pydicom Dataset read without its pixel data), which DICOM outputs reference (see
    `covidseg_tf.dicom`); None for other formats."""


def colour_share(rgb: np.ndarray) -> float:
    """Share (0..1) of the pixels of an H x W x 3(+) uint8 RGB array whose chroma, max(R,G,B) - min(R,G,B), is at
    least `limits.COLOUR_CHROMA` (the alpha channel is ignored); `serving.colour_share` computes the same in the
    SavedModel."""
    rgb = np.asarray(rgb)[..., :3]
    if rgb.size == 0:
        return 0.0
    chroma = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1).astype(np.int16)
    return float(np.count_nonzero(chroma >= COLOUR_CHROMA)) / float(chroma.size)


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


_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # (Float / Double Float) Pixel Data
_HEADER_BYTES = 1 << 22
"""Most bytes of a deflated DICOM inflated to read its header (4 MiB)."""


def _dicom_dataset(data: bytes, name: str, header_only: bool) -> Any:
    """The pydicom dataset of a DICOM file; `header_only` stops before the pixel data.

    A deflated file (transfer syntax 1.2.840.10008.1.2.1.99: the whole dataset is zlib-compressed) is inflated
    here, bounded: 4 MiB for a header, `limits.MAX_INFLATED_BYTES` for the whole file, so a small file never
    inflates without limit (pydicom itself inflates the whole stream, even with ``stop_before_pixels``).
    """
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = io.BytesIO(data)
    if data[128:132] == b"DICM":
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            cap = _HEADER_BYTES if header_only else MAX_INFLATED_BYTES
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            body = inflater.decompress(data[fp.tell():], cap)
            if inflater.unconsumed_tail and not header_only:
                raise XRayReadError(f"{name}: deflated DICOM inflates to more than {cap} bytes (the limit; not read)")
            stop = (lambda tag, vr, length: tag in _PIXEL_TAGS) if header_only else None
            ds = read_dataset(pydicom.filebase.DicomBytesIO(body), False, True, stop_when=stop)
            return pydicom.dataset.FileDataset(name, ds, preamble=preamble, file_meta=meta, is_implicit_VR=False,
                                               is_little_endian=True)
        fp.seek(0)
    return pydicom.dcmread(fp, stop_before_pixels=header_only)


def _dicom_size(data: bytes, name: str, ds: Any = None) -> tuple[int, int]:
    """(Rows, Columns) of a DICOM file from its header `ds` (read here, without the pixel data, when not given)."""
    ds = _dicom_dataset(data, name, header_only=True) if ds is None else ds
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise XRayReadError(f"{name}: DICOM file has no Rows / Columns (not an image)")
    return int(rows), int(cols)


_pydicom_quiet_lock = threading.Lock()
_pydicom_quiet_depth = 0
_pydicom_level = logging.NOTSET


@contextlib.contextmanager
def _pydicom_quiet() -> Iterator[None]:
    """Silence the "pydicom" logger while a frame decodes: a failing decoder plugin is logged by pydicom as an
    ERROR with its whole traceback (20 lines) before the exception we turn into one clean `XRayReadError`.
    Reference-counted under a lock, so concurrent decodes (Beam worker threads) restore the level exactly."""
    global _pydicom_quiet_depth, _pydicom_level
    logger = logging.getLogger("pydicom")
    with _pydicom_quiet_lock:
        if _pydicom_quiet_depth == 0:
            _pydicom_level = logger.level
            logger.setLevel(logging.CRITICAL + 1)
        _pydicom_quiet_depth += 1
    try:
        yield
    finally:
        with _pydicom_quiet_lock:
            _pydicom_quiet_depth -= 1
            if _pydicom_quiet_depth == 0:
                logger.setLevel(_pydicom_level)


def _read_dicom(data: bytes, name: str) -> tuple[np.ndarray, float]:
    """(grey uint8 image, colour share) of a DICOM file (the module docstring's rules)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds = _dicom_dataset(data, name, header_only=False)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise XRayReadError(f"{name}: DICOM file has no pixel data")
    with _pydicom_quiet():
        arr = pixel_array(ds, index=0)  # the first frame only: a multi-frame file is never decoded whole
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples > 1:  # colour DICOM: pixel_array is already RGB (pydicom converts YBR by default)
        rgb = arr if arr.dtype == np.uint8 else to_uint8(arr)
        return to_uint8(_luma(arr)), colour_share(rgb)
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds)  # no-op when there is no VOI LUT / window
    out = to_uint8(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    return out, 0.0


def _read_pillow(source: io.BytesIO, name: str) -> tuple[np.ndarray, float]:
    """(grey uint8 image, colour share) of a file Pillow opens (the module docstring's rules)."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open_pillow(source, name) as img:
            img.seek(0)
            _check_size(img.size[1], img.size[0], name)  # from the header, before decoding
            img.load()  # decode now: truncated / corrupt files fail here
            img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode == "L":
                return np.asarray(img, dtype=np.uint8).copy(), 0.0
            if mode in ("LA", "1"):
                return np.asarray(img.convert("L"), dtype=np.uint8).copy(), 0.0
            if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA", "LAB", "HSV"):
                rgb = img.convert("RGB")
                return np.asarray(rgb.convert("L"), dtype=np.uint8).copy(), colour_share(np.asarray(rgb))
            arr = np.asarray(img)  # I;16*, I, F: high bit depth
    if arr.ndim == 3:
        return to_uint8(_luma(arr)), colour_share(to_uint8(arr))
    return to_uint8(arr), 0.0


def _open_pillow(source: io.BytesIO, name: str) -> Any:
    """Pillow's lazy open (header only); its own decompression-bomb refusal becomes our size error."""
    from PIL import Image

    try:
        return Image.open(source)
    except Image.DecompressionBombError as e:
        raise XRayReadError(f"{name}: {e}; at most {MAX_PIXELS} pixels are decoded") from e
    except Image.UnidentifiedImageError as e:  # Pillow's message names only its BytesIO object
        detail = ("empty file, 0 bytes" if not source.getbuffer().nbytes else
                  "unknown format: not PNG, JPEG, TIFF, BMP or another format Pillow reads, nor DICOM")
        raise XRayReadError(f"{name}: not an image ({detail})") from e


def _check_size(height: int, width: int, name: str) -> None:
    problem = size_problem(height, width)
    if problem is not None:
        raise XRayReadError(f"{name} {problem} (checked from the file header; the image was not decoded)")


def header_size(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) an image or DICOM file declares in its header, without decoding any pixel (`name` as in
    `decode_xray`).

    Raises:
        XRayReadError: the header cannot be read.
    """
    if not data:  # whatever the name says (an empty .dcm too)
        raise XRayReadError(f"{name}: not an image (empty file, 0 bytes)")
    try:
        if is_dicom_bytes(data, name):
            return _dicom_size(data, name)
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_pillow(io.BytesIO(data), name) as img:
                return img.size[1], img.size[0]
    except XRayReadError:
        raise
    except Exception as e:
        raise XRayReadError(f"{name}: cannot read the header: {type(e).__name__}: {e}") from e


def is_dicom_bytes(data: bytes, name: str) -> bool:
    """Whether `decode_xray` reads the file `name` with bytes `data` as DICOM: its extension is in
    DICOM_EXTENSIONS or the bytes carry the "DICM" magic after the 128-byte preamble.

    >>> is_dicom_bytes(b"", "chest.DCM"), is_dicom_bytes(bytes(128) + b"DICM", "upload"), is_dicom_bytes(b"", "a.png")
    (True, True, False)
    """
    return Path(name).suffix.lower() in DICOM_EXTENSIONS or data[128:132] == b"DICM"


def read_xray(path: str | Path) -> np.ndarray:
    """Read an X-ray image or DICOM file as an HxW uint8 grayscale array (see the module docstring).

    Raises:
        XRayReadError: the file is missing, unreadable, not an image, or has no pixel data.
    """
    path = Path(path)
    problem = path_problem(path)  # a dangling or looping link, a FIFO (read_bytes would block), no access
    if problem is not None:
        raise XRayReadError(f"{path}: {problem}")
    if not path.is_file():
        raise XRayReadError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise XRayReadError(f"{path}: cannot read: {e}") from e
    return decode_xray(data, str(path))


def _one_line(message: str) -> str:
    """A decoder's message as one line, without Pillow's name of an in-memory file ("<_io.BytesIO object at
    0x7f...>", which names nothing): pydicom lists its plugins' errors on lines of their own."""
    message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", message)
    return re.sub(r"\s*\n\s*", " ", message).strip()


def decode_xray(data: bytes, name: str) -> np.ndarray:
    """The bytes of an X-ray image or DICOM file as an HxW uint8 grayscale array, by `read_xray`'s rules; `name`
    (a path or URL) decides DICOM by its extension (or the "DICM" magic bytes) and names the input in errors.

    The size policy (`covidseg_tf.limits`) is checked from the header before decoding. `decode_image` also gives
    the file's colour share (for the input gate).

    Raises:
        XRayReadError: not an image, unreadable, no pixel data, or larger than the size limits (the message names
            `name` and the limit).
    """
    return decode_image(data, name).gray


def decode_image(data: bytes, name: str) -> DecodedImage:
    """`decode_xray`'s grey image of the bytes `data` and the file's colour share (`colour_share` of its RGB
    pixels before the conversion to grey; 0 for a grey file), as a `DecodedImage`. Raises as `decode_xray`."""
    if not data:  # whatever the name says (an empty .dcm too)
        raise XRayReadError(f"{name}: not an image (empty file, 0 bytes)")
    dicom = is_dicom_bytes(data, name)
    header = None
    try:
        if dicom:
            header = _dicom_dataset(data, name, header_only=True)
            _check_size(*_dicom_size(data, name, header), name)
        arr, colour = _read_dicom(data, name) if dicom else _read_pillow(io.BytesIO(data), name)
    except XRayReadError:
        raise
    except Exception as e:  # Pillow / pydicom raise many types; keep the reason, name the file
        kind = "DICOM" if dicom else "image"
        raise XRayReadError(f"{name}: cannot read as {kind}: {type(e).__name__}: {_one_line(str(e))}") from e
    if arr.ndim != 2 or arr.size == 0:
        raise XRayReadError(f"{name}: decoded to an array of shape {arr.shape}; expected one grey image (H x W)")
    _check_size(arr.shape[0], arr.shape[1], name)  # the header's promise kept (e.g. after the EXIF rotation)
    return DecodedImage(np.ascontiguousarray(arr, dtype=np.uint8), colour, header)


def find_images(paths: list[str | Path], exclude: Path | None = None,
                unusable: list[Unusable] | None = None) -> tuple[list[Path], list[Path]]:
    """Expand files and folders (recursively, known extensions, sorted) into image paths.

    Returns (files, missing): explicitly named files are kept whatever their extension; folders contribute
    files with a known extension, except those under `exclude` (e.g. the output folder). What cannot be used is
    never skipped without a word (`covidseg_tf.files.walk_files`): folders that cannot be listed, dangling or
    looping symbolic links, non-regular files (and, as notes, symbolic links to folders, not followed) are
    appended to `unusable` when it is given, else logged as warnings.
    """
    files: list[Path] = []
    missing: list[Path] = []
    seen: set[Path] = set()
    excl = exclude.resolve() if exclude is not None else None
    found: list[Unusable] = []

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
        problem = path_problem(p)
        if problem is not None:
            found.append(Unusable(p, problem))
        elif p.is_dir():
            walked, skipped = walk_files(p, lambda name: Path(name).suffix.lower() in KNOWN_EXTENSIONS)
            for f in walked:
                add(f, walked=True)
            found.extend(u for u in skipped if excl is None or not (u.path.absolute() == excl
                                                                    or excl in u.path.absolute().parents))
        elif p.is_file():
            add(p)
        else:
            missing.append(p)
    if unusable is None:
        for u in found:
            log.warning("%s: %s; skipped", u.path, u.reason)
    else:
        unusable.extend(found)
    return files, missing

"""The seeded bad-input corpus of issue 23 (tests/test_fuzz.py): >= 500 generated files, never stored.

`corpus()` gives (name, bytes) pairs, the same every call:

* valid seeds in every odd mode the readers meet: PNG L, LA, P (also with transparency), 1-bit, I;16, RGB, RGBA;
  JPEG L, RGB, CMYK, progressive; BMP; TIFF 1-bit, I;16, F; GIF; DICOM MONOCHROME1/2, deflated, RGB, multi-frame;
* special cases: decompression bombs, headers that lie about the size, empty files, magic numbers alone, random
  bytes behind a real magic number, text, a DICOM with a broken JPEG 2000 stream;
* seeded mutants of the seeds: bit flips, overwritten runs, truncations, inserted bytes, sizes rewritten in the
  header, scrambled headers.

Each name carries an extension the tools recognise (.png, .jpg, .bmp, .tif, .dcm), whatever the content.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

SEED = 23
SIZE_VALUES = (0, 1, 31, 4096, 4097, 12000, 65535)


def _phantom(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """A chest-X-ray-like grey image (bright body, two dark lungs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    img = np.full((h, w), 180.0)
    for cx in (0.3, 0.7):
        img[((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.35) ** 2 < 1] = 40.0
    return np.clip(img + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _dicom(arr: np.ndarray, photometric: str = "MONOCHROME2", transfer: str = "explicit",
           frames: int = 1) -> bytes:
    """A DICOM file of `arr` (H x W uint16 grey, or H x W x 3 uint8 RGB)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[photometric, transfer, str(frames)])
    meta.TransferSyntaxUID = {"explicit": ExplicitVRLittleEndian, "deflated": DeflatedExplicitVRLittleEndian,
                              "j2k": JPEG2000Lossless}[transfer]
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape[:2]
    if arr.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if transfer == "j2k":
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"broken" * 30])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.concatenate([arr.astype(np.uint16 if arr.ndim == 2 else np.uint8)] * frames).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def seeds() -> dict[str, bytes]:
    """Valid files of every mode and format the readers meet (name -> bytes)."""
    g = _phantom()
    rgb = np.stack([g, g // 2, 255 - g], -1)
    i16 = Image.fromarray(g.astype(np.int32) * 16).convert("I;16")
    return {
        "L.png": _save(Image.fromarray(g), "PNG"),
        "LA.png": _save(Image.fromarray(np.stack([g, 255 - g], -1), "LA"), "PNG"),
        "P.png": _save(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "P_tRNS.png": _save(Image.fromarray(rgb).convert("P"), "PNG", transparency=0),
        "1bit.png": _save(Image.fromarray(g).convert("1"), "PNG"),
        "I16.png": _save(i16, "PNG"),
        "RGB.png": _save(Image.fromarray(rgb), "PNG"),
        "RGBA.png": _save(Image.fromarray(np.concatenate([rgb, g[..., None]], -1), "RGBA"), "PNG"),
        "stored.png": _save(Image.fromarray(g), "PNG", compress_level=0),
        "L.jpg": _save(Image.fromarray(g), "JPEG", quality=90),
        "RGB.jpg": _save(Image.fromarray(rgb), "JPEG", quality=90),
        "CMYK.jpg": _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
        "progressive.jpg": _save(Image.fromarray(g), "JPEG", quality=90, progressive=True),
        "L.bmp": _save(Image.fromarray(g), "BMP"),
        "1bit.tif": _save(Image.fromarray(g).convert("1"), "TIFF"),
        "I16.tif": _save(i16, "TIFF"),
        "F.tif": _save(Image.fromarray(g.astype(np.float32) / 7.0, "F"), "TIFF"),
        "gif_as.png": _save(Image.fromarray(g).convert("P"), "GIF"),
        "mono2.dcm": _dicom(g.astype(np.uint16) * 16),
        "mono1.dcm": _dicom(4095 - g.astype(np.uint16) * 16, photometric="MONOCHROME1"),
        "deflated.dcm": _dicom(g.astype(np.uint16) * 16, transfer="deflated"),
        "rgb.dcm": _dicom(rgb),
        "frames.dcm": _dicom(g.astype(np.uint16) * 16, frames=3),
    }


def resize_header(data: bytes, height: int, width: int) -> bytes:
    """`data` with the size in its header replaced (PNG IHDR with its CRC fixed, JPEG SOF0/SOF2, DICOM
    Rows/Columns in explicit VR little endian, BMP's), so only the size lies."""
    b = bytearray(data)
    if data.startswith(b"\x89PNG") and len(b) >= 33:
        b[16:24] = (width % 2**32).to_bytes(4, "big") + (height % 2**32).to_bytes(4, "big")
        b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    elif data.startswith(b"\xff\xd8"):
        i = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
        if i > 0:
            b[i + 5:i + 9] = (height % 65536).to_bytes(2, "big") + (width % 65536).to_bytes(2, "big")
    elif data.startswith(b"BM") and len(b) >= 26:
        b[18:26] = (width % 2**31).to_bytes(4, "little") + (height % 2**31).to_bytes(4, "little")
    else:
        for tag, value in ((b"\x28\x00\x10\x00US\x02\x00", height), (b"\x28\x00\x11\x00US\x02\x00", width)):
            i = data.find(tag)
            if i > 0:
                b[i + 8:i + 10] = (value % 65536).to_bytes(2, "little")
    return bytes(b)


def specials(base: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """Hand-made cases: bombs, lying headers, empty and magic-only files, random bytes, text."""
    rng = np.random.default_rng(SEED)
    bomb = _save(Image.fromarray(np.zeros((12000, 12000), np.uint8)), "PNG", optimize=True)
    return [
        ("bomb_12000.png", bomb),
        ("bomb_lying_ihdr.png", resize_header(base["L.png"], 40000, 40000)),
        ("bomb_lying_sof.jpg", resize_header(base["L.jpg"], 65535, 65535)),
        ("bomb_lying_rows.dcm", resize_header(base["mono2.dcm"], 65535, 65535)),
        ("bomb_deflated.dcm", _dicom(np.zeros((4100, 4100), np.uint16), transfer="deflated")),
        ("j2k_broken.dcm", _dicom(_phantom().astype(np.uint16), transfer="j2k")),
        ("empty.png", b""), ("empty.dcm", b""),
        ("magic_only.png", b"\x89PNG\r\n\x1a\n"), ("soi_only.jpg", b"\xff\xd8\xff"),
        ("bm_only.bmp", b"BM"), ("tiff_magic_only.tif", b"II*\x00"), ("dicm_only.dcm", b"\0" * 128 + b"DICM"),
        ("text.png", b"this is not an image\n"), ("html.jpg", b"<html><body>404</body></html>"),
        ("zeros.png", bytes(4096)),
        ("random.png", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
        ("png_magic_random.png", b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
        ("jpeg_magic_random.jpg", b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
        ("dicm_random.dcm", b"\0" * 128 + b"DICM" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
    ]


def _mutate(data: bytearray, kind: int, rng: np.random.Generator) -> bytearray:
    n = len(data)
    if n == 0:
        return data
    if kind == 0:  # bit flips
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, n))
            data[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # an overwritten run
        i, length = int(rng.integers(0, n)), int(rng.integers(1, 64))
        data[i:i + length] = rng.integers(0, 256, min(length, n - i), dtype=np.uint8).tobytes()
    elif kind == 2:  # truncated
        data = data[: int(rng.integers(0, n))]
    elif kind == 3:  # inserted bytes
        i = int(rng.integers(0, n))
        data[i:i] = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
    elif kind == 4:  # the header's size rewritten
        data = bytearray(resize_header(bytes(data), int(rng.choice(SIZE_VALUES)), int(rng.choice(SIZE_VALUES))))
    else:  # a random header: the first bytes after the magic number scrambled
        start = 8 if data[:4] == b"\x89PNG" else 132 if data[128:132] == b"DICM" else 2
        data[start:start + 24] = rng.integers(0, 256, min(24, max(0, n - start)), dtype=np.uint8).tobytes()
    return data


MUTATIONS = 6
"""bit flips, overwritten run, truncation, insertion, header size, random header."""


def corpus(count: int = 520, seed: int = SEED, make_seeds: Callable[[], dict[str, bytes]] = seeds
           ) -> list[tuple[str, bytes]]:
    """`count` (>= 500) named inputs: the seeds, the specials, then seeded mutants of the seeds; unique names."""
    base = make_seeds()
    items = list(base.items()) + specials(base)
    names = sorted(base)
    rng = np.random.default_rng(seed)
    k = 0
    while len(items) < count:
        name = names[k % len(names)]
        kind = k // len(names) % MUTATIONS
        items.append((f"m{k:03d}_{kind}_{name}", bytes(_mutate(bytearray(base[name]), kind, rng))))
        k += 1
    return items

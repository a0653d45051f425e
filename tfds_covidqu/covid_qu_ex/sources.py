"""Finding and reading the manually downloaded COVID-QU-Ex files (Kaggle `anasmohammedtahir/covidqu`).

Shared by the TFDS builder (`covid_qu_ex_dataset_builder`) and the audit CLI (`tfds_covidqu.audit`); it does not
import TensorFlow.

Accepted `manual_dir` contents (folder names are matched case-, space-, dash- and underscore-insensitively):

- the Kaggle zip (any file name ending in `.zip`), or `manual_dir` is that zip file itself; members are read in
  place with `zipfile`, never extracted;
- the extracted download, with or without the doubled part folder
  (`Infection Segmentation Data/Infection Segmentation Data/Train/...` or `Infection Segmentation Data/Train/...`);
- the part folder itself (`manual_dir/Train/COVID-19/images/...`).

Below the part folder the layout is `{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/{images,lung masks,
infection masks}/<name>.png`; an image and its masks share the same file name. When both an extracted folder
and a zip hold the part, the extracted folder wins (logged).

Pixel rules:

- images: any mode Pillow reads becomes 8-bit gray: RGB/RGBA/palette via Pillow's ITU-R 601 luma (alpha
  ignored), 16-bit (and 32-bit integer) gray stretched linearly from the image's own min..max to 0..255
  (`round((v - min) * 255 / (max - min))`, a constant image gives zeros; robust for 12-bit content stored in
  16-bit files), 1-bit to {0, 255}. This is the same rule, to the byte, as `covidseg_tf.imageio.to_uint8`, which
  prediction applies to 16-bit PNG/TIFF and DICOM files; this package keeps its own copy so that it does not
  import `covidseg_tf`;
- masks: binarized to {0, 1}. A mask whose raw values are all <= 1 is taken as a 0/1 mask (`v > 0`); any other
  16-bit mask is thresholded at half its range (`v >= 32768`, no stretch: a full or empty mask stays so); any
  other mask is converted to 8-bit gray and thresholded at `v > 127` (Kaggle masks are {0, 255}).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

KAGGLE_DATASET = "anasmohammedtahir/covidqu"
KAGGLE_URL = "https://www.kaggle.com/datasets/anasmohammedtahir/covidqu"

CLASS_NAMES: tuple[str, ...] = ("COVID-19", "Non-COVID", "Normal")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Kaggle's folder name of each TFDS split.
KAGGLE_SPLIT_FOLDERS = {"train": "Train", "validation": "Val", "test": "Test"}
PART_FOLDERS = {"lung": "Lung Segmentation Data", "infection": "Infection Segmentation Data"}
# Feature name -> Kaggle folder name.
KIND_FOLDERS = {"image": "images", "lung_mask": "lung masks", "infection_mask": "infection masks"}
PART_KINDS = {"lung": ("image", "lung_mask"), "infection": ("image", "lung_mask", "infection_mask")}
IMAGE_SUFFIXES = (".png",)


try:  # absl-py comes with TensorFlow and TFDS
    from absl.app import UsageError as _AbslUsageError
except ImportError:  # pragma: no cover
    _AbslUsageError = Exception


class CovidQuExDataError(ValueError, _AbslUsageError):
    """The manually downloaded COVID-QU-Ex data is missing, incomplete or unreadable (message names the file).

    Also an `absl.app.UsageError`, so that a command line run by absl, such as `tfds build`, ends with its message
    after a usage line instead of a traceback (exit code 1).
    """

    exitcode = 1  # read by absl.app.run


def _norm(name: str) -> str:
    """Folder name key: lower case, letters and digits only ("Non-COVID" -> "noncovid")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_SPLIT_KEYS = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
               "validation": "validation", "test": "test", "testing": "test"}
_CLASS_KEYS = {"covid19": "COVID-19", "covid": "COVID-19", "noncovid": "Non-COVID", "noncovid19": "Non-COVID",
               "normal": "Normal"}
_KIND_KEYS = {"images": "image", "image": "image", "lungmasks": "lung_mask", "lungmask": "lung_mask",
              "infectionmasks": "infection_mask", "infectionmask": "infection_mask"}
_PART_KEYS = {_norm(v): k for k, v in PART_FOLDERS.items()}


def missing_data_message(part: str, manual_dir: str | os.PathLike | None) -> str:
    """Where to put the data (used by the builder's MANUAL_DOWNLOAD_INSTRUCTIONS and errors)."""
    folder = PART_FOLDERS[part]
    return (
        f"COVID-QU-Ex '{folder}' not found in manual_dir {manual_dir!s}. Download the Kaggle dataset "
        f"'{KAGGLE_DATASET}' ({KAGGLE_URL}, e.g. `kaggle datasets download {KAGGLE_DATASET}`) and put the zip "
        f"(any name, *.zip) or the extracted '{folder}' folder into the manual_dir "
        "(default <data_dir>/downloads/manual/, or pass download_config=tfds.download.DownloadConfig("
        "manual_dir=...) / `tfds build --manual_dir ...`)."
    )


# ---------------------------------------------------------------------------------------------------------------
# Sources: a folder or a zip archive
# ---------------------------------------------------------------------------------------------------------------


class Source:
    """A container of files addressed by relative POSIX paths (`members`)."""

    root: Path

    def members(self) -> Iterator[str]:
        raise NotImplementedError

    def read(self, member: str) -> bytes:
        raise NotImplementedError

    def where(self, member: str) -> str:
        """Human-readable location of `member` for error messages."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class DirSource(Source):
    """Files below a folder (symlinked folders are followed, each real folder once)."""

    def __init__(self, root: str | os.PathLike, skip_zips: bool = True):
        self.root = Path(root)
        self.skip_zips = skip_zips

    def members(self) -> Iterator[str]:
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            rel = Path(dirpath).relative_to(self.root)
            for f in sorted(filenames):
                if _hidden(f) or (self.skip_zips and f.lower().endswith(".zip")):
                    continue
                yield (rel / f).as_posix()

    def read(self, member: str) -> bytes:
        try:
            return (self.root / member).read_bytes()
        except OSError as e:
            raise CovidQuExDataError(f"{self.where(member)}: cannot read file ({e})") from e

    def where(self, member: str) -> str:
        return str(self.root / member)

    def __repr__(self) -> str:
        return f"DirSource({str(self.root)!r})"


class ZipSource(Source):
    """Members of a zip archive, read in place. Raises CovidQuExDataError for members escaping the archive."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._names: dict[str, str] = {}  # normalized posix member -> real member name
        zf = self._open()
        for info in zf.infolist():
            name = info.filename
            posix = name.replace("\\", "/")
            if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in posix.split("/"):
                raise CovidQuExDataError(
                    f"{self.root}: zip member {name!r} escapes the archive (absolute path or '..'); refusing to read it"
                )
            if info.is_dir() or posix.endswith("/"):
                continue
            self._names[posix] = name

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.root)
            except (OSError, zipfile.BadZipFile) as e:
                raise CovidQuExDataError(f"{self.root}: not a readable zip file ({e})") from e
        return self._zip

    def members(self) -> Iterator[str]:
        for posix in sorted(self._names):
            parts = posix.split("/")
            if any(_hidden(p) for p in parts):
                continue
            yield posix

    def read(self, member: str) -> bytes:
        try:
            return self._open().read(self._names[member])
        except (KeyError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise CovidQuExDataError(f"{self.where(member)}: cannot read zip member ({e})") from e

    def where(self, member: str) -> str:
        return f"{self.root}::{member}"

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self):  # picklable (e.g. for multiprocessing): reopen lazily
        state = self.__dict__.copy()
        state["_zip"] = None
        return state

    def __repr__(self) -> str:
        return f"ZipSource({str(self.root)!r})"


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__MACOSX")


# ---------------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExampleFiles:
    """One image and its masks (member paths inside `source`)."""

    source: Source
    split: str  # "train" | "validation" | "test"
    label: str  # one of CLASS_NAMES
    file_name: str  # e.g. "covid_1.png"
    image: str
    lung_mask: str
    infection_mask: str | None = None

    @property
    def key(self) -> str:
        """Unique key within a split: "<label>/<file_name>"."""
        return f"{self.label}/{self.file_name}"

    def where(self, kind: str = "image") -> str:
        return self.source.where(getattr(self, kind))


@dataclasses.dataclass
class Scan:
    """Result of scanning a manual_dir for one part."""

    part: str
    source: Source | None
    examples: dict[str, list[ExampleFiles]]
    problems: list[str]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: n}}."""
        out = {s: {c: 0 for c in CLASS_NAMES} for s in SPLITS}
        for s, exs in self.examples.items():
            for e in exs:
                out[s][e.label] += 1
        return out


def _parse(member: str, part: str, outer: tuple[str, ...]):
    """(prefix, split, label, kind, file_name) of a member in the Kaggle layout of `part`, else None."""
    parts = member.split("/")
    if len(parts) < 4 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    split = _SPLIT_KEYS.get(_norm(parts[-4]))
    label = _CLASS_KEYS.get(_norm(parts[-3]))
    kind = _KIND_KEYS.get(_norm(parts[-2]))
    if split is None or label is None or kind is None:
        return None
    prefix = tuple(parts[:-4])
    named_parts = {_PART_KEYS[_norm(p)] for p in outer + prefix if _norm(p) in _PART_KEYS}
    if named_parts and part not in named_parts:
        return None  # belongs to the other part
    if kind not in PART_KINDS[part]:
        return None
    return prefix, split, label, kind, parts[-1]


def _scan_source(source: Source, part: str, outer: tuple[str, ...]) -> tuple[dict, list[str]]:
    """{prefix: {(split, label): {kind: {file_name: member}}}} and the members whose name repeats in a group."""
    found: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    dups: list[str] = []
    for member in source.members():
        parsed = _parse(member, part, outer)
        if parsed is None:
            continue
        prefix, split, label, kind, name = parsed
        slot = found[prefix][(split, label)][kind]
        if name in slot:  # e.g. both "images/" and "Images/" folders
            dups.append(member)
        else:
            slot[name] = member
    return found, dups


def _sources_in(manual_dir: Path) -> tuple[list[Source], list[str]]:
    """The folder itself and every readable *.zip in it (or just the zip when manual_dir is a zip file), plus
    the errors of unreadable zips. Zips with unsafe members raise."""
    if manual_dir.is_file():
        return [ZipSource(manual_dir)], []
    found: list[Source] = [DirSource(manual_dir)]
    errors = []
    for p in sorted(manual_dir.iterdir()):
        if p.is_file() and p.suffix.lower() == ".zip" and not _hidden(p.name):
            if not zipfile.is_zipfile(p):
                errors.append(f"{p}: not a readable zip file (incomplete download?)")
                continue
            found.append(ZipSource(p))
    return found, errors


def scan(manual_dir: str | os.PathLike, part: str) -> Scan:
    """Finds all examples of `part` ("lung" or "infection") in `manual_dir` (a folder, or a zip file) without
    reading pixels.

    Never raises for per-file problems (images without masks, duplicate names): they are listed in
    `Scan.problems`. Raises CovidQuExDataError when the part is missing or ambiguous, or a zip is unsafe.
    """
    if part not in PART_FOLDERS:
        raise ValueError(f"unknown part {part!r}; expected one of {sorted(PART_FOLDERS)}")
    manual_dir = Path(manual_dir)
    if manual_dir.is_file() and not zipfile.is_zipfile(manual_dir):
        raise CovidQuExDataError(f"manual_dir {manual_dir} is a file but not a readable zip (incomplete download?); "
                                 "it takes the Kaggle zip itself or a folder holding the zip or its extracted files")
    if not (manual_dir.is_dir() or manual_dir.is_file()):
        raise CovidQuExDataError(missing_data_message(part, manual_dir))
    outer = (manual_dir.resolve().name,)
    candidates = []
    all_sources, zip_errors = _sources_in(manual_dir)
    for source in all_sources:
        found, dups = _scan_source(source, part, outer if isinstance(source, DirSource) else ())
        if found:
            candidates.append((source, found, dups))
        else:
            source.close()
    if not candidates:
        raise CovidQuExDataError("\n".join(zip_errors + [missing_data_message(part, manual_dir)]))
    for err in zip_errors:
        logger.warning("%s; ignored", err)
    dirs = [c for c in candidates if isinstance(c[0], DirSource)]
    if dirs:
        for s, *_ in candidates:
            if not isinstance(s, DirSource):
                logger.info("using the extracted folder in %s; ignoring %s", manual_dir, s.root)
                s.close()
        candidates = dirs
    if len(candidates) > 1:
        raise CovidQuExDataError(
            f"'{PART_FOLDERS[part]}' found in several zips in {manual_dir}: "
            f"{[str(c[0].root) for c in candidates]}; keep only one"
        )
    source, found, dups = candidates[0]
    if len(found) > 1:
        where = sorted("/".join(p) or "." for p in found)
        raise CovidQuExDataError(
            f"'{PART_FOLDERS[part]}' found in several places in {source.root}: {where}; keep only one copy"
        )
    (prefix, groups), = found.items()
    logger.info("reading '%s' from %s (%s)", PART_FOLDERS[part], source.where("/".join(prefix)) if prefix
                else source.root, type(source).__name__)
    kinds = PART_KINDS[part]
    problems = [f"{source.where(m)}: duplicate file name (another folder differs only in case)" for m in dups]
    examples: dict[str, list[ExampleFiles]] = {s: [] for s in SPLITS}
    for (split, label), by_kind in sorted(groups.items()):
        images = by_kind["image"]
        for name in sorted(images):
            masks = {}
            for kind in kinds[1:]:
                member = by_kind[kind].get(name)
                if member is None:
                    problems.append(
                        f"{source.where(images[name])}: image without its {KIND_FOLDERS[kind]!r} "
                        f"(expected {KIND_FOLDERS[kind]}/{name} beside images/)"
                    )
                masks[kind] = member
            if all(masks.values()):
                examples[split].append(ExampleFiles(source, split, label, name, images[name], **masks))
        for kind in kinds[1:]:
            orphans = sorted(set(by_kind[kind]) - set(images))
            for name in orphans:
                logger.warning("%s: mask without image; ignored", source.where(by_kind[kind][name]))
    splits_with_images = {split for (split, _), by_kind in groups.items() if by_kind["image"]}
    for split in SPLITS:
        if split not in splits_with_images:
            problems.append(
                f"{source.root}: no '{KAGGLE_SPLIT_FOLDERS[split]}' split with images found in "
                f"'{PART_FOLDERS[part]}'"
            )
    return Scan(part=part, source=source, examples=examples, problems=problems)


def find_examples(manual_dir: str | os.PathLike, part: str) -> dict[str, list[ExampleFiles]]:
    """{split: [ExampleFiles sorted by (label, file_name)]}; raises CovidQuExDataError listing every problem."""
    result = scan(manual_dir, part)
    if result.problems:
        n = len(result.problems)
        shown = "\n  ".join(result.problems[:20])
        more = f"\n  ... and {n - 20} more" if n > 20 else ""
        raise CovidQuExDataError(f"{n} problem(s) in the COVID-QU-Ex '{PART_FOLDERS[part]}' data:\n  {shown}{more}")
    return result.examples


# ---------------------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------------------


def open_image(data: bytes, where: str) -> Image.Image:
    """Fully decoded PIL image; CovidQuExDataError naming `where` if unreadable or truncated."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise CovidQuExDataError(f"{where}: unreadable or truncated image ({type(e).__name__}: {e})") from e
    return im


def raw_array(im: Image.Image) -> np.ndarray:
    """Single-channel array of the stored values (uint8, or int32 for 16-bit images)."""
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"))
    if im.mode.startswith("I;16") or im.mode == "I":
        return np.asarray(im, dtype=np.int64 if im.mode == "I" else None).astype(np.int32)
    if im.mode == "LA":
        return np.asarray(im.getchannel("L"))
    if im.mode == "F":
        return np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
    return np.asarray(im.convert("L"))  # RGB, RGBA, P, CMYK, ...


def stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linear min..max stretch of a numeric array to uint8 0..255 (a constant image gives zeros).

    A copy of `covidseg_tf.imageio.to_uint8` (same bytes; tests/test_imageio.py checks both readers agree).
    """
    arr = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip(np.round((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def to_gray8(im: Image.Image) -> np.ndarray:
    """uint8 HxW gray image following the module's pixel rules (16-bit: min..max stretch)."""
    arr = raw_array(im)
    if arr.dtype != np.uint8:  # 16-bit or 32-bit integer gray
        arr = stretch_to_uint8(arr)
    return arr


def binarize_mask(im: Image.Image) -> np.ndarray:
    """uint8 HxW mask in {0, 1} (raw values <= 1 -> `v > 0`; 16-bit -> `v >= 32768`; else 8-bit gray `v > 127`)."""
    raw = raw_array(im)
    if raw.size and int(raw.max()) <= 1:
        return (raw > 0).astype(np.uint8)
    if raw.dtype != np.uint8:  # a threshold on the stored range, not on the stretched image
        return (raw >= 32768).astype(np.uint8)
    return (raw > 127).astype(np.uint8)


def encode_png(arr: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of a uint8 HxW array (deterministic; lower compress_level = faster, larger)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


@dataclasses.dataclass
class LoadedExample:
    """Decoded pixels of one example (image uint8 HxW, masks {0,1}) plus PNG bytes ready for TFDS."""

    files: ExampleFiles
    image: np.ndarray
    masks: dict[str, np.ndarray]
    image_png: bytes


def load_example(ex: ExampleFiles) -> LoadedExample:
    """Reads and checks one example; CovidQuExDataError naming the bad file.

    The image's original bytes are reused when it already is an 8-bit gray PNG (no re-encoding).
    """
    data = ex.source.read(ex.image)
    im = open_image(data, ex.where("image"))
    image = to_gray8(im)
    image_png = data if (im.format == "PNG" and im.mode == "L") else encode_png(image)
    masks = {}
    for kind in ("lung_mask", "infection_mask"):
        member = getattr(ex, kind)
        if member is None:
            continue
        mim = open_image(ex.source.read(member), ex.where(kind))
        if mim.size != im.size:
            raise CovidQuExDataError(
                f"{ex.where(kind)}: mask size {mim.size[0]}x{mim.size[1]} differs from its image "
                f"{ex.where('image')} ({im.size[0]}x{im.size[1]})"
            )
        masks[kind] = binarize_mask(mim)
    return LoadedExample(ex, image, masks, image_png)


def iter_all(examples: dict[str, list[ExampleFiles]]) -> Iterable[ExampleFiles]:
    """All examples in split order."""
    for split in SPLITS:
        yield from examples.get(split, [])

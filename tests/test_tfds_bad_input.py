"""covid_qu_ex builder: bad manual data gives clear errors, odd-but-valid inputs (zip, layouts, RGB, 16-bit) work,
and the real Infection Segmentation Data (../shared/covidqu) builds with the right counts."""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

import tfds_covidqu  # noqa: E402,F401  (registers covid_qu_ex)
from tfds_covidqu.covid_qu_ex import sources  # noqa: E402
from tfds_covidqu.covid_qu_ex.sources import CovidQuExDataError  # noqa: E402

PART = "Infection Segmentation Data"
SPLITS = {"Train": 2, "Val": 1, "Test": 1}
NAMES = {"COVID-19": "covid_{}.png", "Non-COVID": "non_COVID ({}).png", "Normal": "Normal ({}).png"}
SIZE = 16


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root: Path, *, doubled: bool = True, split_names=SPLITS) -> dict[str, Path]:
    """Tiny valid Infection Segmentation Data under root; returns {"<Split>/<class>/<name>": image path}."""
    base = root / PART / PART if doubled else root
    rng = np.random.default_rng(1)
    lung = np.zeros((SIZE, SIZE), np.uint8)
    lung[3:13, 2:7] = 255
    lung[3:13, 9:14] = 255
    images = {}
    i = 1
    for split, n in split_names.items():
        for cls, pattern in NAMES.items():
            for _ in range(n):
                name = pattern.format(i)
                i += 1
                inf = np.zeros_like(lung)
                if cls == "COVID-19":
                    inf[5:8, 3:6] = 255
                for kind, arr in (("images", rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)),
                                  ("lung masks", lung), ("infection masks", inf)):
                    p = base / split / cls / kind / name
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(_png(arr))
                images[f"{split}/{cls}/{name}"] = base / split / cls / "images" / name
    return images


def zip_dir(src: Path, dst: Path) -> Path:
    with zipfile.ZipFile(dst, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    return dst


def build(manual_dir: Path, data_dir: Path, config: str = "infection"):
    builder = tfds.builder(f"covid_qu_ex/{config}", data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_missing_manual_data_says_where_and_what(tmp_path):
    empty = tmp_path / "manual"
    empty.mkdir()
    (empty / "unrelated.txt").write_text("x")
    with pytest.raises(CovidQuExDataError) as e:
        build(empty, tmp_path / "data")
    msg = str(e.value)
    assert "anasmohammedtahir/covidqu" in msg and str(empty) in msg and "Infection Segmentation Data" in msg


def test_missing_manual_dir_through_builder(tmp_path):
    with pytest.raises(CovidQuExDataError, match="anasmohammedtahir/covidqu"):
        build(tmp_path / "does_not_exist", tmp_path / "data")


@pytest.mark.parametrize("kind", ["lung masks", "infection masks"])
def test_image_without_mask_names_every_such_image(tmp_path, kind):
    images = make_tree(tmp_path)
    victims = ["Train/COVID-19/covid_1.png", "Val/Normal/Normal (9).png"]
    for key in victims:
        img = images[key]
        (img.parent.parent / kind / img.name).unlink()
    with pytest.raises(CovidQuExDataError) as e:
        sources.find_examples(tmp_path, "infection")
    msg = str(e.value)
    assert "2 problem(s)" in msg and kind in msg
    for key in victims:
        assert str(images[key]) in msg


def test_mask_size_differs_from_image(tmp_path):
    images = make_tree(tmp_path)
    bad = images["Test/Non-COVID/non_COVID (11).png"].parent.parent / "lung masks" / "non_COVID (11).png"
    bad.write_bytes(_png(np.zeros((SIZE, SIZE + 4), np.uint8)))
    with pytest.raises(CovidQuExDataError, match="differs from its image") as e:
        build(tmp_path, tmp_path / "data")
    assert str(bad) in str(e.value) and "20x16" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_or_truncated_png(tmp_path, damage):
    images = make_tree(tmp_path)
    bad = images["Train/Normal/Normal (5).png"]
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a png at all", "empty": b""}[damage])
    with pytest.raises(CovidQuExDataError, match="unreadable or truncated") as e:
        build(tmp_path, tmp_path / "data")
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_zip_member_escaping_archive(tmp_path, member):
    make_tree(tmp_path / "src")
    manual = tmp_path / "manual"
    manual.mkdir()
    z = zip_dir(tmp_path / "src", manual / "archive.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr(zipfile.ZipInfo(member), b"x")
    with pytest.raises(CovidQuExDataError, match="escapes the archive") as e:
        sources.find_examples(manual, "infection")
    assert member in str(e.value) and str(z) in str(e.value)


def test_missing_split_is_reported(tmp_path):
    make_tree(tmp_path, split_names={"Train": 1, "Val": 1})
    with pytest.raises(CovidQuExDataError, match="no 'Test' split"):
        sources.find_examples(tmp_path, "infection")


def test_wrong_part_is_not_used(tmp_path):
    make_tree(tmp_path)  # only the infection part
    with pytest.raises(CovidQuExDataError, match="Lung Segmentation Data"):
        sources.find_examples(tmp_path, "lung")


# ---------------------------------------------------------------------------------------------------------------
# Accepted inputs
# ---------------------------------------------------------------------------------------------------------------


def _expected_counts():
    return {"train": 6, "validation": 3, "test": 3}


@pytest.mark.parametrize("layout", ["zip_doubled", "zip_single", "dir_single", "part_folder", "odd_case", "symlink"])
def test_layouts_found(tmp_path, layout):
    manual = tmp_path / "manual"
    manual.mkdir()
    if layout == "zip_doubled":
        make_tree(tmp_path / "src")
        zip_dir(tmp_path / "src", manual / "covidqu-download.ZIP")
    elif layout == "zip_single":
        make_tree(tmp_path / "src" / PART, doubled=False)
        zip_dir(tmp_path / "src", manual / "x.zip")
    elif layout == "dir_single":
        make_tree(manual / PART, doubled=False)
    elif layout == "part_folder":
        make_tree(manual, doubled=False)
    elif layout == "odd_case":
        make_tree(tmp_path / "src")
        for p in sorted((tmp_path / "src").rglob("*"), key=lambda p: -len(p.parts)):
            new = {"Train": "train", "Val": "VAL", "COVID-19": "covid_19", "Non-COVID": "non covid",
                   "images": "Images", "lung masks": "Lung_Masks", "infection masks": "INFECTION-MASKS",
                   PART: "infection segmentation data"}.get(p.name)
            if new:
                p.rename(p.with_name(new))
        shutil.move(str(tmp_path / "src" / "infection segmentation data"), manual)
    elif layout == "symlink":
        make_tree(tmp_path / "src")
        (manual / PART).symlink_to(tmp_path / "src" / PART, target_is_directory=True)
    examples = sources.find_examples(manual, "infection")
    assert {s: len(v) for s, v in examples.items()} == _expected_counts()
    ex = examples["train"][0]
    assert (ex.label, ex.file_name) == ("COVID-19", "covid_1.png")
    loaded = sources.load_example(ex)
    assert loaded.image.shape == (SIZE, SIZE) and set(np.unique(loaded.masks["lung_mask"])) == {0, 1}


def test_zip_build_end_to_end(tmp_path):
    make_tree(tmp_path / "src")
    manual = tmp_path / "manual"
    manual.mkdir()
    zip_dir(tmp_path / "src", manual / "archive.zip")
    builder = build(manual, tmp_path / "data")
    assert str(builder.info.file_format.value) == "tfrecord"
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == _expected_counts()
    names = builder.info.features["label"].names
    for ex in tfds.as_numpy(builder.as_dataset(split="train")):
        assert ex["image"].shape == (SIZE, SIZE, 1)
        assert set(np.unique(ex["lung_mask"])) == {0, 1}
        expect_infection = names[ex["label"]] == "COVID-19"
        assert bool(ex["infection_mask"].any()) == expect_infection
        assert not (ex["infection_mask"] & (1 - ex["lung_mask"])).any()


def test_extracted_folder_wins_over_zip(tmp_path):
    make_tree(tmp_path / "src")
    manual = tmp_path / "manual"
    shutil.copytree(tmp_path / "src", manual)
    zip_dir(tmp_path / "src", manual / "archive.zip")
    scan = sources.scan(manual, "infection")
    assert isinstance(scan.source, sources.DirSource) and not scan.problems


def test_rgb_rgba_16bit_and_01_masks_are_converted(tmp_path):
    images = make_tree(tmp_path)
    gray = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    lung01 = np.zeros((SIZE, SIZE), np.uint8)
    lung01[2:10, 2:10] = 1
    cases = {
        "Train/COVID-19/covid_1.png": ("rgb", _png(np.repeat(gray[..., None], 3, -1))),
        "Train/COVID-19/covid_2.png": ("rgba", _png(np.dstack([gray, gray, gray, np.full_like(gray, 7)]))),
        "Train/Non-COVID/non_COVID (3).png": ("16bit", _png(gray.astype(np.uint16) * 257)),
    }
    for key, (_, data) in cases.items():
        images[key].write_bytes(data)
    # masks: RGB {0,255} lung mask, 16-bit {0,65535} infection mask, 0/1 lung mask
    img = images["Train/COVID-19/covid_1.png"]
    (img.parent.parent / "lung masks" / img.name).write_bytes(_png(np.repeat((lung01 * 255)[..., None], 3, -1)))
    (img.parent.parent / "infection masks" / img.name).write_bytes(_png(lung01.astype(np.uint16) * 65535))
    img2 = images["Train/COVID-19/covid_2.png"]
    (img2.parent.parent / "lung masks" / img2.name).write_bytes(_png(lung01))
    (img2.parent.parent / "infection masks" / img2.name).write_bytes(_png(lung01.astype(np.uint16)))

    builder = build(tmp_path, tmp_path / "data")
    by_name = {ex["file_name"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
    for key in cases:
        np.testing.assert_array_equal(by_name[key.split("/")[-1]]["image"][..., 0], gray, err_msg=key)
    for name in ("covid_1.png", "covid_2.png"):
        np.testing.assert_array_equal(by_name[name]["lung_mask"][..., 0], lung01, err_msg=name)
        np.testing.assert_array_equal(by_name[name]["infection_mask"][..., 0], lung01, err_msg=name)


def test_mask_binarization_rule():
    mask = Image.fromarray(np.array([[0, 100, 128, 255]], np.uint8))
    np.testing.assert_array_equal(sources.binarize_mask(mask), [[0, 0, 1, 1]])
    mask01 = Image.fromarray(np.array([[0, 1, 1, 0]], np.uint8))
    np.testing.assert_array_equal(sources.binarize_mask(mask01), [[0, 1, 1, 0]])


def test_16bit_masks_are_thresholded_on_the_stored_range_not_stretched():
    """Images are stretched min..max; masks are not: a full or empty 16-bit mask stays full or empty."""
    full = Image.fromarray(np.full((2, 3), 65535, np.uint16))
    np.testing.assert_array_equal(sources.binarize_mask(full), np.ones((2, 3)))
    np.testing.assert_array_equal(sources.to_gray8(full), np.zeros((2, 3)))  # the image rule: constant -> 0
    values = Image.fromarray(np.array([[0, 32767, 32768, 65535]], np.uint16))
    np.testing.assert_array_equal(sources.binarize_mask(values), [[0, 0, 1, 1]])


# ---------------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_build_real_infection_data(shared_covidqu, tmp_path):
    import tensorflow as tf

    start = time.time()
    builder = build(shared_covidqu, tmp_path / "data")
    build_seconds = time.time() - start
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert splits == {"train": 3728, "validation": 932, "test": 200}

    names = builder.info.features["label"].names
    expected = {"train": (1864, 932, 932), "validation": (466, 233, 233), "test": (100, 50, 50)}
    for split, counts in expected.items():
        ds = builder.as_dataset(split=split).map(
            lambda ex: (
                ex["label"],
                tf.reduce_sum(tf.cast((ex["infection_mask"] > 0) & (ex["lung_mask"] == 0), tf.int32)),
                tf.reduce_max(ex["lung_mask"]),
                tf.reduce_max(ex["infection_mask"]),
                tf.shape(ex["image"]),
            ),
            num_parallel_calls=2,
        )
        labels, outside, lung_max, inf_max, shapes = (np.stack(x) for x in zip(*tfds.as_numpy(ds)))
        assert tuple(np.bincount(labels, minlength=3)) == counts, split
        assert (outside == 0).all(), f"{split}: infection outside the lung in {np.count_nonzero(outside)} examples"
        assert (lung_max == 1).all() and set(np.unique(inf_max)) <= {0, 1}
        assert (shapes == [256, 256, 1]).all()
        covid = labels == names.index("COVID-19")
        assert (inf_max[~covid] == 0).all(), "infection masks of Non-COVID/Normal must be empty"
    print(f"infection build from {shared_covidqu}: {build_seconds:.1f} s")


def test_incomplete_zip_is_named_and_folder_still_used(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "archive.zip").write_bytes(b"PK\x03\x04 partial download")
    with pytest.raises(CovidQuExDataError, match="not a readable zip") as e:
        sources.find_examples(manual, "infection")
    assert str(manual / "archive.zip") in str(e.value) and "anasmohammedtahir/covidqu" in str(e.value)
    make_tree(manual)  # an extracted copy beside the broken zip is used
    assert {s: len(v) for s, v in sources.find_examples(manual, "infection").items()} == _expected_counts()


def test_manual_dir_may_be_the_zip_file_itself(tmp_path):
    make_tree(tmp_path / "src")
    z = zip_dir(tmp_path / "src", tmp_path / "covidqu.zip")
    assert {s: len(v) for s, v in sources.find_examples(z, "infection").items()} == _expected_counts()


def test_manual_dir_may_be_the_zip_file_itself_through_tfds(tmp_path):
    """Reproduction: `tfds build ... --manual_dir covidqu.zip` failed with NotADirectoryError inside TFDS (its
    dl_manager.manual_dir lists a folder); train's and evaluate's --manual-dir take the same path (load_builder)."""
    from covidseg_tf.data import load_builder

    make_tree(tmp_path / "src")
    z = zip_dir(tmp_path / "src", tmp_path / "covidqu.zip")
    builder = build(z, tmp_path / "data")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == _expected_counts()
    builder = load_builder("covid_qu_ex/infection", tmp_path / "data2", manual_dir=z)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == _expected_counts()


def test_manual_dir_file_that_is_not_a_zip(tmp_path):
    not_zip = tmp_path / "covidqu.zip"
    not_zip.write_bytes(b"PK\x03\x04 partial download")
    with pytest.raises(CovidQuExDataError) as e:
        build(not_zip, tmp_path / "data")
    assert str(e.value) == (f"manual_dir {not_zip} is a file but not a readable zip (incomplete download?); it takes "
                            "the Kaggle zip itself or a folder holding the zip or its extracted files")


def test_tfds_build_ends_with_the_builder_message_not_a_traceback(tmp_path):
    """`tfds build` (absl runs it) prints a CovidQuExDataError, which is also an absl UsageError, after a usage
    line instead of a 20-frame traceback; the message is the last line. Here it is raised while the examples are
    generated, the deepest place it can come from."""
    import os
    import subprocess
    import sys

    images = make_tree(tmp_path / "src")
    bad = images["Train/Normal/Normal (5).png"]
    bad.write_bytes(bad.read_bytes()[:30])
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tfds"), "build", str(Path(sources.__file__).parent), "--config",
         "infection", "--manual_dir", str(tmp_path / "src"), "--data_dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{bad}: unreadable or truncated image")

"""tfds_covidqu.audit: finds planted exact/near duplicates across splits and bad masks, and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfds_covidqu import audit

PART = "Infection Segmentation Data"
SIZE = 64
NAMES = {"COVID-19": "covid_{}.png", "Non-COVID": "non_COVID ({}).png", "Normal": "Normal ({}).png"}


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def make_clean_tree(root: Path) -> dict[str, Path]:
    """3 splits x 3 classes x 2 images of independent noise (20..200), valid masks. Returns {split/cls/name: dir}."""
    rng = np.random.default_rng(7)
    lung = np.zeros((SIZE, SIZE), np.uint8)
    lung[8:56, 6:28] = 255
    lung[8:56, 36:58] = 255
    base = root / PART / PART
    dirs = {}
    i = 1
    for split in ("Train", "Val", "Test"):
        for cls, pattern in NAMES.items():
            for _ in range(2):
                name = pattern.format(i)
                i += 1
                infection = np.zeros_like(lung)
                if cls == "COVID-19":
                    infection[20:30, 10:20] = 255
                _save(base / split / cls / "images" / name, rng.integers(20, 200, (SIZE, SIZE)))
                _save(base / split / cls / "lung masks" / name, lung)
                _save(base / split / cls / "infection masks" / name, infection)
                dirs[f"{split}/{cls}/{name}"] = base / split / cls
    return dirs


@pytest.fixture
def planted(tmp_path):
    dirs = make_clean_tree(tmp_path)
    # exact duplicate across splits: Val Normal image := Train COVID image (different name and class)
    src = dirs["Train/COVID-19/covid_1.png"] / "images" / "covid_1.png"
    (dirs["Val/Normal/Normal (11).png"] / "images" / "Normal (11).png").write_bytes(src.read_bytes())
    # near duplicate across splits: Test Non-COVID image := Train Normal image + 12 gray levels
    bright = np.asarray(Image.open(dirs["Train/Normal/Normal (5).png"] / "images" / "Normal (5).png")).astype(int) + 12
    _save(dirs["Test/Non-COVID/non_COVID (15).png"] / "images" / "non_COVID (15).png", bright)
    # bad masks: infection outside the lung (Train covid_2), non-binary lung mask (Val non_COVID (9))
    inf = np.zeros((SIZE, SIZE), np.uint8)
    inf[2:6, 30:34] = 255  # between / above the lungs
    _save(dirs["Train/COVID-19/covid_2.png"] / "infection masks" / "covid_2.png", inf)
    lung_path = dirs["Val/Non-COVID/non_COVID (9).png"] / "lung masks" / "non_COVID (9).png"
    lung = np.asarray(Image.open(lung_path)).copy()
    lung[10:12, 10:12] = 128
    _save(lung_path, lung)
    return tmp_path


def test_planted_findings_and_nothing_else(planted):
    report = audit.audit(planted, "infection", progress=False)
    s = report["summary"]
    assert s["images"] == 18 and s["layout_problems"] == 0

    exact = report["exact_duplicates"]
    assert exact["within_split"] == []
    assert [sorted((r["split"], r["file_name"]) for r in g) for g in exact["cross_split"]] == [
        [("train", "covid_1.png"), ("validation", "Normal (11).png")]
    ]

    near = report["near_duplicates"]
    assert near["within_split"] == []
    assert len(near["cross_split"]) == 1
    pair = near["cross_split"][0]
    assert {(pair["a"]["split"], pair["a"]["file_name"]), (pair["b"]["split"], pair["b"]["file_name"])} == {
        ("train", "Normal (5).png"), ("test", "non_COVID (15).png")}
    assert pair["correlation"] > 0.99

    masks = report["mask_problems"]
    assert [Path(e["file"]).name for e in masks["infection_outside_lung"]] == ["covid_2.png"]
    assert masks["infection_outside_lung"][0]["outside_pixels"] == 16
    assert [Path(e["file"]).name for e in masks["non_binary"]] == ["non_COVID (9).png"]
    assert "lung masks" in masks["non_binary"][0]["file"] and 128 in masks["non_binary"][0]["values"]
    for kind in ("unreadable", "size_mismatch", "infection_in_non_covid", "empty_lung_mask"):
        assert masks[kind] == [], kind


def test_clean_tree_has_no_findings(tmp_path):
    make_clean_tree(tmp_path)
    s = audit.audit(tmp_path, "infection", progress=False)["summary"]
    assert {k: v for k, v in s.items() if k != "images"} == {k: 0 for k in s if k != "images"}


def test_cli_writes_json_and_summary(planted, tmp_path, capsys):
    out = tmp_path / "reports" / "audit.json"
    assert audit.main(["--manual_dir", str(planted), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "exact duplicates across splits: 1 group(s)" in text
    assert "near duplicates across splits" in text and "1 pair(s)" in text
    report = json.loads(out.read_text())
    assert report["summary"]["mask_infection_outside_lung"] == 1


def test_cli_missing_data_and_help(tmp_path, capsys):
    assert audit.main(["--manual_dir", str(tmp_path), "--quiet"]) == 2
    assert "anasmohammedtahir/covidqu" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        audit.main(["--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_unreadable_image_is_reported_not_fatal(tmp_path):
    dirs = make_clean_tree(tmp_path)
    bad = dirs["Test/Normal/Normal (17).png"] / "images" / "Normal (17).png"
    bad.write_bytes(bad.read_bytes()[:40])
    report = audit.audit(tmp_path, "infection", progress=False)
    assert [Path(e["file"]).name for e in report["mask_problems"]["unreadable"]] == ["Normal (17).png"]
    assert report["summary"]["near_duplicate_pairs_cross_split"] == 0


def test_zip_input_gives_the_same_findings(planted, tmp_path):
    import zipfile

    from_dir = audit.audit(planted, "infection", progress=False)["summary"]
    manual = tmp_path / "zipped"
    manual.mkdir()
    with zipfile.ZipFile(manual / "archive.zip", "w") as zf:
        for p in sorted((planted / PART).rglob("*.png")):
            zf.write(p, p.relative_to(planted).as_posix())
    from_zip = audit.audit(manual, "infection", progress=False)
    assert from_zip["summary"] == from_dir
    assert "archive.zip::" in from_zip["mask_problems"]["infection_outside_lung"][0]["file"]

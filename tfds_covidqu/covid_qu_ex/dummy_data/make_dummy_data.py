"""Writes the fake COVID-QU-Ex files used by covid_qu_ex_dataset_builder_test.py (run from anywhere).

Layout and file names follow the Kaggle download; images are 32x32 8-bit gray, masks {0, 255}, infection masks
inside the lung masks (empty for Non-COVID and Normal). Deterministic: re-running rewrites identical files.

    python tfds_covidqu/covid_qu_ex/dummy_data/make_dummy_data.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE = 32
# (split folder, per-class count) -> the test expects these numbers.
COUNTS = {
    "Lung Segmentation Data": {"Train": 3, "Val": 2, "Test": 1},
    "Infection Segmentation Data": {"Train": 2, "Val": 1, "Test": 1},
}


def _names(cls: str, n: int, start: int) -> list[str]:
    if cls == "COVID-19":
        return [f"covid_{start + i}.png" for i in range(n)]
    if cls == "Non-COVID":  # Kaggle mixes both spellings
        return [f"{'non_COVID' if i % 2 == 0 else 'Non_COVID'} ({start + i}).png" for i in range(n)]
    return [f"Normal ({start + i}).png" for i in range(n)]


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, optimize=True)


def main() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for part, splits in COUNTS.items():
        shutil.rmtree(HERE / part, ignore_errors=True)
        root = HERE / part / part
        start = 1
        for split, n in splits.items():
            for cls in ("COVID-19", "Non-COVID", "Normal"):
                for name in _names(cls, n, start):
                    image = rng.integers(40, 200, size=(SIZE, SIZE))
                    lung = ((np.abs(xx - 16) > 3) & (np.abs(xx - 16) < 13) & (yy > 5) & (yy < 28)) * 255
                    _save(root / split / cls / "images" / name, image)
                    _save(root / split / cls / "lung masks" / name, lung)
                    if part.startswith("Infection"):
                        infection = np.zeros_like(lung)
                        if cls == "COVID-19":
                            cy, cx = rng.integers(10, 22), rng.choice([8, 24])
                            infection[cy - 3 : cy + 3, cx - 3 : cx + 3] = 255
                            infection &= lung
                        _save(root / split / cls / "infection masks" / name, infection)
                start += n


if __name__ == "__main__":
    main()

"""Shared fixtures: the real data folder (optional), a built `synthetic` dataset (session-wide) and X-ray input
files of every kind (`inputs`, used by test_imageio.py and test_predict.py). Shared helpers that are not fixtures
(H, W, GOOD, BAD, phantoms, tiny models, runners) are in helpers.py: `from helpers import ...`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, H, W, gradient, write_dicom

import covidseg_tf  # noqa: F401  (first: sets TensorFlow's oneDNN default before anything imports TF)

# ../shared/covidqu beside the checkout (CI and the developers' machines); COVIDQU_DIR overrides it.
SHARED_COVIDQU = Path(os.environ.get("COVIDQU_DIR", REPO.parent / "shared" / "covidqu"))


@pytest.fixture(scope="session")
def shared_covidqu() -> Path:
    """The real COVID-QU-Ex files; the test is skipped when they are absent (a user's checkout)."""
    if not (SHARED_COVIDQU / "Infection Segmentation Data").is_dir():
        pytest.skip(f"real COVID-QU-Ex data not found at {SHARED_COVIDQU}")
    return SHARED_COVIDQU


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TFDS data_dir holding the built `covid_qu_ex/synthetic` dataset, built once per session."""
    import tensorflow_datasets as tfds

    import tfds_covidqu  # noqa: F401  (registers covid_qu_ex)

    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.builder("covid_qu_ex/synthetic", data_dir=str(data_dir)).download_and_prepare()
    return data_dir


# ----------------------------------------------------------------------------------------------- X-ray input files
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """One file of every supported kind (GOOD) and of every broken kind (BAD)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    g8 = gradient()
    files: dict[str, Path] = {}
    files["png8_gray"] = d / "png8_gray.png"
    Image.fromarray(g8, "L").save(files["png8_gray"])
    files["png16_gray"] = d / "png16_gray.png"
    Image.fromarray(gradient(np.uint16, 4095).astype(np.int32)).convert("I;16").save(files["png16_gray"])
    files["png_rgb"] = d / "png_rgb.png"
    Image.fromarray(np.repeat(g8[..., None], 3, -1), "RGB").save(files["png_rgb"])
    files["png_rgba"] = d / "png_rgba.png"
    rgba = np.concatenate([np.repeat(g8[..., None], 3, -1), np.full((H, W, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(files["png_rgba"])
    files["jpeg"] = d / "sub" / "jpeg_gray.jpg"
    files["jpeg"].parent.mkdir()
    Image.fromarray(g8, "L").save(files["jpeg"], quality=95)
    files["jpeg_rgb"] = d / "sub" / "jpeg_rgb.jpeg"
    Image.fromarray(np.repeat(g8[..., None], 3, -1), "RGB").save(files["jpeg_rgb"], quality=95)
    files["dicom_mono2"] = write_dicom(d / "mono2.dcm", gradient(np.uint16, 4095))
    files["dicom_mono1"] = write_dicom(d / "mono1.dcm", 4095 - gradient(np.uint16, 4095), photometric="MONOCHROME1")
    files["dicom_window"] = write_dicom(d / "window.dcm", gradient(np.uint16, 4095), window=(1024, 2048))
    bad = d / "bad"
    bad.mkdir()
    files["bad_truncated"] = bad / "truncated.png"
    data = (d / "png8_gray.png").read_bytes()
    files["bad_truncated"].write_bytes(data[: len(data) // 2])
    files["bad_nopixels"] = write_dicom(bad / "nopixels.dcm", gradient(np.uint16, 4095), pixel_data=False)
    files["bad_text"] = bad / "text.png"
    files["bad_text"].write_text("this is not an image\n")
    return files

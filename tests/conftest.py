"""Shared fixtures: the real data folder (optional) and a built `synthetic` dataset (session-wide)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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

"""covid_qu_ex dataset: COVID-QU-Ex chest X-rays with lung and COVID-19 infection masks (plus synthetic phantoms)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from . import phantoms, sources
from .sources import CLASS_NAMES, CovidQuExDataError

logger = logging.getLogger(__name__)

_DESCRIPTION = """
COVID-QU-Ex (Qatar University): chest X-rays (256x256, 8-bit gray) with ground-truth lung masks and, for the
"Infection Segmentation Data" part, COVID-19 infection masks. Classes: COVID-19, Non-COVID (other viral or
bacterial pneumonia), Normal. Splits follow Kaggle's Train/Val/Test. Masks are stored as {0, 1}; infection masks
of Non-COVID and Normal images are empty. Manual download from Kaggle `anasmohammedtahir/covidqu`.

Configs: `lung` (Lung Segmentation Data, 33,920 images), `infection` (Infection Segmentation Data, 5,826 images)
and `synthetic` (procedural phantoms, no download; for tests and smoke runs).
"""

_INFECTION_COUNTS = (
    "Kaggle counts (COVID-19/Non-COVID/Normal): train 1864/932/932 (3,728), validation 466/233/233 (932), "
    "test 583/292/291 (1,166)."
)


class CovidQuExConfig(tfds.core.BuilderConfig):
    """BuilderConfig for covid_qu_ex: `part` is "lung", "infection" or None (synthetic)."""

    def __init__(self, *, part: str | None, with_infection: bool, **kwargs):
        super().__init__(**kwargs)
        self.part = part
        self.with_infection = with_infection


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for the covid_qu_ex dataset (writes tfrecord by default)."""

    name = "covid_qu_ex"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: lung, infection and synthetic configs."}
    BUILDER_CONFIGS = [
        CovidQuExConfig(
            name="lung",
            part="lung",
            with_infection=False,
            description="Lung Segmentation Data: 33,920 CXRs with lung masks "
            "(Kaggle: 11,956 COVID-19, 11,263 Non-COVID, 10,701 Normal).",
        ),
        CovidQuExConfig(
            name="infection",
            part="infection",
            with_infection=True,
            description="Infection Segmentation Data: 5,826 CXRs with lung and infection masks. " + _INFECTION_COUNTS,
        ),
        CovidQuExConfig(
            name="synthetic",
            part=None,
            with_infection=True,
            description="Procedural chest-X-ray-like phantoms (no download), 256x256, train/validation/test = "
            "300/60/60, classes 2:1:1 (COVID-19/Non-COVID/Normal); opacities and infection masks only in "
            "COVID-19 phantoms. Same bytes on every build.",
        ),
    ]
    DEFAULT_CONFIG_NAME = "infection"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download the Kaggle dataset `{sources.KAGGLE_DATASET}` ({sources.KAGGLE_URL}), e.g. with
    `kaggle datasets download {sources.KAGGLE_DATASET}`, and place the zip (any name) or the extracted
    "Infection Segmentation Data" / "Lung Segmentation Data" folder in `manual_dir`
    (default `<data_dir>/downloads/manual/`), or pass the zip file itself as `manual_dir`. The zip is read in
    place. The `synthetic` config needs nothing.
    """

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # Always tfrecord unless asked otherwise: array_record cannot feed tf.data in this project.
        super().__init__(file_format=file_format or "tfrecord", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        gray = dict(shape=(None, None, 1), dtype=np.uint8)
        features = {
            "image": tfds.features.Image(**gray),
            "lung_mask": tfds.features.Image(**gray),
        }
        if self.builder_config.with_infection:
            features["infection_mask"] = tfds.features.Image(**gray)
        features["label"] = tfds.features.ClassLabel(names=list(CLASS_NAMES))
        features["file_name"] = tfds.features.Text()
        target = "infection_mask" if self.builder_config.with_infection else "lung_mask"
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", target),
            homepage=sources.KAGGLE_URL,
            license="CC BY-SA 4.0",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        part = self.builder_config.part
        if part is None:
            return {split: self._generate_synthetic(split, n) for split, n in phantoms.SPLIT_SIZES.items()}
        manual_dir = getattr(dl_manager, "_manual_dir", None)
        if manual_dir is None or not epath.Path(manual_dir).is_file():  # a file is the Kaggle zip itself: sources
            try:  # reads it; TFDS's dl_manager.manual_dir only takes folders (NotADirectoryError on a file)
                manual_dir = dl_manager.manual_dir
            except AssertionError:  # missing or empty manual_dir
                raise CovidQuExDataError(sources.missing_data_message(part, manual_dir)) from None
        examples = sources.find_examples(os.fspath(manual_dir), part)
        for split, exs in examples.items():
            logger.info("covid_qu_ex/%s %s: %d examples", part, split, len(exs))
        return {split: self._generate_examples(exs) for split, exs in examples.items()}

    def _generate_examples(self, examples: list[sources.ExampleFiles]) -> Iterator[tuple[str, dict]]:
        """Yields (key, example) per image; raises CovidQuExDataError naming any bad file."""
        for ex in examples:
            loaded = sources.load_example(ex)
            record = {
                "image": loaded.image_png,
                "lung_mask": sources.encode_png(loaded.masks["lung_mask"]),
                "label": ex.label,
                "file_name": ex.file_name,
            }
            if self.builder_config.with_infection:
                infection = loaded.masks["infection_mask"]
                outside = int((infection & (1 - loaded.masks["lung_mask"])).sum())
                if outside:  # kept as published; `python -m tfds_covidqu.audit` lists these
                    logger.warning(
                        "%s: %d infection pixel(s) outside the lung mask", ex.where("infection_mask"), outside
                    )
                record["infection_mask"] = sources.encode_png(infection)
            yield ex.key, record

    def _generate_synthetic(self, split: str, n: int) -> Iterator[tuple[str, dict]]:
        for index in range(n):
            ex = phantoms.synthetic_example(split, index)
            yield f"{split}/{index:04d}", {
                "image": sources.encode_png(ex["image"], compress_level=1),  # noisy: level 6 is 2x slower
                "lung_mask": sources.encode_png(ex["lung_mask"]),
                "infection_mask": sources.encode_png(ex["infection_mask"]),
                "label": ex["label"],
                "file_name": ex["file_name"],
            }

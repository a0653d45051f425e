"""covid_qu_ex dataset: TFDS builder tests on dummy_data (lung, infection) and on the synthetic phantoms."""

import tensorflow_datasets as tfds

from . import covid_qu_ex_dataset_builder


class CovidQuExLungTest(tfds.testing.DatasetBuilderTestCase):
    """`lung` config on dummy_data/Lung Segmentation Data (3 classes x 3/2/1 images)."""

    DATASET_CLASS = covid_qu_ex_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["lung"]
    SPLITS = {"train": 9, "validation": 6, "test": 3}


class CovidQuExInfectionTest(tfds.testing.DatasetBuilderTestCase):
    """`infection` config on dummy_data/Infection Segmentation Data (3 classes x 2/1/1 images)."""

    DATASET_CLASS = covid_qu_ex_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["infection"]
    SPLITS = {"train": 6, "validation": 3, "test": 3}


class CovidQuExSyntheticTest(tfds.testing.DatasetBuilderTestCase):
    """`synthetic` config: generated, no files needed."""

    DATASET_CLASS = covid_qu_ex_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["synthetic"]
    SPLITS = {"train": 300, "validation": 60, "test": 60}


if __name__ == "__main__":
    tfds.testing.test_main()

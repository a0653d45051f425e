"""TFDS dataset `covid_qu_ex` (COVID-QU-Ex chest X-rays; configs lung, infection, synthetic).

Importing this package registers the builder:

    import tensorflow_datasets as tfds
    import tfds_covidqu  # noqa: F401
    ds = tfds.load("covid_qu_ex/synthetic", split="train")
"""

from tfds_covidqu.covid_qu_ex.covid_qu_ex_dataset_builder import Builder as CovidQuEx
from tfds_covidqu.covid_qu_ex.phantoms import make_phantom
from tfds_covidqu.covid_qu_ex.sources import CovidQuExDataError, find_examples

__all__ = ["CovidQuEx", "CovidQuExDataError", "find_examples", "make_phantom"]

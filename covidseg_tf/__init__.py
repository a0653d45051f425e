"""covidseg-tf: two-stage lung and COVID-19 infection segmentation of chest X-rays in Keras 3."""

__version__ = "0.1.0"

"""covidseg-tf: two-stage lung and COVID-19 infection segmentation of chest X-rays in Keras 3."""

import os

# TensorFlow turns its oneDNN kernels (fused convolutions, FusedBatchNorm and their gradients) on by default only on
# CPUs with AVX-512 VNNI / BF16 or AMX; elsewhere its convolutions run as Eigen kernels around oneDNN GEMMs, much slower
# to train (bench/RESULTS.md, "oneDNN"). The variable is read once, when TensorFlow is first imported,
# so it is set here, before any of our modules imports it. A value the user exported (e.g. 0) is kept.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"

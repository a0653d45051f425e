"""Kept for old imports only: the inference code's former names, re-exported from `covidseg_tf.inference`.

New code imports from `covidseg_tf.inference`. The former names: `Cascade` (`inference.Predictor`), `load_model`
(`inference.load_stage`), `masks_at` (`postprocess.apply_decision`), `mask_at` (`postprocess.threshold_mask`), and
`run_cascade`, `run_stage2`, `run_stages` (wrappers of `predictor.run_stages` taking their former arguments); the
other names are the inference package's own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import tensorflow as tf

from covidseg_tf.inference.postprocess import (  # noqa: F401
    SEVERITY_BANDS,
    SEVERITY_KEYS,
    SPLIT_BAND,
    Decision,
    image_class_names,
    infection_probability,
    severity,
    severity_grade,
    split_columns,
)
from covidseg_tf.inference.postprocess import apply_decision as masks_at  # noqa: F401
from covidseg_tf.inference.postprocess import threshold_mask as mask_at  # noqa: F401
from covidseg_tf.inference.predictor import Prediction, Predictor  # noqa: F401
from covidseg_tf.inference.predictor import run_stages as _run_stages
from covidseg_tf.inference.preprocess import (  # noqa: F401
    SIZE_DIVISOR,
    detail,
    input_quality,
    lung_plausibility,
    resize_mask,
    roughness,
    to_model_pixels,
)
from covidseg_tf.inference.stages import (  # noqa: F401
    EXPORT_INFO,
    IMAGE_CLASS_PROB,
    TFLITE_FILE,
    ExportManifest,
    SavedModelStage,
    Stage,
    TFLiteStage,
    has_image_head,
    head_agreement,
    model_input_size,
    quiet_absl,
    saved_model_version,
    stage_agreement,
)
from covidseg_tf.inference.stages import load_stage as load_model  # noqa: F401

Cascade = Predictor


def run_stages(lung_model: Any, infection_model: Any, pixels: tf.Tensor, threshold: float,
               lung_mask: tf.Tensor | None = None, hflip: bool = False) -> dict[str, tf.Tensor]:
    """`inference.predictor.run_stages` with the former (threshold, hflip) arguments."""
    return _run_stages(lung_model, infection_model, pixels, replace(Decision.of(threshold), hflip=hflip), lung_mask)


def run_stage2(infection_model: Any, pixels: tf.Tensor, lung_input: tf.Tensor, hflip: bool = False,
               with_class: bool = False) -> Any:
    """Stage 2 alone: `inference.predictor.run_stages(None, infection_model, ..., lung_mask=lung_input)`."""
    out = _run_stages(None, infection_model, pixels, Decision(hflip=hflip), lung_mask=lung_input)
    return (out["infection_prob"], out.get("image_class_prob")) if with_class else out["infection_prob"]


def run_cascade(lung_model: Any, infection_model: Any, pixels: tf.Tensor,
                threshold: Decision | float = 0.5) -> dict[str, tf.Tensor]:
    """`inference.Predictor(lung_model, infection_model, threshold).predict_pixels(pixels)`."""
    return Predictor(lung_model, infection_model, threshold).predict_pixels(pixels)

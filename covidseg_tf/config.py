"""One config object per stage: every seed number lives here once.

The CLIs build their flags from these dataclasses (`dataclasses.fields`), so a default changed here changes
the `--help` text, the training run and the exported model card together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Stage = Literal["lung", "infection"]
STAGES: tuple[Stage, ...] = ("lung", "infection")
UNET_LAYOUTS: tuple[str, ...] = ("segmentation_models", "segmentation_models_pytorch")
"""Where the U-Net takes its skips and bottleneck (covidseg_tf.models explains both)."""
BATCH_NORMS: tuple[str, ...] = ("keras", "fused")
"""BatchNormalization implementations of the U-Net (covidseg_tf.batchnorm explains the fused one)."""
# The terms of the segmentation loss (covidseg_tf.losses), named by StageConfig.loss_weights and --loss-weights.
LOSS_TERMS: tuple[str, ...] = ("dice", "image_dice", "bce", "focal")

# The image-level head's classes, in the order of the dataset's `label` (tfds_covidqu's CLASS_NAMES; a test keeps
# the two equal: importing the builder here would load TensorFlow Datasets into every CLI).
IMAGE_CLASSES: tuple[str, ...] = ("COVID-19", "Non-COVID", "Normal")
INFECTION_CLASS = IMAGE_CLASSES.index("COVID-19")
"""The image class with infection (every COVID-19 image of the dataset has an infection mask, no other has)."""
# The outputs of a stage model with an image-level head (`models.build_unet(image_classes=...)`).
MASK_OUTPUT = "mask"
IMAGE_CLASS_OUTPUT = "image_class"


def split_outputs(outputs: Any) -> tuple[Any, Any]:
    """(mask probabilities, image class probabilities or None) of a stage model's output: a model with an image
    head returns {MASK_OUTPUT: (B, H, W, 1), IMAGE_CLASS_OUTPUT: (B, len(IMAGE_CLASSES))}, one without it the
    mask tensor alone.

    >>> split_outputs("m")
    ('m', None)
    >>> split_outputs({"mask": "m", "image_class": "p"})
    ('m', 'p')
    """
    if isinstance(outputs, dict):
        return outputs[MASK_OUTPUT], outputs.get(IMAGE_CLASS_OUTPUT)
    return outputs, None

# ImageNet statistics on 0-255 pixels (the seed's normalization).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation (albumentations), applied jointly to the image and its masks.

    The seed's ShiftScaleRotate(shift 0.1, scale 0.1, rotate 15) is expressed as albumentations' `Affine`.
    Gaussian noise: the seed's var_limit (10, 50) on 0-255 pixels, i.e. std sqrt(10)..sqrt(50) over 255.
    """

    # One `train --aug-<field>` flag per field, with this help text (probabilities end in `_p`).
    hflip_p: float = field(default=0.5, metadata={"help": "probability of HorizontalFlip"})
    shift: float = field(default=0.1, metadata={"help": "Affine translation limit, fraction of the size (+-)"})
    scale: float = field(default=0.1, metadata={"help": "Affine scale limit X: zoom in 1-X..1+X, X in [0, 1)"})
    rotate_deg: float = field(default=15.0, metadata={"help": "Affine rotation limit in degrees (+-)"})
    affine_p: float = field(default=0.5, metadata={"help": "probability of the Affine transform"})
    brightness: float = field(default=0.2, metadata={"help": "RandomBrightnessContrast brightness limit (+-)"})
    contrast: float = field(default=0.2, metadata={"help": "RandomBrightnessContrast contrast limit (+-)"})
    brightness_contrast_p: float = field(default=0.5, metadata={"help": "probability of RandomBrightnessContrast"})
    noise_std: tuple[float, float] = field(default=(10**0.5 / 255, 50**0.5 / 255),
                                           metadata={"help": "GaussNoise std range, fraction of the 0-255 range"})
    noise_p: float = field(default=0.5, metadata={"help": "probability of GaussNoise"})


@dataclass(frozen=True)
class StageConfig:
    """Hyper-parameters of one stage of the cascade."""

    stage: Stage
    encoder: str
    in_channels: int
    image_size: int = 448
    batch_size: int = 32
    epochs: int = 15
    patience: int = 5
    learning_rate: float = 1e-4
    # "constant" (the seed) or "cosine": cosine decay from learning_rate to 0 over all epochs' steps, which helps
    # short runs from random init settle.
    lr_schedule: str = "constant"
    weight_decay: float = 1e-4
    dropout: float = 0.0
    # BatchNorm moving-statistics momentum (Keras convention). 0.9 is PyTorch's default (momentum=0.1), which the
    # seed's smp decoder used; with Keras' 0.99 a short run's moving statistics stay near their initial values
    # (bench/RESULTS.md, "BatchNorm momentum").
    bn_momentum: float = 0.9
    clipnorm: float | None = None
    # Where the U-Net taps the encoder (UNET_LAYOUTS): "segmentation_models_pytorch" (smp's Unet: last block of
    # each stride, no top conv; the seed recipe's own library; the shipped models') or "segmentation_models"
    # (qubvel's Keras Unet). Chosen by measurement: bench/RESULTS.md, "U-Net layout".
    unet_layout: str = "segmentation_models_pytorch"
    # BatchNormalization of every encoder and decoder BN layer (BATCH_NORMS): "fused" (covidseg_tf.batchnorm.
    # FusedBatchNormalization: keras' layer and weights, its training step one FusedBatchNormV3 op) or "keras"
    # (keras.layers.BatchNormalization). Inference is the same arithmetic either way. Chosen by measurement:
    # bench/RESULTS.md, "Fused BatchNorm".
    batch_norm: str = "fused"
    # Loss = sum(weight * term); terms: LOSS_TERMS.
    loss_weights: dict[str, float] = field(default_factory=lambda: {"dice": 0.7, "bce": 0.3})
    # "auto": ImageNet when the weights can be had (downloaded or in ~/.keras/models), else random init with a
    # warning; "imagenet": ImageNet or fail; "none": random init; or the path of a local Keras weights file.
    encoder_weights: str = "auto"
    dataset: str = "covid_qu_ex/infection"
    threshold: float = 0.5
    # Weight of the image-level head's loss (sparse categorical cross-entropy over IMAGE_CLASSES) beside the mask
    # loss; 0 = no head (the seed). Only the infection stage has one.
    image_head_weight: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def replace(self, **changes: Any) -> StageConfig:
        """A copy with some fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LUNG = StageConfig(
    stage="lung",
    encoder="efficientnetb3",
    in_channels=3,
    epochs=15,
    patience=5,
    weight_decay=1e-4,
    loss_weights={"dice": 0.7, "bce": 0.3},
)

INFECTION = StageConfig(
    stage="infection",
    encoder="efficientnetb0",
    in_channels=4,  # RGB + Stage-1 lung mask
    epochs=50,
    patience=12,
    weight_decay=1e-3,
    dropout=0.3,
    clipnorm=1.0,
    loss_weights={"dice": 0.5, "bce": 0.3, "focal": 0.2},
)

SAVED_MODELS = Path(__file__).resolve().parent.parent / "saved_models"
"""The repository's TF Serving base folder (covidseg_tf.export writes `<stage>/<N>/` versions into it)."""
SHIPPED_VERSION = 5
"""The version of each servable committed to the repository: predict's and evaluate's default models. Pinned, so
that a version a user exports into saved_models/ never silently replaces the shipped one."""
DEFAULT_LUNG_MODEL = SAVED_MODELS / "lung" / str(SHIPPED_VERSION)
DEFAULT_INFECTION_MODEL = SAVED_MODELS / "infection" / str(SHIPPED_VERSION)

DEFAULTS: dict[str, StageConfig] = {"lung": LUNG, "infection": INFECTION}


def default_config(stage: str) -> StageConfig:
    """The seed configuration of `stage` ("lung" or "infection")."""
    try:
        return DEFAULTS[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}") from None

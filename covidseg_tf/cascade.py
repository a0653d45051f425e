"""The two-stage cascade and the severity score, in pure TensorFlow ops.

Everything here works eagerly, inside `tf.function` and in an exported SavedModel (covidseg_tf.export
imports `run_cascade`).

Cascade
    Stage 1 (lung model) gives a lung probability map; thresholding it gives the lung mask. Stage 2
    (infection model) sees the raw pixels plus that lung mask as a 4th channel; its thresholded output is
    multiplied by the lung mask, so no infection is ever reported outside the predicted lungs.

Models
    `load_model` reads a stage model from a `.keras` file or from a stage SavedModel written by
    covidseg_tf.export (a version folder, or a TF Serving base folder such as `saved_models/lung`, whose highest
    integer version is used); the latter is wrapped as a `SavedModelStage`, callable like the Keras model.
    `DEFAULT_LUNG_MODEL` / `DEFAULT_INFECTION_MODEL` are the repository's `saved_models/lung` and
    `saved_models/infection`.

Severity
    Severity is the infected fraction of the lung, in percent: ``100 * |infection AND lung| / |lung|``, per
    lung field and for both lungs together; it is 0 when the (half of the) lung mask is empty.

    Splitting the lung mask into its two fields (per image): take the column profile of the binary lung
    mask (number of lung pixels in each image column). Inside the central band of columns
    ``[0.25 W, 0.75 W)`` choose the column with the fewest lung pixels (the mediastinum gap); ties (e.g. a
    gap several columns wide, or an empty mask) go to the column nearest the image centre, so an empty
    or fully merged mask falls back to the image centre. Columns left of the split are the image's left
    half, which on a PA (or AP) chest X-ray is the PATIENT's RIGHT lung; columns from the split on are the
    patient's LEFT lung. A vertical split is a simplification: strongly rotated images, lateral views or
    lungs that overlap across the midline are split at their narrowest column, which may be imperfect.

Severity grades (`severity_grade`)
    none (exactly 0 %), mild (< 25 %), moderate (25 % to < 50 %), severe (>= 50 %) of the lung area.
    These bands are a project convention, not a validated clinical scale: they follow the quartile
    cut-offs of the semi-quantitative chest-radiograph extent score of Wong et al., "Frequency and
    distribution of chest radiographic findings in patients positive for COVID-19", Radiology 2020
    (per lung: 0 none, 1 < 25 %, 2 25-50 %, 3 50-75 %, 4 > 75 % involvement), with the two top bands merged
    into "severe". Tahir et al. (the COVID-QU-Ex authors) report the infected-lung percentage itself; the
    grade is only a readable summary of that number.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import tensorflow as tf

from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL, SAVED_MODELS  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

# Central band (fractions of the width) in which the split column between the two lung fields is searched.
SPLIT_BAND = (0.25, 0.75)

SEVERITY_BANDS: tuple[tuple[float, str], ...] = ((25.0, "mild"), (50.0, "moderate"), (float("inf"), "severe"))
"""Upper bounds (exclusive, percent) of the grades above "none"; see the module docstring."""


def _binary(mask: tf.Tensor) -> tf.Tensor:
    """(B, H, W) or (B, H, W, 1) mask -> (B, H, W) float32 in {0, 1} (values > 0.5 count as set)."""
    mask = tf.convert_to_tensor(mask)
    if mask.shape.rank == 4:
        mask = mask[..., 0]
    return tf.cast(tf.cast(mask, tf.float32) > 0.5, tf.float32)


def split_columns(lung_mask: tf.Tensor) -> tf.Tensor:
    """Column index (B,) int32 separating the two lung fields of each image (see the module docstring).

    Columns ``< split`` belong to the image's left half (the patient's right lung on a PA view).
    """
    lung = _binary(lung_mask)
    width = tf.shape(lung)[2]
    w = tf.cast(width, tf.float32)
    cols = tf.reduce_sum(lung, axis=1)  # (B, W) lung pixels per column
    x = tf.range(width, dtype=tf.float32)
    lo = tf.floor(SPLIT_BAND[0] * w)
    hi = tf.math.ceil(SPLIT_BAND[1] * w)
    in_band = (x >= lo) & (x < hi)
    # Lung pixel counts are integers, so `count * W` dominates and `|x - centre| < W` only breaks ties.
    score = cols * w + tf.abs(x - (w - 1.0) / 2.0)[tf.newaxis, :]
    score = tf.where(in_band[tf.newaxis, :], score, tf.fill(tf.shape(score), float("inf")))
    return tf.cast(tf.argmin(score, axis=1), tf.int32)


def severity(lung_mask: tf.Tensor, infection_mask: tf.Tensor) -> dict[str, tf.Tensor]:
    """Infected share of the lung in percent, per patient-side lung and in total.

    Args:
        lung_mask: (B, H, W, 1) or (B, H, W), values in {0, 1} (> 0.5 counts as lung).
        infection_mask: same shape; only infection inside the lung mask is counted.

    Returns:
        {"severity_left", "severity_right", "severity_total"}: (B,) float32 in [0, 100]; "left"/"right" are
        the PATIENT's sides (patient's right = image left on a PA view); 0 where the lung (side) is empty.
    """
    lung = _binary(lung_mask)
    infected = _binary(infection_mask) * lung
    split = split_columns(lung)
    x = tf.range(tf.shape(lung)[2], dtype=tf.int32)
    image_left = tf.cast(x[tf.newaxis, :] < split[:, tf.newaxis], tf.float32)[:, tf.newaxis, :]  # (B, 1, W)
    image_right = 1.0 - image_left

    def percent(region: tf.Tensor) -> tf.Tensor:
        lung_px = tf.reduce_sum(lung * region, axis=[1, 2])
        inf_px = tf.reduce_sum(infected * region, axis=[1, 2])
        return 100.0 * tf.math.divide_no_nan(inf_px, lung_px)

    return {
        "severity_left": percent(image_right),  # patient's left lung = image right
        "severity_right": percent(image_left),  # patient's right lung = image left
        "severity_total": percent(tf.ones_like(image_left)),
    }


def severity_grade(total_percent: Any) -> str:
    """Band name ("none", "mild", "moderate", "severe") of an infected-lung percentage (module docstring)."""
    p = float(total_percent)
    if p != p or p < 0:  # NaN or negative
        raise ValueError(f"severity percentage must be a number >= 0, got {total_percent!r}")
    if p == 0.0:
        return "none"
    for upper, name in SEVERITY_BANDS:
        if p < upper:
            return name
    return SEVERITY_BANDS[-1][1]


def run_cascade(lung_model: Any, infection_model: Any, pixels: tf.Tensor, threshold: float = 0.5) -> dict[str, tf.Tensor]:
    """Run Stage 1 then Stage 2 on a batch and score severity.

    Args:
        lung_model: Keras model (or any callable) mapping (B, S, S, 3) pixels to (B, S, S, 1) probabilities.
        infection_model: callable mapping (B, S, S, 4) (pixels + lung mask) to (B, S, S, 1) probabilities.
        pixels: float32 (B, S, S, 3), raw 0..255, at the models' input size.
        threshold: probability at or above which a pixel is set (both stages).

    Returns:
        {"lung_prob", "lung_mask", "infection_prob", "infection_mask"}: (B, S, S, 1) float32 (masks 0/1; the
        infection mask is inside the lung mask) and {"severity_left", "severity_right", "severity_total"}
        (B,) float32 percentages (see `severity`).
    """
    pixels = tf.cast(pixels, tf.float32)
    lung_prob = tf.cast(lung_model(pixels, training=False), tf.float32)
    lung_mask = tf.cast(lung_prob >= threshold, tf.float32)
    infection_prob = tf.cast(infection_model(tf.concat([pixels, lung_mask], axis=-1), training=False), tf.float32)
    infection_mask = tf.cast(infection_prob >= threshold, tf.float32) * lung_mask
    out = {
        "lung_prob": lung_prob,
        "lung_mask": lung_mask,
        "infection_prob": infection_prob,
        "infection_mask": infection_mask,
    }
    out.update(severity(lung_mask, infection_mask))
    return out


EXPORT_INFO = Path("assets.extra") / "covidseg_export.json"
"""What covidseg_tf.export wrote into each version folder (servable, image_size, precision, ...)."""

_EXPECTED = ("expected a Keras `.keras` file, a stage SavedModel version folder (holding saved_model.pb) or a TF "
             "Serving base folder of integer versions such as saved_models/lung")
_HOW_TO_GET = ("train the stages with `python -m covidseg_tf.train --stage lung|infection ... --output runs/NAME` "
               "(it writes runs/NAME/model.keras and exports saved_models/<stage>/<N>/), export .keras models with "
               "`python -m covidseg_tf.export ... --out saved_models/`, run `python -m covidseg_tf.demo`, or pass "
               "--lung-model/--infection-model")


class SavedModelStage:
    """A stage SavedModel written by `covidseg_tf.export.export_stage`, called like the Keras stage model.

    `stage(pixels, training=False)` maps (B, S, S, C) raw pixels to (B, S, S, 1) float32 probabilities through
    the `predict_pixels` signature; it works eagerly and inside `tf.function`.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.info: dict[str, Any] = json.loads((self.path / EXPORT_INFO).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: a SavedModel without a readable {EXPORT_INFO} ({e}); "
                             f"{_EXPECTED}, written by covidseg_tf.export") from e
        self.stage = self.info.get("servable")
        if self.stage == "cascade":
            raise ValueError(f"{self.path} is a cascade SavedModel (both stages in one servable); pass the stage "
                             "SavedModels (saved_models/lung and saved_models/infection) or .keras files instead")
        if self.stage not in ("lung", "infection"):
            raise ValueError(f"{self.path}: servable {self.stage!r} in {EXPORT_INFO}; expected 'lung' or 'infection'")
        absl = logging.getLogger("absl")  # silence "ops with unsaved custom gradients": inference needs none
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            self._loaded = tf.saved_model.load(str(self.path))  # keeps the signature's resources alive
            self._fn = self._loaded.signatures["predict_pixels"]
        except Exception as e:
            raise ValueError(f"{self.path}: cannot load the `predict_pixels` signature of this SavedModel: "
                             f"{type(e).__name__}: {e}") from e
        finally:
            absl.setLevel(level)
        spec = self._fn.structured_input_signature[1]["pixels"]
        self.input_shape: tuple[int | None, ...] = tuple(spec.shape.as_list())
        self.name = f"{self.stage}_v{self.path.name}"
        self._output = f"{self.stage}_prob"
        log.info("loaded %s stage SavedModel %s (input %s)", self.stage, self.path, self.input_shape)

    def __call__(self, pixels: tf.Tensor, training: bool = False) -> tf.Tensor:
        """(B, S, S, C) pixels -> (B, S, S, 1) float32 probabilities (`training` is ignored)."""
        return self._fn(pixels=tf.cast(pixels, tf.float32))[self._output]

    def __repr__(self) -> str:
        return f"SavedModelStage({str(self.path)!r}, stage={self.stage!r}, input_shape={self.input_shape})"


def saved_model_version(path: Path | str) -> Path:
    """The version folder of a SavedModel path: `path` itself if it holds saved_model.pb, else its highest
    integer-named sub-folder (TF Serving's choice; other names such as `.tmp-*` are ignored).

    Raises:
        ValueError: no saved_model.pb and no integer version folder, or the chosen version has no saved_model.pb.
    """
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        return p
    versions = [d for d in p.iterdir() if d.is_dir() and d.name.isdigit()]
    if not versions:
        what = "is empty" if not any(p.iterdir()) else "has no saved_model.pb and no integer version folders"
        raise ValueError(f"{p} {what}: it is not a SavedModel; {_EXPECTED}. To get models: {_HOW_TO_GET}")
    latest = max(versions, key=lambda d: int(d.name))
    if not (latest / "saved_model.pb").is_file():
        raise ValueError(f"{latest} (latest version of {p}) has no saved_model.pb; {_EXPECTED}")
    return latest


def load_model(path: str | Path, stage: str | None = None) -> Any:
    """Load a stage model: a `.keras` file (custom objects registered, not compiled) or a stage SavedModel
    (version folder or TF Serving base folder, see `saved_model_version`) as a `SavedModelStage`.

    `stage` ("lung" or "infection"), when given, must be the model's stage (SavedModel) or match its number of
    input channels (3 or 4).

    Raises:
        FileNotFoundError: `path` does not exist (the message says how to obtain a model).
        ValueError: `path` is neither a loadable `.keras` file nor a lung/infection SavedModel (the message says
            which, e.g. a cascade SavedModel or a base folder without versions), or is the other stage.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {p} not found; {_HOW_TO_GET}")
    model = SavedModelStage(saved_model_version(p)) if p.is_dir() else _load_keras(p)
    if stage is not None:
        channels = model.input_shape[-1]
        found = model.stage if isinstance(model, SavedModelStage) else {3: "lung", 4: "infection"}.get(channels)
        if found != stage:
            raise ValueError(f"{p} is not a {stage} stage model (it is {found or 'unknown'}, input shape "
                             f"{tuple(model.input_shape)}); check --lung-model / --infection-model")
    return model


def _load_keras(p: Path) -> Any:
    """A `.keras` file as an uncompiled Keras model (ValueError naming `p` if it is not one)."""
    if p.suffix != ".keras":
        raise ValueError(f"{p}: not a model; {_EXPECTED}")
    import keras

    import covidseg_tf.models  # noqa: F401  (registers the custom layers)

    for extra in ("covidseg_tf.losses", "covidseg_tf.metrics"):  # registered objects a saved config may name
        try:
            __import__(extra)
        except ImportError:  # pragma: no cover - optional when loading uncompiled
            pass
    try:
        return keras.models.load_model(p, compile=False)
    except Exception as e:
        raise ValueError(f"{p}: cannot load Keras model: {type(e).__name__}: {e}") from e


def model_image_size(model: Any, default: int | None = None) -> int:
    """Square input size S of a model built for (B, S, S, C) input, else `default` (error if None)."""
    shape = model.inputs[0].shape if getattr(model, "inputs", None) else getattr(model, "input_shape", None)
    size = shape[1] if shape is not None and len(shape) == 4 else None
    if size is None or shape[2] != size:
        if default is None:
            raise ValueError(f"model {getattr(model, 'name', model)!r} has no fixed square input size; pass one")
        return int(default)
    return int(size)

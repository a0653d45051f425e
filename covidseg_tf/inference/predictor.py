"""The cascade: Stage 1 (lungs), then Stage 2 (infection, given the lung mask), as one `Predictor` object.

    predictor = Predictor.load("saved_models/lung", "saved_models/infection")   # the recorded Decision
    [p] = predictor.predict([gray])             # masks at the image's own size, severity, the gate's verdict
    for batch, out in predictor.predict_batches("validation", builder=builder, batch_size=16):
        ...                                     # a TFDS split: probabilities at the model size S per batch

`run_stages` is the one stage runner (TensorFlow ops, eagerly or inside `tf.function` and SavedModels): Stage 1
gives a lung probability map at S; thresholding it at S gives the lung mask Stage 2 sees as its 4th channel
(`lung_input`); a given `lung_mask` (e.g. the ground truth) replaces it. Training's Stage-1 masks are this same
`lung_input`, so Stage 2 trains on what it gets at inference. `postprocess.apply_decision` then makes the masks and
severity at the size asked for, and `preprocess.input_quality` decides whether an image is assessed at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from covidseg_tf.config import IMAGE_CLASSES, INFECTION_CLASS
from covidseg_tf.inference.postprocess import SEVERITY_KEYS, Decision, apply_decision, infection_probability
from covidseg_tf.inference.preprocess import input_quality, to_model_pixels
from covidseg_tf.inference.stages import (
    Stage,
    as_stage,
    head_agreement,
    load_stage,
    model_input_size,
    stage_agreement,
)

Tensors = dict[str, tf.Tensor]
BatchStep = Callable[[Tensors, Tensors], Tensors]
"""`Predictor.predict_batches`' `then`: (the batched examples, `run_stages`' outputs) -> more outputs."""


def run_stages(lung_model: Any | None, infection_model: Any | None, pixels: tf.Tensor, decision: Decision | float,
               lung_mask: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """Stage 1, then (unless `infection_model` is None) Stage 2, at the models' size S.

    Args:
        lung_model, infection_model: stage models (a `Stage` or a keras.Model); `lung_model` may be None when
            `lung_mask` is given (Stage 1 is then not run).
        pixels: float32 (B, S, S, 3) model pixels (`preprocess.to_model_pixels`).
        decision: the `Decision` (or one threshold): its lung `threshold` makes Stage 2's lung mask, its `hflip`
            averages each stage with its mirrored input.
        lung_mask: (B, S, S, 1) 0/1 mask given to Stage 2 instead of Stage 1's (e.g. the ground truth).

    Returns:
        {"lung_prob" (without a lung model: absent), "lung_input", "infection_prob"}: (B, S, S, 1) float32;
        `lung_input` is the 0/1 mask Stage 2 was given (no "infection_prob" without an infection model); for an
        infection model with an image head also "image_class_prob" (B, len(IMAGE_CLASSES)) float32.
    """
    decision = Decision.of(decision)
    pixels = tf.cast(pixels, tf.float32)
    out: dict[str, tf.Tensor] = {}
    if lung_model is not None:
        out["lung_prob"] = as_stage(lung_model).probabilities(pixels, decision.hflip)[0]
    elif lung_mask is None:
        raise ValueError("run_stages needs a lung model or a lung mask")
    if lung_mask is None:
        out["lung_input"] = tf.cast(out["lung_prob"] >= decision.threshold, tf.float32)
    else:
        out["lung_input"] = tf.cast(lung_mask, tf.float32)
    if infection_model is not None:
        x = tf.concat([pixels, out["lung_input"]], axis=-1)
        out["infection_prob"], image_class = as_stage(infection_model).probabilities(x, decision.hflip)
        if image_class is not None:
            out["image_class_prob"] = image_class
    return out


@dataclass
class Prediction:
    """Masks (H x W uint8 0/1, at the image's own size) and severity (percent) of one image.

    `assessed` is False for an image the input gate refused (`preprocess.input_quality`; `reason` says why): its
    masks are empty and its severity 0, which is no finding - report it as "not assessed", never as a grade.
    `image_class_probabilities` ({class name: probability}, `config.IMAGE_CLASSES`) comes from an infection model
    with an image head (None without one).
    """

    lung: np.ndarray
    infection: np.ndarray
    severity_left: float
    severity_right: float
    severity_total: float
    assessed: bool = True
    reason: str = ""
    image_class_probabilities: dict[str, float] | None = None

    @property
    def infection_probability(self) -> float | None:
        """The head's probability that the image shows infection (its COVID-19 class), or None without a head."""
        probs = self.image_class_probabilities
        return None if probs is None else probs[IMAGE_CLASSES[INFECTION_CLASS]]

    @property
    def image_class(self) -> str | None:
        """The head's most probable class, or None without a head."""
        probs = self.image_class_probabilities
        return None if probs is None else max(probs, key=probs.__getitem__)


class Predictor:
    """The two stage models, checked to agree (channels, input size, image head), with their `Decision`.

        Predictor(lung_model, infection_model, decision=Decision(), image_size=None)   # Stages or keras.Models
        Predictor.load(lung_path, infection_path, decision=None, image_size=None, **overrides)

    `predict(grays)` runs decoded images; `predict_pixels(pixels)` a batch of model pixels; `predict_batches(...)`
    a TFDS split or dataset (`run_batch` one of its batches); `input_gate(grays)` the gate alone.
    """

    def __init__(self, lung_model: Any, infection_model: Any, decision: Decision | float = 0.5,
                 image_size: int | None = None):
        decision = Decision.of(decision)
        self.lung_model: Stage = as_stage(lung_model)
        self.infection_model: Stage = as_stage(infection_model)
        self.decision = decision
        self.image_size = stage_agreement(self.lung_model, self.infection_model, image_size)
        self.has_image_head = head_agreement(self.infection_model, decision)
        self.sources: dict[str, Path | None] = {"lung": self.lung_model.path, "infection": self.infection_model.path}
        s = self.image_size
        self._stages = tf.function(lambda p: run_stages(self.lung_model, self.infection_model, p, decision),
                                   input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)])
        self._lung_stage = tf.function(  # Stage 1 alone, for `input_gate`
            lambda p: run_stages(self.lung_model, None, p, decision)["lung_prob"],
            input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)])
        prob = tf.TensorSpec([1, s, s, 1], tf.float32)
        classes = tf.TensorSpec([1, len(IMAGE_CLASSES)], tf.float32)
        self._masks = tf.function(
            lambda lp, ip, hw, ok, ic: _as_uint8_masks(apply_decision(
                lp, ip, decision, hw, assessed=ok, image_class_prob=ic if self.has_image_head else None)),
            input_signature=[prob, prob, tf.TensorSpec([2], tf.int32), tf.TensorSpec([1], tf.bool), classes])

    @property
    def threshold(self) -> float:
        """The lung (Stage-1) threshold."""
        return self.decision.threshold

    @classmethod
    def load(cls, lung_path: str | Path, infection_path: str | Path, decision: Decision | None = None,
             image_size: int | None = None, **overrides: Any) -> Predictor:
        """Load both stage models (`stages.load_stage`) and check them; `sources` keeps the paths given.

        `decision` defaults to the one recorded in an exported infection stage's manifest (`Decision()` for a
        `.keras` file); `overrides` (Decision field=value, None ignored) replace single fields, e.g. threshold=0.4.
        """
        lung, infection = load_stage(lung_path, stage="lung"), load_stage(infection_path, stage="infection")
        if decision is None:
            recorded = infection.manifest.decision if infection.manifest is not None else None
            decision = recorded or Decision()
        changes = {k: v for k, v in overrides.items() if v is not None}
        if changes:
            decision = replace(decision, **changes)
        predictor = cls(lung, infection, decision, image_size)
        predictor.sources = {"lung": Path(lung_path), "infection": Path(infection_path)}
        return predictor

    def model_pixels(self, gray: np.ndarray) -> tf.Tensor:
        """H x W uint8 -> (S, S, 3) float32 model pixels (`preprocess.to_model_pixels`)."""
        return to_model_pixels(tf.convert_to_tensor(np.asarray(gray)[:, :, None]), self.image_size)

    def predict_pixels(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        """Both stages on (B, S, S, 3) model pixels and the decision at S, without the input gate (TensorFlow ops).

        Returns {"lung_prob", "lung_mask", "infection_prob", "infection_mask"}: (B, S, S, 1) float32 (masks 0/1;
        the infection inside the lung), the `SEVERITY_KEYS` (B,) float32 percentages; with an image head also
        "image_class_prob" (B, C) and "infection_probability" (B,).
        """
        stages = run_stages(self.lung_model, self.infection_model, pixels, self.decision)
        out = {"lung_prob": stages["lung_prob"], "infection_prob": stages["infection_prob"]}
        image_class = stages.get("image_class_prob")
        if image_class is not None:
            out.update(image_class_prob=image_class, infection_probability=infection_probability(image_class))
        out.update(apply_decision(stages["lung_prob"], stages["infection_prob"], self.decision,
                                  image_class_prob=image_class))
        return out

    def input_gate(self, grays: Sequence[np.ndarray], colour: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """The input gate's verdict and statistics (`preprocess.input_quality`: "assessed", "reason", "check" and
        every statistic, as numpy arrays of one value per image) for decoded H x W uint8 images, exactly as
        `predict` decides them, running Stage 1 only; `colour` as in `predict`."""
        if colour is not None and len(colour) != len(grays):
            raise ValueError(f"{len(colour)} colour shares for {len(grays)} images: give one per image")
        pixels = tf.stack([self.model_pixels(g) for g in grays])
        sizes = tf.constant([np.shape(g)[:2] for g in grays], tf.int32)
        quality = input_quality(pixels, sizes, None if colour is None else tf.constant(colour, tf.float32),
                                self._lung_stage(pixels))
        out = {k: v.numpy() for k, v in quality.items()}
        for k in ("reason", "check"):
            out[k] = np.array([r.decode() for r in out[k]], dtype=object)
        return out

    def predict(self, grays: Sequence[np.ndarray], colour: Sequence[float] | None = None) -> list[Prediction]:
        """Masks and severity of decoded H x W uint8 images, each at its own size, after the input gate (an image
        it refuses gets `assessed=False`, its reason, empty masks, severity 0).

        `colour`, one number per image, is the share of clearly coloured pixels of each decoded file
        (`imageio.decode_image(...).colour`); None skips the colour check (grey arrays, e.g. TFDS images)."""
        if not len(grays):
            return []
        if colour is not None and len(colour) != len(grays):
            raise ValueError(f"{len(colour)} colour shares for {len(grays)} images: give one per image")
        pixels = tf.stack([self.model_pixels(g) for g in grays])
        sizes = tf.constant([np.shape(g)[:2] for g in grays], tf.int32)
        stages = self._stages(pixels)
        quality = input_quality(pixels, sizes, None if colour is None else tf.constant(colour, tf.float32),
                                stages["lung_prob"])
        image_class = stages.get("image_class_prob")
        if image_class is None:
            image_class = tf.zeros([len(grays), len(IMAGE_CLASSES)], tf.float32)  # unused without a head
        out = []
        for i in range(len(grays)):
            ok = bool(quality["assessed"][i])
            m = self._masks(stages["lung_prob"][i:i + 1], stages["infection_prob"][i:i + 1], sizes[i],
                            tf.constant([ok]), image_class[i:i + 1])
            probs = None
            if self.has_image_head and ok:
                probs = {name: float(p) for name, p in zip(IMAGE_CLASSES, image_class[i].numpy())}
            out.append(Prediction(lung=m["lung_mask"].numpy()[0, :, :, 0],
                                  infection=m["infection_mask"].numpy()[0, :, :, 0],
                                  **{k: float(m[k].numpy()[0]) for k in SEVERITY_KEYS},
                                  assessed=ok, reason=quality["reason"][i].numpy().decode(),
                                  image_class_probabilities=probs))
        return out

    def run_batch(self, batch: Tensors, *, infection: bool = True, hflip: bool | None = None,
                  then: BatchStep | None = None) -> Tensors:
        """`run_batch` (the module function) with this predictor's models and decision (`hflip` replaces its flip;
        `infection` False runs Stage 1 only)."""
        return run_batch(self.lung_model, self.infection_model if infection else None, batch, self._decision(hflip),
                         self.image_size, then)

    def predict_batches(self, examples: Any, *, infection: bool = True, hflip: bool | None = None,
                        **kwargs: Any) -> Iterator[tuple[Tensors, Tensors]]:
        """`predict_batches` (the module function) with this predictor's models and decision:

            for batch, out in predictor.predict_batches("validation", builder=builder, batch_size=16):
                out["lung_prob"], out["infection_prob"], batch["label"]

        `infection` False runs Stage 1 only; `hflip` replaces the decision's flip; `kwargs` are the function's.
        """
        return predict_batches(self.lung_model, self.infection_model if infection else None, examples,
                               self._decision(hflip), image_size=self.image_size, **kwargs)

    def _decision(self, hflip: bool | None) -> Decision:
        return self.decision if hflip is None else replace(self.decision, hflip=hflip)


def run_batch(lung_model: Any, infection_model: Any | None, batch: Tensors, decision: Decision | float,
              image_size: int, then: BatchStep | None = None) -> Tensors:
    """One batch of `predict_batches` as TensorFlow ops: `run_stages` on the model pixels of batch["image"]
    ((B, H, W, 1) 0..255) at `image_size`, then `then(batch, stages)`; returns the stages' outputs and then's."""
    stages = run_stages(lung_model, infection_model, to_model_pixels(batch["image"], image_size), decision)
    return {**stages, **(then(batch, stages) if then is not None else {})}


def predict_batches(lung_model: Any, infection_model: Any | None, examples: Any, decision: Decision | float, *,
                    image_size: int | None = None, builder: Any = None, batch_size: int = 16,
                    limit: int | None = None, then: BatchStep | None = None, desc: str | None = None,
                    total: int | None = None) -> Iterator[tuple[Tensors, Tensors]]:
    """Run the stages over a TFDS split or dataset in batches: yields (batch, outputs) per batch, in order
    (`Predictor.predict_batches` is this with the predictor's models; training's Stage-1 masks call it with the
    lung model alone).

    Args:
        lung_model, infection_model: stage models (`infection_model` None: Stage 1 only).
        examples: a split name of `builder` (`data.load_split`) or a tf.data.Dataset of unbatched examples
            whose "image" is (H, W, 1) uint8 (the images of one batch must share a size).
        decision: the `Decision` (or lung threshold) `run_stages` uses.
        image_size: the models' input size S (default: the lung model's).
        batch_size, limit: images per batch; only the first `limit` examples.
        then: `then(batch, stages) -> dict` of more TensorFlow ops, run in the same graph after `run_stages`
            (e.g. masks at the native size, losses); its outputs join the stages'.
        desc: progress bar text (default: no bar); total: its length for a dataset (a split knows its own).

    Returns:
        An iterator of (the batched example dict, {"lung_prob", "lung_input", "infection_prob",
        "image_class_prob" (with a head), then's outputs}) as tensors (see `run_stages`).
    """
    from tqdm import tqdm

    size = model_input_size(lung_model, image_size)[0]
    if isinstance(examples, str):
        from covidseg_tf.data import load_split

        total = builder.info.splits[examples].num_examples
        examples = load_split(builder, examples)
    if limit:
        examples = examples.take(limit)
        total = limit if total is None else min(total, limit)
    batches = examples.batch(batch_size).prefetch(2)
    fn = tf.function(lambda batch: run_batch(lung_model, infection_model, batch, decision, size, then),
                     input_signature=[batches.element_spec])
    with tqdm(total=total, desc=desc, unit="img", disable=None if desc else True) as bar:
        for batch in batches:
            yield batch, fn(batch)
            bar.update(int(tf.shape(batch["image"])[0]))


def _as_uint8_masks(m: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """`apply_decision`'s output with uint8 masks (a quarter of the float32 bytes handed to numpy)."""
    return dict(m, lung_mask=tf.cast(m["lung_mask"], tf.uint8), infection_mask=tf.cast(m["infection_mask"], tf.uint8))

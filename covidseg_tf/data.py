"""tf.data input pipelines: TFDS examples → (pixels, mask) batches for either stage.

    examples (native size, uint8) ─ cache ─ shuffle ─ albumentations (train) ─ resize ─ batch ─ prefetch

* Model inputs follow the model contract: float32 pixels 0–255 with the grayscale X-ray repeated to RGB, and for
  Stage 2 a fourth channel holding the lung mask in {0, 1}. Normalization happens inside the model.
* Augmentation runs at native size (256 px for COVID-QU-Ex, cheaper than at 448) on the image and all its masks
  jointly, with one seed per example drawn from `tf.data.Dataset.random`, so a seeded run is reproducible even
  with parallel calls.
* Images become model pixels with `covidseg_tf.inference.preprocess.to_model_pixels` (the rule every entry point
  uses); masks are resized with nearest neighbour (`preprocess.resize_mask`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from covidseg_tf.config import IMAGE_CLASS_OUTPUT, MASK_OUTPUT, AugmentConfig, StageConfig
from covidseg_tf.inference.preprocess import resize_mask, to_model_pixels

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


class DatasetError(RuntimeError):
    """The requested dataset cannot be loaded or built; the message says what to do."""


# ----------------------------------------------------------------------------------------------- TFDS loading
def load_builder(dataset: str, data_dir: str | Path | None = None, manual_dir: str | Path | None = None,
                 build: bool = True):
    """The TFDS builder of `dataset` (e.g. "covid_qu_ex/infection"), prepared (built) if needed."""
    import tensorflow_datasets as tfds

    import tfds_covidqu  # noqa: F401  (registers covid_qu_ex)

    try:
        builder = tfds.builder(dataset, data_dir=None if data_dir is None else str(data_dir))
    except Exception as e:  # unknown name or config
        raise DatasetError(f"unknown dataset {dataset!r} ({e}); try covid_qu_ex/synthetic, "
                           "covid_qu_ex/infection or covid_qu_ex/lung") from e
    if build:
        from tfds_covidqu.covid_qu_ex.sources import CovidQuExDataError

        config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir))
        try:
            builder.download_and_prepare(download_config=config)
        except CovidQuExDataError as e:
            raise DatasetError(str(e)) from e
    return builder


IMAGE_FEATURES = ("image", "lung_mask", "infection_mask")
"""The image features of an example (grayscale uint8 HxWx1, PNG in the TFDS files)."""


def load_split(builder, split: str, decode: bool = True) -> tf.data.Dataset:
    """One split as a dataset of feature dicts, in file order (deterministic); with decode=False the images
    (IMAGE_FEATURES) stay the PNG bytes of the TFDS files (`make_pipeline` caches those and decodes after)."""
    if split not in builder.info.splits:
        raise DatasetError(f"{builder.info.full_name} has no split {split!r}; it has {list(builder.info.splits)}")
    decoders = None
    if not decode:
        import tensorflow_datasets as tfds

        decoders = {k: tfds.decode.SkipDecoding() for k in IMAGE_FEATURES if k in builder.info.features}
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)


def decode_images(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """`example` with its encoded images (strings, from `load_split(decode=False)`) decoded to uint8 HxWx1, as
    TFDS decodes them; decoded ones are kept."""
    return {k: tf.io.decode_image(v, channels=1, dtype=tf.uint8, expand_animations=False)
            if k in IMAGE_FEATURES and v.dtype == tf.string else v for k, v in example.items()}


# ----------------------------------------------------------------------------------------------- augmentation
def build_augmenter(aug: AugmentConfig):
    """The seed's train-time augmentation as an albumentations Compose (image + masks jointly)."""
    import albumentations as A
    import cv2

    return A.Compose([
        A.HorizontalFlip(p=aug.hflip_p),
        A.Affine(translate_percent=(-aug.shift, aug.shift), scale=(1 - aug.scale, 1 + aug.scale),
                 rotate=(-aug.rotate_deg, aug.rotate_deg), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0,
                 p=aug.affine_p),
        A.RandomBrightnessContrast(brightness_limit=aug.brightness, contrast_limit=aug.contrast,
                                   p=aug.brightness_contrast_p),
        A.GaussNoise(std_range=aug.noise_std, p=aug.noise_p),
    ])


def make_augment_fn(aug: AugmentConfig) -> Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """A thread-safe `fn(image HxW uint8, masks KxHxW uint8, seed) -> (image, masks)`.

    Each thread owns its Compose; re-seeding it per example makes the result depend on the example's seed only.
    """
    local = threading.local()

    def fn(image: np.ndarray, masks: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(local, "compose"):
            local.compose = build_augmenter(aug)
        local.compose.set_random_seed(int(seed) % (2**32))
        out = local.compose(image=image, masks=list(masks))
        return out["image"], np.stack(out["masks"]).astype(np.uint8)

    return fn


def augment(image: tf.Tensor, masks: tf.Tensor, seed: tf.Tensor, fn) -> tuple[tf.Tensor, tf.Tensor]:
    """Run the numpy augmentation `fn` inside the graph; image HxWx1, masks HxWxK (uint8)."""
    img2d = image[..., 0]

    def _np(i, m, s):  # masks moved to K x H x W and back in numpy (oneDNN has no uint8 transpose on AVX2 CPUs)
        out_img, out_masks = fn(i, np.moveaxis(m, -1, 0), s)
        return out_img, np.ascontiguousarray(np.moveaxis(out_masks, 0, -1))

    out_img, out_masks = tf.numpy_function(_np, [img2d, masks, seed], [tf.uint8, tf.uint8], stateful=False)
    out_img = tf.ensure_shape(out_img[..., None], image.shape)
    out_masks = tf.ensure_shape(out_masks, masks.shape)
    return out_img, out_masks


# ----------------------------------------------------------------------------------------------- pipelines
def to_model_inputs(image: tf.Tensor, masks: tf.Tensor, size: int, stage: str,
                    label: tf.Tensor | None = None) -> tuple[tf.Tensor, Any]:
    """Resize a native example and arrange it as (x, y) for `stage`.

    `masks` channels: [lung] for the lung stage; [lung channel, infection] for the infection stage, where the
    lung channel is the Stage-1 prediction or the ground truth. With the image `label` (for a model with an image
    head), y is {MASK_OUTPUT: mask, IMAGE_CLASS_OUTPUT: label}.
    """
    rgb = to_model_pixels(image, size)
    m = tf.cast(resize_mask(masks, size), tf.float32)
    x, y = (rgb, m[..., :1]) if stage == "lung" else (tf.concat([rgb, m[..., :1]], axis=-1), m[..., 1:2])
    return (x, y) if label is None else (x, {MASK_OUTPUT: y, IMAGE_CLASS_OUTPUT: label})


def select_masks(example: Mapping[str, tf.Tensor], stage: str,
                 stage1_masks: tf.lookup.StaticHashTable | None = None) -> tf.Tensor:
    """The mask channels a stage needs, HxWxK uint8 in {0, 1} (see `to_model_inputs`)."""
    if stage == "lung":
        return tf.cast(example["lung_mask"], tf.uint8)
    if stage1_masks is None:
        lung = example["lung_mask"]
    else:
        png = stage1_masks.lookup(example["file_name"])
        found = tf.debugging.assert_greater(tf.strings.length(png), 0,
                                            message="no cached Stage-1 lung mask for this file name")
        with tf.control_dependencies([found]):
            lung = tf.image.decode_png(png, channels=1)
        lung = resize_mask(lung, tf.shape(example["lung_mask"])[:2])
    return tf.concat([tf.cast(lung, tf.uint8), tf.cast(example["infection_mask"], tf.uint8)], axis=-1)


def make_pipeline(examples: tf.data.Dataset, cfg: StageConfig, *, training: bool, seed: int | None = None,
                  stage1_masks: tf.lookup.StaticHashTable | None = None, repeat: bool = False,
                  cache: bool = True, batch_size: int | None = None, shuffle_buffer: int = 2048,
                  prefetch: int = AUTOTUNE, parallel_calls: int = AUTOTUNE) -> tf.data.Dataset:
    """Batches of (x, y) for `cfg.stage` (y a dict with the image label when cfg.image_head_weight > 0, see
    `to_model_inputs`). Training adds shuffle + augmentation; validation only resizes.

    `examples` holds decoded images or, from `load_split(decode=False)`, their PNG bytes: then the cache and the
    shuffle buffer hold those (a sixth of the decoded bytes: ~0.11 instead of ~0.70 GiB for COVID-QU-Ex's 3,728
    training examples with their masks) and each example is decoded when drawn."""
    size, stage = cfg.image_size, cfg.stage
    if stage == "infection" and "infection_mask" not in examples.element_spec:
        raise DatasetError("the infection stage needs a dataset with infection masks "
                           "(covid_qu_ex/infection or covid_qu_ex/synthetic), not the lung part")
    labels = cfg.image_head_weight > 0
    if labels and "label" not in examples.element_spec:
        raise DatasetError("an image head (image_head_weight > 0) needs a dataset with image labels")
    encoded = examples.element_spec["image"].dtype == tf.string

    def native(ex):  # (image, masks[, label]) at native size
        ex = decode_images(ex)
        return (ex["image"], select_masks(ex, stage, stage1_masks), *((ex["label"],) if labels else ()))

    ds = examples if encoded else examples.map(native, num_parallel_calls=parallel_calls)
    if cache:
        ds = ds.cache()  # native-size examples (decoded, or their PNG bytes): augmentation runs from memory
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if encoded:
        ds = ds.map(native, num_parallel_calls=parallel_calls)
    if training:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        fn = make_augment_fn(cfg.augment)
        ds = tf.data.Dataset.zip(ds, seeds).map(lambda xm, s: (*augment(xm[0], xm[1], s, fn), *xm[2:]),
                                                num_parallel_calls=parallel_calls, deterministic=seed is not None)
    ds = ds.map(lambda image, masks, *label: to_model_inputs(image, masks, size, stage, *label),
                num_parallel_calls=parallel_calls)
    ds = ds.batch(batch_size or cfg.batch_size, drop_remainder=False)
    return ds.prefetch(prefetch)


def masks_lookup(names: list[str], pngs: list[bytes]) -> tf.lookup.StaticHashTable:
    """A file name → PNG-encoded mask table (missing names give an empty string)."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(names, tf.string), tf.constant(pngs, tf.string)),
        default_value="")

"""Model building and counting helpers shared by bench/infer.py and bench/train_step.py."""

from __future__ import annotations

import logging

# bench/infer.py reports the package's FLOP count as mu.conv_flops_per_image
from covidseg_tf.flops import conv_flops_per_image  # noqa: F401

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def add_layout_arg(p) -> None:
    """--layout: the U-Net layout of the models built (StageConfig.unet_layout), checked by build_unet."""
    p.add_argument("--layout", default=None, metavar="LAYOUT",
                   help="U-Net layout, one of covidseg_tf.models.UNET_LAYOUTS: segmentation_models, "
                        "segmentation_models_pytorch (default: the stage config's)")


def stage_cfg(stage: str, size: int, layout: str | None = None):
    """The seed StageConfig of `stage` at `size` px with random encoder weights (no downloads), with U-Net
    layout `layout` (None: the config's)."""
    from covidseg_tf.config import default_config

    return default_config(stage).replace(image_size=size, encoder_weights="none", unet_layout=layout)


def trained_architecture(weights_from: str) -> dict:
    """The StageConfig fields that shape the model (encoder, layout, BatchNorm, image head, dropout) of a training
    run's `model.keras`, from the run's config.json beside it ({} when there is none: the seed config's)."""
    import json
    from pathlib import Path

    run_config = Path(weights_from).parent / "config.json"
    if not run_config.is_file():
        return {}
    cfg = json.loads(run_config.read_text())["config"]
    keys = ("encoder", "unet_layout", "batch_norm", "image_head_weight", "dropout")
    return {k: cfg[k] for k in keys if k in cfg}


def build_stage(stage: str, size: int, precision: str, weights_from: str | None = None, seed: int = 0,
                layout: str | None = None):
    """Stage model under the Keras dtype policy of `precision` (set at build time, then reset to float32).

    weights_from: optional trained `.keras` file of the same stage (any input size: the U-Net is fully
    convolutional, so its weights are copied into the model built at `size`; its architecture comes from the
    run's config.json, `trained_architecture`).
    layout: U-Net layout (StageConfig.unet_layout; None: the config's)."""
    import keras

    from covidseg_tf.models import build_stage_model

    keras.utils.set_random_seed(seed)
    cfg = stage_cfg(stage, size, layout)
    if weights_from:
        cfg = cfg.replace(**trained_architecture(weights_from))
    keras.mixed_precision.set_global_policy(PRECISIONS[precision])
    try:
        model = build_stage_model(cfg, encoder_weights=None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    if weights_from:
        from covidseg_tf.inference.stages import load_stage

        model.set_weights(load_stage(weights_from).get_weights())
    return model


def profiler_flops(fn, spec) -> int | None:
    """Total float ops of a tf.function's frozen concrete graph (tf.compat.v1 profiler; all ops it has
    statistics for: convs, matmuls AND element-wise ops such as BN, add, mul), or None when it fails."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        frozen = convert_variables_to_constants_v2(fn.get_concrete_function(spec))
        builder = tf.compat.v1.profiler.ProfileOptionBuilder
        opts = builder(builder.float_operation()).with_empty_output().build()
        prof = tf.compat.v1.profiler.profile(graph=frozen.graph, options=opts)
        return int(prof.total_float_ops)
    except Exception as e:  # noqa: BLE001
        log.warning("profiler FLOP count failed: %s", e)
        return None


def param_count(model) -> int:
    return int(sum(int(__import__("numpy").prod(w.shape)) for w in model.weights))

"""Train one stage of the cascade: `python -m covidseg_tf.train --stage lung|infection`, or from Python::

    from covidseg_tf.config import default_config
    from covidseg_tf.train import train_stage

    cfg = default_config("lung").replace(dataset="covid_qu_ex/synthetic", image_size=128, epochs=3,
                                         encoder_weights="none")
    summary = train_stage(cfg, output="runs/lung-synth", seed=0)  # summary["model"]: runs/lung-synth/model.keras

`train_stage` takes the StageConfig and the run's other settings (`RunArgs`, as keywords) and is what the CLI
calls; its errors are `UsageError`s naming the flag of the same name.

A run folder (``--output``, default ``runs/<stage>``) receives::

    config.json        the StageConfig and flags the run was started with (written once, at the first start)
    reruns.jsonl       one line per later start of the run: when, from which epoch, the flags changed since
    model.keras        best weights so far (validation Dice)
    history.csv        one row per finished epoch
    logs/              TensorBoard: losses, Dice, IoU, learning rate, validation overlays
    backup/            BackupAndRestore state while the run is unfinished: rerun the same command to resume
    stage1_masks/      (infection stage, --lung-masks stage1) cached Stage-1 lung masks

and at the end the best model is exported as a SavedModel to ``<export-dir>/<stage>/<N>/`` (by default
``<output>/saved_models/``: training never writes into the repository's shipped ``saved_models/`` unless
``--export-dir`` names it). Every flag, the encoder weights, ``--lung-model`` and the dataset are checked before
the run folder is created or touched: a bad one ends with one ``error:`` line, exit code 2 (1 for a dataset that
cannot be built or loaded).

Reruns. Training into an existing run folder continues that run: from its last finished epoch when ``backup/``
holds one (the log says "resuming <run> from epoch N/E"), else from the first; a finished run (``DONE``) is
refused. A run keeps its model, so a rerun that changes a flag of `INCOMPATIBLE_FLAGS` is refused before anything
is written, naming each such flag (old -> new); start a new run with another ``--output`` instead:

* ``--stage`` (it sets ``in_channels``, 3 or 4), ``--encoder``, ``--unet-layout``: another network, whose layers
  the backup's weights do not fit (Keras fails with "N objects could not be loaded");
* ``--batch-norm``: the same weights, but a backup addresses each layer by its class (keras' weights files do), so
  it would not load into the other BatchNorm class either (a run started before the flag existed used ``keras``);
* ``--image-size``: the weights would load, but ``model.keras``, the run's best model so far, takes the old size
  and was chosen by a validation Dice measured at it, so the run's result could end up at either size;
* ``--lr-schedule``: a constant rate is a variable of the optimizer state in the backup, a schedule is not, and
  Keras then skips restoring the whole optimizer state (moments, step count) with only a warning;
* ``--mixed-precision`` to or from ``fp16``: fp16 wraps the optimizer in a LossScaleOptimizer, with the same effect
  (``off`` <-> ``bf16`` restores fine).

A resumed run keeps the layer classes its ``model.keras`` names, which its backup addresses (the log says how many
layers keep theirs): e.g. Keras' UpSampling2D in a run started before `models.build_unet` used covidseg_tf.fast_layers.

Any other flag may change; the change is logged and recorded in ``reruns.jsonl`` and applies from the resumed
epoch: ``--epochs`` extends (or shortens) the run, ``--learning-rate`` replaces the rate the backup restores
(with ``--lr-schedule cosine`` the decay is recomputed over the new ``--epochs``), and dropout, BatchNorm momentum,
weight decay, clipping, loss weights, augmentation, batch size and patience are not part of the saved weights or
optimizer variables. ``--encoder-weights`` only initializes a new run (a resumed one restores its weights).
``--dataset``, ``--threshold`` and ``--lung-model`` change what the validation Dice that picks ``model.keras``
measures: allowed, but check the log.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidseg_tf import exitcodes, optional_imports
from covidseg_tf.cli import add_dataset_flags
from covidseg_tf.config import (
    BATCH_NORMS,
    IMAGE_CLASS_OUTPUT,
    LOSS_TERMS,
    MASK_OUTPUT,
    STAGES,
    UNET_LAYOUTS,
    AugmentConfig,
    StageConfig,
    default_config,
    split_outputs,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger("covidseg_tf.train")

EXAMPLES = """\
examples:
  # Stage 1 on the synthetic phantoms (no download), small and quick
  python -m covidseg_tf.train --stage lung --dataset covid_qu_ex/synthetic --image-size 128 --epochs 3 \\
      --encoder-weights none --output runs/lung-synth
  # Stage 2 on the same data, fed the lung masks predicted by that Stage-1 model
  python -m covidseg_tf.train --stage infection --dataset covid_qu_ex/synthetic --image-size 128 --epochs 3 \\
      --encoder-weights none --lung-model runs/lung-synth/model.keras --output runs/infection-synth
  # the seed recipe on the real data (Kaggle download in ~/covidqu)
  python -m covidseg_tf.train --stage lung --manual-dir ~/covidqu
  # after a crash or kill: rerun the same command, it resumes from the last finished epoch
  tensorboard --logdir runs
refused (exit 2, nothing created or changed): a bad flag value, --encoder-weights or --lung-model that does not
load, an --output that is a file or holds a finished run or one started with other model flags;
a dataset that cannot be built or loaded: exit 1.
"""

# Config fields settable from the command line (flag = field name with dashes).
_CONFIG_FLAGS = ("encoder", "image_size", "batch_size", "epochs", "patience", "learning_rate", "lr_schedule",
                 "weight_decay",
                 "dropout", "bn_momentum", "clipnorm", "encoder_weights", "dataset", "threshold", "unet_layout",
                 "batch_norm", "image_head_weight")


# Flags a started run cannot change (the module docstring says why), and the run arguments compared on a rerun.
INCOMPATIBLE_FLAGS = ("--stage", "--encoder", "--unet-layout", "--batch-norm", "--image-size", "--lr-schedule")
#: Config fields newer than some run folders, with the value such runs were built with.
_ADDED_FIELDS = {"batch_norm": "keras", "image_head_weight": 0.0}
CONFIG_FILE = "config.json"
RERUNS_FILE = "reruns.jsonl"


class UsageError(ValueError):
    """A bad setting or missing input, found before the run folder is created or touched; the message names the
    flag (the `train_stage` keyword or StageConfig field of the same name). `main` ends with it: exit code 2."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


LUNG_MASKS = ("stage1", "ground_truth")
MIXED_PRECISIONS = ("off", "bf16", "fp16")
STRATEGIES = ("auto", "mirrored", "multiworker")


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """The settings of a training run beside its StageConfig, each the `train` flag of the same name (`--help`
    says what it does): `config.json` records them and a rerun is compared with them (`check_rerun`).
    `train_stage` takes them as keywords (`export=False` for `no_export=True`)."""

    lung_model: str | os.PathLike | None = None
    lung_masks: str = "stage1"
    mixed_precision: str = "off"
    strategy: str = "auto"
    seed: int | None = None
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    data_dir: str | os.PathLike | None = None
    manual_dir: str | os.PathLike | None = None
    export_dir: str | os.PathLike | None = None
    no_export: bool = False


_RUN_ARGS = tuple(f.name for f in dataclasses.fields(RunArgs))


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m covidseg_tf.train",
        description="Train Stage 1 (lung) or Stage 2 (infection) of the covidseg-tf cascade. Defaults are the "
                    "seed recipe of the chosen stage (shown as lung / infection).",
        epilog=EXAMPLES + exitcodes.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=STAGES, help="which stage to train")
    lung, inf = default_config("lung"), default_config("infection")
    for name in _CONFIG_FLAGS:
        f = next(f for f in dataclasses.fields(StageConfig) if f.name == name)
        a, b = getattr(lung, name), getattr(inf, name)
        default_txt = f"{a}" if a == b else f"{a} / {b}"
        kind = {"image_size": int, "batch_size": int, "epochs": int, "patience": int, "learning_rate": float,
                "weight_decay": float, "dropout": float, "bn_momentum": float, "clipnorm": _optional_float,
                "threshold": float, "image_head_weight": float}.get(name, str)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=f.name.upper(),
                       help=f"default: {default_txt}")
    p.add_argument("--loss-weights", type=_loss_weights, default=None, metavar="TERM=W[,TERM=W...]",
                   help=f"loss = sum of weight x term over {', '.join(LOSS_TERMS)}; unnamed terms get 0 "
                        f"(default: {_weights_txt(lung.loss_weights)} / {_weights_txt(inf.loss_weights)})")
    aug = p.add_argument_group("augmentation (training only; AugmentConfig fields)")
    for f in dataclasses.fields(AugmentConfig):
        a, b = _aug_txt(getattr(lung.augment, f.name)), _aug_txt(getattr(inf.augment, f.name))
        what = f.metadata.get("help", "")
        aug.add_argument(_aug_flag(f.name), type=_float_pair if _is_range(f) else float, default=None,
                         metavar="LO,HI" if _is_range(f) else "P" if f.name.endswith("_p") else "X",
                         help=f"{what}{'; ' if what else ''}default: {a if a == b else f'{a} / {b}'}")
    add_dataset_flags(p, default=None)  # --dataset is a StageConfig field above
    p.add_argument("--output", help="run folder (default: runs/<stage>); rerunning resumes an unfinished run")
    p.add_argument("--lung-model", help="Stage-1 .keras model (infection stage with --lung-masks stage1)")
    p.add_argument("--lung-masks", choices=LUNG_MASKS, default="stage1",
                   help="Stage 2's lung channel: Stage-1 predictions (as at inference; default) or ground truth")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default="off",
                   help="compute dtype; bf16 uses AMX on recent Intel CPUs, fp16 is for GPUs (default: off)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="tf.distribute strategy; --batch-size is global (default: auto)")
    p.add_argument("--seed", type=int, help="seed everything (weights, shuffling, augmentation) for a repeatable run")
    p.add_argument("--steps-per-epoch", type=int, help="cap the training steps of each epoch")
    p.add_argument("--validation-steps", type=int, help="cap the validation steps of each epoch")
    p.add_argument("--export-dir", default=None,
                   help="TF Serving base folder; the best model goes to <export-dir>/<stage>/<N>/ "
                        "(default: <output>/saved_models)")
    p.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


_OFF = "none"
LR_SCHEDULES = ("constant", "cosine")


def _optional_float(text: str) -> float | str:
    """A float, or the word none/off (switches the option off)."""
    return _OFF if text.lower() in ("none", "off") else float(text)


def _loss_weights(text: str) -> dict[str, float]:
    """`dice=0.5,bce=0.3,focal=0.2` -> {"dice": 0.5, "bce": 0.3, "focal": 0.2}: known terms, weights >= 0, at
    least one > 0 (argparse reports the error with the flag's name)."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        term, sep, value = (s.strip() for s in item.partition("="))
        try:
            weight = float(value) if sep else None
        except ValueError:
            weight = None
        if weight is None or weight != weight:  # no "=", not a number, or NaN
            raise argparse.ArgumentTypeError(
                f"expected TERM=WEIGHT pairs separated by commas (e.g. dice=0.5,bce=0.3,focal=0.2), got {text!r}")
        if term in weights:
            raise argparse.ArgumentTypeError(f"loss term {term!r} given twice in {text!r}")
        weights[term] = weight
    problem = _loss_weights_problem(weights, repr(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return weights


def _loss_weights_problem(weights: dict[str, float], given: str) -> str | None:
    """What is wrong with loss weights {term: weight} (`given`: as the user wrote them), or None: the terms must
    be LOSS_TERMS, the weights zero or more, at least one positive.

    >>> _loss_weights_problem({"dice": 1.0, "focal": 0.0}, "")
    >>> _loss_weights_problem({"dice": 0.0}, "dice=0")
    'at least one loss weight must be positive, got dice=0'
    """
    for term, weight in weights.items():
        if term not in LOSS_TERMS:
            return f"unknown loss term {term!r}; known terms: {', '.join(LOSS_TERMS)}"
        if not weight >= 0:
            return f"weight of {term!r} must be zero or more, got {weight:g}"
    if not any(w > 0 for w in weights.values()):
        return f"at least one loss weight must be positive, got {given}"
    return None


def _weights_txt(weights: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in weights.items())


def _float_pair(text: str) -> tuple[float, float]:
    """`LO,HI` -> (LO, HI)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers LO,HI, got {text!r}") from None


def _is_range(f: dataclasses.Field) -> bool:
    """An AugmentConfig field holding a (low, high) pair."""
    return isinstance(f.default, tuple)


def _aug_flag(name: str) -> str:
    return "--aug-" + name.replace("_", "-")


def _aug_txt(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"


# Valid values of the AugmentConfig fields that need more than the rule of their kind (see _augment_problems).
_AUG_RULES = {
    "scale": (lambda v: 0 <= v < 1, "in [0, 1) (the zoom factor 1-X must stay positive)"),
    "noise_std": (lambda v: 0 <= v[0] <= v[1] <= 1, "LO,HI with 0 <= LO <= HI <= 1"),
}


def _augment_problems(aug: AugmentConfig) -> list[str]:
    """One message per invalid AugmentConfig field, naming its flag: probabilities (`*_p`) in [0, 1], ranges LO,HI
    with 0 <= LO <= HI, every other limit zero or more, plus _AUG_RULES."""
    problems = []
    for f in dataclasses.fields(AugmentConfig):
        v = getattr(aug, f.name)
        if f.name in _AUG_RULES:
            check, what = _AUG_RULES[f.name]
        elif _is_range(f):
            check, what = (lambda v: 0 <= v[0] <= v[1]), "LO,HI with 0 <= LO <= HI"
        elif f.name.endswith("_p"):
            check, what = (lambda v: 0 <= v <= 1), "a probability in [0, 1]"
        else:
            check, what = (lambda v: v >= 0), "zero or more"
        if not check(v):
            problems.append(f"{_aug_flag(f.name)} must be {what}, got {_aug_txt(v)}")
    return problems


def config_from_args(args: argparse.Namespace) -> StageConfig:
    """The stage's seed config with the flags given on the command line applied, validated (`check_config`)."""
    cfg = default_config(args.stage)
    changes = {name: getattr(args, name) for name in _CONFIG_FLAGS}
    cfg = cfg.replace(**changes, loss_weights=args.loss_weights)
    aug_changes = {f.name: getattr(args, "aug_" + f.name) for f in dataclasses.fields(AugmentConfig)}
    cfg = cfg.replace(augment=dataclasses.replace(cfg.augment, **{k: v for k, v in aug_changes.items()
                                                                  if v is not None}))
    if args.clipnorm == _OFF:  # "--clipnorm none" switches the stage's clipping off
        cfg = dataclasses.replace(cfg, clipnorm=None)
    return check_config(cfg)


def check_config(cfg: StageConfig) -> StageConfig:
    """`cfg` checked, with its encoder name in lower case; a bad field raises UsageError naming its `train` flag
    (`--<field-name>`; the augment fields `--aug-<name>`)."""
    from covidseg_tf.models import ENCODERS  # imported here: `--help` stays free of TensorFlow

    if cfg.stage not in STAGES:
        raise UsageError(f"--stage must be one of {', '.join(STAGES)}, got {cfg.stage}")
    channels = default_config(cfg.stage).in_channels
    if cfg.in_channels != channels:  # only a config built by hand can get it wrong
        raise UsageError(f"in_channels {cfg.in_channels} does not fit --stage {cfg.stage}, which takes {channels} "
                         "(build the config with default_config(stage).replace(...))")
    checks = [
        ("--encoder", cfg.encoder.lower() in ENCODERS, f"one of {', '.join(ENCODERS)}"),
        ("--image-size", cfg.image_size > 0 and cfg.image_size % 32 == 0, "a positive multiple of 32"),
        ("--batch-size", cfg.batch_size > 0, "positive"),
        ("--epochs", cfg.epochs > 0, "positive"),
        ("--patience", cfg.patience >= 0, "zero or more"),
        ("--learning-rate", cfg.learning_rate > 0, "positive"),
        ("--lr-schedule", cfg.lr_schedule in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
        ("--weight-decay", cfg.weight_decay >= 0, "zero or more"),
        ("--dropout", 0 <= cfg.dropout < 1, "in [0, 1)"),
        ("--bn-momentum", 0 <= cfg.bn_momentum < 1, "in [0, 1)"),
        ("--threshold", 0 < cfg.threshold < 1, "in (0, 1)"),
        ("--unet-layout", cfg.unet_layout in UNET_LAYOUTS, f"one of {', '.join(UNET_LAYOUTS)}"),
        ("--batch-norm", cfg.batch_norm in BATCH_NORMS, f"one of {', '.join(BATCH_NORMS)}"),
        ("--image-head-weight", cfg.image_head_weight >= 0, "zero or more"),
        ("--image-head-weight", cfg.stage == "infection" or cfg.image_head_weight == 0,
         "0 for the lung stage (only Stage 2 has an image head)"),
    ]
    _raise_first(checks, cfg)
    if cfg.clipnorm is not None and cfg.clipnorm <= 0:
        raise UsageError(f"--clipnorm must be positive or 'none', got {cfg.clipnorm}")
    problem = _loss_weights_problem(cfg.loss_weights, _weights_txt(cfg.loss_weights))
    if problem:
        raise UsageError(f"--loss-weights: {problem}")
    problems = _augment_problems(cfg.augment)
    if problems:
        raise UsageError("; ".join(problems))
    return cfg.replace(encoder=cfg.encoder.lower())


def check_run_args(args: RunArgs) -> None:
    """A UsageError naming the flag of the first bad field of `args` (paths are checked when the run starts)."""
    _raise_first([
        ("--lung-masks", args.lung_masks in LUNG_MASKS, f"one of {', '.join(LUNG_MASKS)}"),
        ("--mixed-precision", args.mixed_precision in MIXED_PRECISIONS, f"one of {', '.join(MIXED_PRECISIONS)}"),
        ("--strategy", args.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
        ("--steps-per-epoch", args.steps_per_epoch is None or args.steps_per_epoch > 0, "positive"),
        ("--validation-steps", args.validation_steps is None or args.validation_steps > 0, "positive"),
    ], args)


def _raise_first(checks: list[tuple[str, bool, str]], values: Any) -> None:
    """UsageError "<flag> must be <what>, got <value>" for the first (flag, ok, what) of `checks` that is not ok;
    the value is the attribute of `values` named like the flag."""
    for flag, ok, what in checks:
        if not ok:
            raise UsageError(f"{flag} must be {what}, got {getattr(values, flag[2:].replace('-', '_'))}")


# ----------------------------------------------------------------------------------------------- setup
def set_mixed_precision(mode: str) -> None:
    import keras

    policy = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[mode]
    keras.mixed_precision.set_global_policy(policy)


def make_strategy(name: str):
    """auto: the default strategy (one device); mirrored: all local GPUs, or all logical CPUs without a GPU;
    multiworker: MultiWorkerMirroredStrategy configured by TF_CONFIG."""
    import tensorflow as tf

    if name == "auto":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if "TF_CONFIG" not in os.environ:
        raise UsageError("--strategy multiworker needs the TF_CONFIG environment variable (cluster and task)")
    return tf.distribute.MultiWorkerMirroredStrategy()


def stage1_lung_masks(model, lung_model_path: Path, builder, splits: Sequence[str], cache_dir: Path,
                      threshold: float, image_size: int) -> tuple[list[str], list[bytes]]:
    """Stage-1 lung masks for every example of `splits`, as (file names, PNG bytes at the model size), predicted by
    `model`, loaded from `lung_model_path` and taking `image_size` (`_load_lung_model`).

    Each mask is `inference.predictor.run_stages`' `lung_input` (through `predict_batches`, one image per batch):
    the image made model pixels, Stage 1, thresholded at the model size, i.e. exactly the mask Stage 2 is given at
    inference (the pipeline resizes it nearest to the
    example's native size for augmentation and back). Predicted once and cached in `cache_dir`, keyed by the
    Stage-1 model file's digest and the threshold, so a rerun (or a resumed run) reuses them and a retrained
    Stage-1 model invalidates them.
    """
    import tensorflow as tf

    from covidseg_tf import data
    from covidseg_tf.files import replace_atomically, sha256_file
    from covidseg_tf.inference.postprocess import Decision
    from covidseg_tf.inference.predictor import predict_batches

    cache = cache_dir / f"{sha256_file(lung_model_path)[:16]}-t{threshold:g}.tfrecord"
    if not cache.exists():
        tmp = cache.with_suffix(".partial")
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for split in splits:
                for ex, out in predict_batches(model, None, data.load_split(builder, split), Decision(threshold),
                                               image_size=image_size, batch_size=1,
                                               desc=f"Stage-1 lung masks ({split})",
                                               total=builder.info.splits[split].num_examples):
                    mask = tf.cast(out["lung_input"][0], tf.uint8)
                    feat = {"name": ex["file_name"][0].numpy(), "png": tf.io.encode_png(mask).numpy()}
                    example = tf.train.Example(features=tf.train.Features(feature={
                        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feat.items()}))
                    writer.write(example.SerializeToString())
        replace_atomically(tmp, cache)  # fsynced, then renamed: a kill leaves no half cache under its name
        log.info("cached Stage-1 lung masks in %s", cache)
    names, pngs = [], []
    spec = {"name": tf.io.FixedLenFeature([], tf.string), "png": tf.io.FixedLenFeature([], tf.string)}
    for rec in tf.data.TFRecordDataset(str(cache)):
        ex = tf.io.parse_single_example(rec, spec)
        names.append(ex["name"].numpy())
        pngs.append(ex["png"].numpy())
    return names, pngs


# ----------------------------------------------------------------------------------------------- callbacks
def make_overlay_callback(log_dir: Path, batch, threshold: float, max_images: int = 4):
    """Each epoch, a grid of image | truth | prediction overlays on a fixed validation batch → TensorBoard; the
    prediction is the mask probabilities thresholded at `threshold` (the run's StageConfig.threshold)."""
    import keras
    import tensorflow as tf

    x, y = batch
    x, y = x[:max_images], split_outputs(y)[0][:max_images]

    class ValidationOverlays(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writer = tf.summary.create_file_writer(str(log_dir / "images"))

        def on_epoch_end(self, epoch, logs=None):
            pred = tf.cast(split_outputs(self.model(x, training=False))[0] >= threshold, tf.float32)
            gray = x[..., :1] / 255.0
            rgb = tf.repeat(gray, 3, axis=-1)

            def overlay(mask):  # red tint where mask == 1
                red = tf.concat([tf.ones_like(mask), tf.zeros_like(mask), tf.zeros_like(mask)], -1)
                return rgb * (1 - 0.45 * mask) + 0.45 * mask * red

            rows = tf.concat([rgb, overlay(y), overlay(pred)], axis=2)  # (B, H, 3W, 3)
            grid = tf.reshape(rows, (1, -1, rows.shape[2], 3))
            with self.writer.as_default():
                tf.summary.image("validation/image_truth_prediction", grid, step=epoch)
            self.writer.flush()

    return ValidationOverlays()


def make_model_checkpoint(path: Path, best: float | None, monitor: str = "val_dice"):
    """ModelCheckpoint of the best validation Dice (`monitor`, see `dice_key`) into `path`, written atomically: to a
    temporary file in the same folder, fsynced, then renamed over `path` (a kill mid-write leaves the previous model
    whole)."""
    import keras

    from covidseg_tf.files import partial_path, remove_partials, replace_atomically

    class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
        def on_train_begin(self, logs=None):
            remove_partials(path)  # a killed run's half-written model
            super().on_train_begin(logs)

        def _save_model(self, epoch, batch, logs):
            filepath = self._get_file_path(epoch, batch, logs)
            if self._should_save_model(epoch, batch, logs, filepath):
                tmp = partial_path(filepath)
                self.model.save(str(tmp), overwrite=True)
                replace_atomically(tmp, filepath)

    return AtomicModelCheckpoint(str(path), monitor=monitor, mode="max", save_best_only=True,
                                 initial_value_threshold=best)


def make_history_logger(path: Path):
    """CSVLogger appending to `path` whose row is on the disk (flushed and fsynced) when the epoch ends."""
    import keras

    class DurableCSVLogger(keras.callbacks.CSVLogger):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            os.fsync(self.csv_file.fileno())

    return DurableCSVLogger(str(path), append=True)


def drop_unfinished_rows(history_csv: Path, finished: int) -> int:
    """Keep only the rows of epochs < `finished` (the ones the backup counts as done: the others are trained
    again), rewritten atomically; returns the number of rows dropped."""
    from covidseg_tf.files import partial_path, replace_atomically

    if not history_csv.exists():
        return 0
    with open(history_csv, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return 0
    rows = list(csv.reader(lines[1:]))
    keep = [ln for ln, r in zip(lines[1:], rows) if r and r[0].isdigit() and int(r[0]) < finished]
    dropped = len(lines) - 1 - len(keep)
    if dropped:
        tmp = partial_path(history_csv)
        with open(tmp, "w", newline="") as f:
            f.writelines([lines[0], *keep])
        replace_atomically(tmp, history_csv)
    return dropped


def make_lr_logger():
    """A callback adding the optimizer's current learning rate to the epoch logs (TensorBoard and the CSV)."""
    import keras

    class LearningRateLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    return LearningRateLogger()


def make_learning_rate(cfg: StageConfig, train_ds, steps_per_epoch: int | None):
    """The optimizer's learning rate: cfg.learning_rate, or a cosine decay of it over the whole run."""
    import keras

    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    steps = steps_per_epoch or int(train_ds.cardinality())
    if steps <= 0:
        raise ValueError("--lr-schedule cosine needs a finite training set or --steps-per-epoch")
    return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=steps * cfg.epochs)


def make_learning_rate_setter(rate: float):
    """A callback setting the optimizer's constant learning rate when training begins. Placed after
    BackupAndRestore, it overrides the rate a resumed run's backup restored, so `--learning-rate` applies."""
    import keras

    class SetLearningRate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.model.optimizer.learning_rate = rate

    return SetLearningRate()


def compile_args(cfg: StageConfig) -> dict[str, Any]:
    """model.compile's loss, metrics (and loss_weights) for `cfg`'s model: the stage's SegmentationLoss with pooled
    Dice/IoU; with an image head (cfg.image_head_weight > 0) per output, the head's sparse categorical
    cross-entropy weighted by cfg.image_head_weight beside the mask loss, and its accuracy."""
    import keras

    from covidseg_tf.losses import make_loss
    from covidseg_tf.metrics import make_metrics

    if cfg.image_head_weight <= 0:
        return {"loss": make_loss(cfg), "metrics": make_metrics(cfg.threshold)}
    return {"loss": {MASK_OUTPUT: make_loss(cfg), IMAGE_CLASS_OUTPUT: keras.losses.SparseCategoricalCrossentropy()},
            "loss_weights": {MASK_OUTPUT: 1.0, IMAGE_CLASS_OUTPUT: cfg.image_head_weight},
            "metrics": {MASK_OUTPUT: make_metrics(cfg.threshold),
                        IMAGE_CLASS_OUTPUT: [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}}


def dice_key(image_head_weight: float) -> str:
    """The epoch-log key of the training mask Dice of a run with this StageConfig.image_head_weight (Keras prefixes
    a metric with its output's name when the model has several outputs); "val_" + it is the validation Dice that
    picks model.keras."""
    return "dice" if image_head_weight <= 0 else f"{MASK_OUTPUT}_dice"


def _best_so_far(history_csv: Path, key: str = "val_dice") -> float | None:
    """Best validation Dice of the finished epochs of an interrupted run (None when there are none)."""
    if not history_csv.exists():
        return None
    with open(history_csv, newline="") as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "", "nan")]
    return max(values) if values else None


# ----------------------------------------------------------------------------------------------- reruns
def _value_txt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_value_txt(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_value_txt(v)}" for k, v in value.items())
    return "none" if value is None else str(value)


def _run_flags(config: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """{flag: value} of a run as config.json stores it (StageConfig dict and argparse namespace)."""
    flags = {}
    for name, value in config.items():
        if name == "augment":
            flags.update({_aug_flag(k): v for k, v in value.items()})
        elif name != "in_channels":  # follows --stage
            flags["--" + name.replace("_", "-")] = value
    flags.update({"--" + name.replace("_", "-"): args.get(name) for name in _RUN_ARGS})
    return flags


def check_rerun(out: Path, cfg: StageConfig, args: RunArgs | argparse.Namespace) -> dict[str, tuple[Any, Any]] | None:
    """Compare a rerun with the run started in `out`: None for a first start (no config.json), else the flags
    changed since, {flag: (old, new)}. Raises UsageError when a changed flag is one a run cannot change
    (INCOMPATIBLE_FLAGS, or --mixed-precision to or from fp16; the module docstring says why)."""
    path = out / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        started = json.loads(path.read_text())
        old = _run_flags({**_ADDED_FIELDS, **started["config"]}, started.get("args", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--output {out}: cannot read {path} ({type(e).__name__}: {e}), so this rerun cannot be "
                         "checked against the run's flags; pass another --output to start a new run") from None
    # through JSON, as config.json was written: tuples become lists, paths strings
    new = _run_flags(json.loads(json.dumps(cfg.to_dict())), json.loads(json.dumps(vars(args), default=str)))
    changes = {flag: (old.get(flag), value) for flag, value in new.items() if old.get(flag) != value}
    fixed = [flag for flag in changes if flag in INCOMPATIBLE_FLAGS
             or (flag == "--mixed-precision" and "fp16" in changes[flag])
             or (flag == "--image-head-weight" and len({float(v or 0) > 0 for v in changes[flag]}) == 2)]
    if fixed:
        diff = ", ".join(f"{flag} {_value_txt(changes[flag][0])} -> {_value_txt(changes[flag][1])}" for flag in fixed)
        raise UsageError(f"--output {out} holds a run started with other model flags ({diff}; see {path}); a run "
                         "cannot change them (its backup and model.keras are that model). Rerun with the run's "
                         "flags to resume it, or pass another --output to start a new run")
    return changes


def _saved_layer_classes(model_path: Path) -> dict[str, type[keras.layers.Layer]]:
    """The class of each layer of a saved ``.keras`` model by layer name, as `_saved_class` resolves it (a layer
    whose class does not resolve is left out, logged); {} when the file cannot be read."""
    import zipfile

    try:
        with zipfile.ZipFile(model_path) as z:
            entries = json.loads(z.read("config.json"))["config"]["layers"]
        named = [(entry.get("name") or entry["config"]["name"], entry) for entry in entries]
    except (OSError, KeyError, TypeError, ValueError, AttributeError, zipfile.BadZipFile) as e:
        log.debug("%s: no layer classes read (%s: %s)", model_path, type(e).__name__, e)
        return {}
    classes = {}
    for name, entry in named:
        if cls := _saved_class(entry):
            classes[name] = cls
        else:
            log.info("%s: layer %s's class %s (%s) does not resolve; it is built as the code builds it", model_path,
                     name, entry.get("registered_name") or entry.get("class_name"), entry.get("module"))
    return classes


def _saved_class(entry: dict[str, Any]) -> type[keras.layers.Layer] | None:
    """The class of one layer entry of a ``.keras`` file's config.json, found as Keras' loader finds it: a registered
    class (``covidseg_tf>...``) by its ``registered_name``, else a built-in one by its ``module`` (Keras' own only)
    and ``class_name``; None if that gives no Layer class."""
    import importlib

    import keras

    cls = keras.saving.get_registered_object(entry.get("registered_name"))
    module = entry.get("module") or ""
    if cls is None and (module == "keras" or module.startswith("keras.")):
        try:
            cls = getattr(importlib.import_module(module), entry.get("class_name", ""), None)
        except ImportError:
            cls = None
    return cls if isinstance(cls, type) and issubclass(cls, keras.layers.Layer) else None


def _with_saved_layer_classes(model: keras.Model, model_path: Path) -> keras.Model:
    """`model` with each layer rebuilt as the class a run's `model_path` saved under its name, where that differs
    (`fast_layers.with_layer_classes`: same configs and weights; `model` itself when none does). A run's backup
    addresses each layer by its class (Keras' weights files do), so a resumed run keeps the classes it started with.
    A run started before the decoder's `fast_layers.UpsamplingConv2D` (its model.keras has separate
    ``decoder_stage*_upsampling`` layers) keeps its graph: the model is `model_path` loaded."""
    from collections import Counter

    import keras

    from covidseg_tf.fast_layers import with_layer_classes

    saved = _saved_layer_classes(model_path)
    if not saved:
        return model
    if any(re.fullmatch(r"decoder_stage\d+_upsampling", name) for name in saved):
        log.info("%s has the decoder's separate upsampling and concat layers (a run started before "
                 "fast_layers.UpsamplingConv2D): the resumed run keeps that graph", model_path)
        return keras.models.load_model(model_path, compile=False)
    names = {layer.name for layer in model.layers}
    if names != saved.keys():
        log.debug("%s: layers without a saved class, built as the code builds them: %s; saved layers the model does "
                  "not have: %s", model_path, sorted(names - saved.keys()), sorted(saved.keys() - names))
    kept = {layer.name: saved[layer.name] for layer in model.layers
            if saved.get(layer.name, type(layer)) is not type(layer)}
    if kept:
        counts = Counter(cls.__name__ for cls in kept.values())
        log.info("%d layer(s) keep the classes the run was started with, which its backup addresses (%s names "
                 "them): %s", len(kept), model_path, ", ".join(f"{n} {name}" for name, n in sorted(counts.items())))
    return with_layer_classes(model, lambda layer: kept.get(layer.name, type(layer)))


def _backup_epochs(backup: Path) -> int | None:
    """Finished epochs saved by BackupAndRestore in `backup` (None when there is none to resume from)."""
    try:
        return int(json.loads((backup / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_output(out: Path) -> None:
    """--output must be (or become) a folder that holds no finished run."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"--output {out}: {p} is a file; --output takes a run folder (created if missing)")
            break
    if (out / "DONE").exists():
        raise UsageError(f"--output {out} holds a finished run (see {out / 'DONE'}); choose another folder")


def _encoder_weights(cfg: StageConfig) -> str | None:
    """cfg.encoder_weights resolved ("auto" -> "imagenet" or None) and checked: an "imagenet" download, or a file
    that loads (a trained stage's .keras file, or weights of the 3-channel encoder, as `build_stage_model` loads
    them), so a PNG or a broken file is a usage error before the run folder is created."""
    from covidseg_tf.inference.stages import keras_model, load_stage
    from covidseg_tf.models import choose_encoder_weights, load_reference_encoder, resolve_encoder_weights

    try:
        weights = choose_encoder_weights(cfg.encoder, cfg.encoder_weights)
        path = resolve_encoder_weights(cfg.encoder, weights)
        if path is not None and path.suffix == ".keras":
            keras_model(load_stage(path))
        elif path is not None and str(weights).lower() != "imagenet":
            load_reference_encoder(cfg.encoder, path)
    except (RuntimeError, OSError, ValueError) as e:
        raise UsageError(f"--encoder-weights {cfg.encoder_weights}: {e}") from None
    return weights


def _load_lung_model(path: Path, image_size: int):
    """The Stage-1 model of --lung-model: loadable, a lung stage model, taking `image_size` (else UsageError)."""
    from covidseg_tf.inference.stages import load_stage, model_input_size

    try:
        model = load_stage(path, stage="lung")
        size, _ = model_input_size(model, image_size)
    except (OSError, ValueError) as e:
        raise UsageError(f"--lung-model: {e}") from None
    if size != image_size:
        raise UsageError(f"--lung-model {path} takes {size} px but this stage trains at --image-size "
                         f"{image_size}; the cascade runs both stages at one size")
    return model


# ----------------------------------------------------------------------------------------------- training
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as the parsed command line `args` says (`train_stage` with its StageConfig and run arguments)."""
    cfg = config_from_args(args)
    run_args = {name: getattr(args, name) for name in _RUN_ARGS if name != "no_export"}
    return train_stage(cfg, output=args.output or f"runs/{cfg.stage}", export=not args.no_export, **run_args)


def train_stage(config: StageConfig, *, output: str | os.PathLike, lung_model: str | os.PathLike | None = None,
                lung_masks: str = "stage1", mixed_precision: str = "off", strategy: str = "auto",
                seed: int | None = None, steps_per_epoch: int | None = None, validation_steps: int | None = None,
                data_dir: str | os.PathLike | None = None, manual_dir: str | os.PathLike | None = None,
                export_dir: str | os.PathLike | None = None, export: bool = True) -> dict[str, Any]:
    """Train the stage `config` describes into the run folder `output`, or resume the unfinished run there, and
    export its best model; returns the summary also written to `<output>/DONE`: {"run", "model" (model.keras),
    "best_val_dice", "encoder_weights", "saved_model" (unless export=False)}.

    The keywords are the `train` flags of the same names (`RunArgs`; `export=False` is `--no-export`): e.g. an
    infection stage fed by a trained lung stage, on the synthetic data, a few steps::

        cfg = default_config("infection").replace(dataset="covid_qu_ex/synthetic", image_size=64, epochs=2)
        train_stage(cfg, output="runs/infection-synth", lung_model="runs/lung-synth/model.keras",
                    steps_per_epoch=5, seed=0)

    Everything (config, run arguments, the run folder, a rerun's flags, the encoder weights, `lung_model`) is
    checked before the run folder is created or touched: a bad one raises UsageError, whose message names the flag;
    a dataset that cannot be built or loaded raises data.DatasetError (or the builder's CovidQuExDataError).
    """
    import keras

    from covidseg_tf import data
    from covidseg_tf.models import build_stage_model
    from covidseg_tf.optimizers import make_optimizer
    from covidseg_tf.steps import release_traced_steps

    # Everything is checked before the run folder is created or touched.
    cfg = check_config(config)
    args = RunArgs(lung_model=lung_model, lung_masks=lung_masks, mixed_precision=mixed_precision, strategy=strategy,
                   seed=seed, steps_per_epoch=steps_per_epoch, validation_steps=validation_steps, data_dir=data_dir,
                   manual_dir=manual_dir, export_dir=export_dir, no_export=not export)
    check_run_args(args)  # from here on `args` holds the keywords (lung_model and strategy are reused as names)
    out = Path(output)
    _check_output(out)
    changes = check_rerun(out, cfg, args)
    lung_model_path = None
    if cfg.stage == "infection" and args.lung_masks == "stage1":
        if not args.lung_model:
            raise UsageError("--lung-masks stage1 (the default) needs --lung-model PATH, the Stage-1 model.keras "
                             "made by `python -m covidseg_tf.train --stage lung ...` (it prints the path); or "
                             "pass --lung-masks ground_truth")
        lung_model_path = Path(args.lung_model)
        if lung_model_path.is_dir():
            raise UsageError(f"--lung-model {lung_model_path} is a folder; it takes the Stage-1 .keras file a "
                             "training run writes (runs/<name>/model.keras), not a SavedModel")
        if not lung_model_path.is_file():
            raise UsageError(f"--lung-model {lung_model_path} does not exist; train Stage 1 first: "
                             f"python -m covidseg_tf.train --stage lung --dataset {cfg.dataset} "
                             f"--image-size {cfg.image_size}")
    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    set_mixed_precision(args.mixed_precision)
    strategy = make_strategy(args.strategy)
    lung_model = None if lung_model_path is None else _load_lung_model(lung_model_path, cfg.image_size)
    weights = _encoder_weights(cfg)  # "auto" and "imagenet" may try a download
    builder = data.load_builder(cfg.dataset, args.data_dir, args.manual_dir)

    resumed = _backup_epochs(out / "backup")
    out.mkdir(parents=True, exist_ok=True)
    if changes is None:  # the first start: config.json remembers how the run was started
        if resumed is not None:
            log.warning("%s has a backup/ but no %s (written by an older version); its flags cannot be checked",
                        out, CONFIG_FILE)
        (out / CONFIG_FILE).write_text(json.dumps({"config": cfg.to_dict(), "args": _args_record(out, args)},
                                                  indent=2, default=str))
    else:
        if changes:
            log.info("flags changed since %s was started (%s keeps the original ones): %s", out, CONFIG_FILE,
                     ", ".join(f"{flag} {_value_txt(a)} -> {_value_txt(b)}" for flag, (a, b) in changes.items()))
        record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished_epochs": resumed,
                  "changed": {flag: list(ab) for flag, ab in changes.items()}, "args": _args_record(out, args)}
        with open(out / RERUNS_FILE, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    if resumed is not None:
        log.info("resuming %s from epoch %d/%d (%d finished epoch(s) restored from %s)", out, resumed + 1,
                 cfg.epochs, resumed, out / "backup")
    elif changes is not None:
        log.info("restarting %s from epoch 1: no finished epoch in %s", out, out / "backup")
    table = None
    if lung_model is not None:
        names, pngs = stage1_lung_masks(lung_model, lung_model_path, builder, ("train", "validation"),
                                        out / "stage1_masks", cfg.threshold, cfg.image_size)
        table = data.masks_lookup(names, pngs)
    # PNG bytes in the pipelines' caches, decoded when drawn (data.make_pipeline; bench/RESULTS.md, "Training memory")
    train_ds = data.make_pipeline(data.load_split(builder, "train", decode=False), cfg, training=True,
                                  seed=args.seed, stage1_masks=table, repeat=args.steps_per_epoch is not None)
    val_ds = data.make_pipeline(data.load_split(builder, "validation", decode=False), cfg, training=False,
                                stage1_masks=table)

    with strategy.scope():
        model = build_stage_model(cfg, encoder_weights=weights)
        if resumed is not None:
            model = _with_saved_layer_classes(model, out / "model.keras")
        optimizer = make_optimizer(cfg, make_learning_rate(cfg, train_ds, args.steps_per_epoch))
        model.compile(optimizer=optimizer, **compile_args(cfg))
    release_traced_steps(model)  # the traced steps' graphs freed before the activations take their memory

    monitor = "val_" + dice_key(cfg.image_head_weight)
    dropped = drop_unfinished_rows(out / "history.csv", resumed or 0)
    if dropped:
        log.info("dropped %d row(s) of %s for epochs the backup did not finish (trained again)", dropped,
                 out / "history.csv")
    best = _best_so_far(out / "history.csv", monitor)
    # Epoch ends run in this order: the learning rate into the logs, the history row (fsynced), the model (atomic),
    # and only then the backup that counts the epoch as finished; so a kill at any point loses no finished epoch's
    # row or model. (BackupAndRestore restores at train begin before the learning-rate setter overrides the rate.)
    callbacks = [
        make_lr_logger(),
        make_history_logger(out / "history.csv"),
        make_model_checkpoint(out / "model.keras", best, monitor),
        keras.callbacks.BackupAndRestore(str(out / "backup"), save_freq="epoch", delete_checkpoint=True),
        *([make_learning_rate_setter(cfg.learning_rate)] if cfg.lr_schedule == "constant" else []),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=cfg.patience,
                                      restore_best_weights=True),
        keras.callbacks.TensorBoard(str(out / "logs")),
        make_overlay_callback(out / "logs", next(iter(val_ds)), cfg.threshold),
    ]
    model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, steps_per_epoch=args.steps_per_epoch,
              validation_steps=args.validation_steps, callbacks=callbacks, shuffle=False,
              verbose=1 if sys.stdout.isatty() else 2)  # a progress bar in a terminal, a line per epoch in a log

    best = _best_so_far(out / "history.csv", monitor)
    if not (out / "model.keras").exists():
        raise RuntimeError(f"training produced no model in {out} (did the loss become NaN? see history.csv)")
    summary: dict[str, Any] = {"run": str(out), "model": str(out / "model.keras"), "best_val_dice": best,
                               "encoder_weights": weights}
    if not args.no_export:
        from covidseg_tf.export import export_stage
        from covidseg_tf.inference.stages import load_stage

        export_dir = Path(args.export_dir) if args.export_dir else out / "saved_models"
        summary["saved_model"] = str(export_stage(load_stage(out / "model.keras"), cfg.stage, export_dir,
                                                  decision=cfg.threshold))
    (out / "DONE").write_text(json.dumps(summary, indent=2))
    return summary


def _args_record(out: Path, args: RunArgs) -> dict[str, Any]:
    """The run arguments as config.json and reruns.jsonl record them (with the run folder, `output`)."""
    return {"output": str(out), **dataclasses.asdict(args)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the `train` flags, train (`train_stage`) and return its summary; a UsageError ends with one
    ``error:`` line and exit code 2 (SystemExit). The console script and `python -m` run `cli`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    optional_imports.import_tensorflow()  # without Keras' unused pandas / IPython; after parsing: `--help` stays light
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except UsageError as e:  # one line, exit code 2 (argparse's own errors print the usage first)
        parser.exit(2, f"{parser.prog}: error: {e.message}\n")
    best = summary["best_val_dice"]
    log.info("best validation Dice %.4f; model %s", float("nan") if best is None else best, summary["model"])
    if "saved_model" in summary:
        log.info("SavedModel %s", summary["saved_model"])
    return summary


def cli() -> None:
    """`python -m covidseg_tf.train`: a dataset that cannot be built or loaded ends with one error line (exit 1),
    a Ctrl-C with one line saying how to resume (exit 130)."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(exitcodes.interrupted("python -m covidseg_tf.train", "every finished epoch is kept: rerun the "
                                       "same command to resume from the last one"))
    except Exception as e:
        # imported late: `--help` stays free of TensorFlow
        from covidseg_tf.data import DatasetError
        from tfds_covidqu.covid_qu_ex.sources import CovidQuExDataError

        if isinstance(e, (DatasetError, CovidQuExDataError)):
            sys.exit(f"error: {e}")
        raise


def launch() -> None:
    """`python -m covidseg_tf.train` and the `covidseg-train` script: `cli` in a process restarted once with the
    training malloc (tcmalloc when installed; covidseg_tf.malloc) before TensorFlow loads."""
    from covidseg_tf.malloc import reexec_for_training

    reexec_for_training()
    cli()


if __name__ == "__main__":
    launch()

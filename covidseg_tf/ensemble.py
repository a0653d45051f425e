"""An ensemble of stage models as one flat Keras model, saved as one `.keras` file that every tool takes as a stage.

    model = ensemble_model(["runs/inf128/model.keras", "runs/inf256/model.keras"])   # or keras.Models
    model.save("runs/infection-ensemble.keras")
    python -m covidseg_tf.ensemble --members runs/inf128/model.keras runs/inf256/model.keras \\
        --out runs/infection-ensemble.keras

The ensemble takes what one stage model takes: (B, S, S, C) raw pixels 0..255 (C = 3 for the lung stage; 4 for
the infection stage: + the lung mask 0/1) at its size S (default: the largest member's), and returns what one
returns: (B, S, S, 1) mask probabilities, or with image heads the dict {MASK_OUTPUT: those, IMAGE_CLASS_OUTPUT:
(B, N) class probabilities}, with the top-level output layers named MASK_OUTPUT and IMAGE_CLASS_OUTPUT (so
`models.has_image_head` and `KerasStage.has_image_head` see the head). Inside, each member:

1. gets the input at its own size s (when s != S): the RGB channels resized like `preprocess.to_model_pixels`
   (bilinear with antialias), the mask channels (3.., the lung mask of Stage 2) with nearest neighbour like
   `preprocess.resize_mask`;
2. runs;
3. has its mask probabilities resized back to S bilinearly (no antialias, like `postprocess.threshold_mask`).

The mask is the mean of the members' masks and the image class probabilities the mean of theirs; `weights` make
both weighted means (normalised to sum 1).

The graph is FLAT: each member's layers are cloned into it under the prefix ``m<i>_`` (``m0_stem_conv``,
``m1_decoder_stage0a_bn``, ...) with their weights, so `optimize.fold_batchnorm`, which walks `model.layers`, folds
every member's Conv -> BN pair (a nested sub-model would hide them), and `export` / `optimize.tflite_model` see
one ordinary functional model. Only built-in Keras layers are added (EinsumDense, Average, Rescaling, Add): the
file loads with plain `keras.models.load_model` (members built by `covidseg_tf.models` still need
`covidseg_tf.batchnorm` and `covidseg_tf.activations` imported, as `inference.load_stage` does).

Resizing is linear and separable, so each resize is two fixed (non-trainable) `EinsumDense` matrix products, rows
then columns, one (new size x old size) matrix per channel, computed by `tf.image.resize` itself on unit
impulses (`resize_matrix`): the same weights as the op, equal up to float32 round-off (about 1e-7 of the
values; nearest neighbour exactly). Not `keras.layers.Resizing`: TFLite has no kernel for the antialiased resize
(TensorFlow's ScaleAndTranslate op), so `optimize.tflite_model` could not convert the ensemble, and the layer's
``training=True`` default would reach every later layer of a ``model(x)`` call without `training` (BatchNorm in
training mode).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidseg_tf import exitcodes

log = logging.getLogger(__name__)

PROG = "python -m covidseg_tf.ensemble"
SIZE_DIVISOR = 32  # = inference.preprocess.SIZE_DIVISOR (not imported: --help stays free of TensorFlow)
RGB = 3
"""Input channels 0..2 are pixels; channels from 3 on are 0/1 masks (the lung mask of Stage 2)."""
# How each kind of channel is resized: (tf.image.resize method, antialias)
PIXELS = ("bilinear", True)  # preprocess.to_model_pixels
MASKS = ("nearest", False)  # preprocess.resize_mask
PROBABILITIES = ("bilinear", False)  # postprocess.threshold_mask


@dataclass(frozen=True)
class Member:
    """One member of an ensemble: its Keras model, where it came from (for messages), its input size (None for a
    model built with a free size), channels and whether it has the image head."""

    model: Any
    label: str
    size: int | None
    channels: int
    has_head: bool


def member(model: Any, label: str | None = None) -> Member:
    """A stage model (keras.Model, Keras `Stage`, or the path of a `.keras` file, loaded by
    `inference.load_stage`) checked to be one: a single square (B, S, S, C) input, C >= 3, a (B, S, S, 1) mask
    output and optionally an image class output (ValueError naming the file or model otherwise)."""
    from covidseg_tf.config import split_outputs
    from covidseg_tf.inference.stages import keras_model, load_stage

    if isinstance(model, (str, Path)):
        label = label or str(model)
        if Path(model).suffix != ".keras":
            raise ValueError(f"{label}: an ensemble member must be a Keras stage model (a training run's .keras "
                             "file), not a SavedModel or TFLite export")
        model = load_stage(model)  # FileNotFoundError / ValueError naming the file
    elif getattr(model, "path", None) is not None:  # a Stage loaded from disk
        label = label or str(model.path)
    try:
        model = keras_model(model)  # ValueError for a SavedModel / TFLite / frozen stage, naming its path
    except TypeError as e:
        raise ValueError(f"{label or type(model).__name__}: not a stage model: {e}") from None
    label = label or f"model {model.name!r}"
    where = f"{label}: not a stage model"
    if len(model.inputs) != 1:
        raise ValueError(f"{where}: {len(model.inputs)} inputs; a stage model has one (B, S, S, C) input")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] is None or shape[3] < RGB:
        raise ValueError(f"{where}: input shape {shape}; expected a square (None, S, S, C) input, C >= {RGB}")
    try:
        mask, image_class = split_outputs(model.output)
    except KeyError:
        raise ValueError(f"{where}: outputs {sorted(model.output)}; expected the mask output "
                         "(and optionally the image class output)") from None
    if isinstance(mask, (dict, list, tuple)) or tuple(mask.shape)[1:] != (shape[1], shape[2], 1):
        raise ValueError(f"{where}: output {_shapes(model.output)} for input {shape}; expected (None, S, S, 1) "
                         "mask probabilities")
    if image_class is not None and len(image_class.shape) != 2:
        raise ValueError(f"{where}: image class output of shape {tuple(image_class.shape)}; expected (None, N)")
    return Member(model, label, shape[1], int(shape[3]), image_class is not None)


def _shapes(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return {k: _shapes(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return [_shapes(v) for v in outputs]
    return tuple(outputs.shape)


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """`weights` normalised to sum 1 (equal weights for None); ValueError unless there is one finite positive
    weight per member."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} members; give one weight per member")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"weights must be positive numbers, got {', '.join(f'{w:g}' for w in bad)}")
    total = sum(weights)
    return [w / total for w in weights]


def ensemble_model(members: Sequence[Any], image_size: int | None = None, weights: Sequence[float] | None = None,
                   name: str | None = None) -> Any:
    """One flat keras.Model averaging the stage models `members` (keras.Models, Keras Stages or `.keras` paths),
    each run at its own input size (see the module docstring).

    Args:
        members: at least two stage models with the same input channels, all with the image head or none.
        image_size: the ensemble's input size S (a positive multiple of 32; default: the largest member's).
            Members built with a free input size run at S.
        weights: one positive weight per member for the means (default: equal); normalised to sum 1.
        name: the model's name (default: "<stage>_ensemble", e.g. "infection_ensemble").

    Raises:
        ValueError (naming the file or model): a member that is no stage model, members with different channel
        counts, the image head on some members only, bad weights or image size.
        FileNotFoundError: a member path that does not exist.
    """
    import keras
    from keras import layers

    from covidseg_tf.config import IMAGE_CLASS_OUTPUT, MASK_OUTPUT, split_outputs
    from covidseg_tf.inference.stages import STAGE_OF_CHANNELS

    if isinstance(members, (str, Path)) or len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    found = [member(m) for m in members]
    channels = {m.channels for m in found}
    if len(channels) > 1:
        raise ValueError("the members take different input channels: "
                         + "; ".join(f"{m.label}: {m.channels}" for m in found)
                         + " (3 = lung stage, 4 = infection stage); an ensemble needs one stage")
    heads = [m for m in found if m.has_head]
    if heads and len(heads) != len(found):
        without = [m.label for m in found if not m.has_head]
        raise ValueError(f"the image-level head is on {len(heads)} of {len(found)} members: {', '.join(without)} "
                         f"{'has' if len(without) == 1 else 'have'} none; ensemble members with heads only or "
                         "without heads only (a model trained without --image-head-weight has none)")
    fractions = check_weights(weights, len(found))
    sizes = [m.size for m in found if m.size is not None]
    if image_size is None:
        if not sizes:
            raise ValueError("every member takes a free input size; give the ensemble's image size")
        image_size = max(sizes)
    if image_size <= 0 or image_size % SIZE_DIVISOR:
        raise ValueError(f"image size must be a positive multiple of {SIZE_DIVISOR}, got {image_size}")
    c = channels.pop()
    s = int(image_size)

    pixels = keras.Input((s, s, c), name="pixels")
    masks, classes, copies = [], [], []
    for i, m in enumerate(found):
        prefix = f"m{i}_"
        size = m.size or s
        methods = [PIXELS] * RGB + [MASKS] * (c - RGB)
        x = pixels if size == s else resize(pixels, size, methods, f"{prefix}resize_input")
        outputs, clones = _inline(m.model, x, prefix)
        copies.append(clones)
        mask, image_class = split_outputs(outputs)
        if size != s:
            mask = resize(mask, s, [PROBABILITIES], f"{prefix}resize_mask")
        masks.append(mask)
        classes.append(image_class)
    equal = len(set(fractions)) == 1
    out = {MASK_OUTPUT: _mean(masks, fractions, equal, MASK_OUTPUT)}
    if heads:
        out[IMAGE_CLASS_OUTPUT] = _mean(classes, fractions, equal, IMAGE_CLASS_OUTPUT)
    model = keras.Model(pixels, out if heads else out[MASK_OUTPUT],
                        name=name or f"{STAGE_OF_CHANNELS.get(c, 'stage')}_ensemble")
    for m, clones in zip(found, copies):  # the weights, once the clones are built
        for layer in m.model.layers:
            if layer.name in clones:
                clones[layer.name].set_weights(layer.get_weights())
                if isinstance(layer, layers.Normalization):
                    clones[layer.name].finalize_state()  # it caches mean/variance tensors: refresh them
    log.info("%s: %d members (%s) at %d px, %d channels%s, weights %s", model.name, len(found),
             ", ".join(f"{m.label} {m.size or s} px" for m in found), s, c, ", image head" if heads else "",
             " ".join(f"{w:.4g}" for w in fractions))
    return model


def resize_matrix(old: int, new: int, method: tuple[str, bool]) -> Any:
    """The (new, old) float32 matrix R of a 1-D resize by `tf.image.resize` with `method` ((name, antialias)):
    resizing (old, old) to (new, new) is R @ image @ R.T per channel (the op is separable). Computed by the op
    itself on the `old` unit impulses."""
    import tensorflow as tf

    name, antialias = method
    impulses = tf.eye(old)[tf.newaxis, :, tf.newaxis, :]  # (1, old, 1, old): channel j = an impulse at row j
    return tf.image.resize(impulses, (new, 1), method=name, antialias=antialias)[0, :, 0, :].numpy()


def resize(x: Any, new: int, methods: Sequence[tuple[str, bool]], name: str) -> Any:
    """The square (B, S, S, C) Keras tensor `x` resized to (B, new, new, C), channel c by `methods[c]`, as two
    fixed EinsumDense layers, `name`_rows and `name`_cols (see the module docstring)."""
    import numpy as np
    from keras import layers

    old, channels = int(x.shape[1]), int(x.shape[-1])
    if len(methods) != channels:
        raise ValueError(f"{len(methods)} resize methods for {channels} channels")
    kernel = np.stack([resize_matrix(old, new, m) for m in methods], axis=-1)  # (new, old, C)
    rows = layers.EinsumDense("bijc,hic->bhjc", output_shape=(new, old, channels), trainable=False,
                              dtype="float32", name=f"{name}_rows")
    cols = layers.EinsumDense("bhjc,wjc->bhwc", output_shape=(new, new, channels), trainable=False,
                              dtype="float32", name=f"{name}_cols")
    y = cols(rows(x))
    rows.set_weights([kernel])
    cols.set_weights([kernel])
    return y


def _inline(model: Any, x: Any, prefix: str) -> tuple[Any, dict[str, Any]]:
    """`model`'s layers cloned (config only, renamed prefix + name) and called on `x` in the caller's graph:
    (the output structure, {original layer name: clone}). The weights are copied once the clones are built.

    `keras.models.clone_model(model, input_tensors=x, ...)` does the same walk but then builds a Functional on the
    intermediate `x`, which re-calls every clone (Keras' clone_graph_nodes): each would have two inbound nodes,
    and `optimize.foldable_pairs` folds only a conv with a single consumer. `Function._run_through_graph` is the
    walk alone (the one clone_model calls)."""
    clones: dict[str, Any] = {}

    def clone(layer: Any) -> Any:
        if layer.name not in clones:  # a layer called twice is cloned once
            config = layer.get_config()
            config["name"] = prefix + layer.name
            clones[layer.name] = layer.__class__.from_config(config)
        return clones[layer.name]

    return model._run_through_graph(x, operation_fn=clone), clones


def _mean(tensors: list[Any], fractions: list[float], equal: bool, name: str) -> Any:
    """The mean of `tensors` (weighted by `fractions`, which sum to 1), as a layer called `name`."""
    from keras import layers

    if equal:
        return layers.Average(dtype="float32", name=name)(tensors)
    scaled = [layers.Rescaling(f, dtype="float32", name=f"m{i}_{name}_weight")(t)
              for i, (t, f) in enumerate(zip(tensors, fractions))]
    return layers.Add(dtype="float32", name=name)(scaled)


# ----------------------------------------------------------------------------------------------- the CLI
def _positive_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0 or value % SIZE_DIVISOR:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of {SIZE_DIVISOR}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Average trained stage models (e.g. a 128 px and a 256 px Stage 2) into ONE flat Keras model, "
        "written as one .keras file that predict, evaluate, tune and export take as --lung-model / "
        "--infection-model. Each member runs at its own input size (the input resized as the cascade resizes "
        "images and masks, its mask resized back); the outputs are the means of the members' mask and image "
        "class probabilities.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m covidseg_tf.ensemble --members runs/infection-128/model.keras \\\n"
        "      runs/infection-256/model.keras --out runs/infection-ensemble.keras\n"
        "  python -m covidseg_tf.ensemble --members A.keras B.keras --weights 0.4 0.6 --image-size 256 \\\n"
        "      --out runs/ens.keras --overwrite\n"
        "then use it as a stage:\n"
        "  python -m covidseg_tf.evaluate --infection-model runs/infection-ensemble.keras ...\n"
        "  python -m covidseg_tf.export --lung-model L.keras --infection-model runs/infection-ensemble.keras\n"
        "refused (exit 2, nothing written): a member that is missing or no Keras stage model (.keras file), members "
        "taking different input channels (lung and infection), the image-level head on some members only, weights "
        "not one positive number per member, an --out that exists (without --overwrite), is no .keras name or "
        "cannot be written\n" + exitcodes.EPILOG,
    )
    p.add_argument("--members", required=True, nargs="+", type=Path, metavar="MODEL",
                   help="two or more stage .keras files (training runs' model.keras) of one stage")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="one positive weight per member for the means, normalised to sum 1 (default: equal)")
    p.add_argument("--image-size", type=_positive_size, default=None,
                   help="the ensemble's input size S (default: the largest member's)")
    p.add_argument("--name", default=None, help="the model's name (default: <stage>_ensemble)")
    p.add_argument("--out", required=True, type=Path, help="the .keras file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if len(args.members) < 2:
        p.error("--members: an ensemble needs at least two members")
    try:
        check_weights(args.weights, len(args.members))
    except ValueError as e:
        p.error(f"--weights: {e}")
    if args.out.suffix != ".keras":
        p.error(f"--out {args.out}: the ensemble is written as a Keras model, whose file name ends in .keras")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from covidseg_tf.files import unwritable_reason

    if args.out.is_dir():
        return _usage(f"--out {args.out} is a folder; give the .keras file to write")
    if args.out.exists() and not args.overwrite:
        return _usage(f"--out {args.out} exists; pass --overwrite to replace it")
    reason = unwritable_reason(args.out.parent)
    if reason:
        return _usage(f"--out {args.out}: {reason}")
    try:
        model = ensemble_model(args.members, image_size=args.image_size, weights=args.weights, name=args.name)
    except (FileNotFoundError, ValueError) as e:
        return _usage(str(e))
    write(model, args.out)
    log.info("wrote %s (%s, input %s)", args.out, model.name, tuple(model.inputs[0].shape))
    return exitcodes.OK


def write(model: Any, path: Path) -> Path:
    """Save `model` to the `.keras` file `path` atomically (a temporary file beside it, checked to load as a
    stage, then renamed over `path`): a kill leaves the old file or the new one."""
    from covidseg_tf.files import partial_path, remove_partials, replace_atomically
    from covidseg_tf.inference.stages import load_stage

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(path)
    tmp = partial_path(path)
    try:
        model.save(tmp)
        stage = load_stage(tmp)  # what every tool will do with it
        if (stage.input_shape, stage.has_image_head) != (tuple(model.inputs[0].shape), len(model.outputs) == 2):
            raise RuntimeError(f"{tmp}: reloads as {stage}, not as the ensemble it was saved from")
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _usage(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return exitcodes.USAGE


if __name__ == "__main__":
    exitcodes.run_cli(main, PROG, "nothing half-written is left (the file is written under a temporary name)")

"""Stage models behind one interface: Keras, exported SavedModel, TFLite and frozen graph, and the export manifest.

    stage = load_stage("saved_models/lung")           # a .keras file, a SavedModel base/version folder, a .tflite
    stage.format, stage.image_size, stage.channels    # "savedmodel", 128, 3
    prob, image_class = stage.probabilities(pixels)   # (B, S, S, 1) float32 and (B, C) or None
    stage.manifest                                    # ExportManifest of an exported stage, else None

A `Stage` is called like the Keras stage model it stands for: `stage(pixels, training=False)` maps (B, S, S, C) raw
pixels 0..255 (C = 3 for the lung stage; 4 for the infection stage: + the lung mask 0/1) to (B, S, S, 1) float32
probabilities, or for an infection model with an image-level head to the dict {MASK_OUTPUT: those,
IMAGE_CLASS_OUTPUT: (B, len(IMAGE_CLASSES)) probabilities}. `probabilities` returns the two apart, as float32, and
with `hflip` averages each with the prediction on the mirrored input (test-time augmentation).

Implementations: `KerasStage` (a keras.Model; its other attributes, e.g. `layers`, pass through to the model),
`SavedModelStage` (a stage servable written by `covidseg_tf.export`, through its `predict_pixels` signature),
`TFLiteStage` (`covidseg_tf.export --tflite`'s `stage.tflite`, on LiteRT/XNNPACK) and `FrozenStage` (a BatchNorm-
folded, frozen graph function, `covidseg_tf.optimize.frozen_stage`). `as_stage` wraps a keras.Model and passes a
Stage through; `load_stage` reads one from disk.

`ExportManifest` is the typed `assets.extra/covidseg_export.json` of an exported version folder: the only reader
and writer of that file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import tensorflow as tf

from covidseg_tf.config import IMAGE_CLASS_OUTPUT, MASK_OUTPUT, split_outputs
from covidseg_tf.files import integer_versions
from covidseg_tf.inference.postprocess import Decision
from covidseg_tf.inference.preprocess import SIZE_DIVISOR

log = logging.getLogger(__name__)

FORMATS = ("keras", "savedmodel", "tflite", "frozen")
EXPORT_INFO = Path("assets.extra") / "covidseg_export.json"
"""Where `ExportManifest` lives inside an exported version folder."""
IMAGE_CLASS_PROB = "image_class_prob"
"""Output name of the image head's (B, C) class probabilities in the SavedModel signatures (`covidseg_tf.serving`)."""
TFLITE_FILE = "stage.tflite"
"""The TFLite copy of a stage that `covidseg_tf.export --tflite` writes into the stage's version folder."""
STAGE_OF_CHANNELS = {3: "lung", 4: "infection"}

_EXPECTED = ("expected a Keras `.keras` file, a stage SavedModel version folder (holding saved_model.pb), a TF "
             "Serving base folder of integer versions such as saved_models/lung, or a `.tflite` stage file "
             "(`covidseg_tf.export --tflite`)")
_HOW_TO_GET = ("train the stages with `python -m covidseg_tf.train --stage lung|infection ... --output runs/NAME` "
               "(it writes runs/NAME/model.keras and exports saved_models/<stage>/<N>/), export .keras models with "
               "`python -m covidseg_tf.export ... --out saved_models/`, run `python -m covidseg_tf.demo`, or pass "
               "--lung-model/--infection-model")


# ----------------------------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class TFLiteExport:
    """The `tflite` entry of an `ExportManifest`: the `stage.tflite` written beside the SavedModel.

        TFLiteExport(precision="int8", bytes=len(content), calibration_images=64, float_layers=["rescaling"])

    `precision` is "fp32" (`export --tflite`) or "int8" (`export --tflite int8`); an int8 file also records
    `calibration_images`, how many images calibrated its activation ranges, and `float_layers`, the Keras layers
    it keeps in float32 (the input preprocessing; `optimize.float32_layers`). Keys this version does not know are
    kept in `extra` and written back.
    """

    file: str = TFLITE_FILE
    precision: str = "fp32"
    bytes: int | None = None
    calibration_images: int | None = None
    float_layers: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (fields that are None are left out; `extra` keys follow the known ones)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TFLiteExport:
        """From `to_dict` output or an older manifest's entry ({"file", "precision", "bytes"}; ValueError for one
        that is no JSON object)."""
        if not isinstance(d, dict):
            raise ValueError(f"the `tflite` entry of the export manifest is {type(d).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class ExportManifest:
    """What `covidseg_tf.export` wrote into a version folder (`assets.extra/covidseg_export.json`).

        ExportManifest(servable="lung", image_size=128, channels=3, threshold=0.5).write(version_dir)
        ExportManifest.read(version_dir).decision

    `servable` is "lung", "infection" or "cascade"; `threshold` the stage's mask threshold (the lung stage applies
    only this); `decision` the whole `Decision` an infection stage or the cascade applies (None for a lung stage);
    `tflite` (a `TFLiteExport`; its JSON object is converted) describes a `stage.tflite` beside the SavedModel.
    Keys this version does not know are kept in `extra` and written back.
    """

    servable: str
    image_size: int | None = None
    channels: int | None = None
    threshold: float | None = None
    decision: Decision | None = None
    precision: str | None = None
    model: str | list[str | None] | None = None
    signatures: list[str] | None = None
    tensorflow: str | None = None
    keras: str | None = None
    exported_at: str | None = None
    max_side: int | None = None
    tflite: TFLiteExport | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FILE: ClassVar[Path] = EXPORT_INFO

    def __post_init__(self) -> None:
        if self.tflite is not None and not isinstance(self.tflite, TFLiteExport):  # its JSON object (from_dict)
            object.__setattr__(self, "tflite", TFLiteExport.from_dict(self.tflite))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (fields that are None are left out; `extra` keys follow the known ones)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            out[f.name] = value.to_dict() if isinstance(value, (Decision, TFLiteExport)) else value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportManifest:
        """From `to_dict` output or an older manifest (ValueError for a missing servable, a bad decision or
        `tflite` entry)."""
        if not isinstance(d, dict) or not isinstance(d.get("servable"), str):
            raise ValueError("no `servable` name in the export manifest")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in known}
        if values.get("decision") is not None:
            values["decision"] = Decision.from_dict(values["decision"])
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def read(cls, version_dir: Path | str) -> ExportManifest:
        """The manifest of an exported version folder (ValueError naming the file when it is missing or bad)."""
        path = Path(version_dir) / EXPORT_INFO
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a readable export manifest ({e}); {_EXPECTED}, written by "
                             "covidseg_tf.export") from e

    @classmethod
    def find(cls, version_dir: Path | str) -> ExportManifest | None:
        """`read`, or None when the folder has no manifest file."""
        return cls.read(version_dir) if (Path(version_dir) / EXPORT_INFO).is_file() else None

    def write(self, version_dir: Path | str) -> Path:
        """Write the manifest into `version_dir`; returns the file."""
        path = Path(version_dir) / EXPORT_INFO
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def replace(self, **changes: Any) -> ExportManifest:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------- the protocol
@runtime_checkable
class Stage(Protocol):
    """One stage model, whatever its file format (module docstring). Implementations subclass this to inherit
    `image_size`, `channels`, `probabilities` and `info`."""

    format: str
    """One of FORMATS: "keras", "savedmodel", "tflite", "frozen"."""
    name: str
    stage: str | None
    """"lung" or "infection" (from the manifest, else from the input channels); None when unknown."""
    path: Path | None
    """The file or version folder it was loaded from (None when built in memory)."""
    manifest: ExportManifest | None
    input_shape: tuple[int | None, ...]
    has_image_head: bool

    def __call__(self, pixels: Any, training: bool = False) -> Any:
        ...

    @property
    def image_size(self) -> int | None:
        """The model's input side S (None for a model built with a free size)."""
        return self.input_shape[1]

    @property
    def channels(self) -> int:
        return int(self.input_shape[-1])

    @property
    def info(self) -> dict[str, Any]:
        """The manifest as its JSON object ({} without one)."""
        return self.manifest.to_dict() if self.manifest is not None else {}

    def probabilities(self, pixels: Any, hflip: bool = False) -> tuple[tf.Tensor, tf.Tensor | None]:
        """(mask probabilities (B, S, S, 1), image class probabilities (B, C) or None) as float32; with `hflip`,
        each the mean with the prediction on the mirrored input (the mask mirrored back)."""
        x = tf.cast(pixels, tf.float32)
        mask, image_class = _float32(split_outputs(self(x, training=False)))
        if hflip:
            mirrored, mirrored_class = _float32(split_outputs(self(tf.reverse(x, axis=[2]), training=False)))
            mask = 0.5 * (mask + tf.reverse(mirrored, axis=[2]))
            if image_class is not None:
                image_class = 0.5 * (image_class + mirrored_class)
        return mask, image_class


def _float32(tensors: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(None if t is None else tf.cast(t, tf.float32) for t in tensors)


# ----------------------------------------------------------------------------------------------- implementations
class KerasStage(Stage):
    """A keras.Model as a Stage: `KerasStage(model, path=None)`. Attributes it does not define (`layers`,
    `get_weights`, `save`, ...) are the model's."""

    format = "keras"
    manifest = None

    def __init__(self, model: Any, path: Path | str | None = None):
        self.model = model
        self.path = None if path is None else Path(path)
        self.name = model.name
        self.input_shape = tuple(model.inputs[0].shape)
        self.stage = STAGE_OF_CHANNELS.get(self.input_shape[-1])
        self.has_image_head = any(layer.name == IMAGE_CLASS_OUTPUT for layer in model.layers)

    def __call__(self, pixels: Any, training: bool = False) -> Any:
        return self.model(pixels, training=training)

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"KerasStage({self.name!r}, input_shape={self.input_shape})"


class FrozenStage(Stage):
    """A stage as a frozen graph function (`covidseg_tf.optimize.frozen_stage` builds one): `function` maps
    (B, S, S, C) float32 pixels to a flat list [mask probabilities] or [mask, image class probabilities]."""

    format = "frozen"
    manifest = None
    path = None

    def __init__(self, function: Callable[..., Any], name: str, input_shape: tuple[int | None, ...],
                 precision: str = "fp32"):
        self.function = function
        self.name = name
        self.input_shape = tuple(input_shape)
        self.precision = precision
        self.stage = STAGE_OF_CHANNELS.get(self.input_shape[-1])
        self.has_image_head = len(function.structured_outputs) == 2

    def __call__(self, pixels: Any, training: bool = False) -> Any:
        """The mask probabilities, or for a model with an image head the dict the Keras model returns."""
        out = self.function(tf.cast(pixels, tf.float32))  # a frozen function returns a flat list
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        return out[0] if len(out) == 1 else {MASK_OUTPUT: out[0], IMAGE_CLASS_OUTPUT: out[1]}

    def __repr__(self) -> str:
        return f"FrozenStage({self.name!r}, precision={self.precision!r}, input_shape={self.input_shape})"


@contextlib.contextmanager
def quiet_absl(level: int = logging.ERROR) -> Any:
    """Inside the block, TensorFlow's Python log (logger "absl") shows only records at `level` or above."""
    absl = logging.getLogger("absl")
    old = absl.level
    absl.setLevel(level)
    try:
        yield
    finally:
        absl.setLevel(old)


class SavedModelStage(Stage):
    """A stage SavedModel version folder written by `covidseg_tf.export.export_stage`: `SavedModelStage(path)`,
    run through its `predict_pixels` signature (eagerly or inside `tf.function`)."""

    format = "savedmodel"

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.manifest = ExportManifest.read(self.path)
        self.stage = self.manifest.servable
        if self.stage == "cascade":
            raise ValueError(f"{self.path} is a cascade SavedModel (both stages in one servable); pass the stage "
                             "SavedModels (saved_models/lung and saved_models/infection) or .keras files instead")
        if self.stage not in ("lung", "infection"):
            raise ValueError(f"{self.path}: servable {self.stage!r} in {EXPORT_INFO}; expected 'lung' or 'infection'")
        try:
            with quiet_absl():  # silence "ops with unsaved custom gradients": inference needs none
                self._loaded = tf.saved_model.load(str(self.path))  # keeps the signature's resources alive
                self._fn = self._loaded.signatures["predict_pixels"]
        except Exception as e:
            raise ValueError(f"{self.path}: cannot load the `predict_pixels` signature of this SavedModel: "
                             f"{type(e).__name__}: {e}") from e
        spec = self._fn.structured_input_signature[1]["pixels"]
        self.input_shape = tuple(spec.shape.as_list())
        self.name = f"{self.stage}_v{self.path.name}"
        self._output = f"{self.stage}_prob"
        self.has_image_head = IMAGE_CLASS_PROB in self._fn.structured_outputs
        log.info("loaded %s stage SavedModel %s (input %s)", self.stage, self.path, self.input_shape)

    def __call__(self, pixels: Any, training: bool = False) -> Any:
        out = self._fn(pixels=tf.cast(pixels, tf.float32))
        if self.has_image_head:
            return {MASK_OUTPUT: out[self._output], IMAGE_CLASS_OUTPUT: out[IMAGE_CLASS_PROB]}
        return out[self._output]

    def __repr__(self) -> str:
        return f"SavedModelStage({str(self.path)!r}, stage={self.stage!r}, input_shape={self.input_shape})"


class TFLiteStage(Stage):
    """A TFLite stage (batch-1 flatbuffer, `covidseg_tf.optimize.tflite_model`): `TFLiteStage(file_or_bytes,
    threads=None)`.

    Runs one image per interpreter call on `threads` threads (default: TensorFlow's intra-op setting, else
    TF_NUM_INTRAOP_THREADS, else every core), eagerly or inside `tf.function` (through `tf.numpy_function`); calls
    are serialised (one interpreter). A file in an exported version folder takes its stage and decision from the
    folder's manifest; a bare file's stage comes from its input channels. `precision` is "int8" for a model holding
    int8 tensors (`export --tflite int8`: float32 input and output, int8 inside), else "fp32".
    """

    format = "tflite"

    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        self.path = None if isinstance(model, bytes) else Path(model)
        where = "TFLite model" if self.path is None else str(self.path)
        threads = (threads or tf.config.threading.get_intra_op_parallelism_threads()
                   or int(os.environ.get("TF_NUM_INTRAOP_THREADS", 0)) or os.cpu_count() or 1)
        self.threads = threads
        try:
            content = model if isinstance(model, bytes) else self.path.read_bytes()
            self._interpreter = _tflite_interpreter(content, threads)
            self._interpreter.allocate_tensors()
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{where}: cannot load this TFLite model: {type(e).__name__}: {e}; {_EXPECTED}") from e
        inp, out = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        shape = tuple(int(d) for d in inp[0]["shape"])
        if len(inp) != 1 or len(out) not in (1, 2) or len(shape) != 4 or shape[0] != 1 or shape[1] != shape[2]:
            raise ValueError(f"{where}: a TFLite model with inputs {[tuple(d['shape']) for d in inp]}; expected "
                             "one (1, S, S, C) input, as `covidseg_tf.export --tflite` writes")
        masks = [d for d in out if len(d["shape"]) == 4]
        heads = [d for d in out if len(d["shape"]) == 2]
        if len(masks) != 1 or len(heads) != len(out) - 1:
            raise ValueError(f"{where}: a TFLite model with outputs {[tuple(d['shape']) for d in out]}; expected a "
                             "(1, S, S, 1) mask and optionally a (1, C) image class output")
        self._input, self._output = inp[0]["index"], masks[0]["index"]
        self._head = heads[0]["index"] if heads else None
        self.has_image_head = self._head is not None
        self.input_shape = (None, *shape[1:])
        self._classes = int(heads[0]["shape"][1]) if heads else 0
        int8 = any(d["dtype"] == np.int8 for d in self._interpreter.get_tensor_details())
        self.precision = "int8" if int8 else "fp32"
        self.manifest = None if self.path is None else ExportManifest.find(self.path.parent)
        self.stage = self.manifest.servable if self.manifest else STAGE_OF_CHANNELS.get(shape[3])
        self.name = f"{self.stage}_tflite"
        self._lock = threading.Lock()
        log.info("loaded %s TFLite %s stage %s (input %s, %d threads)", self.stage, self.precision, where,
                 self.input_shape, threads)

    def run(self, pixels: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """(B, S, S, C) pixels -> (B, S, S, 1) float32 probabilities, in numpy (with an image head, the pair of
        those and the (B, C) class probabilities)."""
        pixels = np.asarray(pixels, np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"{self.name}: pixels of shape {pixels.shape}; expected (B, *{self.input_shape[1:]})")
        masks, classes = [], []
        with self._lock:
            for image in pixels:
                self._interpreter.set_tensor(self._input, image[None])
                self._interpreter.invoke()
                masks.append(self._interpreter.get_tensor(self._output)[0].astype(np.float32))
                if self._head is not None:
                    classes.append(self._interpreter.get_tensor(self._head)[0].astype(np.float32))
        mask = np.stack(masks) if masks else np.zeros((0, *self.input_shape[1:3], 1), np.float32)
        if self._head is None:
            return mask
        return mask, (np.stack(classes) if classes else np.zeros((0, self._classes), np.float32))

    def __call__(self, pixels: Any, training: bool = False) -> Any:
        if tf.executing_eagerly():
            out = self.run(np.asarray(pixels))
            if self._head is None:
                return tf.constant(out)
            return {MASK_OUTPUT: tf.constant(out[0]), IMAGE_CLASS_OUTPUT: tf.constant(out[1])}
        dtypes = [tf.float32] if self._head is None else [tf.float32, tf.float32]
        result = tf.numpy_function(self.run, [tf.cast(pixels, tf.float32)], dtypes, stateful=True)
        result = result if isinstance(result, (list, tuple)) else [result]
        result[0].set_shape([pixels.shape[0], *self.input_shape[1:3], 1])
        if self._head is None:
            return result[0]
        result[1].set_shape([pixels.shape[0], self._classes])
        return {MASK_OUTPUT: result[0], IMAGE_CLASS_OUTPUT: result[1]}

    def __repr__(self) -> str:
        return (f"TFLiteStage({str(self.path or '<bytes>')!r}, stage={self.stage!r}, precision={self.precision!r}, "
                f"input_shape={self.input_shape})")


def _tflite_interpreter(content: bytes, threads: int) -> Any:
    """LiteRT's interpreter (package ai-edge-litert) or, without it, TensorFlow's deprecated `tf.lite.Interpreter`."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is in requirements.txt
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_content=content, num_threads=threads)


# ----------------------------------------------------------------------------------------------- loading
def as_stage(model: Any) -> Stage:
    """`model` as a Stage: a Stage itself, a keras.Model wrapped in `KerasStage` (TypeError otherwise)."""
    if isinstance(model, Stage):
        return model
    import keras

    if isinstance(model, keras.Model):
        return KerasStage(model)
    raise TypeError(f"not a stage model: {type(model).__name__}; expected a keras.Model or a Stage "
                    f"({', '.join(FORMATS)})")


def keras_model(model: Any) -> Any:
    """The keras.Model of a Keras stage (`KerasStage` or a keras.Model), for what needs the Keras graph itself
    (export, BatchNorm folding, TFLite conversion); ValueError for the other formats."""
    stage = as_stage(model)
    if not isinstance(stage, KerasStage):
        where = f" ({stage.path})" if stage.path else ""
        raise ValueError(f"{stage.name}{where} is a {stage.format} stage; this needs the Keras model (.keras file)")
    return stage.model


def saved_model_version(path: Path | str) -> Path:
    """The version folder of a SavedModel path: `path` itself if it holds saved_model.pb, else its highest
    integer-named sub-folder (TF Serving's choice; other names such as `.tmp-*` are ignored).

    Raises:
        ValueError: no saved_model.pb and no integer version folder, or the chosen version has no saved_model.pb.
    """
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        return p
    versions = integer_versions(p)
    if not versions:
        what = "is empty" if not any(p.iterdir()) else "has no saved_model.pb and no integer version folders"
        raise ValueError(f"{p} {what}: it is not a SavedModel; {_EXPECTED}. To get models: {_HOW_TO_GET}")
    latest = versions[max(versions)]
    if not (latest / "saved_model.pb").is_file():
        raise ValueError(f"{latest} (latest version of {p}) has no saved_model.pb; {_EXPECTED}")
    return latest


def load_stage(path: str | Path, stage: str | None = None) -> Stage:
    """A stage model from disk: a `.keras` file (`KerasStage`, uncompiled), a stage SavedModel version or base
    folder (`SavedModelStage`, see `saved_model_version`) or a `.tflite` file (`TFLiteStage`).

    `stage` ("lung" or "infection"), when given, must be the model's stage.

    Raises:
        FileNotFoundError: `path` does not exist (the message says how to obtain a model).
        ValueError: `path` is not a loadable stage model (the message says why), or is the other stage.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {p} not found; {_HOW_TO_GET}")
    if p.is_dir():
        model: Stage = SavedModelStage(saved_model_version(p))
    else:
        model = TFLiteStage(p) if p.suffix == ".tflite" else _load_keras(p)
    if stage is not None and model.stage != stage:
        raise ValueError(f"{p} is not a {stage} stage model (it is {model.stage or 'unknown'}, input shape "
                         f"{tuple(model.input_shape)}); check --lung-model / --infection-model")
    return model


def _load_keras(p: Path) -> KerasStage:
    """A `.keras` file as an uncompiled Keras model (ValueError naming `p` if it is not one)."""
    if p.suffix != ".keras":
        raise ValueError(f"{p}: not a model; {_EXPECTED}")
    import zipfile

    import keras

    import covidseg_tf.activations  # noqa: F401  (registers xla_swish, the training models' swish)
    import covidseg_tf.batchnorm  # noqa: F401  (registers FusedBatchNormalization)
    import covidseg_tf.fast_layers  # noqa: F401  (registers NearestUpSampling2D, WindowAveragePooling2D, MatMulConv2D)

    # Keras says "File not found" for a file that exists but is no zip, and a KeyError for a zip without a model
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p}: not a Keras model: not a zip archive ({p.stat().st_size} bytes), which every "
                         f".keras file is; {_EXPECTED}")
    with zipfile.ZipFile(p) as z:
        if "config.json" not in z.namelist():
            raise ValueError(f"{p}: not a Keras model: a zip archive with no config.json; {_EXPECTED}")
    try:
        return KerasStage(keras.models.load_model(p, compile=False), path=p)
    except Exception as e:
        raise ValueError(f"{p}: cannot load Keras model: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------- agreement
def model_input_size(model: Any, image_size: int | None = None) -> tuple[int, int]:
    """(S, C) of a stage model (a Stage or a keras.Model) with a square (B, S, S, C) input.

    A model built with a free size (None, None) takes `image_size` (a multiple of SIZE_DIVISOR); a fixed-size model
    takes its own size, and `image_size`, when given, must agree with it.
    """
    stage = as_stage(model)
    shape = tuple(stage.input_shape)
    if len(shape) != 4 or shape[3] is None or shape[1] != shape[2]:
        raise ValueError(f"model {stage.name!r} has input shape {shape}; expected a square (None, S, S, C) input "
                         "(or (None, None, None, C) with an image size S)")
    if shape[1] is None:
        if image_size is None:
            raise ValueError(f"model {stage.name!r} has a free input size {shape}; give the image size (a multiple "
                             f"of {SIZE_DIVISOR})")
        if image_size <= 0 or image_size % SIZE_DIVISOR:
            raise ValueError(f"image size must be a positive multiple of {SIZE_DIVISOR}, got {image_size}")
        return int(image_size), int(shape[3])
    if image_size is not None and image_size != shape[1]:
        raise ValueError(f"model {stage.name!r} takes {shape[1]} px, not an image size of {image_size}")
    return int(shape[1]), int(shape[3])


def stage_agreement(lung_model: Any, infection_model: Any, image_size: int | None = None) -> int:
    """The cascade's input size S, after checking that the lung model takes 3 channels, the infection model 4,
    and both the same size (ValueError naming what differs)."""
    size, c1 = model_input_size(lung_model, image_size)
    size2, c2 = model_input_size(infection_model, image_size or size)
    if (c1, c2) != (3, 4):
        raise ValueError(f"the cascade needs a 3-channel lung model and a 4-channel infection model, got {c1} and {c2}")
    if size != size2:
        raise ValueError(f"the lung model takes {size} px but the infection model {size2} px; the cascade needs "
                         "one size")
    return size


def has_image_head(model: Any) -> bool:
    """True if a stage model (a Stage or a keras.Model) returns image class probabilities."""
    return as_stage(model).has_image_head


def head_agreement(infection_model: Any, decision: Decision) -> bool:
    """Whether the infection model has an image head, after checking that a decision which consults the head
    (`Decision.uses_image_head`) gets one (ValueError otherwise)."""
    head = has_image_head(infection_model)
    if decision.uses_image_head and not head:
        raise ValueError(f"the decision consults the image-level head (min_infection_probability "
                         f"{decision.min_infection_probability:g}) but the infection model has none; use "
                         "--min-infection-probability 0 or a model trained with --image-head-weight")
    return head

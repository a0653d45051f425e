"""Helpers shared by the tests (`from helpers import ...`; pytest puts tests/ on the import path): the repository
root, X-ray input files of every kind, phantom images, tiny stage models with readable behaviour, and runners that
load a SavedModel as TF Serving does or fuzz a decoder in a capped process. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- X-ray input files
H, W = 40, 52  # deliberately not square and not the model size
GOOD = ["png8_gray", "png16_gray", "png_rgb", "png_rgba", "jpeg", "jpeg_rgb", "dicom_mono2", "dicom_mono1",
        "dicom_window"]
BAD = ["bad_truncated", "bad_nopixels", "bad_text"]


def gradient(dtype=np.uint8, maxval=255) -> np.ndarray:
    """HxW ramp: left dark -> right bright, with a brighter square to check orientation."""
    g = np.tile(np.linspace(0, maxval, W), (H, 1))
    g[5:15, 5:15] = maxval
    return g.astype(dtype)


def write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", window: tuple | None = None,
                pixel_data: bool = True, slope: float = 1.0, intercept: float = 0.0) -> Path:
    """A 12-bit (stored in 16) single-frame DICOM of `arr`."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def phantom(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A chest-X-ray-like grey image: bright body, two dark lung fields, a brighter patch in the image-left one.

    With `conv_cascade` its lungs and infection are found far from the thresholds, and its lung map passes the
    input gate's lung checks (two lungs, centred, sure)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    img = np.full((h, w), 180.0)
    for cx in (0.3, 0.7):
        img[((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.35) ** 2 < 1] = 40.0
    img[((x - 0.3) / 0.08) ** 2 + ((y - 0.6) / 0.1) ** 2 < 1] = 90.0
    return np.clip(img + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- models
def conv_stage(size: int, channels: int, kernel: list[float], bias: float, name: str):
    """A stage model computing sigmoid(kernel . pixel + bias) per pixel (one 1x1 convolution with fixed weights):
    loads, traces and exports in seconds, with readable behaviour (`conv_cascade`)."""
    import keras

    inp = keras.Input((size, size, channels), name=f"{name}_pixels")
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_conv")
    model = keras.Model(inp, conv(inp), name=name)
    conv.set_weights([np.array(kernel, np.float32).reshape(1, 1, channels, 1), np.array([bias], np.float32)])
    return model


def normalized_conv_stage(size: int, channels: int, name: str):
    """(model, head, mean, variance): a stage model with the encoder's input preprocessing (Rescaling 1/255, then
    Normalization with `models.input_normalization_stats`, which int8 export keeps in float32) and a sigmoid 1x1
    convolution `head` whose weights the caller sets (mean and variance are the Normalization's statistics)."""
    import keras

    from covidseg_tf.models import input_normalization_stats

    inp = keras.Input((size, size, channels))
    x = keras.layers.Rescaling(1 / 255.0, name="rescaling")(inp)
    mean, variance = input_normalization_stats(channels)
    x = keras.layers.Normalization(mean=mean, variance=variance, name="normalization")(x)
    head = keras.layers.Conv2D(1, 1, activation="sigmoid", name="head")
    return keras.Model(inp, head(x), name=name), head, mean, variance


def conv_cascade(size: int = 64):
    """(lung, infection) `conv_stage`s: grey < 100 is lung; inside the lung, grey > 60 is infection."""
    return (conv_stage(size, 3, [-0.1 / 3] * 3, 10.0, "lung_conv"),
            conv_stage(size, 4, [0.1 / 3] * 3 + [20.0], -26.0, "infection_conv"))


def conv_head_stage(size: int = 64, name: str = "infection_head_conv"):
    """`conv_cascade`'s infection stage with an image-level head (the dict output of a Stage-2 model trained with
    --image-head-weight): the COVID-19 logit is 0.05 x (mean grey - 100), the other two classes' logits 0, so an
    image brighter than 100 on average is "COVID-19" (P = 0.94 at a mean of 170), a darker one not (0.16 at 80)."""
    import keras

    from covidseg_tf.config import IMAGE_CLASS_OUTPUT, MASK_OUTPUT

    inp = keras.Input((size, size, 4), name=f"{name}_pixels")
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_conv")
    dense = keras.layers.Dense(3, name=f"{name}_dense")
    pooled = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(inp)
    head = keras.layers.Activation("softmax", name=IMAGE_CLASS_OUTPUT)(dense(pooled))
    model = keras.Model(inp, {MASK_OUTPUT: conv(inp), IMAGE_CLASS_OUTPUT: head}, name=name)
    conv.set_weights([np.array([0.1 / 3] * 3 + [20.0], np.float32).reshape(1, 1, 4, 1), np.array([-26.0], np.float32)])
    kernel = np.zeros((4, 3), np.float32)
    kernel[0, 0] = 0.05
    dense.set_weights([kernel, np.array([-5.0, 0.0, 0.0], np.float32)])
    return model


# ----------------------------------------------------------------------------------------------- SavedModels
# Runs a list of cases against a SavedModel exactly as TF Serving does: TF1 loader, tag "serve", feeds and
# fetches by the signature's tensor names. Errors are returned (type + message), never raised.
TF1_RUNNER = """
import os, pickle, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
path, cases_file, out_file = sys.argv[1:4]
with open(cases_file, "rb") as f:
    cases = pickle.load(f)
results = []
with tf.compat.v1.Session(graph=tf.Graph()) as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
    for case in cases:
        sig = meta.signature_def[case["signature"]]
        feed = {sig.inputs[k].name: v for k, v in case["feeds"].items()}
        fetch = {k: t.name for k, t in sig.outputs.items()}
        try:
            results.append({"outputs": sess.run(fetch, feed)})
        except tf.errors.OpError as e:
            results.append({"error": type(e).__name__, "message": e.message})
with open(out_file, "wb") as f:
    pickle.dump(results, f)
"""


def run_tf1(path: Path, cases: list[dict], workdir: Path) -> list[dict]:
    """Run `cases` ({"signature", "feeds"}) against the SavedModel at `path` in a fresh Python process through
    the TF1 loader (as TF Serving loads it); one {"outputs": {...}} or {"error", "message"} per case."""
    import pickle
    import subprocess
    import sys

    runner = workdir / "tf1_runner.py"
    runner.write_text(TF1_RUNNER)
    cases_file, out_file = workdir / "cases.pkl", workdir / "results.pkl"
    cases_file.write_bytes(pickle.dumps(cases))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(runner), str(path), str(cases_file), str(out_file)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pickle.loads(out_file.read_bytes())


def randomize_batchnorms(model, seed: int = 0) -> None:
    """Give every BatchNormalization of `model` statistics and affine weights far from identity (as after training)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.1, n).astype("float32"))


def training_gradients_and_peak(model, x) -> tuple[list[np.ndarray], int]:
    """The weights' gradients (float32 arrays) of one training step of `model` on `x` (loss: the sum of squared
    outputs), and TensorFlow's CPU allocator's peak bytes during that step; a first step, outside the measurement,
    traces it and compiles its XLA functions."""
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(x, training=True), tf.float32) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    step(x)
    tf.config.experimental.reset_memory_stats("CPU:0")
    grads = step(x)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return [g.numpy().astype(np.float32) for g in grads], peak


# ----------------------------------------------------------------------------------------------- fuzzing
FUZZ_RUNNER = textwrap.dedent(
    """
    import os, pickle, resource, sys, time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    which, path, cases_file, out_file = sys.argv[1:5]
    with open(cases_file, "rb") as f:
        cases = pickle.load(f)
    results = []
    if which == "imageio":
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a bomb fails with MemoryError, not the host
        from covidseg_tf.imageio import XRayReadError, decode_xray
        for name, data in cases:
            t = time.time()
            try:
                a = decode_xray(data, name)
                results.append(("ok", (a.shape, str(a.dtype)), time.time() - t))
            except XRayReadError as e:
                results.append(("XRayReadError", str(e), time.time() - t))
            except BaseException as e:
                results.append(("other", f"{type(e).__name__}: {e}", time.time() - t))
    else:
        import numpy as np, tensorflow as tf
        fn = tf.saved_model.load(path).signatures["serving_default"]
        for name, data in cases:
            t = time.time()
            try:
                out = {k: v.numpy() for k, v in fn(images=tf.constant([data])).items()}
                results.append(("ok", {k: (v.tolist() if v.dtype != object else None) for k, v in out.items()
                                       if not k.endswith("_bytes")}, time.time() - t))
            except tf.errors.InvalidArgumentError as e:
                results.append(("InvalidArgumentError", e.message, time.time() - t))
            except BaseException as e:
                results.append(("other", f"{type(e).__name__}: {e}", time.time() - t))
    try:  # this process's own peak (ru_maxrss may start at the parent's peak after fork + exec)
        status = open("/proc/self/status").read()
        peak_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out_file, "wb") as f:
        pickle.dump({"results": results, "peak_mb": peak_mb}, f)
    """
)


def run_fuzz(which: str, cases: list[tuple[str, bytes]], workdir: Path, model: Path | None = None) -> dict[str, Any]:
    """Run (name, bytes) `cases` through `imageio.decode_xray` (`which` "imageio") or the cascade SavedModel at
    `model` ("serving") in a fresh process under a 3 GiB address-space cap: {"results": [(outcome, detail,
    seconds)], "peak_mb": the process's peak RSS, "stderr": what it printed}."""
    runner = workdir / "fuzz_runner.py"
    runner.write_text(FUZZ_RUNNER)
    cases_file, out_file = workdir / f"{which}.pkl", workdir / f"{which}_out.pkl"
    cases_file.write_bytes(pickle.dumps(cases))
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's covidseg_tf, whatever pip installed
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(runner), which, str(model), str(cases_file), str(out_file)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path))
    assert proc.returncode == 0, f"the {which} fuzz process died ({proc.returncode}): {proc.stderr[-3000:]}"
    return {**pickle.loads(out_file.read_bytes()), "stderr": proc.stderr}


def check_decode_outcomes(outcomes: dict[str, tuple[str, Any, float]]) -> None:
    """`run_fuzz("imageio", ...)` outcomes by input name: each a 2-D uint8 image within the size policy, or an
    XRayReadError whose one-line message starts with the input's name (no Pillow `BytesIO` repr); each under 10 s."""
    from covidseg_tf import limits

    for name, (kind, detail, seconds) in outcomes.items():
        assert kind in ("ok", "XRayReadError"), (name, detail)
        assert seconds < 10, (name, seconds)
        if kind == "ok":
            (h, w), dtype = detail
            assert dtype == "uint8" and 1 <= h <= limits.MAX_SIDE and 1 <= w <= limits.MAX_SIDE, (name, detail)
        else:
            assert detail.startswith(name) and "\n" not in detail and "BytesIO" not in detail, (name, detail)


def skip_if_sigint_ignored() -> None:
    """Skip a test that sends SIGINT to a child process when this process ignores SIGINT: its children inherit that,
    and Python then installs no Ctrl-C handler (a test run started in the background by a non-interactive shell,
    `pytest ... &`, ignores SIGINT)."""
    import signal

    import pytest

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this process (started in the background?); its children would ignore it too")


def stage2_pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 4) float32 Stage-2 input: uniform RGB pixels 0..255 and a 0/1 mask channel."""
    x = np.random.default_rng(seed).uniform(0, 255, (n, size, size, 4)).astype("float32")
    x[..., 3] = x[..., 3] > 100
    return x

"""The second export target: each stage as float32 TFLite (`export --tflite`, `optimize.tflite_model`), loaded by
`inference.load_stage` as a `TFLiteStage` wherever a stage model is taken."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import conv_cascade, phantom, randomize_batchnorms

from covidseg_tf import export
from covidseg_tf.config import default_config
from covidseg_tf.inference import Predictor, load_stage
from covidseg_tf.inference.stages import TFLITE_FILE, TFLiteStage
from covidseg_tf.models import build_stage_model
from covidseg_tf.optimize import tflite_model

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`conv_cascade` saved as .keras and exported by the CLI with --tflite and a recorded decision."""
    tmp = tmp_path_factory.mktemp("tflite")
    paths = {}
    for model in conv_cascade(SIZE):
        paths[model.name] = tmp / f"{model.name}.keras"
        model.save(paths[model.name])
    out = tmp / "saved_models"
    code = export.main(["--lung-model", str(paths["lung_conv"]), "--infection-model", str(paths["infection_conv"]),
                        "--out", str(out), "--only", "lung", "infection", "--tflite", "--no-warmup",
                        "--min-infection-percent", "5"])
    assert code == 0
    return {"out": out, "lung": out / "lung" / "1", "infection": out / "infection" / "1"}


@pytest.fixture(scope="module")
def greys() -> list[np.ndarray]:
    """Two chest-X-ray-like phantoms (`helpers.phantom`: they pass the input gate) of other sizes than the
    models', with a lung infection patch."""
    return [phantom(90, 70, 0), phantom(64, 128, 1)]


def test_export_writes_stage_tflite_and_records_it(exported):
    for stage in ("lung", "infection"):
        version = exported[stage]
        assert (version / "saved_model.pb").is_file() and (version / TFLITE_FILE).is_file()
        info = json.loads((version / "assets.extra" / "covidseg_export.json").read_text())
        assert info["tflite"] == {"file": TFLITE_FILE, "precision": "fp32",
                                  "bytes": (version / TFLITE_FILE).stat().st_size}
    assert not (exported["out"] / "cascade").exists()


def test_tflite_stages_predict_what_the_saved_models_predict(exported, greys):
    tflite = Predictor.load(exported["lung"] / TFLITE_FILE, exported["infection"] / TFLITE_FILE)
    saved = Predictor.load(exported["lung"], exported["infection"])
    assert isinstance(tflite.lung_model, TFLiteStage) and tflite.lung_model.stage == "lung"
    assert tflite.decision == saved.decision and tflite.decision.min_infection_percent == 5  # the recorded one
    a, b = tflite.predict(greys), saved.predict(greys)
    assert [p.lung.shape for p in a] == [g.shape for g in greys]
    for p, q in zip(a, b):  # the same masks but for pixels whose probability sits at the threshold (round-off)
        assert p.lung.any() and p.infection.any()  # not trivially equal
        assert (p.lung != q.lung).mean() < 1e-3 and (p.infection != q.infection).mean() < 1e-3
        assert p.severity_total == pytest.approx(q.severity_total, abs=0.2)


def test_tflite_stage_runs_eagerly_and_in_a_graph(exported):
    stage = load_stage(exported["infection"] / TFLITE_FILE, stage="infection")
    reference = load_stage(exported["infection"], stage="infection")
    x = np.random.default_rng(1).uniform(0, 255, (3, SIZE, SIZE, 4)).astype(np.float32)
    x[..., 3] = x[..., 3] > 100
    want = reference(x).numpy()
    graph = tf.function(lambda v: stage(v), input_signature=[tf.TensorSpec([None, SIZE, SIZE, 4], tf.float32)])
    for got in (stage(x).numpy(), graph(tf.constant(x)).numpy()):
        assert got.shape == (3, SIZE, SIZE, 1) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"pixels of shape \(3, 64, 64, 3\)"):
        stage.run(x[..., :3])


def test_tflite_stage_takes_tensorflows_thread_setting(exported, monkeypatch):
    """batch_predict --tf-threads sets TensorFlow's intra-op pool; the TFLite stages use the same number."""
    path = exported["lung"] / TFLITE_FILE
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")
    monkeypatch.setattr(tf.config.threading, "get_intra_op_parallelism_threads", lambda: 0)
    assert TFLiteStage(path).threads == 3
    monkeypatch.setattr(tf.config.threading, "get_intra_op_parallelism_threads", lambda: 1)
    assert TFLiteStage(path).threads == 1
    assert TFLiteStage(path, threads=2).threads == 2


def test_bad_tflite_files_are_named(exported, tmp_path):
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(ValueError, match=r"garbage\.tflite: cannot load this TFLite model"):
        load_stage(garbage)
    with pytest.raises(ValueError, match=r"stage\.tflite is not a infection stage model \(it is lung"):
        load_stage(exported["lung"] / TFLITE_FILE, stage="infection")
    with pytest.raises(FileNotFoundError, match="missing.tflite"):
        load_stage(tmp_path / "missing.tflite")


def test_tflite_model_rejects_unknown_modes_and_uncalibrated_int8():
    lung, _ = conv_cascade(SIZE)
    with pytest.raises(ValueError, match="TFLite mode must be one of"):
        tflite_model(lung, "fp16")
    with pytest.raises(ValueError, match="needs representative pixels"):
        tflite_model(lung, "int8")


def test_tflite_unet_matches_the_keras_model():
    """A real U-Net (EfficientNet-B0, BatchNorms far from identity): TFLite float32 = Keras to round-off."""
    keras.utils.set_random_seed(3)
    model = build_stage_model(default_config("infection").replace(image_size=SIZE), encoder_weights=None)
    randomize_batchnorms(model, seed=0)
    x = np.random.default_rng(2).uniform(0, 255, (2, SIZE, SIZE, 4)).astype(np.float32)
    x[..., 3] = x[..., 3] > 100
    stage = TFLiteStage(tflite_model(model), threads=1)
    assert stage.stage == "infection" and stage.input_shape == (None, SIZE, SIZE, 4)
    np.testing.assert_allclose(stage(x).numpy(), model(x, training=False).numpy(), atol=1e-5)

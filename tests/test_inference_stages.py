"""covidseg_tf.inference.stages: every stage format behind one interface, the typed export manifest, the stage
servables applying the Decision they record, and the import structure (no circle with covidseg_tf.models)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import conv_cascade, phantom

from covidseg_tf.config import DEFAULT_INFECTION_MODEL, DEFAULT_LUNG_MODEL, SAVED_MODELS, SHIPPED_VERSION
from covidseg_tf.inference import Decision, ExportManifest, Predictor, Stage, load_stage
from covidseg_tf.inference.stages import (
    EXPORT_INFO,
    TFLITE_FILE,
    KerasStage,
    SavedModelStage,
    TFLiteExport,
    TFLiteStage,
    as_stage,
    keras_model,
)

S = 64
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """`conv_cascade` as .keras files and as stage version folders with stage.tflite (decision: the default)."""
    from covidseg_tf.export import export_stage

    tmp = tmp_path_factory.mktemp("stages")
    out: dict[str, Path] = {}
    for stage, model in zip(("lung", "infection"), conv_cascade(S)):
        model.save(tmp / f"{stage}.keras")
        out[f"{stage}.keras"] = tmp / f"{stage}.keras"
        out[stage] = export_stage(model, stage, tmp / "saved_models", Decision(), warmup=False, tflite=True)
    return out


def pixels(channels: int) -> np.ndarray:
    x = np.stack([np.repeat(phantom(S, S, seed)[..., None], 3, -1) for seed in (0, 1)]).astype(np.float32)
    if channels == 4:
        x = np.concatenate([x, (x[..., :1] < 100).astype(np.float32)], -1)  # conv_cascade's lung rule
    return x


@pytest.mark.parametrize("stage,channels", [("lung", 3), ("infection", 4)])
def test_every_format_loads_and_reports_itself(exported, stage, channels):
    from covidseg_tf.optimize import frozen_stage

    keras_stage = load_stage(exported[f"{stage}.keras"], stage=stage)
    saved = load_stage(exported[stage].parent, stage=stage)  # the base folder: its highest version
    tflite = load_stage(exported[stage] / TFLITE_FILE, stage=stage)
    frozen = frozen_stage(keras_stage)
    want = {"keras": KerasStage, "savedmodel": SavedModelStage, "tflite": TFLiteStage, "frozen": type(frozen)}
    x = pixels(channels)
    reference = keras_stage.probabilities(x)[0].numpy()
    assert 0 < (reference >= 0.5).mean() < 1  # a map with both sides of the threshold
    for st in (keras_stage, saved, tflite, frozen):
        assert isinstance(st, Stage) and isinstance(st, want[st.format])
        assert (st.image_size, st.channels, st.stage, st.has_image_head) == (S, channels, stage, False)
        prob, image_class = st.probabilities(x)
        assert image_class is None and prob.dtype == tf.float32 and prob.shape == (2, S, S, 1)
        np.testing.assert_allclose(prob.numpy(), reference, atol=1e-5, err_msg=st.format)
    assert keras_stage.manifest is None and frozen.manifest is None
    for st in (saved, tflite):  # the version folder's manifest, for the TFLite file beside it too
        assert st.manifest == ExportManifest.read(exported[stage])
        assert (st.manifest.servable, st.manifest.image_size, st.manifest.channels) == (stage, S, channels)
    assert saved.path == exported[stage] and tflite.path == exported[stage] / TFLITE_FILE
    assert keras_stage.path == exported[f"{stage}.keras"] and frozen.path is None
    assert keras_model(keras_stage) is keras_stage.model
    with pytest.raises(ValueError, match="savedmodel stage"):
        keras_model(saved)


def test_as_stage_wraps_keras_models_and_refuses_the_rest():
    lung, _ = conv_cascade(S)
    wrapped = as_stage(lung)
    assert isinstance(wrapped, KerasStage) and as_stage(wrapped) is wrapped
    assert wrapped.layers == lung.layers  # a Keras stage still answers as its model
    with pytest.raises(TypeError, match="not a stage model"):
        as_stage(lambda x: x)


def test_export_manifest_round_trips_and_keeps_unknown_keys(tmp_path):
    manifest = ExportManifest(servable="infection", image_size=128, channels=4, threshold=0.3,
                              decision=Decision(infection_threshold=0.3, min_infection_percent=3.0, hflip=True),
                              precision="bf16", model="infection_unet", signatures=["predict_pixels"],
                              tflite={"file": TFLITE_FILE, "precision": "fp32", "bytes": 10},
                              extra={"from_the_future": {"a": 1}})
    assert ExportManifest.from_dict(manifest.to_dict()) == manifest
    path = manifest.write(tmp_path)
    assert path == tmp_path / EXPORT_INFO
    raw = json.loads(path.read_text())
    assert raw["decision"]["min_infection_percent"] == 3.0 and raw["from_the_future"] == {"a": 1}
    assert "extra" not in raw and ExportManifest.read(tmp_path) == manifest
    lung = ExportManifest(servable="lung", threshold=0.5)
    assert lung.to_dict() == {"servable": "lung", "threshold": 0.5}  # a lung stage records no Decision
    (tmp_path / EXPORT_INFO).write_text(json.dumps({"decision": {}}))
    with pytest.raises(ValueError, match=str(tmp_path / EXPORT_INFO)):
        ExportManifest.read(tmp_path)
    (tmp_path / EXPORT_INFO).write_text(json.dumps({"servable": "lung", "decision": {"threshold": 2}}))
    with pytest.raises(ValueError, match="threshold must be in"):
        ExportManifest.read(tmp_path)


def test_export_manifest_tflite_entry_is_typed_and_old_entries_still_read(tmp_path):
    """The `tflite` entry is a `TFLiteExport`: an fp32 entry as written before it had a type reads and writes back
    unchanged; an int8 entry records its calibration count and float32 layers; a bad entry names the file."""
    old = {"servable": "lung", "threshold": 0.5, "tflite": {"file": TFLITE_FILE, "precision": "fp32", "bytes": 10}}
    manifest = ExportManifest.from_dict(old)
    assert manifest.tflite == TFLiteExport(precision="fp32", bytes=10) and manifest.tflite.calibration_images is None
    assert manifest.to_dict() == old
    int8 = manifest.replace(tflite=TFLiteExport(precision="int8", bytes=7, calibration_images=64,
                                                float_layers=["rescaling", "normalization"], extra={"new": 1}))
    int8.write(tmp_path)
    raw = json.loads((tmp_path / EXPORT_INFO).read_text())["tflite"]
    assert raw == {"file": TFLITE_FILE, "precision": "int8", "bytes": 7, "calibration_images": 64,
                   "float_layers": ["rescaling", "normalization"], "new": 1}
    assert ExportManifest.read(tmp_path) == int8
    (tmp_path / EXPORT_INFO).write_text(json.dumps({**old, "tflite": "stage.tflite"}))
    with pytest.raises(ValueError, match=r"covidseg_export\.json.*`tflite` entry .* is str, not an object"):
        ExportManifest.read(tmp_path)


@pytest.mark.parametrize("servable", ["lung", "infection", "cascade"])
def test_the_shipped_manifests_read_and_write_back_unchanged(servable, tmp_path):
    """The version folders exported before the manifest had a type still read, field for field."""
    folder = SAVED_MODELS / servable / str(SHIPPED_VERSION)
    raw = json.loads((folder / EXPORT_INFO).read_text())
    manifest = ExportManifest.read(folder)
    assert manifest.servable == servable and manifest.image_size == raw["image_size"] and not manifest.extra
    # a lung stage records its threshold only; the infection stage and the cascade the whole decision
    assert manifest.decision == (Decision.from_dict(raw["decision"]) if "decision" in raw else None)
    assert (manifest.decision is None) == (servable == "lung")
    assert manifest.to_dict() == raw
    manifest.write(tmp_path)
    assert json.loads((tmp_path / EXPORT_INFO).read_text()) == raw


def test_the_shipped_stages_load_with_their_recorded_decision():
    predictor = Predictor.load(DEFAULT_LUNG_MODEL, DEFAULT_INFECTION_MODEL)
    assert predictor.lung_model.format == predictor.infection_model.format == "savedmodel"
    assert predictor.decision == ExportManifest.read(DEFAULT_INFECTION_MODEL).decision
    assert predictor.has_image_head and predictor.image_size == ExportManifest.read(DEFAULT_LUNG_MODEL).image_size


def test_model_file_info_names_each_format(exported):
    from covidseg_tf.files import sha256_file
    from covidseg_tf.optimize import frozen_stage
    from covidseg_tf.predict import model_file_info, model_info

    tflite_paths = [exported[s] / TFLITE_FILE for s in ("lung", "infection")]
    info = model_info(Predictor.load(*tflite_paths))
    assert info["lung"]["format"] == info["infection"]["format"] == "tflite"
    assert info["infection"]["sha256"] == sha256_file(tflite_paths[1])
    assert info["infection"]["bytes"] == tflite_paths[1].stat().st_size
    assert info["infection"]["precision"] == "fp32" and info["infection"]["image_size"] == S  # from the manifest
    saved = model_info(Predictor.load(exported["lung"], exported["infection"]))["lung"]
    assert saved["format"] == "savedmodel" and saved["path"] == str(exported["lung"])
    assert saved["sha256"] == sha256_file(exported["lung"] / "saved_model.pb")
    keras_file = exported["lung.keras"]
    assert model_file_info(load_stage(keras_file), keras_file)["format"] == "keras"
    frozen = model_file_info(frozen_stage(load_stage(keras_file)), None)
    assert frozen == {"path": None, "format": "frozen"}


# ------------------------------------------------------------------------------------------ the stage servables
@pytest.mark.parametrize("rule", [Decision(), Decision(min_infection_percent=10.0),
                                  Decision(infection_threshold=0.3, min_infection_percent=10.0, hflip=True)])
def test_infection_servable_applies_its_recorded_decision_as_the_predictor(rule, tmp_path):
    """The phantom's finding covers about 7 % of its lungs: a 10 % rule empties it, in the Predictor and in the
    infection stage servable given the Predictor's lung mask (an image of the model's size, so that the lung mask
    the servable resizes for Stage 2 is the Predictor's own Stage-2 input), by PNG and by model pixels."""
    from covidseg_tf.export import export_stage

    lung, infection = conv_cascade(S)
    version = export_stage(infection, "infection", tmp_path, rule, warmup=False)
    assert ExportManifest.read(version).decision == rule
    served = tf.saved_model.load(str(version)).signatures
    predictor = Predictor(lung, infection, rule)
    gray = phantom(S, S)
    [pred] = predictor.predict([gray])
    assert pred.assessed and pred.lung.any()
    assert pred.infection.any() == (rule.min_infection_percent == 0)  # the rule acts (the test can fail)
    png = tf.io.encode_png(gray[..., None]).numpy()
    out = served["serving_default"](images=tf.constant([png]),
                                    lung_masks=tf.constant([tf.io.encode_png(pred.lung[..., None] * 255).numpy()]))
    got = tf.io.decode_png(out["infection_mask_bytes"][0]).numpy()[..., 0] > 127
    np.testing.assert_array_equal(got, pred.infection.astype(bool))
    x = predictor.model_pixels(gray)[None]
    want = predictor.predict_pixels(x)
    small = served["predict_pixels"](pixels=tf.concat([x, want["lung_mask"]], -1))
    np.testing.assert_array_equal(small["infection_mask"].numpy(), want["infection_mask"].numpy())
    np.testing.assert_allclose(small["infection_prob"].numpy(), want["infection_prob"].numpy(), atol=1e-6)


def test_lung_servable_records_and_applies_only_its_threshold(tmp_path):
    from covidseg_tf.export import export_stage

    lung, _ = conv_cascade(S)
    version = export_stage(lung, "lung", tmp_path, Decision(threshold=0.7, min_infection_percent=5.0), warmup=False)
    manifest = ExportManifest.read(version)
    assert manifest.threshold == 0.7 and manifest.decision is None
    x = pixels(3)
    out = tf.saved_model.load(str(version)).signatures["predict_pixels"](pixels=tf.constant(x))
    np.testing.assert_array_equal(out["lung_mask"].numpy(), (out["lung_prob"].numpy() >= 0.7).astype(np.float32))


# ------------------------------------------------------------------------------------------ import structure
def imported(module: str) -> set[str]:
    """The covidseg_tf modules (and whether TensorFlow) a fresh interpreter holds after importing `module`."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return {m for m in run.stdout.split() if m.startswith(("covidseg_tf", "tensorflow"))}


def test_models_and_inference_do_not_import_each_other():
    after_models = imported("covidseg_tf.models")
    assert "covidseg_tf.models" in after_models
    assert not {m for m in after_models if m.startswith("covidseg_tf.inference")}, after_models
    after_inference = imported("covidseg_tf.inference")
    assert "covidseg_tf.inference.predictor" in after_inference
    assert not after_inference & {"covidseg_tf.models", "covidseg_tf.train", "covidseg_tf.losses",
                                  "covidseg_tf.data", "covidseg_tf.optimize"}, after_inference


def test_the_cli_flags_load_no_tensorflow():
    after = imported("covidseg_tf.cli")
    assert "covidseg_tf.cli" in after and "tensorflow" not in after, after

"""covidseg_tf.inference (severity, the decision, the stages, the Predictor) on hand-made masks and tiny stand-in
models with fixed outputs."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidseg_tf.inference import Decision, Predictor
from covidseg_tf.inference.postprocess import apply_decision, severity, severity_grade, split_columns
from covidseg_tf.inference.predictor import run_stages
from covidseg_tf.inference.stages import KerasStage

S = 64


def two_lungs(left=(8, 56, 4, 26), right=(8, 56, 36, 60)) -> np.ndarray:
    """(1, S, S, 1) mask with an image-left and an image-right rectangle (rows r0:r1, cols c0:c1)."""
    m = np.zeros((1, S, S, 1), np.float32)
    for r0, r1, c0, c1 in (left, right):
        m[0, r0:r1, c0:c1] = 1
    return m


def sev(lung, inf) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in severity(tf.constant(lung), tf.constant(inf)).items()}


def test_severity_exact_percentages_patient_sides():
    lung = two_lungs()
    inf = np.zeros_like(lung)
    inf[0, 8:32, 4:26] = 1  # upper half of the IMAGE-left lung = patient's RIGHT lung
    s = sev(lung, inf)
    left_px, right_px = 48 * 22, 48 * 24
    assert s["severity_right"][0] == pytest.approx(50.0)
    assert s["severity_left"][0] == 0.0
    assert s["severity_total"][0] == pytest.approx(100 * 24 * 22 / (left_px + right_px), rel=1e-6)
    split = split_columns(tf.constant(lung)).numpy()[0]
    assert 26 <= split <= 36  # inside the gap between the lungs


def test_severity_only_counts_infection_inside_lung():
    lung = two_lungs()
    inf = np.zeros_like(lung)
    inf[0, :, 36:64] = 1  # whole image-right strip, lung part and outside
    s = sev(lung, inf)
    assert s["severity_left"][0] == pytest.approx(100.0)
    assert s["severity_right"][0] == 0.0
    assert s["severity_total"][0] == pytest.approx(100 * 48 * 24 / (48 * 22 + 48 * 24), rel=1e-6)


def test_severity_unequal_and_tilted_lungs():
    lung = np.zeros((2, S, S, 1), np.float32)
    # image 0: a small right lung and a large left lung, gap off-centre (cols 20..23)
    lung[0, 20:40, 6:20] = 1
    lung[0, 4:60, 24:62] = 1
    # image 1: two parallelogram (tilted) lungs, each shifting right by 1 column every 4 rows
    for r in range(4, 60):
        d = r // 4
        lung[1, r, 2 + d : 14 + d] = 1
        lung[1, r, 34 + d // 2 : 50 + d // 2] = 1
    inf = np.zeros_like(lung)
    inf[0, 20:30, 6:20] = 1  # half of image 0's image-left lung
    inf[1] = lung[1] * (np.arange(S)[None, :, None] >= 34)  # all of image 1's image-right lung
    s = sev(lung, inf)
    split = split_columns(tf.constant(lung)).numpy()
    assert 20 <= split[0] <= 24
    assert 14 + 59 // 4 <= split[1] <= 34  # left of the right lung's first column, right of the left's last
    np.testing.assert_allclose(s["severity_right"], [50.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(s["severity_left"], [0.0, 100.0], rtol=1e-6)
    total1 = 100 * lung[1, :, 34:].sum() / lung[1].sum()
    np.testing.assert_allclose(s["severity_total"], [100 * 140 / (280 + 56 * 38), total1], rtol=1e-6)


def test_severity_empty_lungs_are_zero_not_nan():
    lung = np.zeros((2, S, S, 1), np.float32)
    lung[1, 10:50, 4:26] = 1  # only the image-left lung present
    inf = np.ones_like(lung)  # infection everywhere: must be clipped to the lung
    s = sev(lung, inf)
    for v in s.values():
        assert np.all(np.isfinite(v))
    np.testing.assert_array_equal(s["severity_total"], [0.0, 100.0])
    np.testing.assert_array_equal(s["severity_right"], [0.0, 100.0])
    np.testing.assert_array_equal(s["severity_left"], [0.0, 0.0])
    assert split_columns(tf.constant(lung)).numpy()[0] in (S // 2 - 1, S // 2)  # empty: image centre


def test_severity_in_tf_function_with_unknown_shape():
    fn = tf.function(severity, input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)] * 2)
    lung = two_lungs()
    inf = lung * 0.0
    inf[0, 8:56, 36:60] = 1
    out = fn(tf.constant(lung), tf.constant(inf))
    assert out["severity_left"].numpy()[0] == pytest.approx(100.0)
    assert out["severity_right"].numpy()[0] == 0.0


@pytest.mark.parametrize(
    "p,grade", [(0.0, "none"), (0.01, "mild"), (24.9, "mild"), (25.0, "moderate"), (49.99, "moderate"),
                (50.0, "severe"), (100.0, "severe")]
)
def test_severity_grade_bands(p, grade):
    assert severity_grade(p) == grade
    assert severity_grade(np.float32(p)) == grade


def test_severity_grade_rejects_nan():
    with pytest.raises(ValueError):
        severity_grade(float("nan"))


def fixed_model(prob_map: np.ndarray, channels: int, name: str) -> keras.Model:
    """A Keras model ignoring its input values and returning `prob_map` (S, S, 1) for every image."""
    inp = keras.Input((S, S, channels))
    const = tf.constant(prob_map[None].astype(np.float32))
    out = keras.layers.Lambda(lambda x: tf.zeros_like(x[..., :1]) + const, name=f"{name}_const")(inp)
    return keras.Model(inp, out, name=name)


def test_predict_pixels_masks_infection_outside_lung_and_feeds_lung_mask():
    lung_prob = two_lungs()[0] * 0.9 + 0.05  # 0.95 in the lungs, 0.05 outside
    inf_prob = np.zeros((S, S, 1), np.float32)
    inf_prob[8:32, 4:26] = 0.8  # inside the image-left lung
    inf_prob[0:6, :] = 0.99  # outside the lungs: must be removed
    lung_model = fixed_model(lung_prob, 3, "lung")
    seen = {}

    inp = keras.Input((S, S, 4))
    inf_out = keras.layers.Lambda(lambda x: tf.zeros_like(x[..., :1]) + tf.constant(inf_prob[None]))(inp)
    inf_model = keras.Model(inp, inf_out)

    class Spy(KerasStage):  # records what Stage 2 is given
        def __call__(self, x, training=False):
            seen["x"] = x
            return super().__call__(x, training=training)

    pixels = tf.random.uniform((2, S, S, 3), 0, 255)
    out = Predictor(lung_model, Spy(inf_model), Decision(threshold=0.5)).predict_pixels(pixels)
    for k in ("lung_prob", "lung_mask", "infection_prob", "infection_mask"):
        assert out[k].shape == (2, S, S, 1) and out[k].dtype == tf.float32
    for k in ("severity_left", "severity_right", "severity_total"):
        assert out[k].shape == (2,)
    np.testing.assert_array_equal(out["lung_mask"].numpy()[0], two_lungs()[0])
    # Stage 2 got the pixels plus the thresholded lung mask as the 4th channel
    np.testing.assert_array_equal(seen["x"].numpy()[..., :3], pixels.numpy())
    np.testing.assert_array_equal(seen["x"].numpy()[1, ..., 3:], two_lungs()[0])
    inf_mask = out["infection_mask"].numpy()
    assert inf_mask[:, 0:6].sum() == 0  # infection outside the lung removed
    assert inf_mask[0].sum() == 24 * 22
    assert np.all(inf_mask <= out["lung_mask"].numpy())
    np.testing.assert_allclose(out["severity_right"].numpy(), [50.0, 50.0], rtol=1e-6)
    np.testing.assert_allclose(out["severity_left"].numpy(), [0.0, 0.0])


def test_predict_pixels_inside_tf_function():
    lung_model = fixed_model(two_lungs()[0], 3, "lung")
    inf_model = fixed_model(np.full((S, S, 1), 0.7, np.float32), 4, "inf")
    predictor = Predictor(lung_model, inf_model)
    fn = tf.function(predictor.predict_pixels,
                     input_signature=[tf.TensorSpec([None, S, S, 3], tf.float32)])
    out = fn(tf.zeros((1, S, S, 3)))
    assert out["severity_total"].numpy()[0] == pytest.approx(100.0)
    assert out["severity_left"].numpy()[0] == pytest.approx(100.0)
    np.testing.assert_array_equal(out["infection_mask"].numpy(), two_lungs())


# ------------------------------------------------------------------------------------------ SavedModel stages
@pytest.fixture(scope="module")
def exported_stages(tmp_path_factory):
    """Tiny untrained U-Nets (64 px) and their fp32 stage SavedModels under one TF Serving base folder."""
    from covidseg_tf.export import export_stage
    from covidseg_tf.models import build_unet

    keras.utils.set_random_seed(0)
    lung = build_unet("efficientnetb0", input_shape=(S, S, 3), encoder_weights=None, name="lung")
    inf = build_unet("efficientnetb0", input_shape=(S, S, 4), encoder_weights=None, name="infection")
    base = tmp_path_factory.mktemp("saved_models")
    export_stage(lung, "lung", base)
    export_stage(inf, "infection", base)
    return lung, inf, base


def random_pixels(channels: int = 3, batch: int = 2, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).uniform(0, 255, (batch, S, S, channels)).astype(np.float32)
    if channels == 4:
        pixels[..., 3] = pixels[..., 3] > 127  # the lung-mask channel is 0/1
    return pixels


@pytest.mark.parametrize("stage,channels", [("lung", 3), ("infection", 4)])
@pytest.mark.parametrize("which", ["base", "version"])
def test_load_stage_saved_model_stage_matches_keras(exported_stages, stage, channels, which):
    from covidseg_tf.inference.stages import SavedModelStage, load_stage, model_input_size

    lung, inf, base = exported_stages
    keras_model = lung if stage == "lung" else inf
    version = base / stage / "1"
    loaded = load_stage(base / stage if which == "base" else version)
    assert isinstance(loaded, SavedModelStage)
    assert loaded.path == version and loaded.info["servable"] == stage and loaded.info["precision"] == "fp32"
    assert loaded.input_shape == (None, S, S, channels) and stage in loaded.name
    assert model_input_size(loaded) == (S, channels) == model_input_size(keras_model)
    x = random_pixels(channels)
    got = loaded(tf.constant(x), training=False)
    assert got.dtype == tf.float32 and got.shape == (2, S, S, 1)
    want = keras_model(x, training=False).numpy()
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    assert np.ptp(want) > 1e-3  # the comparison is not between two constant maps


def test_saved_model_version_takes_highest_integer(tmp_path):
    from covidseg_tf.inference.stages import saved_model_version

    for name in ("2", "10", "9", ".tmp-abc", "11b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pb").write_bytes(b"")
    assert saved_model_version(tmp_path) == tmp_path / "10"  # numeric, not lexicographic; others ignored
    assert saved_model_version(tmp_path / "9") == tmp_path / "9"


@pytest.mark.parametrize("case", ["empty", "only_tmp", "not_saved_model", "version_without_pb", "cascade", "text_file"])
def test_load_stage_rejects_what_is_not_a_stage_model(exported_stages, tmp_path, case):
    import json
    import shutil

    from covidseg_tf.inference.stages import load_stage

    path = tmp_path / "model"
    path.mkdir()
    expect = {"empty": "is empty", "only_tmp": "is empty", "not_saved_model": "no saved_model.pb",
              "version_without_pb": "has no saved_model.pb", "cascade": "cascade SavedModel",
              "text_file": "expected a Keras `.keras` file"}[case]
    if case == "only_tmp":
        (path / ".tmp-x").mkdir()  # a half-written version: not a version
        expect = "no saved_model.pb and no integer version"
    elif case == "not_saved_model":
        (path / "notes.txt").write_text("hello")
    elif case == "version_without_pb":
        (path / "3").mkdir()
    elif case == "cascade":  # the loader reads the servable from covidseg_export.json before loading the graph
        shutil.copytree(exported_stages[2] / "lung" / "1", path / "1")
        info_file = path / "1" / "assets.extra" / "covidseg_export.json"
        info_file.write_text(json.dumps(dict(json.loads(info_file.read_text()), servable="cascade")))
    elif case == "text_file":
        path = tmp_path / "model.txt"
        path.write_text("hello")
    with pytest.raises(ValueError, match=expect) as err:
        load_stage(path)
    assert str(path) in str(err.value)


def test_load_stage_checks_the_stage(exported_stages):
    from covidseg_tf.inference.stages import load_stage

    base = exported_stages[2]
    assert load_stage(base / "infection", stage="infection").stage == "infection"
    with pytest.raises(ValueError, match="not a lung stage model"):
        load_stage(base / "infection", stage="lung")


def test_predict_pixels_with_saved_model_stages_in_tf_function(exported_stages):
    from covidseg_tf.inference.stages import load_stage

    lung, inf, base = exported_stages
    x = tf.constant(random_pixels(3, seed=1))
    # Untrained nets give probabilities crowded around 0.5: threshold in the widest gap between the central
    # Keras lung probabilities, so float32 round-off (~1e-7) cannot flip a lung pixel.
    p = np.sort(lung(x, training=False).numpy().ravel())
    mid = p[len(p) // 4: 3 * len(p) // 4]
    i = int(np.argmax(np.diff(mid)))
    threshold = float((mid[i] + mid[i + 1]) / 2)
    spec = [tf.TensorSpec([None, S, S, 3], tf.float32)]
    outs = []
    for stages in ((lung, inf), (load_stage(base / "lung"), load_stage(base / "infection"))):
        fn = tf.function(Predictor(*stages, threshold).predict_pixels, input_signature=spec)
        outs.append({k: v.numpy() for k, v in fn(x).items()})
    want, got = outs
    assert 0 < want["lung_mask"].mean() < 1
    np.testing.assert_array_equal(got["lung_mask"], want["lung_mask"])
    np.testing.assert_allclose(got["infection_prob"], want["infection_prob"], atol=1e-4)
    # same inputs to Stage 2, so its masks agree wherever the probability is not within round-off of the threshold
    far = np.abs(want["infection_prob"] - threshold) > 1e-5
    assert far.mean() > 0.99 and 0 < want["infection_mask"].sum()
    np.testing.assert_array_equal(got["infection_mask"][far], want["infection_mask"][far])


# ------------------------------------------------------------------------------------------ decision
def test_decision_rule_empties_small_infections_and_their_severity():
    lung_prob = np.repeat(two_lungs(), 2, axis=0) * 0.9  # (2, S, S, 1): both images the same lungs
    inf_prob = np.zeros_like(lung_prob)
    inf_prob[0, 8:32, 4:26] = 0.8  # image 0: 528 px of the image-left lung
    inf_prob[1, 8:10, 4:6] = 0.8  # image 1: 4 px
    lung_px = float(two_lungs()[0].sum())
    keep_all = apply_decision(lung_prob, inf_prob, Decision())
    small_pct = 100 * 4 / lung_px
    assert float(keep_all["severity_total"][1]) == pytest.approx(small_pct, rel=1e-5)
    rule = apply_decision(lung_prob, inf_prob, Decision(min_infection_percent=small_pct * 2))
    assert rule["infection_mask"].numpy()[1].sum() == 0 and float(rule["severity_total"][1]) == 0.0
    np.testing.assert_array_equal(rule["infection_mask"].numpy()[0], keep_all["infection_mask"].numpy()[0])
    assert float(rule["severity_total"][0]) == pytest.approx(100 * 528 / lung_px, rel=1e-5)
    # the infection threshold is its own: 0.85 > 0.8 drops both, the lung stays
    high = apply_decision(lung_prob, inf_prob, Decision(infection_threshold=0.85))
    assert high["infection_mask"].numpy().sum() == 0 and high["lung_mask"].numpy().sum() == 2 * lung_px


def test_hflip_tta_averages_the_mirrored_prediction():
    ramp = np.tile(np.linspace(0.0, 1.0, S, dtype=np.float32)[None, :, None], (S, 1, 1))  # left 0 -> right 1
    model = fixed_model(ramp, 3, "ramp")
    pixels = tf.zeros((1, S, S, 3))
    plain = run_stages(model, None, pixels, 0.5)["lung_prob"].numpy()
    tta = run_stages(model, None, pixels, Decision(hflip=True))["lung_prob"].numpy()
    np.testing.assert_allclose(plain[0], ramp)
    np.testing.assert_allclose(tta[0], 0.5 * (ramp + ramp[:, ::-1]), atol=1e-6)  # mean with the mirror: flat


def test_decision_is_recorded_by_export_and_read_by_predictor_load(exported_stages, tmp_path):
    from covidseg_tf.export import export_stage

    lung, inf, _ = exported_stages
    chosen = Decision(threshold=0.45, infection_threshold=0.6, min_infection_percent=2.0, hflip=True)
    for model, stage in ((lung, "lung"), (inf, "infection")):
        export_stage(model, stage, tmp_path, chosen, warmup=False)
    loaded = Predictor.load(tmp_path / "lung", tmp_path / "infection")
    assert loaded.decision == chosen
    assert Predictor.load(tmp_path / "lung", tmp_path / "infection", hflip=False).decision == Decision(0.45, 0.6, 2.0)
    info = json.loads((tmp_path / "infection" / "1" / "assets.extra" / "covidseg_export.json").read_text())
    assert info["threshold"] == 0.6 and info["decision"] == chosen.to_dict()
    with pytest.raises(ValueError, match="infection_threshold must be in"):
        Decision(infection_threshold=1.5)


def test_the_old_import_path_names_the_new_objects():
    """covidseg_tf.cascade keeps the former names for old imports; each is the inference package's object."""
    from covidseg_tf import cascade, inference
    from covidseg_tf.inference import postprocess, preprocess, stages

    assert cascade.Cascade is inference.Predictor and cascade.load_model is stages.load_stage
    assert cascade.masks_at is postprocess.apply_decision and cascade.mask_at is postprocess.threshold_mask
    assert cascade.Decision is postprocess.Decision and cascade.to_model_pixels is preprocess.to_model_pixels
    lung_model = fixed_model(two_lungs()[0], 3, "lung")
    inf_model = fixed_model(np.full((S, S, 1), 0.7, np.float32), 4, "inf")
    x = tf.zeros((1, S, S, 3))
    old = cascade.run_cascade(lung_model, inf_model, x, 0.5)
    new = Predictor(lung_model, inf_model, 0.5).predict_pixels(x)
    assert set(old) == set(new) and all(np.array_equal(old[k], new[k]) for k in new)
    np.testing.assert_array_equal(cascade.run_stage2(inf_model, x, two_lungs()), new["infection_prob"])

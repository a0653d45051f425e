"""The image-level head at inference (issue 22, part 3): the cascade's decision, predict's JSON, batch_predict's
CSV, serve_client, the SavedModels (stage and cascade), TFLite, tune's grid and evaluate's image-level figures.

The models are `helpers.conv_cascade`'s lung stage and `helpers.conv_head_stage` (an infection stage whose head
calls an image "COVID-19" when its mean grey is above 100), so every expected value can be worked out by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import conv_cascade, conv_head_stage, phantom

from covidseg_tf.config import IMAGE_CLASSES
from covidseg_tf.inference import Decision, Predictor

SIZE = 64


def two_images() -> list[np.ndarray]:
    """A: `helpers.phantom` (two dark lungs in a bright body, an infection patch in one lung; it passes the input
    gate): mean grey ~130, the head says COVID-19. B: the same with the body darkened from ~180 to ~120 (still no
    lung for the conv stage): the same masks, mean grey ~90, the head says no."""
    a = phantom(SIZE, SIZE)
    b = a.copy()
    b[a > 150] -= 60
    return [a, b]


def covid_probability(mean_grey: float) -> float:
    """conv_head_stage's P(COVID-19) for an image of this mean grey."""
    logit = 0.05 * mean_grey - 5.0
    return float(np.exp(logit) / (np.exp(logit) + 2.0))


@pytest.fixture(scope="module")
def models():
    lung, _ = conv_cascade(SIZE)
    return lung, conv_head_stage(SIZE)


def test_apply_decision_empties_images_the_head_calls_healthy():
    import tensorflow as tf

    from covidseg_tf.inference.postprocess import apply_decision

    prob = tf.fill([2, 8, 8, 1], 0.9)
    classes = tf.constant([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    m = apply_decision(prob, prob, Decision(min_infection_probability=0.5), image_class_prob=classes)
    assert m["infection_mask"].numpy().reshape(2, -1).max(axis=1).tolist() == [1.0, 0.0]
    assert m["severity_total"].numpy().tolist() == [100.0, 0.0]
    assert m["lung_mask"].numpy().min() == 1.0  # the lungs stay
    both = apply_decision(prob, prob, Decision(), image_class_prob=classes)  # the head not consulted
    assert both["infection_mask"].numpy().min() == 1.0
    with pytest.raises(ValueError, match="no image head"):
        apply_decision(prob, prob, Decision(min_infection_probability=0.5))


def test_decision_field_is_checked_and_recorded():
    d = Decision(min_infection_probability=0.3)
    assert d.uses_image_head and not Decision().uses_image_head
    assert Decision.from_dict(d.to_dict()) == d
    assert Decision.from_dict({"threshold": 0.5}).min_infection_probability == 0.0  # older records
    with pytest.raises(ValueError, match="min_infection_probability"):
        Decision(min_infection_probability=1.0)


def test_predictor_reports_the_head_and_follows_its_rule(models):
    lung, infection = models
    a, b = two_images()
    plain = Predictor(lung, infection).predict([a, b])
    assert [p.infection.any() for p in plain] == [True, True]
    assert plain[0].infection_probability == pytest.approx(covid_probability(a.mean()), abs=1e-3)
    assert plain[1].infection_probability == pytest.approx(covid_probability(b.mean()), abs=1e-3)
    assert plain[0].image_class == "COVID-19" and plain[1].image_class != "COVID-19"
    assert list(plain[0].image_class_probabilities) == list(IMAGE_CLASSES)
    assert sum(plain[1].image_class_probabilities.values()) == pytest.approx(1.0, abs=1e-5)

    ruled = Predictor(lung, infection, Decision(min_infection_probability=0.5)).predict([a, b])
    assert ruled[0].infection.sum() == plain[0].infection.sum() > 0
    assert not ruled[1].infection.any() and ruled[1].severity_total == 0.0
    assert ruled[1].lung.sum() == plain[1].lung.sum()


def test_models_without_a_head_keep_working_and_refuse_a_head_decision():
    lung, infection = conv_cascade(SIZE)
    pred = Predictor(lung, infection).predict(two_images())
    assert pred[0].image_class_probabilities is None and pred[0].infection_probability is None
    with pytest.raises(ValueError, match="has none"):
        Predictor(lung, infection, Decision(min_infection_probability=0.5))


def test_not_assessed_images_get_no_head_verdict(models):
    pred = Predictor(*models).predict([two_images()[1][:10]])[0]  # 10 px tall: too small
    assert not pred.assessed and pred.image_class_probabilities is None


def test_predict_json_batch_csv_and_serve_client_carry_the_head(models, tmp_path):
    from covidseg_tf.batch_predict import CSV_COLUMNS, csv_line
    from covidseg_tf.predict import render_outputs
    from covidseg_tf.serve_client import save_prediction

    a, b = two_images()
    preds = Predictor(*models, Decision(min_infection_probability=0.5)).predict([a, b])
    record, _ = render_outputs("a.png", a, preds[0], str(tmp_path / "a"), {})
    head = record["image_level"]
    assert head["class"] == "COVID-19"
    assert head["infection_probability"] == pytest.approx(covid_probability(a.mean()), abs=1e-3)
    assert set(head["class_probabilities"]) == set(IMAGE_CLASSES)
    row = dict(zip(CSV_COLUMNS, csv_line(json.loads(json.dumps(record))).split(",")))
    assert row["image_class"] == "COVID-19" and float(row["infection_probability"]) == pytest.approx(
        head["infection_probability"])
    lung, _ = conv_cascade(SIZE)
    headless, _ = render_outputs("b.png", b, Predictor(*conv_cascade(SIZE)).predict([b])[0], str(tmp_path / "b"), {})
    assert headless["image_level"] is None
    assert csv_line(headless).endswith(",,")

    served = {"assessed": True, "infection_probability": 0.9, "image_class": "COVID-19",
              "image_class_prob": [0.9, 0.05, 0.05], "severity_total": 12.0}
    summary = save_prediction(served, "x", tmp_path)
    assert summary["image_class_prob"] == [0.9, 0.05, 0.05] and summary["image_class"] == "COVID-19"
    refused = save_prediction(dict(served, assessed=False, reason="too small"), "y", tmp_path)
    assert refused["infection_probability"] is None and refused["image_class_prob"] is None


def test_exported_servables_serve_the_head(models, tmp_path):
    import tensorflow as tf

    from covidseg_tf.export import export_cascade, export_stage
    from covidseg_tf.inference.stages import SavedModelStage

    lung, infection = models
    decision = Decision(min_infection_probability=0.5)
    stage_dir = export_stage(infection, "infection", tmp_path, decision, warmup=False)
    stage = SavedModelStage(stage_dir)
    assert stage.has_image_head
    lung_dir = export_stage(lung, "lung", tmp_path, decision, warmup=False)
    loaded = Predictor.load(lung_dir, stage_dir)
    assert loaded.decision == decision  # recorded with the export
    a, b = two_images()
    want = Predictor(lung, infection, decision).predict([a, b])
    got = loaded.predict([a, b])
    for w, g in zip(want, got):
        assert g.infection_probability == pytest.approx(w.infection_probability, abs=1e-5)
        np.testing.assert_array_equal(g.infection, w.infection)

    cascade_dir = export_cascade(lung, infection, tmp_path, decision, warmup=False)
    serve = tf.saved_model.load(str(cascade_dir)).signatures["serving_default"]
    out = serve(images=tf.constant([tf.io.encode_png(x[..., None]).numpy() for x in (a, b)]))
    np.testing.assert_allclose(out["infection_probability"].numpy(),
                               [w.infection_probability for w in want], atol=1e-5)
    assert [s.decode() for s in out["image_class"].numpy()] == [w.image_class for w in want]
    assert out["image_class_prob"].shape == (2, len(IMAGE_CLASSES))
    assert out["severity_total"].numpy()[1] == 0.0 and out["severity_total"].numpy()[0] > 0  # the rule, served

    with pytest.raises(ValueError, match="has none"):
        export_cascade(*conv_cascade(SIZE), tmp_path, decision, warmup=False)


def test_tflite_stage_returns_the_head(models):
    from covidseg_tf.config import IMAGE_CLASS_OUTPUT, MASK_OUTPUT
    from covidseg_tf.inference.stages import TFLiteStage
    from covidseg_tf.optimize import tflite_model

    _, infection = models
    stage = TFLiteStage(tflite_model(infection))
    assert stage.has_image_head
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 4)).astype(np.float32)
    got, want = stage(x), infection(x, training=False)
    for key in (MASK_OUTPUT, IMAGE_CLASS_OUTPUT):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=1e-5)


def test_tune_scores_the_head_rule_from_the_same_counts():
    from covidseg_tf.tune import score, score_head_rules

    classes = ("COVID-19", "Non-COVID", "Normal")
    n, s = 3, 8
    infection = np.zeros((n, s, s, 1), np.uint8)
    infection[0, :2] = 1  # image 0: COVID-19, 16 px
    prob = np.full((n, s, s, 1), 0.1, np.float32)
    prob[0, :2] = prob[1, :1] = 0.9  # image 1: a spurious finding on a Non-COVID image
    data = {"lung_prob": np.full((n, s, s, 1), 0.9, np.float32), "infection_prob": prob,
            "lung": np.ones((n, s, s, 1), np.uint8), "infection": infection, "label": np.array([0, 1, 2]),
            "infection_probability": np.array([0.8, 0.3, 0.1], np.float32)}
    off, mid, high = score_head_rules(data, Decision(), classes, [0.0, 0.5, 0.9])
    assert off == score(data, Decision(), classes)
    assert off["healthy_with_infection_fraction"] == 0.5 and off["dice_per_image_mean"] == pytest.approx(2 / 3)
    assert mid["healthy_with_infection_fraction"] == 0.0 and mid["dice_per_image_mean"] == 1.0
    assert mid["covid_with_infection_fraction"] == 1.0
    assert high["dice_per_covid_image_mean"] == 0.0 and high["covid_with_infection_fraction"] == 0.0
    assert high["severity_mae_covid"] == pytest.approx(25.0)  # 16 of 64 lung pixels missed
    assert mid == score(data, Decision(min_infection_probability=0.5), classes)
    del data["infection_probability"]
    with pytest.raises(ValueError, match="image head"):
        score_head_rules(data, Decision(), classes, [0.5])


def test_image_level_figures_by_hand():
    from covidseg_tf.evaluate import image_level_figures

    r = image_level_figures([True, True, True, False], [True, True, False, False], [0.9, 0.6, 0.2, 0.6], 0.5)
    assert r["mask"] == {"sensitivity": pytest.approx(2 / 3), "specificity": 1.0}
    assert r["head"]["sensitivity"] == pytest.approx(2 / 3) and r["head"]["specificity"] == 0.0
    assert r["head"]["auc"] == pytest.approx((1 + 0.5 + 0) / 3)  # 0.9 > 0.6, 0.6 ties 0.6, 0.2 < 0.6
    assert image_level_figures([False], [True])["mask"] == {"sensitivity": None, "specificity": 0.0}
    assert image_level_figures([True], [True])["head"] is None


def test_decision_table_shows_the_head_rule_alone():
    from covidseg_tf.decision_table import markdown

    figures = ("dice_pooled", "dice_per_covid_image_mean", "dice_per_image_mean", "healthy_with_infection_fraction",
               "covid_with_infection_fraction", "severity_mae_covid")
    grid = []
    for i, h in enumerate((0.0, 0.4)):
        for m in (0.0, 5.0):
            d = Decision(min_infection_percent=m, min_infection_probability=h).to_dict()
            grid.append({"decision": d, **{k: 0.1 * i + m / 100 for k in figures}})
    chosen = Decision(min_infection_percent=5.0, min_infection_probability=0.4).to_dict()
    lines = markdown({"decision": chosen, "grid": grid}).splitlines()
    labels = [line.split(" | ")[0] for line in lines[2:]]
    assert labels == ["| default (0.5, no rule, no flip)", "| + empty below 5 % of the lung only",
                      "| + empty where the image head's infection probability < 0.4 only",
                      "| chosen: all of the above"]
    assert "COVID-19 with any infection" in lines[0]
    assert lines[2].split(" | ")[4] == "0 %" and lines[4].split(" | ")[4] == "10 %"  # healthy share, head alone

"""covidseg_tf.tune: every candidate decision scored by hand-checkable numbers, and the CLI's choice and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import conv_cascade

from covidseg_tf.inference import Decision
from covidseg_tf.tune import INFECTION_THRESHOLDS, MIN_INFECTION_PERCENTS, score

CLASSES = ("COVID-19", "Non-COVID", "Normal")


@pytest.fixture()
def hand_made() -> dict[str, np.ndarray]:
    """Four 8x8 images, all lung (64 px): two COVID-19 with 16 infected pixels (rows 0-1), predicted with
    probability 0.8 and 0.6; a Non-COVID image with a spurious 0.6 on 2 pixels (3.1 % of its lung); a Normal image
    predicted clean."""
    n, s = 4, 8
    infection = np.zeros((n, s, s, 1), np.uint8)
    infection[:2, :2] = 1
    prob = np.full((n, s, s, 1), 0.1, np.float32)
    prob[0, :2], prob[1, :2], prob[2, 4, :2] = 0.8, 0.6, 0.6
    return {"lung_prob": np.full((n, s, s, 1), 0.9, np.float32), "infection_prob": prob,
            "lung": np.ones((n, s, s, 1), np.uint8), "infection": infection, "label": np.array([0, 0, 1, 2])}


def test_default_decision_counts_the_spurious_pixels(hand_made):
    r = score(hand_made, Decision(), CLASSES)
    assert r["dice_per_image_mean"] == pytest.approx(0.75)  # 1, 1, 0 (FP on an empty truth), 1
    assert r["dice_pooled"] == pytest.approx(64 / 66)  # TP 32, FP 2, FN 0
    assert r["dice_per_covid_image_mean"] == pytest.approx(1.0)
    assert r["healthy_with_infection_fraction"] == pytest.approx(0.5)
    assert r["severity_mae_covid"] == pytest.approx(0.0, abs=1e-4)


def test_infection_threshold_drops_weak_predictions_of_both_kinds(hand_made):
    r = score(hand_made, Decision(infection_threshold=0.7), CLASSES)
    assert r["dice_per_image_mean"] == pytest.approx(0.75)  # 1, 0 (missed), 1, 1
    assert r["dice_pooled"] == pytest.approx(32 / 48)  # TP 16, FP 0, FN 16
    assert r["dice_per_covid_image_mean"] == pytest.approx(0.5)
    assert r["healthy_with_infection_fraction"] == 0.0
    assert r["severity_mae_covid"] == pytest.approx(12.5, abs=1e-3)  # image 1: 0 % predicted, 25 % true


def test_minimum_share_of_the_lung_empties_only_small_findings(hand_made):
    r = score(hand_made, Decision(min_infection_percent=5.0), CLASSES)  # 3.1 % goes, 25 % stays
    assert r["dice_per_image_mean"] == pytest.approx(1.0)
    assert r["dice_pooled"] == pytest.approx(1.0)
    assert r["healthy_with_infection_fraction"] == 0.0
    r = score(hand_made, Decision(min_infection_percent=30.0), CLASSES)  # now the true findings go too
    assert r["dice_per_covid_image_mean"] == pytest.approx(0.0)


def test_cli_chooses_the_best_decision_and_writes_the_grid(synthetic_data_dir, tmp_path):
    from covidseg_tf.tune import main

    for model in conv_cascade(64):
        model.save(tmp_path / f"{model.name}.keras")
    out = tmp_path / "decision.json"
    result = main(["--lung-model", str(tmp_path / "lung_conv.keras"),
                   "--infection-model", str(tmp_path / "infection_conv.keras"), "--dataset", "covid_qu_ex/synthetic",
                   "--data-dir", str(synthetic_data_dir), "--limit", "6", "--batch-size", "4", "--hflip", "both",
                   "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["decision"] == result["decision"]
    grid = saved["grid"]
    assert len(grid) == 2 * len(INFECTION_THRESHOLDS) * len(MIN_INFECTION_PERCENTS)
    assert {r["decision"]["hflip"] for r in grid} == {False, True}
    best = max(r["dice_per_image_mean"] for r in grid)
    assert saved["chosen"]["dice_per_image_mean"] == best and saved["chosen"]["decision"] == saved["decision"]
    assert saved["baseline"]["decision"] == Decision().to_dict()
    Decision.from_dict(saved["decision"])  # what export --decision reads

    from covidseg_tf.decision_table import markdown

    lines = markdown(saved).splitlines()
    bench = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "decision_table.py"),
                            str(out)], capture_output=True, text=True, timeout=60)
    assert bench.returncode == 0 and bench.stdout == markdown(saved) + "\n", bench.stderr  # the model card's command
    assert lines[2].startswith("| default (0.5, no rule, no flip) |") and lines[-1].startswith("| chosen:")
    assert f"{saved['baseline']['dice_pooled']:.3f}" in lines[2]
    assert f"{saved['chosen']['dice_pooled']:.3f}" in lines[-1]


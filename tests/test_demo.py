"""covidseg_tf.demo: the README's demo command end to end (minutes: marked slow)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The README's demo command, shortened: every promised artefact exists, where the summary says."""
    from covidseg_tf.demo import main

    wd = tmp_path / "demo"
    summary = main(["--workdir", str(wd), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
                    "--samples", "2"])
    assert summary["predict_exit_code"] == 0
    reports = wd / "reports" / "synthetic"
    expected = {"report": reports / "report.md", "report_json": reports / "report.json",
                "figure": reports / "fig1_validation.png", "lung_model": wd / "runs" / "lung" / "model.keras",
                "infection_model": wd / "runs" / "infection" / "model.keras"}
    for key, path in expected.items():
        assert Path(summary[key]) == path, key
        assert path.is_file(), key
    # a fresh workdir: the cascade is version 1
    assert Path(summary["cascade_saved_model"]) == wd / "saved_models" / "cascade" / "1"
    assert (wd / "saved_models" / "cascade" / "1" / "saved_model.pb").is_file()
    samples = sorted((wd / "samples").glob("*.png"))
    assert len(samples) == 2
    predictions = Path(summary["predictions"])
    for suffix in ("_lung.png", "_infection.png", "_overlay.png", ".json"):
        assert sorted(p.name for p in predictions.glob(f"*{suffix}")) == sorted(s.stem + suffix for s in samples)
    for stage in ("lung", "infection"):
        assert list((wd / "runs" / stage / "logs").rglob("*tfevents*")), stage

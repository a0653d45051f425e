#!/usr/bin/env python3
"""One JSON line per training run folder: its config, validation Dice per epoch and minutes per epoch.

Minutes per epoch come from the `- NNNs -` figures Keras prints per epoch in the run's log (`<run>.log` beside
the folder, as bench/layout_compare.sh writes it).

    python bench/run_summary.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from covidseg_tf.train import dice_key  # noqa: E402


def summary(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())["config"]
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    key = dice_key(float(cfg.get("image_head_weight", 0.0)))
    log = run.with_suffix(".log")
    seconds = [int(s) for s in re.findall(r"\s-\s(\d+)s\s-\s", log.read_text())] if log.exists() else []
    return {"run": str(run), "unet_layout": cfg.get("unet_layout"), "encoder": cfg["encoder"],
            "image_size": cfg["image_size"], "epochs": len(rows),
            "val_dice": [round(float(r[f"val_{key}"]), 4) for r in rows],
            "train_dice": [round(float(r[key]), 4) for r in rows],
            **({"val_image_accuracy": [round(float(r["val_image_class_accuracy"]), 4) for r in rows]}
               if key != "dice" else {}),
            "minutes_per_epoch": [round(s / 60, 1) for s in seconds]}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(summary(Path(arg))))

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


def summary(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())["config"]
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    log = run.with_suffix(".log")
    seconds = [int(s) for s in re.findall(r"\s-\s(\d+)s\s-\s", log.read_text())] if log.exists() else []
    return {"run": str(run), "unet_layout": cfg.get("unet_layout"), "encoder": cfg["encoder"],
            "image_size": cfg["image_size"], "epochs": len(rows),
            "val_dice": [round(float(r["val_dice"]), 4) for r in rows],
            "train_dice": [round(float(r["dice"]), 4) for r in rows],
            "minutes_per_epoch": [round(s / 60, 1) for s in seconds]}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(summary(Path(arg))))

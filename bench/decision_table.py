#!/usr/bin/env python3
"""The decision ablation of a `python -m covidseg_tf.tune --hflip both` result, as a Markdown table.

Rows: the default decision (threshold 0.5, no image-level rule, no flip), each lever of the chosen decision
alone (flip TTA, infection threshold, minimum infection share of the lung, the image head's minimum infection
probability), and the chosen decision; columns: the figures tune computed for each (Val, at the models' size).

    python bench/decision_table.py RUN_DIR/decision.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (("dice_pooled", "infection Dice, pooled"), ("dice_per_covid_image_mean", "mean per COVID-19 image"),
           ("dice_per_image_mean", "mean per image (empty = 1 if predicted empty)"),
           ("healthy_with_infection_fraction", "Non-COVID + Normal with any infection"),
           ("covid_with_infection_fraction", "COVID-19 with any infection"),
           ("severity_mae_covid", "severity MAE, COVID-19 (points)"))


def rows(result: dict) -> list[tuple[str, dict]]:
    """(label, grid row) for the default, each single lever of the chosen decision, and the chosen one."""
    grid = {tuple(sorted(r["decision"].items())): r for r in result["grid"]}
    chosen = result["decision"]
    default = {**chosen, "infection_threshold": 0.5, "min_infection_percent": 0.0, "hflip": False}
    if "min_infection_probability" in chosen:  # tune results before the image head lack the field
        default["min_infection_probability"] = 0.0

    def find(**changes) -> dict:
        return grid[tuple(sorted({**default, **changes}.items()))]

    out = [("default (0.5, no rule, no flip)", find())]
    if chosen["hflip"]:
        out.append(("+ flip TTA only", find(hflip=True)))
    if chosen["infection_threshold"] != 0.5:
        out.append((f"+ infection threshold {chosen['infection_threshold']:g} only",
                    find(infection_threshold=chosen["infection_threshold"])))
    if chosen["min_infection_percent"]:
        out.append((f"+ empty below {chosen['min_infection_percent']:g} % of the lung only",
                    find(min_infection_percent=chosen["min_infection_percent"])))
    if chosen.get("min_infection_probability"):
        out.append((f"+ empty where the image head's infection probability < {chosen['min_infection_probability']:g}"
                    " only", find(min_infection_probability=chosen["min_infection_probability"])))
    out.append(("chosen: all of the above", find(**chosen)))
    return out


def table(result: dict) -> str:
    columns = [(k, c) for k, c in COLUMNS if k in result["grid"][0]]  # older results lack some figures
    lines = ["| decision | " + " | ".join(c for _, c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, r in rows(result):
        cells = [f"{100 * r[k]:.0f} %" if k.endswith("_fraction") else
                 f"{r[k]:.1f}" if k == "severity_mae_covid" else f"{r[k]:.3f}" for k, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(table(json.loads(Path(sys.argv[1]).read_text())))

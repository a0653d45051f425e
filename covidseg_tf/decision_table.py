"""The decision ablation of a `python -m covidseg_tf.tune --hflip both` result, as a Markdown table.

Rows: the default decision (threshold 0.5, no image-level rule, no flip), each lever of the chosen decision alone
(flip TTA, infection threshold, minimum infection share of the lung, the image head's minimum infection
probability), and the chosen decision; columns: the figures tune computed for each (Val, at the models' size)::

    import json
    from covidseg_tf.decision_table import markdown

    print(markdown(json.loads(open("runs/decision.json").read())))

(`python bench/decision_table.py runs/decision.json` prints the same.)
"""

from __future__ import annotations

from typing import Any

COLUMNS = (("dice_pooled", "infection Dice, pooled"), ("dice_per_covid_image_mean", "mean per COVID-19 image"),
           ("dice_per_image_mean", "mean per image (empty = 1 if predicted empty)"),
           ("healthy_with_infection_fraction", "Non-COVID + Normal with any infection"),
           ("covid_with_infection_fraction", "COVID-19 with any infection"),
           ("severity_mae_covid", "severity MAE, COVID-19 (points)"))
"""(tune's figure, column title), in the table's order; a result without a figure gets no column for it."""


def ablation_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, grid row) of a tune result for the default decision, each single lever of the chosen decision,
    and the chosen one. A lever's row must be in the result's grid (tune's grid holds every combination)."""
    grid = {tuple(sorted(r["decision"].items())): r for r in result["grid"]}
    chosen = result["decision"]
    default = {**chosen, "infection_threshold": 0.5, "min_infection_percent": 0.0, "hflip": False}
    if "min_infection_probability" in chosen:  # tune results before the image head lack the field
        default["min_infection_probability"] = 0.0

    def find(**changes) -> dict[str, Any]:
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


def markdown(result: dict[str, Any]) -> str:
    """The Markdown table of `ablation_rows(result)`: Dice to 3 decimals, fractions in %, severity MAE to 1."""
    columns = [(k, c) for k, c in COLUMNS if k in result["grid"][0]]  # older results lack some figures
    lines = ["| decision | " + " | ".join(c for _, c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, r in ablation_rows(result):
        cells = [f"{100 * r[k]:.0f} %" if k.endswith("_fraction") else
                 f"{r[k]:.1f}" if k == "severity_mae_covid" else f"{r[k]:.3f}" for k, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

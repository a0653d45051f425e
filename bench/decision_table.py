#!/usr/bin/env python3
"""The decision ablation of a `python -m covidseg_tf.tune --hflip both` result, as a Markdown table
(covidseg_tf.decision_table says which rows and columns).

    python bench/decision_table.py RUN_DIR/decision.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidseg_tf.decision_table import markdown  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))

"""bench/compare_peer.py: our training and memory runs get the inter-op threads asked for (1 unless told)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import compare_peer  # noqa: E402


def _inter_threads(cmd: list[str]) -> str:
    return cmd[cmd.index("--inter-threads") + 1]


def test_our_training_runs_take_the_inter_op_threads_asked_for():
    default = compare_peer.parse_args([])
    assert _inter_threads(compare_peer.our_train_cmd(default, 256, 8, 5, 2, "x")) == "1"
    two = compare_peer.parse_args(["--our-train-inter-threads", "2"])
    cmd = compare_peer.our_train_cmd(two, 256, 16, 1, 0, "compare memory")
    assert _inter_threads(cmd) == "2" and cmd[cmd.index("--batch") + 1] == "16"

"""bench/onednn_share.py's parser of ONEDNN_VERBOSE output (the lines below are from a real Stage-2 run), through
its --from-log mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MDS = ("src:f32::blocked:acdb::f0 wei:f32:a:blocked:Acdb32a::f0 bia:undef::undef::: dst:f32::blocked:acdb::f0,"
       "attr-scratchpad:user,alg:convolution_direct")
VERBOSE = "\n".join([
    "onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,prop_kind,"
    "memory_descriptors,attributes,auxiliary,problem_desc,exec_time",
    f"onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx2,forward_training,{MDS},"
    "mb8_ic4oc32_ih257oh128kh3sh2dh0ph0_iw257ow128kw3sw2dw0pw0,10.5",
    f"onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx2,backward_weights,{MDS},"
    "mb8_ic96oc32_ih128oh128kh3sh1dh0ph1_iw128ow128kw3sw1dw0pw1,250",
    f"onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx2,backward_weights,{MDS},"
    "mb8_ic32oc16_ih256oh256kh3sh1dh0ph1_iw256ow256kw3sw1dw0pw1,150",
    "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32::blocked:abdec::f0 "
    "dst:f32::blocked:debcA8a::f0,attr-scratchpad:user,,32x1x1x3x3,0.5",
    "onednn_verbose,v1,primitive,create:cache_miss,cpu,reorder,jit:uni,undef,src:f32::blocked:abdec::f0,"
    "attr-scratchpad:user,,32x1x1x3x3,0.9",
    '{"median_s": 1.0}',
])


def breakdown(tmp_path: Path, calls: int, *extra: str) -> dict:
    """bench/onednn_share.py --from-log on VERBOSE (run as a script: tests import no bench module)."""
    log = tmp_path / "verbose.log"
    log.write_text(VERBOSE)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "onednn_share.py"), "--from-log", str(log),
                           "--calls", str(calls), *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_sums_exec_times_per_kind_and_implementation(tmp_path: Path):
    result = breakdown(tmp_path, 1)
    # ms -> s; the info and create lines are ignored
    assert result["per_kind_s_per_step"] == pytest.approx({"convolution": 0.4105, "reorder": 0.0005})
    assert result["per_impl_s_per_step"] == pytest.approx({"convolution/forward_training/brg_conv_fwd:avx2": 0.0105,
                                                           "convolution/backward_weights/jit:avx2": 0.4,
                                                           "reorder/undef/jit:uni": 0.0005})
    assert result["onednn_s_per_step"] == pytest.approx(0.411)
    assert list(result["per_kind_s_per_step"]) == ["convolution", "reorder"]  # largest first


def test_per_call_figures_and_top_rows(tmp_path: Path):
    result = breakdown(tmp_path, 2, "--top", "1")
    assert result["calls"] == 2 and result["onednn_s_per_step"] == pytest.approx(0.411 / 2)
    assert result["per_impl_s_per_step"] == pytest.approx({"convolution/backward_weights/jit:avx2": 0.2})

"""Issue 23's fuzz corpus (tests/fuzzcorpus.py: >= 500 seeded inputs, generated, never stored) through every entry
point, each in a bounded subprocess (a timeout and an address-space cap via resource.setrlimit): no crash, no
hang, memory bounded, and every failure named (the message names the file, or the item of a batch).

* `imageio.decode_xray` over the whole corpus (seconds);
* the cascade SavedModel's serving_default, one request per input, predict's CLI on a folder holding the corpus
  and batch_predict on the same folder (1x1-convolution stage models; about 20 s each on 2 busy cores).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from fuzzcorpus import corpus
from helpers import check_decode_outcomes, run_fuzz

from covidseg_tf import limits

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


@pytest.fixture(scope="module")
def inputs() -> list[tuple[str, bytes]]:
    return corpus()


def test_corpus_is_seeded_large_and_covers_the_odd_modes(inputs):
    import io

    from PIL import Image

    assert len(inputs) >= 500 and len({n for n, _ in inputs}) == len(inputs)
    assert corpus() == inputs  # the same files every run
    modes = set()
    for _, data in inputs:
        try:
            modes.add(Image.open(io.BytesIO(data)).mode)
        except Exception:  # noqa: BLE001 - most mutants are not images any more
            pass
    assert {"L", "LA", "P", "1", "I;16", "RGB", "RGBA", "CMYK", "F"} <= modes, modes
    names = [n for n, _ in inputs]
    assert {"bomb_12000.png", "empty.png", "j2k_broken.dcm", "deflated.dcm", "frames.dcm"} <= set(names)
    assert all(Path(n).suffix in (".png", ".jpg", ".bmp", ".tif", ".dcm") for n in names)


def _limit_memory(gib: int) -> Any:
    """A preexec_fn capping the child's address space at `gib` GiB (a bomb then fails, not the host)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (gib * GIB, gib * GIB))
    return apply


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # this checkout's code
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": path}


def test_fuzz_decode_xray_every_input_an_image_or_a_named_error(inputs, tmp_path):
    """Each input decodes to a 2-D uint8 image within the size policy or raises XRayReadError whose one-line
    message starts with the input's name; nothing else escapes; each under 10 s; the process under a 3 GiB
    address-space cap and below 1.5 GB resident at its peak."""
    run = run_fuzz("imageio", inputs, tmp_path)
    assert "Traceback" not in run["stderr"], run["stderr"][-3000:]  # nothing logged a traceback (pydicom did)
    outcomes = dict(zip((n for n, _ in inputs), run["results"]))
    check_decode_outcomes(outcomes)
    assert outcomes["bomb_12000.png"][1].endswith("(checked from the file header; the image was not decoded)")
    assert outcomes["CMYK.jpg"][0] == outcomes["frames.dcm"][0] == outcomes["F.tif"][0] == "ok"
    kinds = [k for k, _, _ in outcomes.values()]
    assert 50 < kinds.count("ok") < len(kinds) - 50, "the corpus should give both outcomes"
    assert run["peak_mb"] < 1500, run["peak_mb"]


# ------------------------------------------------------------------------------------- the CLIs and the server
@pytest.fixture(scope="module")
def corpus_folder(inputs, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "corpus"
    d.mkdir()
    for name, data in inputs:
        (d / name).write_bytes(data)
    return d


@pytest.fixture(scope="module")
def conv_models(tmp_path_factory) -> tuple[Path, Path]:
    from helpers import conv_cascade

    d = tmp_path_factory.mktemp("fuzz_models")
    for model, stage in zip(conv_cascade(64), ("lung", "infection")):
        model.save(d / f"{stage}.keras")
    return d / "lung.keras", d / "infection.keras"


# Runs a command and reports ITS peak RSS: the wrapper's RUSAGE_CHILDREN covers that one command only (the pytest
# worker's own RUSAGE_CHILDREN would include every subprocess earlier tests of the worker started).
PEAK_WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
                "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                "sys.exit(code)")


def run_measured(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """`subprocess.run(cmd, capture_output=True, text=True, **kwargs)` and the command's peak RSS in MiB (the
    wrapper's line is removed from stderr)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], capture_output=True, text=True, **kwargs)
    match = re.search(r"^PEAK_KIB (\d+)$", proc.stderr, re.MULTILINE)
    assert match, proc.stderr[-3000:]
    proc.stderr = proc.stderr[:match.start()] + proc.stderr[match.end():]
    return proc, int(match.group(1)) / 1024


def test_fuzz_predict_cli_on_the_corpus_folder(corpus_folder, conv_models, inputs, tmp_path):
    """`predict <folder>`: exit 1 (some inputs fail), no traceback; every input either has its JSON (naming it) or
    one `skipping <path>: <path>: ...` error line; the counts add up."""
    out = tmp_path / "out"
    proc, peak_mb = run_measured([sys.executable, "-m", "covidseg_tf.predict", str(corpus_folder), "--out", str(out),
                                  "--lung-model", str(conv_models[0]), "--infection-model", str(conv_models[1]),
                                  "--quiet"], cwd=REPO, timeout=1800, env=_env(), preexec_fn=_limit_memory(6))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    done = {json.loads(p.read_text())["file"] for p in out.rglob("*.json")}
    skipped = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"ERROR \S+: skipping (\S+): (.*)$", line)  # logger __main__ under python -m
        if m:
            skipped[m.group(1)] = m.group(2)
    every = {str(corpus_folder / n) for n, _ in inputs}
    assert done | set(skipped) == every and not done & set(skipped)
    for path, message in skipped.items():
        assert message.startswith(path), (path, message)  # the message names the file
    assert f"ERROR __main__: {len(skipped)} input(s) failed: " in proc.stderr  # the summary line (--quiet)
    assert peak_mb < 6 * 1024


def test_fuzz_batch_predict_on_the_corpus_folder(corpus_folder, conv_models, inputs, tmp_path):
    """batch_predict on the folder: exit 1, no traceback; every input is in summary.jsonl or dead_letter.jsonl,
    exactly once; each decode failure's reason names the file."""
    out = tmp_path / "out"
    proc, peak_mb = run_measured([sys.executable, "-m", "covidseg_tf.batch_predict", str(corpus_folder), "--output",
                                  str(out), "--lung-model", str(conv_models[0]), "--infection-model",
                                  str(conv_models[1]), "--quiet", "--runner", "DirectRunner"], cwd=REPO,
                                 timeout=1800, env=_env(), preexec_fn=_limit_memory(6))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ok = [json.loads(ln)["file"] for ln in (out / "summary.jsonl").read_text().splitlines() if ln]
    dead = [json.loads(ln) for ln in (out / "dead_letter.jsonl").read_text().splitlines() if ln]
    every = sorted(str(corpus_folder / n) for n, _ in inputs)
    assert sorted(ok + [d["file"] for d in dead]) == every
    for d in dead:
        assert d["stage"] in ("decode", "inference") and d["reason"], d
        if d["stage"] == "decode":
            assert d["reason"].startswith(d["file"]), d
    assert peak_mb < 6 * 1024


SERVE_RUNNER = textwrap.dedent(
    """
    import pickle, sys, time
    import tensorflow as tf
    fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    cases = pickle.load(open(sys.argv[2], "rb"))
    results = []
    for name, data in cases:
        t = time.time()
        try:
            out = {k: v.numpy() for k, v in fn(images=tf.constant([data])).items()}
            results.append(("ok", {k: v.tolist() for k, v in out.items() if not k.endswith("_bytes")
                                   and k != "reason"}, time.time() - t))
        except tf.errors.InvalidArgumentError as e:
            results.append(("InvalidArgumentError", e.message, time.time() - t))
        except BaseException as e:
            results.append(("other", f"{type(e).__name__}: {e}", time.time() - t))
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
    pickle.dump({"results": results, "peak_mb": peak}, open(sys.argv[3], "wb"))
    """
)


def test_fuzz_cascade_serving_signature(inputs, tmp_path):
    """Each input as one request to the exported cascade (TensorFlow's own decoders, not Pillow): a complete
    result within the size policy or an InvalidArgument naming images[0]; the PNG/JPEG seeds are all served
    (CMYK JPEG included, issue 23 item 7)."""
    from helpers import conv_cascade

    from covidseg_tf.export import export_cascade

    path = export_cascade(*conv_cascade(64), tmp_path / "served", decision=0.5, warmup=False)
    (tmp_path / "cases.pkl").write_bytes(pickle.dumps(inputs))
    proc = subprocess.run([sys.executable, "-c", SERVE_RUNNER, str(path), str(tmp_path / "cases.pkl"),
                           str(tmp_path / "o.pkl")], capture_output=True, text=True, timeout=1800, env=_env(),
                          preexec_fn=_limit_memory(6))
    assert proc.returncode == 0, f"the serving process died ({proc.returncode}): {proc.stderr[-3000:]}"
    run = pickle.loads((tmp_path / "o.pkl").read_bytes())
    outcomes = dict(zip((n for n, _ in inputs), run["results"]))
    for name, (kind, detail, seconds) in outcomes.items():
        assert kind in ("ok", "InvalidArgumentError"), (name, detail)
        assert seconds < 20, (name, seconds)
        if kind == "ok":
            assert 1 <= detail["height"][0] <= limits.MAX_SIDE and 1 <= detail["width"][0] <= limits.MAX_SIDE
            assert all(0.0 <= detail[k][0] <= 100.0 for k in ("severity_left", "severity_right", "severity_total"))
        else:
            assert "images[0]" in detail, (name, detail)
    served = {"L.png", "LA.png", "P.png", "P_tRNS.png", "1bit.png", "I16.png", "RGB.png", "RGBA.png", "stored.png",
              "L.jpg", "RGB.jpg", "CMYK.jpg", "progressive.jpg"}
    assert {n for n in served if outcomes[n][0] != "ok"} == set(), {n: outcomes[n][1] for n in served}
    assert "each side must be 1..4096" in outcomes["bomb_12000.png"][1]
    assert sum(k == "ok" for k, _, _ in outcomes.values()) >= 30  # the mutants of PNG/JPEG seeds that still decode
    assert run["peak_mb"] < 3000, run["peak_mb"]

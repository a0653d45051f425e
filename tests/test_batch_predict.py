"""covidseg_tf.batch_predict on Beam's DirectRunner: stems, dead letters and metrics, rerun refusal and --overwrite
(tiny untrained models), and the same masks and severity as `predict` on real Val images (shipped models, slow)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem
from helpers import BAD, GOOD, H, W
from PIL import Image

from covidseg_tf import batch_predict as bp

RUNNER = ["--runner", "DirectRunner"]


# ----------------------------------------------------------------------------------------------- stems (no Beam run)
def test_patterns_prefixes_and_relative_stems(tmp_path):
    assert bp.fixed_prefix("gs://b/x/**/*.png") == "gs://b/x/"
    assert bp.fixed_prefix("gs://b/x/a*.png") == "gs://b/x/"
    assert bp.fixed_prefix("s3://b/x/y.dcm") == "s3://b/x/"
    assert bp.relative_stem("gs://b/x/2020/p1/a.png", "gs://b/x/") == "2020/p1/a"
    assert bp.relative_stem("gs://b/x/noext", "gs://b/x/") == "noext"
    assert bp.relative_stem("gs://b/x/a.b.dcm", "gs://b/x/") == "a.b"
    (tmp_path / "d").mkdir()
    assert bp.normalize_pattern(str(tmp_path / "d")) == f"{tmp_path}/d/**"  # a local folder: everything below
    assert bp.normalize_pattern("gs://b/x/") == "gs://b/x/**"
    assert bp.normalize_pattern("gs://b/x/*.png") == "gs://b/x/*.png"
    rel = bp.normalize_pattern("some/file.png")
    assert os.path.isabs(rel) and rel.endswith("some/file.png")


def test_stems_are_collision_free_and_stable():
    pairs = [("gs://b/x/a.png", "gs://b/x/"), ("gs://b/x/a.dcm", "gs://b/x/"),  # same folder, two extensions
             ("gs://b/y/a.png", "gs://b/y/"),  # the same relative path under a second pattern
             ("gs://b/x/B.png", "gs://b/x/"), ("gs://b/x/b.png", "gs://b/x/"),  # case only
             ("gs://b/x/c.png", "gs://b/x/"), ("gs://b/x/sub/c.png", "gs://b/x/")]
    plan = bp.plan_stems(pairs)
    assert plan["gs://b/x/c.png"] == "c" and plan["gs://b/x/sub/c.png"] == "sub/c"  # no clash: no hash
    for uri in ("gs://b/x/a.png", "gs://b/x/a.dcm", "gs://b/y/a.png"):
        assert plan[uri] == f"a-{bp.uri_hash(uri)}"
    assert plan["gs://b/x/B.png"] == f"B-{bp.uri_hash('gs://b/x/B.png')}"
    assert len({s.lower() for s in plan.values()}) == len(plan)
    assert bp.plan_stems(reversed(pairs)) == plan  # the same inputs always get the same stems
    # a file literally named like another input's hashed stem: both move to full hashes
    uri = "gs://b/x/a.png"
    named = f"gs://b/x/a-{bp.uri_hash(uri)}.png"
    plan = bp.plan_stems([(uri, "gs://b/x/"), ("gs://b/x/a.dcm", "gs://b/x/"), (named, "gs://b/x/")])
    assert plan[uri] == f"a-{bp.uri_hash(uri)}-{bp.uri_hash(uri, 64)}"
    assert plan[named] == f"a-{bp.uri_hash(uri)}-{bp.uri_hash(named, 64)}"
    assert len(set(plan.values())) == 3


def test_match_skips_the_output_and_dead_letters_missing_files(tmp_path):
    d = tmp_path / "in"
    (d / "preds" / "images").mkdir(parents=True)
    (d / "x.png").write_bytes(b"x")
    (d / "preds" / "images" / "x_lung.png").write_bytes(b"y")  # an earlier run's output inside the input folder
    fn = bp.MatchFn(str(d / "preds"))
    assert list(fn.process((3, bp.normalize_pattern(str(d))))) == [(str(d / "x.png"), 3)]
    (missing,) = fn.process((0, str(d / "nope.png")))
    assert missing.tag == "dead_letter"
    assert json.loads(missing.value) == {"file": str(d / "nope.png"), "stage": "match", "reason": "no such file"}
    assert list(fn.process((0, str(d / "*.dcm")))) == []  # a glob may match nothing


def test_beam_flags_pass_through():
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    args, rest = bp.build_parser().parse_known_args(
        ["gs://b/**", "--output", "o", "--overwrite", "--runner", "DirectRunner", "--direct_num_workers", "2",
         "--direct_running_mode", "multi_processing", "--project", "p"])
    assert args.inputs == ["gs://b/**"] and args.overwrite and args.batch_size == bp.DEFAULT_BATCH_SIZE
    opts = PipelineOptions(rest).view_as(DirectOptions)
    assert (opts.direct_num_workers, opts.direct_running_mode) == (2, "multi_processing")
    assert "--project" in rest
    from covidseg_tf.cli import decision_overrides

    args, _ = bp.build_parser().parse_known_args(["x", "--output", "o", "--infection-threshold", "0.3", "--hflip"])
    assert decision_overrides(args) == {"infection_threshold": 0.3, "hflip": True}  # predict's decision flags


def test_bad_decision_is_refused_before_the_pipeline(tmp_path, caplog, capsys):
    with caplog.at_level(logging.ERROR):
        try:
            rc = bp.main([str(tmp_path), "--output", str(tmp_path / "out"), "--threshold", "1.5"] + RUNNER)
        except SystemExit as e:  # the flag's own check (argparse), where config has one
            rc = e.code
    assert rc in (1, 2) and "must be in (0, 1)" in caplog.text + capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- a bucket
BUCKET = "covidsegtest://"


class FakeBucket(LocalFileSystem):
    """``covidsegtest://`` URLs as an object store without folders (like gs:// or s3://), kept in a local folder:
    exercises the paths a bucket takes (prefix listing, remote models, remote outputs) without a network."""

    root: Path | None = None

    @classmethod
    def scheme(cls) -> str:
        return BUCKET.split(":")[0]

    def local(self, url: str) -> str:
        return str(self.root / url[len(BUCKET):])

    def has_dirs(self) -> bool:
        return False

    def join(self, base: str, *parts: str) -> str:
        return "/".join([base.rstrip("/"), *parts])

    def _url_dirname(self, url: str) -> str:
        return url.rsplit("/", 1)[0]

    def _list(self, prefix: str):
        for f in sorted(self.root.rglob("*")):
            url = BUCKET + f.relative_to(self.root).as_posix()
            if f.is_file() and url.startswith(prefix):
                yield FileMetadata(url, f.stat().st_size)

    def exists(self, url: str) -> bool:
        return os.path.isfile(self.local(url))  # objects only: a "folder" is just a prefix

    def metadata(self, url: str) -> FileMetadata:
        return FileMetadata(url, os.path.getsize(self.local(url)))

    def open(self, url, *args, **kwargs):
        return super().open(self.local(url), *args, **kwargs)

    def create(self, url, *args, **kwargs):
        return super().create(self.local(url), *args, **kwargs)

    def delete(self, urls) -> None:
        for u in urls:
            os.remove(self.local(u))


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(FakeBucket, "root", tmp_path / "bucket")
    (tmp_path / "bucket").mkdir()
    return tmp_path / "bucket"


def test_bucket_inputs_models_and_earlier_results(bucket, tiny_models, inputs):
    # inputs: a prefix pattern, the output under the same prefix is skipped, bytes decoded from the bucket
    for rel in ("archive/2020/a.png", "archive/2020/a.dcm", "archive/b.png", "archive/out/images/x_lung.png"):
        (bucket / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(inputs["png8_gray"] if rel.endswith(".png") else inputs["dicom_mono2"], bucket / rel)
    pattern = bp.normalize_pattern(BUCKET + "archive/")
    assert pattern == BUCKET + "archive/**"
    matched = list(bp.MatchFn(BUCKET + "archive/out").process((0, pattern)))
    assert sorted(u for u, _ in matched) == [BUCKET + r for r in ("archive/2020/a.dcm", "archive/2020/a.png",
                                                                  "archive/b.png")]
    stems = bp.plan_stems((u, bp.fixed_prefix(pattern)) for u, _ in matched)
    assert stems[BUCKET + "archive/b.png"] == "b"
    assert stems[BUCKET + "archive/2020/a.png"] == f"2020/a-{bp.uri_hash(BUCKET + 'archive/2020/a.png')}"
    (x,) = bp.ReadDecodeFn(BUCKET + "out/images").process((BUCKET + "archive/b.png", "b"))
    assert x.stem == BUCKET + "out/images/b" and x.gray.shape == (H, W)
    assert x.sha256 == hashlib.sha256(inputs["png8_gray"].read_bytes()).hexdigest()
    (missing,) = bp.MatchFn(BUCKET + "out").process((0, BUCKET + "archive/2020"))  # a prefix is not a file
    assert missing.tag == "dead_letter" and "PREFIX/**" in json.loads(missing.value)["reason"]
    # models in the bucket: copied once per worker, reported by their bucket paths
    (bucket / "models").mkdir()
    for m in tiny_models:
        shutil.copy(m, bucket / "models" / m.name)
    for sub in ("1/saved_model.pb", "1/variables/variables.index", "2/saved_model.pb"):  # a folder's layout
        (bucket / "models" / "base" / sub).parent.mkdir(parents=True, exist_ok=True)
        (bucket / "models" / "base" / sub).write_text(sub)
    local = Path(bp.stage_locally(BUCKET + "models/base/"))
    assert local.name == "base" and sorted(str(f.relative_to(local)) for f in local.rglob("*") if f.is_file()) == [
        "1/saved_model.pb", "1/variables/variables.index", "2/saved_model.pb"]
    assert (local / "1" / "variables" / "variables.index").read_text() == "1/variables/variables.index"
    loaded = bp.CascadeModelHandler(BUCKET + "models/lung.keras", BUCKET + "models/infection.keras").load_model()
    assert loaded.models["lung"]["path"] == BUCKET + "models/lung.keras"
    assert loaded.models["infection"]["sha256"] == hashlib.sha256(tiny_models[1].read_bytes()).hexdigest()
    bp.check_model(BUCKET + "models/base", "--lung-model")  # a prefix holding files is fine
    with pytest.raises(bp.Refused, match="not found"):
        bp.check_model(BUCKET + "models/nothing", "--lung-model")
    # an earlier run's results in the bucket: refused, then --overwrite deletes exactly those its manifest lists
    for rel in ("res/images/2020/a_lung.png", "res/summary.jsonl", "res/notes.txt", "res/images/2020/own.png"):
        (bucket / rel).parent.mkdir(parents=True, exist_ok=True)
        (bucket / rel).write_text("x")
    (bucket / "res" / bp.MANIFEST).write_text("images/2020/a_lung.png\nsummary.jsonl\nseverity.csv\n../notes.txt\n")
    with pytest.raises(bp.Refused, match="4 files"):
        bp.prepare_output(BUCKET + "res", overwrite=False)
    bp.prepare_output(BUCKET + "res", overwrite=True)
    assert sorted(str(f.relative_to(bucket)) for f in bucket.joinpath("res").rglob("*") if f.is_file()) == [
        "res/images/2020/own.png", "res/notes.txt"]


# ----------------------------------------------------------------------------------------------- Beam runs
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two-convolution stage models at 64 px saved as .keras (lung: 3 input channels, infection: 4): the pipeline
    only needs the stages' input and output shapes, and these load and trace in a fraction of a U-Net's time."""
    import keras

    d = tmp_path_factory.mktemp("models")
    for name, channels in (("lung", 3), ("infection", 4)):
        keras.utils.set_random_seed(0)
        x = keras.Input((64, 64, channels))
        y = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.Rescaling(1 / 255)(x))
        keras.Model(x, keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(y), name=name).save(
            d / f"{name}.keras")
    return d / "lung.keras", d / "infection.keras"


@pytest.fixture(scope="module")
def tiny_loaded(tiny_models) -> bp.LoadedCascade:
    """What each worker holds: the tiny cascade loaded by the handler (default decision), shared by the tests."""
    return bp.CascadeModelHandler(*map(str, tiny_models)).load_model()


def test_handler_loads_the_cascade_with_the_decision_and_survives_a_failing_image(tiny_models, tiny_loaded):
    from covidseg_tf.inference import Prediction

    handler = bp.CascadeModelHandler(*map(str, tiny_models), decision={"infection_threshold": 0.3}, max_batch_size=4)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 4}
    loaded = handler.load_model()
    assert loaded.cascade.decision.infection_threshold == 0.3 and loaded.cascade.decision.threshold == 0.5
    assert loaded.models["lung"]["path"] == str(tiny_models[0])
    assert loaded.models["decision"]["infection_threshold"] == 0.3
    ok = np.zeros((H, W), np.uint8)
    batch = [bp.XRay("a", "a", ok), bp.XRay("b", "b", np.zeros((H, W, 3), np.uint8)), bp.XRay("c", "c", ok)]
    results = list(handler.run_inference(batch, tiny_loaded))  # the 3-D image fails the batch: one by one
    assert [type(r[1]) for r in results] == [Prediction, bp.InferenceFailure, Prediction]
    assert [r[0].file for r in results] == ["a", "b", "c"] and results[1][1].reason
    assert handler.get_num_bytes(batch) == sum(x.gray.nbytes for x in batch)


@pytest.fixture(scope="module")
def conv_loaded(tmp_path_factory) -> bp.LoadedCascade:
    """helpers.conv_cascade (dark pixels are lung, brighter ones inside it infection) loaded by the handler: its
    lung maps of chest-X-ray-like phantoms pass the input gate."""
    from helpers import conv_cascade

    d = tmp_path_factory.mktemp("conv_models")
    for model, stage in zip(conv_cascade(64), ("lung", "infection")):
        model.save(d / f"{stage}.keras")
    return bp.CascadeModelHandler(str(d / "lung.keras"), str(d / "infection.keras")).load_model()


def test_a_colour_photo_is_not_assessed_and_an_xray_is(conv_loaded, tmp_path):
    """ReadDecodeFn measures each file's colour share, run_inference hands it to the input gate, WriteOutputsFn
    writes predict's record: a colour photograph is "assessed": false with the reason (empty masks, "not
    assessed" in severity.csv), a chest-X-ray-like phantom in the same batch is graded, its masks predict's."""
    from helpers import phantom

    from covidseg_tf import limits, nonxray
    from covidseg_tf.imageio import decode_image

    images = {"photo.png": nonxray.make("photo"), "xray.png": phantom(90, 80, 2)}
    xrays = []
    for name, image in images.items():
        Image.fromarray(image).save(tmp_path / name)
        xrays += list(bp.ReadDecodeFn(str(tmp_path / "out" / "images")).process((str(tmp_path / name), name[:-4])))
    assert [type(x) for x in xrays] == [bp.XRay, bp.XRay]
    assert xrays[0].colour > limits.MAX_COLOUR_SHARE and xrays[1].colour == 0.0
    handler = bp.CascadeModelHandler("lung.keras", "infection.keras", max_batch_size=2)
    results = list(handler.run_inference(xrays, conv_loaded))
    records = [r for result in results for r in bp.WriteOutputsFn(str(tmp_path / "out")).process(result)
               if isinstance(r, dict)]
    photo, xray = records
    assert photo["assessed"] is False
    assert photo["reason"].startswith("not a frontal chest X-ray: a colour image: "), photo["reason"]
    assert photo["severity"]["grade"] is None and photo["lung_area_px"] == 0
    assert bp.csv_line(photo).endswith(",,,,not assessed,,")  # no head verdict either
    assert not np.asarray(Image.open(tmp_path / "out" / "images" / "photo_lung.png")).any()
    assert xray["assessed"] is True and xray["reason"] is None and xray["severity"]["grade"] != "none"
    decoded = decode_image((tmp_path / "xray.png").read_bytes(), "xray.png")
    pred = conv_loaded.cascade.predict([decoded.gray], colour=[decoded.colour])[0]
    lung = np.asarray(Image.open(tmp_path / "out" / "images" / "xray_lung.png")) > 0
    assert lung.any() and np.array_equal(lung, pred.lung.astype(bool))
    assert xray["severity"]["total"] == pytest.approx(pred.severity_total)


def run_main(capsys, argv: list[str]) -> tuple[int, dict | None]:
    """`batch_predict.main` and the JSON line it printed (None when it printed none)."""
    capsys.readouterr()
    rc = bp.main(argv)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return rc, json.loads(lines[-1]) if lines else None


def read_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln]


@pytest.fixture(scope="module")
def mixed_run(inputs, tiny_models, tmp_path_factory):
    """One run over conftest's folder of every good and bad kind, plus an empty file, a text file, a literal path
    that does not exist and a glob that matches nothing."""
    folder = inputs["png8_gray"].parent
    (folder / "bad" / "empty.png").write_bytes(b"")
    (folder / "bad" / "notes.txt").write_text("not an X-ray\n")
    out = tmp_path_factory.mktemp("batch") / "out"
    missing = folder / "no_such.png"
    lung, inf = tiny_models
    buf = io.StringIO()  # (capsys is function-scoped)
    with contextlib.redirect_stdout(buf):
        rc = bp.main([str(folder), str(missing), f"{folder}/*.nothing", "--output", str(out), "--lung-model", str(lung),
                      "--infection-model", str(inf), "--quiet"] + RUNNER)
    result = json.loads([ln for ln in buf.getvalue().splitlines() if ln.startswith("{")][-1])
    return {"rc": rc, "result": result, "out": out, "folder": folder, "missing": missing}


def test_bad_files_go_to_the_dead_letter_and_good_ones_get_every_output(mixed_run, inputs, tiny_models,
                                                                        tiny_loaded):
    from covidseg_tf.imageio import decode_image

    out, folder = mixed_run["out"], mixed_run["folder"]
    assert mixed_run["rc"] == 1  # some inputs failed
    res = mixed_run["result"]
    bad_files = [inputs[k] for k in BAD] + [folder / "bad" / "empty.png", folder / "bad" / "notes.txt"]
    # metrics: every good file processed, every bad one counted by the stage that rejected it
    assert res["state"] == "DONE"
    assert res["images_ok"] == len(GOOD) and res["images_failed"] == len(bad_files) + 1
    assert res["failed_by_stage"] == {"match": 1, "decode": len(bad_files)}
    assert res["patterns_matching_nothing"] == 1
    dead = {json.loads(ln)["file"]: json.loads(ln) for ln in read_lines(out / bp.DEAD_LETTER)}
    assert set(dead) == {str(f) for f in bad_files} | {str(mixed_run["missing"])}
    assert dead[str(mixed_run["missing"])]["reason"] == "no such file"
    assert "empty file" in dead[str(folder / "bad" / "empty.png")]["reason"]
    assert "no pixel data" in dead[str(inputs["bad_nopixels"])]["reason"]
    for f in bad_files:
        assert dead[str(f)]["stage"] == "decode" and str(f) in dead[str(f)]["reason"]
    # every good file: predict's four outputs at the input size, with predict's record
    summary = {json.loads(ln)["file"]: json.loads(ln) for ln in read_lines(out / bp.SUMMARY)}
    assert set(summary) == {str(inputs[k]) for k in GOOD}
    with open(out / bp.SEVERITY_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(bp.CSV_COLUMNS) and len(rows) == len(GOOD)
    cascade = tiny_loaded.cascade
    for kind in GOOD:
        src = inputs[kind]
        rec = summary[str(src)]
        stem = out / "images" / src.relative_to(folder).with_suffix("")
        assert rec["outputs"]["lung"] == f"{stem}_lung.png"
        assert json.loads(Path(f"{stem}.json").read_text()) == rec
        assert rec["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert rec["size"] == {"height": H, "width": W}
        decoded = decode_image(src.read_bytes(), str(src))
        pred = cascade.predict([decoded.gray], colour=[decoded.colour])[0]  # predict's path: one image per call
        # the input gate decides as in predict's path (random models find no plausible lungs: mostly refused)
        assert rec["assessed"] is pred.assessed and rec["reason"] == (None if pred.assessed else pred.reason)
        for name in ("lung", "infection"):
            mask = np.asarray(Image.open(f"{stem}_{name}.png"))
            assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask > 0, getattr(pred, name).astype(bool))
        assert rec["severity"]["total"] == (pred.severity_total if pred.assessed else None)
        assert Image.open(f"{stem}_overlay.png").size == (W, H)
        assert rec["models"]["lung"]["path"] == str(tiny_models[0]) and len(rec["models"]["lung"]["sha256"]) == 64
    assert res["images_not_assessed"] == sum(not rec["assessed"] for rec in summary.values())
    for row in rows:
        rec = summary[row["file"]]
        if rec["assessed"]:
            assert float(row["severity_total"]) == rec["severity"]["total"]
            assert row["grade"] == rec["severity"]["grade"]
        else:  # not assessed: empty severities, the grade "not assessed"
            assert row["severity_total"] == "" and rec["severity"]["total"] is None
            assert row["grade"] == "not assessed"
    # a.png and a.dcm style clashes do not exist here: no stem got a hash
    assert not list((out / "images").rglob("*-????????.json"))


def test_rerun_is_refused_and_overwrite_replaces_the_earlier_results(mixed_run, inputs, tiny_models, capsys,
                                                                     caplog):
    out = mixed_run["out"]
    lung, inf = tiny_models
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    mine = out / "my_notes.md"  # not a file of a run: never deleted
    mine.write_text("keep me")
    models = ["--lung-model", str(lung), "--infection-model", str(inf), "--quiet"] + RUNNER
    src = inputs["png8_gray"]
    with caplog.at_level(logging.ERROR):
        rc, printed = run_main(capsys, [str(src), "--output", str(out)] + models)
    assert rc == 2 and printed is None  # refused: a usage error
    assert "already holds the results of a run" in caplog.text and "--overwrite" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p != mine} == before  # nothing touched
    # --overwrite: the earlier run's files are deleted first, so only this run's results remain
    rc, printed = run_main(capsys, [str(src), "--output", str(out), "--overwrite"] + models)
    assert rc == 0 and printed["images_ok"] == 1 and printed["images_failed"] == 0
    assert sorted(p.name for p in (out / "images").rglob("*") if p.is_file()) == sorted(
        f"png8_gray{s}" for s in ("_lung.png", "_infection.png", "_overlay.png", ".json"))
    assert [json.loads(ln)["file"] for ln in read_lines(out / bp.SUMMARY)] == [str(src)]
    assert read_lines(out / bp.DEAD_LETTER) == []
    assert len(read_lines(out / bp.SEVERITY_CSV)) == 2  # header + 1
    assert mine.read_text() == "keep me"


def test_overwrite_deletes_only_the_files_a_run_wrote(inputs, tiny_models, tmp_path, capsys):
    """Issue 23: --overwrite deleted a user's own images/2020/*.png and images/notes.txt inside --output."""
    out = tmp_path / "study"
    lung, inf = tiny_models
    models = ["--lung-model", str(lung), "--infection-model", str(inf), "--quiet"] + RUNNER
    src = inputs["png8_gray"]
    rc, _ = run_main(capsys, [str(src), "--output", str(out)] + models)
    assert rc == 0 and (out / bp.MANIFEST).is_file()
    listed = read_lines(out / bp.MANIFEST)
    assert sorted(listed) == sorted([bp.SUMMARY, bp.SEVERITY_CSV, bp.DEAD_LETTER] + [
        f"images/png8_gray{s}" for s in ("_lung.png", "_infection.png", "_overlay.png", ".json")])
    own = [out / "images" / "2020" / "a.png", out / "images" / "notes.txt", out / "images" / "b_lung.png"]
    for f in own:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"mine")
    stale = out / "images" / "png8_gray_overlay.png"
    rc, printed = run_main(capsys, [str(inputs["jpeg"]), "--output", str(out), "--overwrite"] + models)
    assert rc == 0 and printed["images_ok"] == 1
    for f in own:
        assert f.read_bytes() == b"mine"  # the user's files are never touched
    assert not stale.exists()  # the earlier run's own outputs are gone
    assert [json.loads(ln)["file"] for ln in read_lines(out / bp.SUMMARY)] == [str(inputs["jpeg"])]
    # a folder holding only what looks like a run's outputs, but no manifest: --overwrite deletes nothing
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "images" / "x_lung.png").write_bytes(b"mine")
    (other / bp.SUMMARY).write_text("mine")
    with pytest.raises(bp.Refused):
        bp.prepare_output(str(other), overwrite=False)
    bp.prepare_output(str(other), overwrite=True)
    assert (other / "images" / "x_lung.png").read_bytes() == b"mine" and (other / bp.SUMMARY).read_text() == "mine"


def test_pattern_matching_nothing_writes_nothing(tiny_models, tmp_path, capsys):
    """Issue 23: a pattern matching nothing exited 1 but left empty summary files, so the rerun was refused."""
    out = tmp_path / "out"
    lung, inf = tiny_models
    models = ["--lung-model", str(lung), "--infection-model", str(inf), "--quiet"] + RUNNER
    (tmp_path / "x").mkdir()
    rc, _ = run_main(capsys, [str(tmp_path / "x" / "*.png"), "--output", str(out)] + models)
    assert rc == 1
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    bp.prepare_output(str(out), overwrite=False)  # the corrected rerun is not refused


def test_input_inside_output_is_refused(tmp_path, tiny_models, caplog):
    (tmp_path / "out" / "scans").mkdir(parents=True)
    lung, inf = tiny_models
    with caplog.at_level(logging.ERROR):
        rc = bp.main([str(tmp_path / "out" / "scans"), "--output", str(tmp_path / "out"), "--lung-model", str(lung),
                      "--infection-model", str(inf)] + RUNNER)
    assert rc == 2 and "inside --output" in caplog.text


def _awkward_folder(root: Path, png: Path, monkeypatch) -> Path:
    """A folder of one good PNG and everything a walk cannot use: a symlink loop, a dangling link, a FIFO named
    .png, a subfolder that cannot be listed (os.scandir made to fail on it: the tests run as root) and a link to
    a folder; a dangling link with a non-image name too."""
    d = root / "in"
    (d / "locked").mkdir(parents=True)
    shutil.copy(png, d / "good.png")
    shutil.copy(png, d / "locked" / "hidden.png")
    (d / "loop1.png").symlink_to("loop2.png")
    (d / "loop2.png").symlink_to("loop1.png")
    (d / "dangling.png").symlink_to("gone.png")
    os.mkfifo(d / "pipe.png")
    (root / "elsewhere").mkdir()
    (d / "linked").symlink_to(root / "elsewhere")
    real = os.scandir

    def scandir(path=".", *args, **kwargs):
        if str(path).rstrip("/") == str(d / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    return d


AWKWARD = {"loop1.png": "a symbolic link loop", "loop2.png": "a symbolic link loop",
           "dangling.png": "a dangling symbolic link", "pipe.png": "not a regular file (a FIFO)",
           "locked": "cannot list the folder (Permission denied)"}


def test_match_names_what_it_cannot_use(inputs, tmp_path, monkeypatch):
    """Issue 23: symlink loops, dangling links and unlistable subfolders were dropped by the match without a word
    (and a FIFO was matched, to block its reader forever); each is now a dead letter of stage "match" naming the
    path and why. A pattern that cannot reach the unlistable folder does not report it."""
    d = _awkward_folder(tmp_path, inputs["png8_gray"], monkeypatch)
    out = list(bp.MatchFn(str(tmp_path / "out")).process((0, bp.normalize_pattern(str(d)))))
    assert [o for o in out if isinstance(o, tuple)] == [(str(d / "good.png"), 0)]
    dead = {json.loads(o.value)["file"]: json.loads(o.value) for o in out if not isinstance(o, tuple)}
    assert set(dead) == {str(d / n) for n in AWKWARD}
    for name, why in AWKWARD.items():
        assert dead[str(d / name)]["stage"] == "match" and dead[str(d / name)]["reason"].startswith(why), name
    flat = list(bp.MatchFn(str(tmp_path / "out")).process((0, f"{d}/*.png")))
    assert {json.loads(o.value)["file"] for o in flat if not isinstance(o, tuple)} == {
        str(d / n) for n in AWKWARD if n != "locked"}
    (literal,) = bp.MatchFn(str(tmp_path / "out")).process((0, str(d / "pipe.png")))
    assert json.loads(literal.value)["reason"].startswith("not a regular file (a FIFO)")


def test_every_path_it_cannot_use_is_a_dead_letter_of_the_run(inputs, tiny_models, tmp_path, monkeypatch, capsys):
    d = _awkward_folder(tmp_path, inputs["png8_gray"], monkeypatch)
    lung, inf = tiny_models
    rc, res = run_main(capsys, [str(d), "--output", str(tmp_path / "out"), "--lung-model", str(lung),
                                "--infection-model", str(inf), "--quiet"] + RUNNER)
    assert rc == 1
    assert res["images_ok"] == 1 and res["images_failed"] == len(AWKWARD) == res["failed_by_stage"]["match"]
    dead = {json.loads(ln)["file"] for ln in read_lines(tmp_path / "out" / bp.DEAD_LETTER)}
    assert dead == {str(d / n) for n in AWKWARD}


# ----------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.shared_data
def test_real_val_images_match_predict(shared_covidqu, tmp_path, capsys):
    """20 real Val images, the shipped models, two worker processes: the same masks and severity as `predict`.

    Both run TensorFlow with one intra-op thread and one image per cascade call, as predict does: oneDNN's results
    depend on the thread count and on the batch size in the last bits, and a pixel at the threshold can flip (1 of
    19,903 lung pixels of one of these images between 1 and 2 threads, 1 of 9,782 of another between batch 1 and 2).
    """
    val = shared_covidqu / "Infection Segmentation Data" / "Infection Segmentation Data" / "Val"
    files = [p for c in ("COVID-19", "Non-COVID", "Normal") for p in sorted((val / c / "images").glob("*.png"))[:7]]
    files = files[:20]
    d = tmp_path / "val"
    for f in files:  # one folder, as an archive would hold them (names are unique across the classes)
        d.joinpath(f.parent.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d / f.parent.parent.name / f.name)
    inputs = sorted(d.rglob("*.png"))
    rc, res = run_main(capsys, [f"{d}/**.png", "--output", str(tmp_path / "beam"), "--quiet", "--tf-threads", "1",
                                "--batch-size", "1", "--runner", "DirectRunner", "--direct_num_workers", "2",
                                "--direct_running_mode", "multi_processing"])
    assert rc == 0 and res["images_ok"] == 20 and res["images_failed"] == 0
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    ref = subprocess.run([sys.executable, "-m", "covidseg_tf.predict", *map(str, inputs), "--out",
                          str(tmp_path / "ref"), "--quiet"], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    summary = {json.loads(ln)["file"]: json.loads(ln) for ln in read_lines(tmp_path / "beam" / bp.SUMMARY)}
    grades = set()
    for p in inputs:
        ref = json.loads((tmp_path / "ref" / f"{p.stem}.json").read_text())
        stem = tmp_path / "beam" / "images" / p.parent.name / p.stem
        got = json.loads(Path(f"{stem}.json").read_text())
        assert got == summary[str(p)]
        assert got["severity"] == ref["severity"], p.name
        for k in ("size", "lung_area_px", "infection_area_px", "input_sha256", "assessed"):
            assert got[k] == ref[k], (p.name, k)
        assert got["models"] == ref["models"]
        for name in ("lung", "infection"):
            a = np.asarray(Image.open(f"{stem}_{name}.png"))
            b = np.asarray(Image.open(tmp_path / "ref" / f"{p.stem}_{name}.png"))
            np.testing.assert_array_equal(a, b, err_msg=f"{p.name} {name}")
        grades.add(got["severity"]["grade"])
    assert len(grades) > 1  # real predictions, not all "none"


def test_ctrl_c_is_one_line_and_exit_130(tiny_models, tmp_path, monkeypatch, capsys):
    """Issue 23: Ctrl-C while the pipeline runs is one line and exit code 130, not a KeyboardInterrupt traceback."""
    def interrupted_run(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bp, "run", interrupted_run)
    lung, inf = tiny_models
    capsys.readouterr()
    rc = bp.main([str(tmp_path / "*.png"), "--output", str(tmp_path / "out"), "--lung-model", str(lung),
                  "--infection-model", str(inf), "--quiet"])
    assert rc == 130
    out, err = capsys.readouterr()
    assert not out and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m covidseg_tf.batch_predict: interrupted (Ctrl-C); the run did not finish")


def test_bad_flag_values_are_usage_errors(tiny_models, tmp_path, capsys):
    lung, inf = tiny_models
    rc, _ = run_main(capsys, [str(tmp_path / "*.png"), "--output", str(tmp_path / "out"), "--lung-model", str(lung),
                              "--infection-model", str(inf), "--batch-size", "0"])
    assert rc == 2
    rc, _ = run_main(capsys, [str(tmp_path / "*.png"), "--output", str(tmp_path / "out"), "--lung-model",
                              str(tmp_path / "nowhere.keras"), "--infection-model", str(inf)] + RUNNER)
    assert rc == 2 and not (tmp_path / "out").exists()

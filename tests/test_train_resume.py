"""Training runs that stop and start again: a killed run resumes without losing a finished epoch, and a rerun with
other model flags is refused before anything is written (tiny synthetic runs, as tests/test_train.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest
from test_train import REPO, TINY, _rows

from covidseg_tf import train
from covidseg_tf.config import UNET_LAYOUTS, default_config


def _train_cmd(data_dir: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "covidseg_tf.train", "--stage", "lung", *TINY, "--epochs", str(epochs),
            "--data-dir", str(data_dir), "--output", str(out), "--no-export", *extra]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_resume_after_sigkill_loses_no_finished_epoch(synthetic_data_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    cmd = _train_cmd(synthetic_data_dir, out, 3)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (train._backup_epochs(out / "backup") or 0) >= 1:  # the first epoch finished (its row, model, backup)
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed in epoch 2"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _rows(out / "history.csv")
    assert [r["epoch"] for r in first] == ["0"]
    assert (out / "backup").is_dir() and not (out / "DONE").exists()
    started = (out / "config.json").read_text()

    # Reproduction: rerun with another --encoder crashed in Keras ("149 objects could not be loaded") after
    # overwriting config.json. Now it is refused before anything is written.
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main([*cmd[3:], "--encoder", "efficientnetb1"])
    assert e.value.code == 2
    assert "--encoder efficientnetb0 -> efficientnetb1" in capsys.readouterr().err
    assert _snapshot(out) == before

    done = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600)
    assert f"resuming {out} from epoch 2/3 (1 finished epoch(s) restored from {out / 'backup'})" in done.stderr
    rows = _rows(out / "history.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # epoch 0 kept, not redone
    assert rows[0] == first[0]
    assert (out / "DONE").exists() and not (out / "backup").exists()
    assert (out / "config.json").read_text() == started
    assert [json.loads(line)["changed"] for line in (out / "reruns.jsonl").read_text().splitlines()] == [{}]


class _Crash(Exception):
    """Stands for a crash or kill (raised by a patched callback or pipeline)."""


def _crashing(make_overlay_callback):
    """`train.make_overlay_callback` whose callback (the last one) raises _Crash at the end of each epoch: the run is
    killed after its epoch, before it ends."""

    def make(*args, **kwargs):
        callback = make_overlay_callback(*args, **kwargs)

        def on_epoch_end(epoch, logs=None):
            raise _Crash(epoch)

        callback.on_epoch_end = on_epoch_end
        return callback

    return make


@pytest.fixture(scope="module")
def started_run(synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lung run of --epochs 1 that crashed when its input pipeline was made, right after the run folder and its
    config.json were written (cheap: nothing trains)."""
    from covidseg_tf import data

    out = tmp_path_factory.mktemp("started") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "make_pipeline", lambda *args, **kwargs: (_ for _ in ()).throw(_Crash()))
        with pytest.raises(_Crash):
            train.main(_train_cmd(synthetic_data_dir, out, 1)[3:])
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    return out


_LAYOUT = default_config("lung").unet_layout
_OTHER_LAYOUT = next(layout for layout in UNET_LAYOUTS if layout != _LAYOUT)


@pytest.mark.parametrize("flags, diff", [
    (["--encoder", "efficientnetb1"], "--encoder efficientnetb0 -> efficientnetb1"),
    (["--unet-layout", _OTHER_LAYOUT], f"--unet-layout {_LAYOUT} -> {_OTHER_LAYOUT}"),
    (["--image-size", "96"], "--image-size 64 -> 96"),
    (["--lr-schedule", "cosine"], "--lr-schedule constant -> cosine"),
    (["--mixed-precision", "fp16"], "--mixed-precision off -> fp16"),
    (["--stage", "infection", "--lung-masks", "ground_truth"], "--stage lung -> infection"),
    (["--encoder", "efficientnetb1", "--image-size", "96", "--epochs", "3"],
     "--encoder efficientnetb0 -> efficientnetb1, --image-size 64 -> 96"),
])
def test_rerun_with_other_model_flags_is_refused_before_anything_is_written(
        started_run: Path, synthetic_data_dir: Path, tmp_path: Path, flags, diff, capsys):
    import shutil

    run = shutil.copytree(started_run, tmp_path / "run")
    before = _snapshot(run)
    argv = _train_cmd(synthetic_data_dir, run, 1, *flags)[3:]
    if "--stage" in flags:
        argv = argv[2:]  # drop "--stage lung"
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"python -m covidseg_tf.train: error: --output {run} holds a run started with other "
                   f"model flags ({diff}; see {run / 'config.json'}); a run cannot change them (its "
                   "backup and model.keras are that model). Rerun with the run's flags to resume it, or pass "
                   "another --output to start a new run\n")
    assert _snapshot(run) == before


@pytest.mark.slow
def test_rerun_with_other_training_flags_resumes_and_records_them(synthetic_data_dir: Path, tmp_path: Path,
                                                                   caplog):
    """--epochs extends a run and --learning-rate applies (not the rate the backup restores); config.json keeps
    the flags the run was started with, the log and reruns.jsonl say what changed. (Slow: two trainings.)"""
    import logging

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_overlay_callback", _crashing(train.make_overlay_callback))
        with pytest.raises(_Crash):
            train.main(_train_cmd(synthetic_data_dir, out, 1)[3:])
    assert [r["epoch"] for r in _rows(out / "history.csv")] == ["0"]
    assert (out / "backup" / "training_metadata.json").is_file() and not (out / "DONE").exists()
    started = (out / "config.json").read_text()

    caplog.set_level(logging.INFO, logger="covidseg_tf.train")
    train.main(_train_cmd(synthetic_data_dir, out, 2, "--learning-rate", "5e-4")[3:])
    assert f"resuming {out} from epoch 2/2 (1 finished epoch(s) restored from {out / 'backup'})" in caplog.text
    assert (f"flags changed since {out} was started (config.json keeps the original ones): --epochs 1 -> 2, "
            "--learning-rate 0.0001 -> 0.0005") in caplog.text
    rows = _rows(out / "history.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert [round(float(r["learning_rate"]), 8) for r in rows] == [1e-4, 5e-4]
    assert (out / "config.json").read_text() == started
    reruns = [json.loads(line) for line in (out / "reruns.jsonl").read_text().splitlines()]
    assert len(reruns) == 1
    assert reruns[0]["finished_epochs"] == 1
    assert reruns[0]["changed"] == {"--epochs": [1, 2], "--learning-rate": [1e-4, 5e-4]}
    assert (out / "DONE").exists() and not (out / "backup").exists()


_KILL_IN_SAVE = """
import os, signal, sys
import keras
from covidseg_tf import train

original, calls = keras.Model.save, []

def save(self, filepath, *args, **kwargs):  # the second model save is killed halfway through its write
    original(self, filepath, *args, **kwargs)
    calls.append(str(filepath))
    if str(filepath).endswith(".keras") and len(calls) == 2:
        with open(filepath, "r+b") as f:
            f.truncate(os.path.getsize(filepath) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

keras.Model.save = save
sys.argv = ["train", *sys.argv[1:]]
train.cli()
"""


@pytest.mark.slow  # ~3 min: two tiny trainings and an export
def test_kill_during_the_model_write_keeps_a_whole_model_and_every_finished_epoch(synthetic_data_dir: Path,
                                                                                  tmp_path: Path):
    """Issue 23: a kill -9 while model.keras was written left a truncated zip (the rerun crashed at export and
    deleted backup/) and history.csv without the row of an epoch the backup counted as finished."""

    out = tmp_path / "run"
    cmd = _train_cmd(synthetic_data_dir, out, 3)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    killed = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, *cmd[3:]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert zipfile.is_zipfile(out / "model.keras")  # the first epoch's model, whole
    rows = _rows(out / "history.csv")
    finished = train._backup_epochs(out / "backup") or 0
    assert [r["epoch"] for r in rows][:finished] == [str(i) for i in range(finished)]
    assert len(rows) >= finished and finished >= 1

    done = subprocess.run(cmd[:-1], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # + export
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {out} from epoch {finished + 1}/3" in done.stderr
    assert [r["epoch"] for r in _rows(out / "history.csv")] == ["0", "1", "2"]  # none lost, none twice
    assert (out / "DONE").exists() and not (out / "backup").exists()
    assert zipfile.is_zipfile(out / "model.keras") and list((out / "saved_models").rglob("saved_model.pb"))
    assert not list(out.glob(".*partial*"))


_KILL_AT = """
import os, signal, sys
from covidseg_tf import train

where = sys.argv[1]

def killer(make, hook, when):
    def wrapped(*args, **kwargs):
        callback = make(*args, **kwargs)
        original = getattr(callback, hook)

        def hooked(step, logs=None):
            original(step, logs)
            if when(step):
                os.kill(os.getpid(), signal.SIGKILL)

        setattr(callback, hook, hooked)
        return callback
    return wrapped

if where == "mid_epoch":  # in the first epoch, after its second batch: no epoch finished yet
    train.make_lr_logger = killer(train.make_lr_logger, "on_train_batch_end", lambda batch: batch == 1)
else:  # "after_history_row": epoch 2's row is on disk, its model and backup are not
    train.make_history_logger = killer(train.make_history_logger, "on_epoch_end", lambda epoch: epoch == 1)
sys.argv = ["train", *sys.argv[2:]]
train.cli()
"""


@pytest.mark.slow  # ~2 min each: a killed tiny run and its resumption
@pytest.mark.parametrize("where, finished, rows_left", [("mid_epoch", 0, []), ("after_history_row", 1, ["0", "1"])])
def test_kill_at_other_points_resumes_without_a_lost_or_doubled_epoch(synthetic_data_dir: Path, tmp_path: Path,
                                                                      where, finished, rows_left):
    """Issue 23: a real (tiny) run killed at several points resumes. With the backup-appears kill
    (test_resume_after_sigkill_loses_no_finished_epoch) and the kill inside the model write (above), these two:
    in the middle of the first epoch (nothing finished: the rerun starts at epoch 1) and right after an epoch's
    history row was written but before its model and backup (the rerun drops that row and trains the epoch
    again, so history.csv never holds an epoch twice)."""
    out = tmp_path / "run"
    cmd = _train_cmd(synthetic_data_dir, out, 3)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AT, where, *cmd[3:]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (train._backup_epochs(out / "backup") or 0) == finished
    rows = [r["epoch"] for r in _rows(out / "history.csv")] if (out / "history.csv").exists() else []
    assert rows == rows_left
    assert (out / "config.json").is_file() and not (out / "DONE").exists()

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    if finished:
        assert f"resuming {out} from epoch {finished + 1}/3" in done.stderr
        assert "dropped 1 row(s) of" in done.stderr  # the row of the epoch the backup did not count
    else:
        assert f"restarting {out} from epoch 1: no finished epoch" in done.stderr
    assert [r["epoch"] for r in _rows(out / "history.csv")] == ["0", "1", "2"]  # none lost, none twice
    assert (out / "DONE").exists() and not (out / "backup").exists()
    assert zipfile.is_zipfile(out / "model.keras")


@pytest.mark.slow  # two tiny trainings
def test_run_started_before_the_fast_layers_resumes_with_keras_classes(synthetic_data_dir: Path, tmp_path: Path,
                                                                       caplog):
    """A run started when build_unet built Keras' own UpSampling2D / GlobalAveragePooling2D / 1x1 Conv2D (before
    covidseg_tf.fast_layers) and a decoder of separate upsampling, concat and conv layers (before UpsamplingConv2D)
    resumes: its backup addresses layers by class and position, so the resumed model is the graph it saved."""
    import logging

    from covidseg_tf import models

    def old_decoder_block(x, skip, filters, stage):  # build_unet's decoder stage before UpsamplingConv2D
        x = keras.layers.UpSampling2D(size=2, name=f"decoder_stage{stage}_upsampling")(x)
        if skip is not None:
            x = keras.layers.Concatenate(axis=-1, name=f"decoder_stage{stage}_concat")([x, skip])
        x = models.conv3x3_bn_relu(x, filters, name=f"decoder_stage{stage}a")
        return models.conv3x3_bn_relu(x, filters, name=f"decoder_stage{stage}b")

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_overlay_callback", _crashing(train.make_overlay_callback))
        mp.setattr(models, "faster_class", lambda layer: type(layer))  # the build before fast_layers
        mp.setattr(models, "decoder_block", old_decoder_block)
        with pytest.raises(_Crash):
            train.main(_train_cmd(synthetic_data_dir, out, 1)[3:])
    started = train._saved_layer_classes(out / "model.keras")
    assert keras.layers.UpSampling2D in started.values() and (out / "backup").is_dir()

    caplog.set_level(logging.INFO, logger="covidseg_tf.train")
    train.main(_train_cmd(synthetic_data_dir, out, 2)[3:])
    assert "the resumed run keeps that graph" in caplog.text
    assert [r["epoch"] for r in _rows(out / "history.csv")] == ["0", "1"]
    # the same classes; names may not be (Keras numbers unnamed layers per process: "rescaling_1" when rebuilt)
    resumed = train._saved_layer_classes(out / "model.keras")
    assert (out / "DONE").exists() and Counter(resumed.values()) == Counter(started.values())


def _classes(model: keras.Model) -> dict[str, type]:
    return {layer.name: type(layer) for layer in model.layers}


def test_a_resumed_model_is_rebuilt_with_the_layer_classes_its_run_saved(tmp_path: Path):
    """Each layer whose class differs from the one the run's model.keras names is rebuilt as that class (Keras'
    built-in ones and covidseg_tf's registered ones, per layer: half the BatchNorms are Keras'), with the built
    model's weights; a model saved with the classes it has is kept as it is."""
    from covidseg_tf.batchnorm import FusedBatchNormalization
    from covidseg_tf.fast_layers import plain_class, with_layer_classes
    from covidseg_tf.models import build_stage_model

    model = build_stage_model(default_config("infection").replace(image_size=32, encoder_weights="none"))
    keras_bns = [layer.name for layer in model.layers if isinstance(layer, FusedBatchNormalization)][::2]
    older = with_layer_classes(model, lambda layer: keras.layers.BatchNormalization if layer.name in keras_bns
                               else plain_class(layer))  # as if started before fast_layers, half with keras' BN
    swapped = {cls.__name__ for name, cls in _classes(older).items() if cls is not type(model.get_layer(name))}
    assert swapped == {"GlobalAveragePooling2D", "Conv2D", "BatchNormalization", "DepthwiseConv2D", "Multiply",
                       "ZeroPadding2D"}  # the upsamplings: UpsamplingConv2D
    assert FusedBatchNormalization in _classes(older).values()
    older.save(tmp_path / "older.keras")
    model.save(tmp_path / "model.keras")
    assert train._saved_layer_classes(tmp_path / "older.keras") == _classes(older)

    for built, saved, path in ((model, older, "older.keras"), (older, model, "model.keras")):
        rebuilt = train._with_saved_layer_classes(built, tmp_path / path)
        assert _classes(rebuilt) == _classes(saved) != _classes(built)
        weights = built.get_weights()
        assert len(rebuilt.get_weights()) == len(weights)
        assert all(np.array_equal(a, b) for a, b in zip(rebuilt.get_weights(), weights))
    assert train._with_saved_layer_classes(model, tmp_path / "model.keras") is model


def _keras_file(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_layers_without_a_resolvable_saved_class_stay_as_built(tmp_path: Path):
    """A missing or unreadable model.keras names no classes; a saved class that does not resolve (unregistered,
    absent from Keras, outside Keras, not a layer) and a layer in only one of the two models leave it as built."""
    from covidseg_tf.fast_layers import NearestUpSampling2D

    (tmp_path / "corrupt.keras").write_bytes(b"not a zip")
    for path in (tmp_path / "missing.keras", tmp_path / "corrupt.keras",
                 _keras_file(tmp_path / "no_config.keras", {"metadata.json": "{}"}),
                 _keras_file(tmp_path / "bad_json.keras", {"config.json": "{"}),
                 _keras_file(tmp_path / "no_layers.keras", {"config.json": "[]"})):
        assert train._saved_layer_classes(path) == {}, path.name

    def entry(name: str, module: str, class_name: str, registered_name: str | None = None) -> dict:
        return {"module": module, "class_name": class_name, "registered_name": registered_name, "name": name,
                "config": {"name": name}}

    layers = [entry("up", "keras.layers", "UpSampling2D"),
              {**entry("fast", "covidseg_tf.fast_layers", "NearestUpSampling2D", "covidseg_tf>NearestUpSampling2D"),
               "name": None},  # its name only in its config
              entry("gone", "covidseg_tf.gone", "Gone", "covidseg_tf>Gone"),
              entry("absent", "keras.layers", "NoSuchLayer"),
              entry("outside", "os", "PathLike"),
              entry("function", "keras.layers", "add"),
              entry("saved_only", "keras.layers", "ReLU")]
    path = _keras_file(tmp_path / "model.keras", {"config.json": json.dumps({"config": {"layers": layers}})})
    assert train._saved_layer_classes(path) == {"up": keras.layers.UpSampling2D, "fast": NearestUpSampling2D,
                                                "saved_only": keras.layers.ReLU}

    x = inputs = keras.Input((2, 2, 1), name="pixels")
    for name in ("up", "gone", "absent", "outside", "function"):
        x = NearestUpSampling2D(name=name)(x)
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, name="built_only")(x))
    rebuilt = train._with_saved_layer_classes(model, path)
    assert _classes(rebuilt) == {**_classes(model), "up": keras.layers.UpSampling2D}


def test_a_run_started_before_the_decoders_upsampling_conv_keeps_its_graph(tmp_path: Path):
    """Its model.keras has separate decoder_stage*_upsampling / _concat layers, which the code no longer builds and
    its backup addresses: the resumed run trains that graph, loaded, not the one the code builds."""
    x = inputs = keras.Input((4, 4, 2), name="pixels")
    skip = keras.layers.Conv2D(3, 1, name="skip")(x)
    up = keras.layers.UpSampling2D(name="decoder_stage0_upsampling")(keras.layers.MaxPooling2D(name="down")(skip))
    cat = keras.layers.Concatenate(name="decoder_stage0_concat")([up, skip])
    old = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same", name="decoder_stage0a_conv")(cat))
    old.save(tmp_path / "model.keras")
    built = keras.Model(inputs, keras.layers.Conv2D(1, 1, name="decoder_stage0a_conv")(x))
    resumed = train._with_saved_layer_classes(built, tmp_path / "model.keras")
    assert [layer.name for layer in resumed.layers] == [layer.name for layer in old.layers]
    assert resumed is not built
    np.testing.assert_allclose(resumed.get_layer("decoder_stage0a_conv").kernel,
                               old.get_layer("decoder_stage0a_conv").kernel)

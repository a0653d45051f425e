"""Training CLI end to end on the synthetic phantoms (tiny: 64 px, EfficientNet-B0, a few steps)."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covidseg_tf import train
from covidseg_tf.config import StageConfig, default_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "covid_qu_ex/synthetic", "--image-size", "64", "--encoder", "efficientnetb0",
        "--encoder-weights", "none", "--batch-size", "8", "--steps-per-epoch", "2", "--validation-steps", "2",
        "--seed", "1"]
# TINY for train.train_stage: the StageConfig fields and the run arguments
TINY_RUN = {"steps_per_epoch": 2, "validation_steps": 2, "seed": 1}


def tiny(stage: str, **changes) -> StageConfig:
    """The seed config of `stage` with TINY's settings (and `changes`)."""
    settings = {"dataset": "covid_qu_ex/synthetic", "image_size": 64, "encoder": "efficientnetb0",
                "encoder_weights": "none", "batch_size": 8}
    return default_config(stage).replace(**{**settings, **changes})


def _rows(history: Path) -> list[dict[str, str]]:
    with open(history, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lung_run(synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lung")
    summary = train.train_stage(tiny("lung", epochs=2), output=root / "run", data_dir=synthetic_data_dir,
                                export_dir=root / "saved_models", **TINY_RUN)
    return {"root": root, **summary}


def test_lung_stage_trains_saves_and_exports(lung_run: dict):
    run = Path(lung_run["run"])
    assert (run / "model.keras").is_file() and (run / "DONE").is_file()
    rows = _rows(run / "history.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for key in ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou", "learning_rate"):
        assert key in rows[0], key
    assert 0.0 <= lung_run["best_val_dice"] <= 1.0
    assert lung_run["best_val_dice"] == max(float(r["val_dice"]) for r in rows)
    saved = Path(lung_run["saved_model"])
    assert saved == lung_run["root"] / "saved_models" / "lung" / "1" and (saved / "saved_model.pb").is_file()


def test_tensorboard_logs_hold_scalars_and_overlay_images(lung_run: dict):
    import tensorflow as tf

    logs = Path(lung_run["run"]) / "logs"
    tags: dict[str, set[str]] = {}
    for event_file in logs.rglob("events.out.tfevents.*"):
        sub = event_file.parent.name
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                tags.setdefault(sub, set()).add(value.tag)
    assert {"epoch_loss", "epoch_dice", "epoch_iou", "epoch_learning_rate"} <= tags["train"]
    assert {"epoch_loss", "epoch_dice", "epoch_iou"} <= tags["validation"]
    assert "validation/image_truth_prediction" in tags["images"]


def test_infection_stage_uses_the_stage1_model(lung_run: dict, synthetic_data_dir: Path, tmp_path: Path):
    summary = train.train_stage(tiny("infection", epochs=1), output=tmp_path / "run", data_dir=synthetic_data_dir,
                                lung_model=lung_run["model"], **TINY_RUN)
    run = Path(summary["run"])
    assert len(_rows(run / "history.csv")) == 1
    assert list((run / "stage1_masks").glob("*.tfrecord")), "Stage-1 masks were not cached"
    # without --export-dir the SavedModel goes into the run folder, never into the repository's saved_models/
    assert Path(summary["saved_model"]) == run / "saved_models" / "infection" / "1"
    # a finished run is never silently retrained: a UsageError, exit code 2 on the command line
    with pytest.raises(train.UsageError, match="holds a finished run"):
        train.train_stage(tiny("infection"), output=run, data_dir=synthetic_data_dir, lung_model=lung_run["model"])
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "infection", *TINY, "--data-dir", str(synthetic_data_dir), "--lung-model",
                    lung_run["model"], "--output", str(run)])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["--stage", "lung", "--image-size", "100"], "--image-size must be a positive multiple of 32"),
    (["--stage", "lung", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--stage", "lung", "--epochs", "0"], "--epochs must be positive"),
    (["--stage", "infection", "--clipnorm", "-1"], "--clipnorm must be positive"),
    (["--stage", "infection"], "needs --lung-model PATH"),
    (["--stage", "infection", "--lung-model", "nowhere/model.keras"],
     "--lung-model nowhere/model.keras does not exist; train Stage 1 first"),
    (["--stage", "nose"], "invalid choice: 'nose'"),
    (["--stage", "lung", "--lr-schedule", "step"], "--lr-schedule must be one of constant, cosine, got step"),
    (["--stage", "lung", "--encoder", "efficientnetb99"],
     "--encoder must be one of efficientnetb0, efficientnetb1, efficientnetb2, efficientnetb3, efficientnetb4, "
     "efficientnetb5, efficientnetb6, efficientnetb7, got efficientnetb99"),
    (["--stage", "lung", "--encoder-weights", "nowhere/enc.h5"], "--encoder-weights nowhere/enc.h5: "),
])
def test_bad_flags_give_clear_errors(argv, message, capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--output", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # checked before the run folder is created


def test_output_that_is_a_file_is_refused(capsys, tmp_path: Path):
    (tmp_path / "taken").write_text("not a folder")
    for output in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(SystemExit) as e:
            train.main(["--stage", "lung", "--output", str(output)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == (f"python -m covidseg_tf.train: error: --output {output}: {tmp_path / 'taken'} is a file; "
                       "--output takes a run folder (created if missing)\n")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_lung_model_that_is_not_a_model_is_a_usage_error(capsys, tmp_path: Path):
    """A file that exists but is no Keras model (random bytes named .keras): one error line naming it, exit 2."""
    bad = tmp_path / "random.keras"
    bad.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "infection", *TINY, "--lung-model", str(bad), "--output", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"python -m covidseg_tf.train: error: --lung-model: {bad}: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["png", "text_named_keras", "zip_named_keras"])
def test_encoder_weights_that_are_no_weights_are_a_usage_error_before_the_run_folder(
        kind, synthetic_data_dir: Path, capsys, tmp_path: Path):
    """Issue 23: --encoder-weights naming a PNG or a .keras file that is no Keras model was accepted (the file
    exists), the run folder and its config.json were written, and the weights load ended in a traceback. Now one
    `error:` line, exit 2, nothing created; a non-zip .keras is said to be no zip archive (not "File not found")."""
    import zipfile

    from PIL import Image

    weights = tmp_path / {"png": "x.png", "text_named_keras": "x.keras", "zip_named_keras": "z.keras"}[kind]
    expect = {"png": "cannot load encoder weights from", "text_named_keras": "not a zip archive",
              "zip_named_keras": "no config.json"}[kind]
    if kind == "png":
        Image.new("L", (8, 8)).save(weights)
    elif kind == "text_named_keras":
        weights.write_text("not a model\n")
    else:
        with zipfile.ZipFile(weights, "w") as z:
            z.writestr("notes.txt", "a zip, but no Keras model")
    i = TINY.index("--encoder-weights")
    argv = ["--stage", "lung", *TINY[:i], *TINY[i + 2:], "--encoder-weights", str(weights), "--data-dir",
            str(synthetic_data_dir), "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "File not found" not in err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    assert lines[0].startswith(f"python -m covidseg_tf.train: error: --encoder-weights {weights}: "), lines[0]
    assert expect in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_lung_model_folder_is_refused(capsys, tmp_path: Path):
    (tmp_path / "lung" / "1").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "infection", "--lung-model", str(tmp_path / "lung"), "--output", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "is a folder; it takes the Stage-1 .keras file" in capsys.readouterr().err


def test_defaults_come_from_the_stage_config():
    from covidseg_tf.config import INFECTION, LUNG

    args = train.build_parser().parse_args(["--stage", "infection"])
    assert train.config_from_args(args) == INFECTION
    args = train.build_parser().parse_args(["--stage", "lung", "--epochs", "3", "--image-size", "128"])
    assert train.config_from_args(args) == LUNG.replace(epochs=3, image_size=128)
    args = train.build_parser().parse_args(["--stage", "infection", "--clipnorm", "none"])
    assert train.config_from_args(args).clipnorm is None
    assert "default: 15 / 50" in train.build_parser().format_help().replace("\n", " ").replace("  ", " ")


def test_cosine_schedule_decays_to_zero_over_all_epochs():
    import numpy as np
    import tensorflow as tf

    from covidseg_tf.config import LUNG

    ds = tf.data.Dataset.range(10).batch(4)  # 3 steps per epoch
    assert train.make_learning_rate(LUNG, ds, None) == LUNG.learning_rate  # the seed: constant
    cfg = LUNG.replace(lr_schedule="cosine", learning_rate=1e-3, epochs=5)
    schedule = train.make_learning_rate(cfg, ds, None)
    lr = [float(schedule(step)) for step in (0, 7, 15)]
    assert np.isclose(lr[0], 1e-3) and 0 < lr[1] < 1e-3 and lr[2] == 0.0
    assert float(train.make_learning_rate(cfg, ds.repeat(), 2)(10)) == 0.0  # --steps-per-epoch 2: 10 steps


def test_missing_real_data_says_where_to_put_it(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "covidseg_tf.train", "--stage", "lung", "--dataset", "covid_qu_ex/infection",
         "--data-dir", str(tmp_path / "tfds"), "--manual-dir", str(tmp_path / "empty"), "--output",
         str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "anasmohammedtahir/covidqu" in proc.stderr and str(tmp_path / "empty") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_ends_a_builder_data_error_with_one_line(monkeypatch, tmp_path: Path):
    """The builder's own CovidQuExDataError (here: --manual-dir is a file but no zip) is one error line, and the
    run folder is not created."""
    not_zip = tmp_path / "covidqu.zip"
    not_zip.write_bytes(b"not a zip")
    monkeypatch.setattr(sys, "argv", [
        "train", "--stage", "lung", "--dataset", "covid_qu_ex/infection", "--encoder-weights", "none", "--data-dir",
        str(tmp_path / "tfds"), "--manual-dir", str(not_zip), "--output", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as e:
        train.cli()
    assert e.value.code == (f"error: manual_dir {not_zip} is a file but not a readable zip (incomplete download?); "
                            "it takes the Kaggle zip itself or a folder holding the zip or its extracted files")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # three minutes on 2 cores: a distribution strategy most users never pick
def test_mirrored_strategy_on_two_logical_cpus(synthetic_data_dir: Path, tmp_path: Path):
    script = (
        "import tensorflow as tf, sys\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from covidseg_tf import train\n"
        "s = train.main(sys.argv[1:])\n"
        "import json; print('SUMMARY', json.dumps({k: str(v) for k, v in s.items()}))\n"
        "print('REPLICAS', train.make_strategy('mirrored').num_replicas_in_sync)\n"
    )
    argv = ["--stage", "lung", *TINY, "--epochs", "1", "--data-dir", str(synthetic_data_dir), "--output",
            str(tmp_path / "run"), "--no-export", "--strategy", "mirrored"]
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REPLICAS 2" in proc.stdout
    assert len(_rows(tmp_path / "run" / "history.csv")) == 1


def test_loss_weights_flag_replaces_the_stage_weights():
    from covidseg_tf.config import INFECTION, LUNG

    parse = train.build_parser().parse_args
    cfg = train.config_from_args(parse(["--stage", "lung", "--loss-weights", "dice=0.5,bce=0.3,focal=0.2"]))
    assert cfg == LUNG.replace(loss_weights={"dice": 0.5, "bce": 0.3, "focal": 0.2})
    cfg = train.config_from_args(parse(["--stage", "infection", "--loss-weights", " focal = 2 "]))
    assert cfg.loss_weights == {"focal": 2.0}  # unnamed terms get 0: the stage's dice and bce are dropped
    assert cfg == INFECTION.replace(loss_weights={"focal": 2.0})
    cfg = train.config_from_args(parse(["--stage", "infection", "--loss-weights", "dice=1,bce=0"]))
    assert cfg.loss_weights == {"dice": 1.0, "bce": 0.0}


AUG_FLAGS = ["--aug-hflip-p", "--aug-shift", "--aug-scale", "--aug-rotate-deg", "--aug-affine-p", "--aug-brightness",
             "--aug-contrast", "--aug-brightness-contrast-p", "--aug-noise-std", "--aug-noise-p"]


def test_one_augment_flag_per_field_and_the_config_reflects_them():
    import dataclasses

    from covidseg_tf.config import LUNG, AugmentConfig

    parser = train.build_parser()
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--aug-")]
    assert flags == AUG_FLAGS
    assert len(AUG_FLAGS) == len(dataclasses.fields(AugmentConfig))
    argv = ["--stage", "lung", "--aug-hflip-p", "0", "--aug-shift", "0.05", "--aug-scale", "0.2",
            "--aug-rotate-deg", "30", "--aug-affine-p", "1", "--aug-brightness", "0.1", "--aug-contrast", "0",
            "--aug-brightness-contrast-p", "0.25", "--aug-noise-std", "0.01,0.02", "--aug-noise-p", "0.75"]
    cfg = train.config_from_args(parser.parse_args(argv))
    want = AugmentConfig(hflip_p=0.0, shift=0.05, scale=0.2, rotate_deg=30.0, affine_p=1.0, brightness=0.1,
                         contrast=0.0, brightness_contrast_p=0.25, noise_std=(0.01, 0.02), noise_p=0.75)
    assert cfg.augment == want
    assert cfg == LUNG.replace(augment=want)
    # one flag changes one field, the others keep the stage's values
    cfg = train.config_from_args(parser.parse_args(["--stage", "infection", "--aug-rotate-deg", "5"]))
    assert cfg.augment == AugmentConfig(rotate_deg=5.0)


def test_new_flags_show_the_config_defaults_in_help():
    helps = {a.option_strings[0]: a.help for a in train.build_parser()._actions if a.option_strings}
    assert helps["--loss-weights"] == ("loss = sum of weight x term over dice, image_dice, bce, focal; unnamed "
                                       "terms get 0 (default: dice=0.7,bce=0.3 / dice=0.5,bce=0.3,focal=0.2)")
    assert helps["--aug-hflip-p"] == "probability of HorizontalFlip; default: 0.5"
    assert helps["--aug-rotate-deg"] == "Affine rotation limit in degrees (+-); default: 15"
    # the seed's GaussNoise var_limit (10, 50) on 0-255 pixels, as a std range over 255
    assert helps["--aug-noise-std"] == ("GaussNoise std range, fraction of the 0-255 range; "
                                        f"default: {10 ** 0.5 / 255:g},{50 ** 0.5 / 255:g}")
    assert helps["--aug-noise-std"].endswith("default: 0.0124011,0.0277297")


@pytest.mark.parametrize("argv, message", [
    (["--loss-weights", "dce=1"],
     "argument --loss-weights: unknown loss term 'dce'; known terms: dice, image_dice, bce, focal"),
    (["--loss-weights", "dice=0.5,bce=-0.1"],
     "argument --loss-weights: weight of 'bce' must be zero or more, got -0.1"),
    (["--loss-weights", "dice=0,bce=0"],
     "argument --loss-weights: at least one loss weight must be positive, got 'dice=0,bce=0'"),
    (["--loss-weights", "dice"], "argument --loss-weights: expected TERM=WEIGHT pairs separated by commas "
                                 "(e.g. dice=0.5,bce=0.3,focal=0.2), got 'dice'"),
    (["--loss-weights", "dice=x"], "argument --loss-weights: expected TERM=WEIGHT pairs"),
    (["--loss-weights", "dice=1,dice=2"], "argument --loss-weights: loss term 'dice' given twice in 'dice=1,dice=2'"),
    (["--aug-hflip-p", "1.5"], "--aug-hflip-p must be a probability in [0, 1], got 1.5"),
    (["--aug-noise-p", "-0.5"], "--aug-noise-p must be a probability in [0, 1], got -0.5"),
    (["--aug-rotate-deg", "-3"], "--aug-rotate-deg must be zero or more, got -3"),
    (["--aug-scale", "1"], "--aug-scale must be in [0, 1) (the zoom factor 1-X must stay positive), got 1"),
    (["--aug-noise-std", "0.2,0.1"], "--aug-noise-std must be LO,HI with 0 <= LO <= HI <= 1, got 0.2,0.1"),
    (["--aug-noise-std", "0.1,2"], "--aug-noise-std must be LO,HI with 0 <= LO <= HI <= 1, got 0.1,2"),
    (["--aug-noise-std", "0.1"], "argument --aug-noise-std: expected two numbers LO,HI, got '0.1'"),
    (["--aug-shift", "a"], "argument --aug-shift: invalid float value: 'a'"),
])
def test_loss_weights_and_augment_flags_give_clear_errors(argv, message, capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "lung", *argv, "--output", str(tmp_path / "run")])
    assert e.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing is started on a bad flag


def test_every_stage_config_field_is_a_train_flag():
    """The README promises it: every StageConfig field is a flag (`in_channels` follows from --stage)."""
    import dataclasses

    from covidseg_tf.config import StageConfig

    flags = {s for a in train.build_parser()._actions for s in a.option_strings}
    for f in dataclasses.fields(StageConfig):
        if f.name in ("stage", "in_channels"):
            continue
        wanted = AUG_FLAGS if f.name == "augment" else ["--" + f.name.replace("_", "-")]
        missing = [flag for flag in wanted if flag not in flags]
        assert not missing, f"StageConfig.{f.name} has no train flag {missing} (README, Training, promises one)"


@pytest.mark.parametrize("threshold, tinted", [(0.5, True), (0.7, False)])
def test_overlays_threshold_at_the_runs_threshold(threshold: float, tinted: bool, tmp_path: Path):
    """The prediction column of the TensorBoard overlays is the mask at the run's --threshold: a model answering
    0.6 everywhere is tinted red at 0.5 and not at 0.7."""
    import keras
    import numpy as np
    import tensorflow as tf

    model = keras.Sequential([keras.layers.Input((8, 8, 3)),
                              keras.layers.Lambda(lambda t: keras.ops.zeros_like(t[..., :1]) + 0.6)])
    x = tf.fill((2, 8, 8, 3), 128.0)
    callback = train.make_overlay_callback(tmp_path, (x, tf.zeros((2, 8, 8, 1))), threshold)
    callback.set_model(model)
    callback.on_epoch_end(0)
    (event_file,) = (tmp_path / "images").glob("events.out.tfevents.*")
    pngs = [v.tensor.string_val[2] for e in tf.compat.v1.train.summary_iterator(str(event_file))
            for v in e.summary.value if v.tag == "validation/image_truth_prediction"]
    grid = tf.io.decode_png(pngs[0]).numpy().astype(int)  # rows of image | truth | prediction
    image, truth, prediction = np.split(grid, 3, axis=1)
    np.testing.assert_array_equal(truth, image)  # an empty truth mask: no tint
    assert (prediction[..., 0] > prediction[..., 1] + 50).all() if tinted else (prediction == image).all()


class _Crash(Exception):
    """Stands for a crash right after the run folder was started (raised by a patched input pipeline)."""


def test_train_stage_is_what_the_cli_runs(synthetic_data_dir: Path, tmp_path: Path, monkeypatch):
    """The command line and the Python API start the same run: the same config.json (the StageConfig and the run
    arguments), written before anything trains (the input pipeline is patched to crash, so nothing does)."""
    import json

    from covidseg_tf import data

    monkeypatch.setattr(data, "make_pipeline", lambda *args, **kwargs: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        train.main(["--stage", "lung", *TINY, "--epochs", "3", "--bn-momentum", "0.95", "--aug-hflip-p", "0",
                    "--data-dir", str(synthetic_data_dir), "--output", str(tmp_path / "cli"), "--no-export"])
    cfg = tiny("lung", epochs=3, bn_momentum=0.95)
    cfg = cfg.replace(augment=dataclasses.replace(cfg.augment, hflip_p=0.0))
    with pytest.raises(_Crash):
        train.train_stage(cfg, output=tmp_path / "api", data_dir=synthetic_data_dir, export=False, **TINY_RUN)
    cli, api = (json.loads((tmp_path / name / train.CONFIG_FILE).read_text()) for name in ("cli", "api"))
    assert cli["config"] == api["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert cli["args"].pop("output") == str(tmp_path / "cli") and api["args"].pop("output") == str(tmp_path / "api")
    assert cli["args"] == api["args"]
    assert api["args"] == {**json.loads(json.dumps(dataclasses.asdict(train.RunArgs()))), **TINY_RUN,
                           "data_dir": str(synthetic_data_dir), "no_export": True}
    # the API's rerun is checked against the CLI's run like any rerun: the encoder cannot change
    with pytest.raises(train.UsageError, match="--encoder efficientnetb0 -> efficientnetb1"):
        train.train_stage(cfg.replace(encoder="efficientnetb1"), output=tmp_path / "cli",
                          data_dir=synthetic_data_dir, export=False, **TINY_RUN)


@pytest.mark.parametrize("config, kwargs, message", [
    (tiny("lung", image_size=100), {}, "--image-size must be a positive multiple of 32, got 100"),
    (tiny("lung", encoder="efficientnetb99"), {}, "--encoder must be one of efficientnetb0, "),
    (tiny("lung").replace(in_channels=4), {}, "in_channels 4 does not fit --stage lung, which takes 3"),
    (tiny("lung", loss_weights={"dice": 1.0, "dce": 1.0}), {},
     "--loss-weights: unknown loss term 'dce'; known terms: dice, image_dice, bce, focal"),
    (tiny("lung", loss_weights={"dice": 0.0, "bce": 0.0}), {},
     "--loss-weights: at least one loss weight must be positive, got dice=0,bce=0"),
    (tiny("lung", augment=dataclasses.replace(default_config("lung").augment, hflip_p=2.0)), {},
     "--aug-hflip-p must be a probability in [0, 1], got 2"),
    (tiny("lung"), {"steps_per_epoch": 0}, "--steps-per-epoch must be positive, got 0"),
    (tiny("lung"), {"strategy": "ring"}, "--strategy must be one of auto, mirrored, multiworker, got ring"),
    (tiny("lung"), {"mixed_precision": "fp8"}, "--mixed-precision must be one of off, bf16, fp16, got fp8"),
    (tiny("infection"), {}, "--lung-masks stage1 (the default) needs --lung-model PATH"),
    (tiny("infection"), {"lung_masks": "predicted"}, "--lung-masks must be one of stage1, ground_truth"),
])
def test_train_stage_refuses_bad_settings_with_a_usage_error(config, kwargs, message, tmp_path: Path):
    """train_stage checks what argparse checks on the command line, and raises (no SystemExit) before the run
    folder is created."""
    with pytest.raises(train.UsageError) as e:
        train.train_stage(config, output=tmp_path / "run", **kwargs)
    assert isinstance(e.value, ValueError) and not isinstance(e.value, SystemExit)
    assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "run").exists()


def test_check_config_lowercases_the_encoder():
    assert train.check_config(tiny("lung", encoder="EfficientNetB0")) == tiny("lung")

"""End-to-end demo on synthetic phantoms, no downloads: `python -m covidseg_tf.demo`.

Steps (everything inside --workdir):

1. build the `covid_qu_ex/synthetic` TFDS dataset (procedural chest phantoms)   -> tfds/
2. train Stage 1 (lung) briefly                                                  -> runs/lung/
3. train Stage 2 (infection) on Stage-1 lung masks                               -> runs/infection/
4. evaluate both stages on the validation split (Tables I/II, Fig. 1)            -> reports/synthetic/
5. export the SavedModels (lung, infection from training; the cascade here)      -> saved_models/
6. predict on a few test images written as PNGs                                  -> samples/, predictions/

The defaults (64 px, EfficientNet-B0 for both stages, random init, a few short epochs, a higher learning rate
than the seed's) only exercise the whole pipeline in a few minutes on a laptop CPU: the models are far from
the seed's quality. Rerunning reuses finished training runs (delete the workdir or pass --fresh to retrain).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidseg_tf import exitcodes, optional_imports

log = logging.getLogger(__name__)

DATASET = "covid_qu_ex/synthetic"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flags' help, the epilog's lines kept."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m covidseg_tf.demo",
        description="Build synthetic data, train both stages briefly, evaluate, export and predict (no downloads).",
        formatter_class=_HelpFormatter,
        epilog="examples:\n  python -m covidseg_tf.demo\n  python -m covidseg_tf.demo --workdir /tmp/demo "
               "--image-size 96 --epochs 5 --fresh\n"
               "exit code: predict's on the sample images (0, or 1 if any failed); 1 if a step failed; 2 for a bad "
               "flag;\n130 interrupted (Ctrl-C; rerun: finished training runs are reused)")
    p.add_argument("--workdir", type=Path, default=Path("demo_runs"), help="everything is written here")
    p.add_argument("--image-size", type=int, default=64, help="model input size (multiple of 32)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per stage")
    p.add_argument("--steps-per-epoch", type=int, default=15, help="training steps per epoch")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--learning-rate", type=float, default=1e-3,
                   help="learning rate (higher than the seed recipe's, for a short run)")
    p.add_argument("--encoder", default="efficientnetb0", help="encoder of both stages")
    p.add_argument("--samples", type=int, default=4, help="test images written as PNGs and predicted")
    p.add_argument("--seed", type=int, default=0, help="seed of the training runs")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo runs in --workdir first")
    return p


def train_or_reuse(stage: str, args: argparse.Namespace, data_dir: Path, lung_model: Path | None = None) -> Path:
    """Train one stage with covidseg_tf.train.train_stage (Stage 2 on the lung masks of `lung_model`), or reuse
    the finished run; returns its model.keras. A setting train refuses ends the demo with exit code 2."""
    from covidseg_tf import train
    from covidseg_tf.config import default_config

    out = args.workdir / "runs" / stage
    model = out / "model.keras"
    if (out / "DONE").exists() and model.is_file():
        log.info("reusing the finished %s run in %s (pass --fresh to retrain)", stage, out)
        return model
    cfg = default_config(stage).replace(dataset=DATASET, image_size=args.image_size, epochs=args.epochs,
                                        batch_size=args.batch_size, learning_rate=args.learning_rate,
                                        encoder=args.encoder, encoder_weights="none")
    log.info("training %s into %s: %s, %d px, %d epochs of %d steps", stage, out, cfg.encoder, cfg.image_size,
             cfg.epochs, args.steps_per_epoch)
    try:
        train.train_stage(cfg, output=out, lung_model=lung_model, seed=args.seed, data_dir=data_dir,
                          steps_per_epoch=args.steps_per_epoch, export_dir=args.workdir / "saved_models")
    except train.UsageError as e:
        build_parser().exit(exitcodes.USAGE, f"python -m covidseg_tf.demo: error: {e}\n")
    if not model.is_file():
        raise RuntimeError(f"training {stage} produced no {model}")
    return model


def write_samples(builder, n: int, folder: Path) -> list[Path]:
    """The first `n` test images as 8-bit PNGs in `folder`."""
    from PIL import Image

    from covidseg_tf.data import load_split

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ex in load_split(builder, "test").take(n):
        name = Path(ex["file_name"].numpy().decode()).stem.replace("/", "_") or f"sample{len(paths)}"
        p = folder / f"{name}.png"
        Image.fromarray(ex["image"].numpy()[..., 0]).save(p)
        paths.append(p)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    optional_imports.import_tensorflow()  # without Keras' unused pandas / IPython; after parsing: `--help` stays light
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from covidseg_tf import evaluate, predict
    from covidseg_tf.data import load_builder
    from covidseg_tf.export import export_cascade
    from covidseg_tf.inference import load_stage

    t0 = time.time()
    wd: Path = args.workdir
    if args.fresh:
        for sub in ("runs", "reports", "saved_models", "samples", "predictions"):
            shutil.rmtree(wd / sub, ignore_errors=True)
    wd.mkdir(parents=True, exist_ok=True)
    data_dir = wd / "tfds"

    log.info("[1/6] building %s in %s", DATASET, data_dir)
    builder = load_builder(DATASET, data_dir)
    log.info("[2/6] training Stage 1 (lung)")
    lung = train_or_reuse("lung", args, data_dir)
    log.info("[3/6] training Stage 2 (infection) on Stage-1 lung masks")
    infection = train_or_reuse("infection", args, data_dir, lung_model=lung)
    log.info("[4/6] evaluating on the validation split")
    report_dir = wd / "reports" / "synthetic"
    evaluate.main(["--lung-model", str(lung), "--infection-model", str(infection), "--dataset", DATASET,
                   "--data-dir", str(data_dir), "--split", "validation", "--out", str(report_dir)])
    log.info("[5/6] exporting the cascade SavedModel")
    cascade_dir = export_cascade(load_stage(lung), load_stage(infection), wd / "saved_models")
    log.info("[6/6] predicting on %d test images", args.samples)
    samples = write_samples(builder, args.samples, wd / "samples")
    pred_dir = wd / "predictions"
    rc = predict.main([str(p) for p in samples] + ["--out", str(pred_dir), "--lung-model", str(lung),
                                                    "--infection-model", str(infection)])
    summary = {
        "report": report_dir / "report.md", "report_json": report_dir / "report.json",
        "figure": report_dir / "fig1_validation.png", "tensorboard": wd / "runs",
        "saved_models": wd / "saved_models", "cascade_saved_model": cascade_dir,
        "lung_model": lung, "infection_model": infection, "predictions": pred_dir, "samples": wd / "samples",
    }
    # The one place where printing is the point: a CLI summary for the user.
    print(f"\ncovidseg-tf demo finished in {time.time() - t0:.0f} s (synthetic phantoms, {args.image_size} px, "
          f"{args.epochs} short epochs: a pipeline check, not a trained model)")
    print(f"  report (Tables I/II):   {summary['report']}  (+ {summary['report_json'].name})")
    print(f"  figure (Fig. 1):        {summary['figure']}")
    print(f"  TensorBoard logs:       tensorboard --logdir {summary['tensorboard']}")
    print(f"  Keras models:           {lung}, {infection}")
    print(f"  SavedModels:            {summary['saved_models']}/{{lung,infection,cascade}}/<N>  "
          f"(cascade: {cascade_dir})")
    print(f"  predictions:            {pred_dir}  "
          f"(masks, overlays, JSON for {len(samples)} PNGs in {summary['samples']})")
    print(f"  these models:           python -m covidseg_tf.predict IMAGES_OR_FOLDERS --out preds "
          f"--lung-model {lung} --infection-model {infection}")
    print("  real-data models:       python -m covidseg_tf.predict IMAGES_OR_FOLDERS --out preds   "
          "(shipped in saved_models/, see saved_models/MODEL_CARD.md)")
    if rc != 0:
        print("  WARNING: some predictions failed, see the log above")
    summary["predict_exit_code"] = rc
    return summary


def cli() -> None:
    """`python -m covidseg_tf.demo`: exit with predict's code; a failed step is one error line (exit 1), a Ctrl-C
    one line (exit 130)."""
    try:
        summary = main()
    except KeyboardInterrupt:
        sys.exit(exitcodes.interrupted("python -m covidseg_tf.demo", "rerun to go on (finished training runs are "
                                       "reused)"))
    except Exception as e:  # noqa: BLE001 - a CLI: one readable line plus the log
        logging.getLogger(__name__).exception("demo failed")
        sys.exit(f"error: {e}")
    sys.exit(summary["predict_exit_code"])


def launch() -> None:
    """`python -m covidseg_tf.demo` and the `covidseg-demo` script: `cli` in a process restarted once with the
    training malloc (tcmalloc when installed; covidseg_tf.malloc) before TensorFlow loads."""
    from covidseg_tf.malloc import reexec_for_training

    reexec_for_training()
    cli()


if __name__ == "__main__":
    launch()

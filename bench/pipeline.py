#!/usr/bin/env python3
"""Input pipeline throughput: covidseg_tf.data.make_pipeline (training: cache of decoded native-size examples,
shuffle, albumentations augmentation in parallel map calls, resize to --size, batch, prefetch) on the REAL
COVID-QU-Ex data, images/s after the cache is warm, compared with the training consumption rate.

Steps: build (once) the TFDS `covid_qu_ex/infection` dataset from --manual-dir into --data-dir; run one full
epoch through the pipeline to fill the cache (timed separately: that is epoch 1's extra cost); then time
--batches batches (repeat=True, so epochs 2+ come from the in-memory cache), per stage.

The ratio pipeline images/s / training images/s (target >= 3) is computed against the fastest training rate
found for the stage in --train-json (a bench/train_step.py JSON lines file) or --consumption IMG_PER_S. Both
figures use the same 2 cores, so the ratio is also the pipeline's CPU cost per image relative to the train
step's: at >= 3 the pipeline needs <= 1/3 of the CPU the model needs, i.e. it never starves the model even
when it shares the cores with it.

Skips with a clear message (exit 0, JSON with "skipped") when the real data folder is absent.

Examples:
  python bench/pipeline.py --size 448 --batch 32 --train-json bench/results/train.jsonl \\
      --json-out bench/results/pipeline.jsonl
  python bench/pipeline.py --size 128 --batch 8 --batches 5 --stages lung         # quick smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

log = logging.getLogger("bench.pipeline")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=60, help="timed batches after the cache is warm")
    p.add_argument("--stages", nargs="+", choices=["lung", "infection"], default=["lung", "infection"])
    p.add_argument("--dataset", default="covid_qu_ex/infection")
    p.add_argument("--manual-dir", default=str(REPO.parent / "shared" / "covidqu"))
    p.add_argument("--data-dir", default="/tmp/bench_tfds", help="TFDS data_dir (built here on first use)")
    p.add_argument("--train-json", nargs="*", default=[], help="bench/train_step.py JSON lines files (or "
                   "compare_peer.py --raw-out files): consumption rates")
    p.add_argument("--consumption", type=float, default=None, help="training images/s to compare with")
    p.add_argument("--seed", type=int, default=None, help="seeded (deterministic order) pipeline if given")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--inter-threads", type=int, default=1)
    p.add_argument("--label", default=None)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def consumption_rates(paths: list[str], size: int) -> dict[str, dict]:
    """Fastest training images/s per stage in train_step JSON lines files (clean-step median when there is one)."""
    best: dict[str, dict] = {}
    lines = [ln for p in paths if Path(p).is_file() for ln in Path(p).read_text().splitlines()]
    for line in lines:
        try:
            res = json.loads(line)
        except ValueError:
            continue
        if res.get("script") != "train_step" or res.get("size") != size:
            continue
        for r in res.get("results", []):
            if "images_per_s" not in r:
                continue
            rate = r.get("clean_images_per_s") or r["images_per_s"]
            cur = best.get(r["stage"])
            if cur is None or rate > cur["images_per_s"]:
                best[r["stage"]] = {"images_per_s": rate, "precision": r["precision"], "batch": r["batch"],
                                    "foreign_cpu_frac": r.get("foreign_cpu_frac"), "size": res.get("size")}
    return best


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = {"script": "pipeline", "label": args.label, "size": args.size, "batch": args.batch,
              "dataset": args.dataset, "manual_dir": args.manual_dir, "results": []}
    real = Path(args.manual_dir) / "Infection Segmentation Data"
    if not real.is_dir():
        msg = f"real data not found under {args.manual_dir} (expected '{real.name}/'): pipeline benchmark skipped"
        log.warning(msg)
        result["skipped"] = msg
        common.emit(result, args.json_out)
        return
    result["tf"] = common.configure_tf(args.threads, args.inter_threads)
    import models_util as mu

    from covidseg_tf import data

    t = time.perf_counter()
    builder = data.load_builder(args.dataset, args.data_dir, args.manual_dir)
    result["prepare_s"] = round(time.perf_counter() - t, 1)
    n_train = builder.info.splits["train"].num_examples
    rates = consumption_rates(args.train_json, args.size)
    for stage in args.stages:
        cfg = mu.stage_cfg(stage, args.size)
        ds = data.make_pipeline(data.load_split(builder, "train"), cfg, training=True, seed=args.seed,
                                repeat=True, batch_size=args.batch)
        it = iter(ds)
        warm_batches = -(-n_train // args.batch) + 2  # one full epoch fills the cache
        t = time.perf_counter()
        for _ in range(warm_batches):
            x, y = next(it)
        warm_s = time.perf_counter() - t
        shapes = {"x": list(x.shape), "y": list(y.shape), "x_dtype": x.dtype.name}
        tm = common.time_steps(lambda it=it: next(it), args.batches, 0)
        rec = {"stage": stage, "n_train_examples": n_train, "cache_fill_epoch_s": round(warm_s, 1),
               "cache_fill_images_per_s": round(warm_batches * args.batch / warm_s, 1), **shapes,
               **tm.summary(args.batch)}
        rec["images_per_s_mean"] = round(args.batch * len(tm.times) / sum(tm.times), 1)
        rec["cpu_s_per_image"] = round((rec["self_cpu_util"] or 0) * sum(tm.times) / (args.batch * len(tm.times)), 4)
        consume = args.consumption or (rates.get(stage) or {}).get("images_per_s")
        if consume:
            rec["training_images_per_s"] = consume
            rec["training_rate_source"] = "--consumption" if args.consumption else rates.get(stage)
            rec["ratio_pipeline_over_training"] = round(rec["images_per_s_mean"] / consume, 2)
            rec["target_met"] = rec["ratio_pipeline_over_training"] >= 3.0
        result["results"].append(rec)
        log.info("%s: %.1f img/s (cache fill %.1f s), foreign cpu %s", stage, rec["images_per_s_mean"], warm_s,
                 rec["foreign_cpu_frac"])
        del it, ds
    result["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    result["machine"] = common.machine_info()
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Ours vs the PyTorch peer (segmentation_models_pytorch, ../shared/bench/peer/smp_bench.py from the repository
root), side by side on this machine, ALTERNATING runs in subprocesses (round r: ours-infer, peer-infer,
ours-train, peer-train; then, once, the memory runs), both with --threads (default 2) threads, and the ratios
per target (issue 26's; issue 13 asked <= 0.6 and <= 1 for the first and last):

  cascade inference at --size, batch 1:   ours best cascade time / peer best (Stage-1 + Stage-2 time)  <= 0.5
  training throughput per stage, batch 8 (--train-batch): ours best images/s / peer best images/s       >= 1.2
  peak training memory per stage at --memory-size px, batch --memory-batch (256, 16): ours peak RSS of the
      training process / the peer's (each side's lowest over its precisions/layouts)                     <= 1.2

"best": over precisions/variants and rounds, of the per-run medians. Ours = bench/infer.py (Keras tf.function:
plain and BN-folded+frozen "fast", fp32 and bf16, the float32 TFLite stages of `export --tflite` and the
Stage-1-int8 ones of `export --tflite int8`, variant "tflite-int8") and
bench/train_step.py (train_on_batch, fp32 and bf16, --our-batch-norm).
Peer = bf16 autocast + channels_last (its best layout per issue 7), optionally also fp32 (--peer-layouts).
The peer has no cascade: its cascade time is the sum of its two stage times at batch 1 (ours also includes the
thresholds, the mask concat and the severity score, i.e. is charged slightly more).

The peer runs with --peer-python, the Python of a venv made by
`bash ../shared/bench/peer/setup_cpu_venv.sh /tmp/peer/venv` (see bench/README.md).

Every child's JSON line is appended to --raw-out; the summary (ONE JSON line) to --json-out. Each figure carries
the contention indicator (foreign_cpu_frac: share of the machine used by other processes during the timed
loop); a ratio whose runs had foreign_cpu_frac > 0.10 is flagged "contended" (rerun when quieter).

Examples:
  python bench/compare_peer.py --rounds 2 --json-out bench/results/compare.jsonl \\
      --raw-out bench/results/compare_raw.jsonl
  python bench/compare_peer.py --size 128 --rounds 1 --steps 2 --train-steps 2 --memory-size 128 \\
      --memory-batch 2                                                                 # quick smoke test
  python bench/compare_peer.py --peer-python ~/peer-venv/bin/python --our-layout segmentation_models_pytorch
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

log = logging.getLogger("bench.compare_peer")
HERE = Path(__file__).resolve().parent
PEER_DIR = HERE.parent.parent / "shared" / "bench" / "peer"  # ../shared/bench/peer from the repository root
DEFAULT_PEER_PYTHON = "/tmp/peer/venv/bin/python"  # bench/README.md: setup_cpu_venv.sh /tmp/peer/venv
PEER = {"lung": ("efficientnet-b3", 3), "infection": ("efficientnet-b0", 4)}
LAYOUTS = {"bf16-cl": ["--amp", "bf16", "--channels-last"], "fp32": ["--amp", "none"],
           "fp32-cl": ["--amp", "none", "--channels-last"], "bf16": ["--amp", "bf16"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed inference iterations (both sides)")
    p.add_argument("--warmup", type=int, default=3, help="untimed inference iterations (both sides)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-warmup", type=int, default=2)
    p.add_argument("--our-precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--our-train-inter-threads", type=int, default=1,
                   help="TensorFlow inter-op threads of our training and memory runs (1, as every run before; "
                        "`train` runs with TensorFlow's default, the number of cores)")
    p.add_argument("--our-train-precision", nargs="+", default=None, help="default: --our-precision")
    p.add_argument("--our-train-env", nargs="*", default=None, metavar="KEY=VALUE",
                   help="variables added to the environment of our training and memory runs only (the peer's is "
                        "left as it is); default: those `python -m covidseg_tf.train` runs with "
                        "(covidseg_tf.malloc.training_env: tcmalloc preloaded when installed); give the option "
                        "alone for none (glibc's malloc)")
    p.add_argument("--our-variants", nargs="+", default=["plain", "fast", "tflite"], help="bench/infer.py --variants")
    p.add_argument("--our-batch-norm", nargs="+", default=None, metavar="BN",
                   help="bench/train_step.py --batch-norm (keras, fused; default: the config's)")
    p.add_argument("--memory-size", type=int, default=256)
    p.add_argument("--memory-batch", type=int, default=16)
    p.add_argument("--peer-layouts", nargs="+", choices=sorted(LAYOUTS), default=["bf16-cl"])
    p.add_argument("--our-layout", default=None, metavar="LAYOUT",
                   help="U-Net layout of our models (bench/infer.py and train_step.py --layout; default: config's)")
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                   help="Python of the peer's venv, made by `bash ../shared/bench/peer/setup_cpu_venv.sh DIR` "
                        "(then DIR/bin/python; default: %(default)s)")
    p.add_argument("--peer-script", default=str(PEER_DIR / "smp_bench.py"), help="default: %(default)s")
    p.add_argument("--skip", nargs="*", choices=["infer", "train", "memory"], default=[], help="targets to leave out")
    p.add_argument("--raw-out", default=None, help="append every child's JSON line here")
    p.add_argument("--json-out", default=None, help="append the summary JSON line here")
    p.add_argument("--label", default=None)
    return p.parse_args(argv)


def run(cmd: list[str], raw_out: str | None, tag: dict, env: dict[str, str] | None = None) -> dict:
    """`cmd`'s last JSON line, tagged with `tag`, the command and its wall time (appended to `raw_out`); `env` is
    added to this process's environment for it."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env} if env else None)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        log.error("failed (%s): %s\n%s", proc.returncode, " ".join(cmd), "\n".join(tail))
        return dict(tag, error=f"exit {proc.returncode}: {' | '.join(tail)}")
    res = json.loads(lines[-1])
    res["_tag"] = dict(tag, cmd=" ".join(cmd), wall_s=round(time.perf_counter() - t, 1))
    if raw_out:
        Path(raw_out).parent.mkdir(parents=True, exist_ok=True)
        with open(raw_out, "a") as f:
            f.write(json.dumps(res, default=str) + "\n")
    return res


def our_train_cmd(args, size: int, batch: int, steps: int, warmup: int, label: str) -> list[str]:
    """bench/train_step.py on both stages with our training precisions, layout and BatchNorm."""
    cmd = [sys.executable, str(HERE / "train_step.py"), "--size", str(size), "--batch", str(batch), "--precision",
           *(args.our_train_precision or args.our_precision), "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(args.threads), "--inter-threads", str(args.our_train_inter_threads), "--label", label]
    cmd += ["--layout", args.our_layout] if args.our_layout else []
    return cmd + (["--batch-norm", *args.our_batch_norm] if args.our_batch_norm else [])


def peer_train_cmd(args, stage: str, layout: str, size: int, batch: int, steps: int, warmup: int,
                   label: str) -> list[str]:
    """The peer's smp_bench.py training run of `stage` in `layout`."""
    enc, ch = PEER[stage]
    return [args.peer_python, args.peer_script, "--encoder", enc, "--in-channels", str(ch), "--size", str(size),
            "--mode", "train", "--batch", str(batch), *LAYOUTS[layout], "--threads", str(args.threads), "--steps",
            str(steps), "--warmup", str(warmup), "--flops", "off", "--label", label]


def main(argv=None):
    args = parse_args(argv)
    if args.our_train_env is None:
        from covidseg_tf.malloc import training_env

        our_env = training_env()
    else:
        our_env = common.key_values(args.our_train_env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for what, path, hint in (("--peer-script", args.peer_script, f"expected the peer benchmark in {PEER_DIR}"),
                             ("--peer-python", args.peer_python,
                              f"make the venv with `bash {PEER_DIR / 'setup_cpu_venv.sh'} /tmp/peer/venv`")):
        if not Path(path).is_file():
            raise SystemExit(f"compare_peer: {what} {path} not found; {hint}")
    py = sys.executable
    layout = ["--layout", args.our_layout] if args.our_layout else []
    ours_cascade, ours_stage_inf, ours_train = [], [], []  # (value, contention, meta)
    peer_inf = {s: [] for s in PEER}
    peer_train = {s: [] for s in PEER}
    for r in range(args.rounds):
        if "infer" not in args.skip:
            cmd = [py, str(HERE / "infer.py"), "--size", str(args.size), "--batch", "1", "--precision",
                   *args.our_precision, "--variants", *args.our_variants, "--no-savedmodel", "--no-flops",
                   "--no-accuracy", "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--inter-threads", "1", "--label", f"compare r{r}", *layout]
            res = run(cmd, args.raw_out, {"side": "ours", "what": "infer", "round": r})
            for rec in res.get("results", []):
                if "median_s" not in rec:
                    continue
                item = (rec["median_s"], rec["foreign_cpu_frac"],
                        {k: rec[k] for k in ("precision", "variant", "target")} | {"round": r})
                (ours_cascade if rec["target"] == "cascade" else ours_stage_inf).append(item)
            for stage, (enc, ch) in PEER.items():
                for lay in args.peer_layouts:
                    cmd = [args.peer_python, args.peer_script, "--encoder", enc, "--in-channels", str(ch),
                           "--size", str(args.size), "--mode", "infer", "--batch", "1", *LAYOUTS[lay],
                           "--threads", str(args.threads), "--steps", str(args.steps), "--warmup",
                           str(args.warmup), "--flops", "on" if r == 0 else "off", "--label", f"compare r{r}"]
                    res = run(cmd, args.raw_out, {"side": "peer", "what": "infer", "stage": stage, "round": r})
                    if "median_s" in res:
                        peer_inf[stage].append((res["median_s"], res["foreign_cpu_frac"],
                                                {"layout": lay, "round": r,
                                                 "fwd_flops_per_img": res.get("fwd_flops_per_img")}))
        if "train" not in args.skip:
            cmd = our_train_cmd(args, args.size, args.train_batch, args.train_steps, args.train_warmup,
                                f"compare r{r}")
            res = run(cmd, args.raw_out, {"side": "ours", "what": "train", "round": r}, our_env)
            for rec in res.get("results", []):
                if "images_per_s" in rec:
                    ours_train.append((rec["images_per_s"], rec["foreign_cpu_frac"],
                                       {"stage": rec["stage"], "precision": rec["precision"], "round": r,
                                        "batch_norm": rec.get("batch_norm"),
                                        "peak_rss_mib": rec.get("peak_rss_mib")}))
            for stage in PEER:
                for lay in args.peer_layouts:
                    cmd = peer_train_cmd(args, stage, lay, args.size, args.train_batch, args.train_steps,
                                         args.train_warmup, f"compare r{r}")
                    res = run(cmd, args.raw_out, {"side": "peer", "what": "train", "stage": stage, "round": r})
                    if "images_per_s" in res:
                        peer_train[stage].append((res["images_per_s"], res["foreign_cpu_frac"],
                                                  {"layout": lay, "round": r,
                                                   "peak_rss_mib": res.get("peak_rss_mib")}))

    ours_mem, peer_mem = [], {s: [] for s in PEER}  # (peak RSS MiB, contention, meta)
    if "memory" not in args.skip:
        cmd = our_train_cmd(args, args.memory_size, args.memory_batch, 1, 0, "compare memory")
        res = run(cmd, args.raw_out, {"side": "ours", "what": "memory"}, our_env)
        for rec in res.get("results", []):
            if "peak_rss_mib" in rec:
                ours_mem.append((rec["peak_rss_mib"], rec.get("foreign_cpu_frac"),
                                 {"stage": rec["stage"], "precision": rec["precision"],
                                  "batch_norm": rec.get("batch_norm")}))
        for stage in PEER:
            for lay in args.peer_layouts:
                cmd = peer_train_cmd(args, stage, lay, args.memory_size, args.memory_batch, 1, 0, "compare memory")
                res = run(cmd, args.raw_out, {"side": "peer", "what": "memory", "stage": stage})
                if "peak_rss_mib" in res:
                    peer_mem[stage].append((res["peak_rss_mib"], res.get("foreign_cpu_frac"), {"layout": lay}))

    def best(items, key=min):
        if not items:
            return None
        v = key(items, key=lambda it: it[0])
        return {"value": v[0], "foreign_cpu_frac": v[1], **v[2]}

    summary = {"script": "compare_peer", "label": args.label, "size": args.size, "threads": args.threads,
               "our_train_inter_threads": args.our_train_inter_threads, "our_train_env": our_env,
               "rounds": args.rounds,
               "our_layout": args.our_layout or "config", "peer_layouts": args.peer_layouts,
               "targets": {}}
    if ours_cascade and all(peer_inf.values()):
        o = best(ours_cascade)
        p1, p2 = best(peer_inf["lung"]), best(peer_inf["infection"])
        peer_sum = p1["value"] + p2["value"]
        ratio = o["value"] / peer_sum
        cont = max(v or 0 for v in (o["foreign_cpu_frac"], p1["foreign_cpu_frac"], p2["foreign_cpu_frac"]))
        summary["targets"]["cascade_infer_b1"] = {
            "ours_s": o, "peer_stage1_s": p1, "peer_stage2_s": p2, "peer_cascade_s": round(peer_sum, 5),
            "ratio_ours_over_peer": round(ratio, 3), "target": "<= 0.5", "met": ratio <= 0.5,
            "max_foreign_cpu_frac": cont, "contended": cont > common.CONTENTION_LIMIT}
        for stage in PEER:
            mine = [it for it in ours_stage_inf if it[2]["target"] == stage]
            if mine:
                ob, pb = best(mine), best(peer_inf[stage])
                summary["targets"][f"{stage}_infer_b1"] = {
                    "ours_s": ob, "peer_s": pb, "ratio_ours_over_peer": round(ob["value"] / pb["value"], 3)}
    for stage in PEER:
        mine = [it for it in ours_train if it[2]["stage"] == stage]
        if mine and peer_train[stage]:
            ob, pb = best(mine, max), best(peer_train[stage], max)
            ratio = ob["value"] / pb["value"]
            cont = max(ob["foreign_cpu_frac"] or 0, pb["foreign_cpu_frac"] or 0)
            summary["targets"][f"{stage}_train_b{args.train_batch}"] = {
                "ours_img_s": ob, "peer_img_s": pb, "ratio_ours_over_peer": round(ratio, 3), "target": ">= 1.2",
                "met": ratio >= 1.2, "max_foreign_cpu_frac": cont, "contended": cont > common.CONTENTION_LIMIT}
        mine = [it for it in ours_mem if it[2]["stage"] == stage]
        if mine and peer_mem[stage]:
            ob, pb = best(mine), best(peer_mem[stage])
            ratio = ob["value"] / pb["value"]
            summary["targets"][f"{stage}_train_memory_{args.memory_size}px_b{args.memory_batch}"] = {
                "ours_peak_rss_mib": ob, "peer_peak_rss_mib": pb, "ratio_ours_over_peer": round(ratio, 3),
                "target": "<= 1.2", "met": ratio <= 1.2}
    summary["all_runs"] = {
        "ours_cascade_b1": ours_cascade, "ours_stage_b1": ours_stage_inf, "ours_train": ours_train,
        "peer_infer_b1": peer_inf, "peer_train": peer_train, "ours_memory": ours_mem, "peer_memory": peer_mem}
    summary["machine"] = common.machine_info()
    common.emit(summary, args.json_out)


if __name__ == "__main__":
    main()

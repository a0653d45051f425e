#!/usr/bin/env python3
"""Batch prediction throughput: `python -m covidseg_tf.batch_predict` on Beam's DirectRunner (multi_processing,
--direct_num_workers 1 and 2) against `python -m covidseg_tf.predict` in one process, on the same N real
COVID-QU-Ex Val images and the shipped models.

Each configuration runs as its own command in a fresh subprocess, end to end (Python and TensorFlow start-up,
model loading, reading, inference, writing every output), which is what a user waits for; `images_per_s` is N
over that wall time. For Beam, `pipeline_s` is the pipeline alone (from `p.run()` to the end, as the command
prints it; it still includes starting the workers and loading the models in each), and `run_inference` holds
RunInference's own metrics (batches, mean batch size, seconds inside `Predictor.predict` and in model loading, summed
over the worker processes; the first batch of each process includes tracing the graph). A psutil sampler (every
--sample-s) follows the whole process tree: `peak_rss_mib` of the launcher, of each Beam worker process
(`sdk_worker_main`) and of the tree at once. Contention: `foreign_cpu_frac` is the machine's busy share during the
run minus this tree's CPU time (from /proc/stat and RUSAGE_CHILDREN), `loadavg` before and after.

Prints ONE JSON line (and appends it to --json-out). Skips (exit 0, "skipped") without the real data.

Example (a few minutes):
  python bench/batch_predict.py --n 64 --json-out bench/results/batch_predict.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COVIDQU_DIR", REPO.parent / "shared" / "covidqu"))
CLASSES = ("COVID-19", "Non-COVID", "Normal")


def pick_images(data: Path, n: int, dest: Path) -> list[Path]:
    """N Val images taken in turn from the three classes (sorted names), copied to dest/<class>/."""
    val = data / "Infection Segmentation Data" / "Infection Segmentation Data" / "Val"
    lists = [sorted((val / c / "images").glob("*.png")) for c in CLASSES]
    picked: list[Path] = []
    i = 0
    while len(picked) < n and any(i < len(x) for x in lists):
        picked += [x[i] for x in lists if i < len(x)]
        i += 1
    out = []
    for src in picked[:n]:
        target = dest / src.parent.parent.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)
        out.append(target)
    return out


class TreeSampler:
    """Peak RSS (MiB) of a process and each of its descendants, sampled every `period` s in a thread."""

    def __init__(self, pid: int, period: float):
        import psutil

        self.root = psutil.Process(pid)
        self.period = period
        self.peak_tree = 0.0
        self.procs: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            total = 0.0
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                    if p.pid not in self.procs:
                        cmd = p.cmdline()
                        self.procs[p.pid] = {"cmd": " ".join(cmd[:4]), "peak_rss_mib": 0.0,
                                             "python": bool(cmd) and "python" in os.path.basename(cmd[0])}
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                self.procs[p.pid]["peak_rss_mib"] = max(self.procs[p.pid]["peak_rss_mib"], rss)
            self.peak_tree = max(self.peak_tree, total)
            self._stop.wait(self.period)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_config(name: str, cmd: list[str], n: int, sample_s: float) -> dict:
    load0 = [round(v, 2) for v in os.getloadavg()]
    stat0, cpu0 = common._proc_stat_busy(), children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid, sample_s) as sampler:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stat1, cpu1 = common._proc_stat_busy(), children_cpu_s()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{err[-3000:]}")
    foreign = None
    if stat0 and stat1 and stat1[1] > stat0[1]:
        total = stat1[1] - stat0[1]
        own = (cpu1 - cpu0) * os.sysconf("SC_CLK_TCK") / total
        foreign = round(max(0.0, (stat1[0] - stat0[0]) / total - own), 3)
    procs = list(sampler.procs.values())
    workers = [p["peak_rss_mib"] for p in procs if p["python"] and "sdk_worker_main" in p["cmd"]]  # not sh -c
    result = {"config": name, "command": " ".join(cmd), "wall_s": round(wall, 2), "images": n,
              "images_per_s": round(n / wall, 3), "cpu_s": round(cpu1 - cpu0, 1),
              "peak_rss_mib": {"launcher": round(procs[0]["peak_rss_mib"], 1) if procs else None,
                               "per_worker": [round(w, 1) for w in workers], "tree": round(sampler.peak_tree, 1)},
              "foreign_cpu_frac": foreign, "contended": (foreign or 0.0) > common.CONTENTION_LIMIT,
              "loadavg_before": load0, "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    printed = [ln for ln in out.splitlines() if ln.startswith("{")]
    if printed:  # batch_predict's own summary: counts and the pipeline's time
        summary = json.loads(printed[-1])
        result["pipeline_s"] = summary["seconds"]
        result["images_ok"] = summary["images_ok"]
        ri = summary.get("run_inference") or {}
        result["run_inference"] = ri
        if ri.get("inference_s"):  # the cascade calls alone, summed over worker processes
            result["inference_images_per_s_per_process"] = round(ri["images"] / ri["inference_s"], 3)
        if summary["images_ok"] != n:
            raise SystemExit(f"{name}: {summary['images_ok']} of {n} images processed")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="real Val images (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--direct_num_workers values")
    p.add_argument("--tf-threads", type=int, nargs="*", default=[0],
                   help="batch_predict --tf-threads values to try with every worker count (0: TensorFlow's "
                        "default; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-predict", action="store_true")
    p.add_argument("--sample-s", type=float, default=0.2, help="memory sampling period")
    p.add_argument("--keep", default=None, help="keep inputs and outputs in this folder (default: a temp folder)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--label", default=None)
    args = p.parse_args()
    if not (DATA / "Infection Segmentation Data").is_dir():
        common.emit({"bench": "batch_predict", "skipped": f"real data not found at {DATA}"}, args.json_out)
        return
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-batch-"))
    files = pick_images(DATA, args.n, work / "in")
    py = sys.executable
    runs = []
    if not args.skip_predict:
        runs.append(("predict", [py, "-m", "covidseg_tf.predict", str(work / "in"), "--out", str(work / "predict"),
                                 "--quiet"]))
    for w in args.workers:
        for t in args.tf_threads:
            name = f"beam_w{w}" + (f"_t{t}" if t else "")
            cmd = [py, "-m", "covidseg_tf.batch_predict", f"{work / 'in'}/**.png", "--output", str(work / name),
                   "--batch-size", str(args.batch_size), "--quiet", "--runner", "DirectRunner",
                   "--direct_num_workers", str(w), "--direct_running_mode", "multi_processing"]
            runs.append((name, cmd + (["--tf-threads", str(t)] if t else [])))
    results = []
    for name, cmd in runs:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(run_config(name, cmd, len(files), args.sample_s))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    base = next((r["images_per_s"] for r in results if r["config"] == "predict"), None)
    for r in results:
        if base:
            r["vs_predict"] = round(r["images_per_s"] / base, 3)
    common.emit({"bench": "batch_predict", "label": args.label, "n": len(files),
                 "images": "COVID-QU-Ex Val, 256 x 256 PNG, classes in turn", "machine": common.machine_info(),
                 "results": results, "work_dir": str(work) if args.keep else None}, args.json_out)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

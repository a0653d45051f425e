"""`python -m covidseg_tf.predict` on big inputs, end to end in a subprocess: wall time and peak memory.

    python bench/predict_big.py [--side 4096] [--lung-model ... --infection-model ...] [--json-out FILE]

Cases (each a fresh `python -m covidseg_tf.predict FILE --out DIR --quiet` with the shipped models by default):

* ``max``: a side x side chest-X-ray-like 8-bit PNG (default 4096, the size limit of covidseg_tf.limits): decode,
  both stages, input-size masks and severity, overlay, four PNG/JSON outputs. Targets: peak RSS <= 2.5 GB and
  wall time <= 30 s on the 2-vCPU machine of the README (load included: the time counts Python and TensorFlow
  start-up and model loading).
* ``small``: the same phantom at 256 x 256 (the models' size): Python, TensorFlow and model start-up, which
  ``max`` pays too; ``max_minus_small`` is what the big input itself costs.
* ``bomb``: the issue's 12000 x 12000 PNG (zeros, optimize=True, ~140 kB): refused from its header (exit 1)
  before any model is loaded.

Peak RSS is the child's VmHWM polled from /proc every 20 ms (and getrusage's children maximum as a cross-check).
Prints ONE JSON line (bench/common.py conventions: machine, load average, foreign CPU share during the run).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGETS = {"peak_rss_gb": 2.5, "wall_s": 30.0}


def chest_png(path: Path, side: int) -> None:
    """A smooth chest-like phantom (body, two dark lung fields, a brighter patch, noise) as an 8-bit PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.ogrid[0:side, 0:side]
    y, x = y / side, x / side
    img = np.full((side, side), 170.0, np.float32)
    for cx in (0.3, 0.7):
        img[((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1] = 55.0
    img[((x - 0.3) / 0.07) ** 2 + ((y - 0.6) / 0.09) ** 2 < 1] = 95.0
    img += rng.normal(0, 6, (side, side)).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def bomb_png(path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((12000, 12000), np.uint8)).save(path, optimize=True)


def vm_hwm_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_predict(image: Path, out: Path, extra: list[str]) -> dict:
    """One predict process: exit code, wall time, peak RSS (MiB), the machine's foreign CPU share meanwhile."""
    cmd = [sys.executable, "-m", "covidseg_tf.predict", str(image), "--out", str(out), "--quiet", *extra]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    busy0 = common._proc_stat_busy()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    peak = [0.0]

    def poll() -> None:
        while proc.poll() is None:
            value = vm_hwm_mib(proc.pid)
            if value:
                peak[0] = max(peak[0], value)
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    watcher.join()
    busy1 = common._proc_stat_busy()
    child_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = None
    if busy0 and busy1 and busy1[1] > busy0[1]:
        machine = (busy1[0] - busy0[0]) / (busy1[1] - busy0[1])
    own = (child_cpu.ru_utime + child_cpu.ru_stime) / max(wall * (os.cpu_count() or 1), 1e-9)
    return {"returncode": proc.returncode, "wall_s": round(wall, 2), "peak_rss_mib": round(peak[0], 1),
            "children_maxrss_mib": round(common.children_peak_rss_mib(), 1),
            "foreign_cpu_frac": None if machine is None else round(max(0.0, machine - own), 3),
            "stderr_tail": stderr.strip().splitlines()[-3:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=None, help="side of the big image (default: limits.MAX_SIDE)")
    p.add_argument("--lung-model", default=None)
    p.add_argument("--infection-model", default=None)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    from covidseg_tf import limits

    side = args.side or limits.MAX_SIDE
    extra = []
    if args.lung_model:
        extra += ["--lung-model", args.lung_model]
    if args.infection_model:
        extra += ["--infection-model", args.infection_model]
    tmp = Path(tempfile.mkdtemp(prefix="predict_big-"))
    result = {"bench": "predict_big", "machine": common.machine_info(), "side": side, "targets": TARGETS}
    small = tmp / "chest_256.png"
    chest_png(small, 256)
    run = run_predict(small, tmp / "out_small", extra)
    result["small"] = {k: run[k] for k in ("returncode", "wall_s", "peak_rss_mib", "foreign_cpu_frac")}
    big = tmp / f"chest_{side}.png"
    chest_png(big, side)
    run = run_predict(big, tmp / "out", extra)
    run["outputs"] = sorted(f.name for f in (tmp / "out").glob("*")) if (tmp / "out").is_dir() else []
    run["within_targets"] = (run["returncode"] == 0 and run["peak_rss_mib"] / 1024 <= TARGETS["peak_rss_gb"]
                             and run["wall_s"] <= TARGETS["wall_s"])
    result["max"] = run
    result["max_minus_small"] = {"wall_s": round(run["wall_s"] - result["small"]["wall_s"], 2),
                                 "peak_rss_mib": round(run["peak_rss_mib"] - result["small"]["peak_rss_mib"], 1)}
    bomb = tmp / "bomb_12000.png"
    bomb_png(bomb)
    run = run_predict(bomb, tmp / "out_bomb", extra)
    run["bytes"] = bomb.stat().st_size
    run["outputs"] = sorted(f.name for f in (tmp / "out_bomb").glob("*")) if (tmp / "out_bomb").is_dir() else []
    result["bomb"] = run
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.keep:
        result["tmp"] = str(tmp)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()

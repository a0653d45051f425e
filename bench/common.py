"""Shared helpers of the bench/ scripts: thread setup, timing loop with a contention indicator, JSON output.

Contention (same idea as the peer's smp_bench.py): during the timed loop we read /proc/stat (whole machine
busy jiffies), this process's CPU time (getrusage) and Linux PSI (/proc/pressure/cpu "some" stall time).
  foreign_cpu_frac = machine busy share - own share   (CPU time used by OTHER processes, 0..1 of the machine)
  psi_stall_frac   = share of wall time in which some runnable task waited for a CPU
A timed step is "clean" when its PSI stall is < --clean-stall of its duration. On this shared 2-core box a
result with foreign_cpu_frac > ~0.1 should be rerun (the scripts report it, they do not hide it).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # the repository, so bench scripts run from anywhere import the package
    sys.path.insert(0, _REPO)
import covidseg_tf  # noqa: E402,F401  (before TensorFlow: the product's oneDNN default, covidseg_tf/__init__.py)

CONTENTION_LIMIT = 0.10  # foreign_cpu_frac above this: the figure is flagged "contended"


# ----------------------------------------------------------------------------------------------- machine
def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_summary() -> dict[str, bool]:
    """The vector / matrix extensions that decide oneDNN's fp32 and bf16 kernels."""
    flags = cpu_flags()
    return {k: k in flags for k in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")}


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def children_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def _proc_stat_busy() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        vals = [int(x) for x in parts[:8]]
        idle = vals[3] + vals[4]
        return sum(vals) - idle, sum(vals)
    except (OSError, ValueError):
        return None


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _psi_some_us() -> int | None:
    try:
        with open("/proc/pressure/cpu") as f:
            first = f.readline().split()
        return int([kv for kv in first if kv.startswith("total=")][0][6:])
    except (OSError, IndexError, ValueError):
        return None


def machine_busy(sample_s: float = 1.0) -> float | None:
    """Busy share of the whole machine over `sample_s` (this process sleeps meanwhile, so: other processes)."""
    a = _proc_stat_busy()
    time.sleep(sample_s)
    b = _proc_stat_busy()
    if not a or not b or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_quiet(max_s: float, busy_thresh: float = 0.15) -> tuple[float, float | None]:
    """Wait up to max_s for the other processes to leave the CPUs idle; returns (waited s, last busy share)."""
    t0 = time.perf_counter()
    busy = None
    while max_s > 0:
        busy = machine_busy(1.0)
        if busy is None or busy < busy_thresh or time.perf_counter() - t0 >= max_s:
            break
    return time.perf_counter() - t0, busy


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    stalls: list[float | None] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)
    wall: float = 0.0
    foreign_cpu_frac: float | None = None
    psi_stall_frac: float | None = None
    self_cpu_util: float | None = None
    clean_stall: float = 0.10

    def summary(self, items_per_step: int) -> dict[str, Any]:
        med = statistics.median(self.times)
        clean = [t for t, s in zip(self.times, self.stalls) if s is not None and s < self.clean_stall]
        cmed = statistics.median(clean) if clean else None
        return {
            "median_s": round(med, 5),
            "min_s": round(min(self.times), 5),
            "max_s": round(max(self.times), 5),
            "steps": len(self.times),
            "times_s": [round(t, 4) for t in self.times],
            "warmup_times_s": [round(t, 3) for t in self.warmup_times],
            "images_per_s": round(items_per_step / med, 3),
            "n_clean": len(clean),
            "clean_median_s": round(cmed, 5) if cmed else None,
            "clean_images_per_s": round(items_per_step / cmed, 3) if cmed else None,
            "foreign_cpu_frac": self.foreign_cpu_frac,
            "psi_stall_frac": self.psi_stall_frac,
            "self_cpu_util": self.self_cpu_util,
            "contended": (self.foreign_cpu_frac or 0.0) > CONTENTION_LIMIT,
        }


def time_steps(step: Callable[[], Any], steps: int, warmup: int, clean_stall: float = 0.10,
               clean_target: int = 0, max_time: float = 300.0) -> Timing:
    """Call `step` warmup times untimed, then `steps` times timed (more, up to max_time, until clean_target
    clean steps exist); `step` must block until its work is done (e.g. return numpy)."""
    tm = Timing(clean_stall=clean_stall)
    for _ in range(warmup):
        t = time.perf_counter()
        step()
        tm.warmup_times.append(time.perf_counter() - t)
    stat0, cpu0, psi0, t0 = _proc_stat_busy(), _self_cpu_s(), _psi_some_us(), time.perf_counter()
    while True:
        n_clean = sum(1 for s in tm.stalls if s is not None and s < clean_stall)
        if len(tm.times) >= steps and (clean_target <= 0 or n_clean >= clean_target
                                       or time.perf_counter() - t0 > max_time):
            break
        q = _psi_some_us()
        t = time.perf_counter()
        step()
        dt = time.perf_counter() - t
        q2 = _psi_some_us()
        tm.times.append(dt)
        tm.stalls.append((q2 - q) / 1e6 / dt if q is not None and q2 is not None else None)
    tm.wall = time.perf_counter() - t0
    stat1, cpu1, psi1 = _proc_stat_busy(), _self_cpu_s(), _psi_some_us()
    if tm.wall > 0:
        tm.self_cpu_util = round((cpu1 - cpu0) / tm.wall, 3)
        if psi0 is not None and psi1 is not None:
            tm.psi_stall_frac = round((psi1 - psi0) / 1e6 / tm.wall, 3)
    if stat0 and stat1 and stat1[1] > stat0[1]:
        total = stat1[1] - stat0[1]
        own = (cpu1 - cpu0) * os.sysconf("SC_CLK_TCK") / total
        tm.foreign_cpu_frac = round(max(0.0, (stat1[0] - stat0[0]) / total - own), 3)
    return tm


# ----------------------------------------------------------------------------------------------- TF setup
def configure_tf(threads: int | None, inter_threads: int | None, training: bool = False) -> dict[str, Any]:
    """Quiet TF and set its thread pools (must run before TF executes anything). Returns the settings. `training`:
    TensorFlow imported as the training CLIs import it (`covidseg_tf.optional_imports.import_tensorflow`: without
    Keras' optional pandas / IPython unless COVIDSEG_OPTIONAL_IMPORTS=keep); the settings then name what it left
    out ("left_out")."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    left_out = None
    if training:
        from covidseg_tf.optional_imports import import_tensorflow

        left_out = import_tensorflow()
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    if inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_threads)
    return tf_info() if left_out is None else {**tf_info(), "left_out": left_out}


def tf_info() -> dict[str, Any]:
    import tensorflow as tf

    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # noqa: BLE001
        onednn = None
    import keras

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onednn": onednn,
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def machine_info() -> dict[str, Any]:
    return {"cpu": cpu_model(), "ncpu": os.cpu_count(), "isa": isa_summary(), "python": platform.python_version(),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


# ----------------------------------------------------------------------------------------------- graph functions
def compiled(fn: Callable[[Any], Any], spec: Any, freeze: bool = False, jit_compile: bool = False) -> Any:
    """A graph-compiled inference callable of `fn` for ONE fixed input signature `spec` (a tf.TensorSpec).

    freeze=True: the concrete function with its variables turned into constants
    (convert_variables_to_constants_v2), so grappler can constant-fold weight casts (bfloat16 copies of the
    float32 variables are made once, not at every call) and fuse conv + bias + activation. A frozen function
    does not see later weight updates: build it after the weights are final."""
    import tensorflow as tf

    f = tf.function(fn, input_signature=[spec], jit_compile=jit_compile)
    if not freeze:
        return f
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(f.get_concrete_function())


def key_values(items: list[str]) -> dict[str, str]:
    """{"KEY": "VALUE"} from command-line items "KEY=VALUE" (split at the first "=")."""
    return dict(item.split("=", 1) for item in items)


# ----------------------------------------------------------------------------------------------- output
def emit(result: dict[str, Any], json_out: str | None) -> None:
    """Print the result as ONE JSON line; append it to json_out when given."""
    line = json.dumps(result, default=str)
    print(line, flush=True)
    if json_out:
        d = os.path.dirname(os.path.abspath(json_out))
        os.makedirs(d, exist_ok=True)
        with open(json_out, "a") as f:
            f.write(line + "\n")


def add_common_args(p) -> None:
    p.add_argument("--threads", type=int, default=2, help="TF intra-op threads (oneDNN runs in this pool)")
    p.add_argument("--inter-threads", type=int, default=1, help="TF inter-op threads")
    p.add_argument("--steps", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations after tracing")
    p.add_argument("--clean-stall", type=float, default=0.10,
                   help="a step is clean when its CPU-pressure stall (PSI some) < this fraction of it")
    p.add_argument("--clean-target", type=int, default=0,
                   help="keep timing after --steps until N clean steps exist (or --max-time runs out)")
    p.add_argument("--max-time", type=float, default=120.0, help="time budget of one timed loop (s)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="MAX_S",
                   help="before the first timing, wait up to MAX_S s for other processes to idle (busy < 15%%)")
    p.add_argument("--label", default=None, help="free text copied into the JSON")
    p.add_argument("--json-out", default=None, help="append the JSON line to this file")

#!/usr/bin/env python3
"""Can Stage 2 run as TFLite 16x8 (int16 activations, int8 weights)? A probe for issue 26's next lever.

Converts a stage model with `tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8`, calibrated
on --calibration random pixels (the question is whether it runs, not how well), then tries to invoke it once next to
the float32 TFLite model (`covidseg_tf.optimize.tflite_model`). Reports whether each converts and runs, the
interpreter's error, and the ops of the float32 graph that have no 16x8 kernel in TFLite's builtin op set
(`UNSUPPORTED_16X8`, from TFLite's kernel registrations). Both timed once per --rounds round, batch 1, so a ratio
is only indicative. Prints ONE JSON line; --json-out appends it to a file.

  python bench/int16_probe.py --model /work/train_runs/v4/infection256/model.keras --size 256
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

UNSUPPORTED_16X8 = ("TILE",)  # TFLite builtin ops our U-Nets contain that have no int16 kernel (UpSampling2D)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a stage .keras file")
    p.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--calibration", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", help="append the JSON line to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = {"bench": "int16_probe", "machine": common.machine_info(), "tf": common.configure_tf(args.threads, 1),
              "args": vars(args)}
    import keras
    import tensorflow as tf

    from covidseg_tf.inference.stages import load_stage, model_input_size
    from covidseg_tf.optimize import keras_model, split_outputs, tflite_model

    model = keras_model(load_stage(args.model))
    size, channels = model_input_size(model, args.size)
    rng = np.random.default_rng(0)
    samples = [rng.uniform(0, 255, (1, size, size, channels)).astype("float32") for _ in range(args.calibration)]
    if channels == 4:  # the lung channel is a 0/1 mask
        for s in samples:
            s[..., 3] = s[..., 3] > 127
    content = {"fp32": tflite_model(model, "fp32", image_size=size)}
    inputs = keras.Input((size, size, channels), batch_size=1)
    mask, image_class = split_outputs(model(inputs))
    converter = tf.lite.TFLiteConverter.from_keras_model(
        keras.Model(inputs, [t for t in (mask, image_class) if t is not None]))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([s] for s in samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Keras' export prints the traced endpoints
            content["int16x8"] = converter.convert()
        result["int16x8_converts"] = True
    except Exception as e:  # noqa: BLE001  (record and go on: the probe's answer)
        result["int16x8_converts"], result["int16x8_convert_error"] = False, f"{type(e).__name__}: {e}"[:400]
    interp = tf.lite.Interpreter(model_content=content["fp32"])
    names = [d["name"] for d in interp.get_tensor_details()]
    result["fp32_tensors_from_unsupported_ops"] = {
        op: [n for n in names if f"/{op.title()}" in n or f"/{op}" in n][:8] for op in UNSUPPORTED_16X8}
    times: dict[str, list[float]] = {}
    for name, c in content.items():
        try:
            it = tf.lite.Interpreter(model_content=c, num_threads=args.threads)
            it.allocate_tensors()
            index = it.get_input_details()[0]["index"]
            times[name] = []
            for _ in range(args.rounds):
                it.set_tensor(index, samples[0])
                t = time.perf_counter()
                it.invoke()
                times[name].append(time.perf_counter() - t)
            result[f"{name}_runs"] = True
        except Exception as e:  # noqa: BLE001
            result[f"{name}_runs"], result[f"{name}_run_error"] = False, f"{type(e).__name__}: {e}"[:400]
    result["median_ms"] = {k: round(1e3 * float(np.median(v)), 1) for k, v in times.items() if v}
    common.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()

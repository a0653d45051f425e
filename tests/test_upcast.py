"""Re-exporting bf16 servables in float32 from their SavedModels alone (covidseg_tf.upcast, `export --from`).

Tiny EfficientNet-B0 U-Nets at 64 px (random weights, BatchNorms far from identity) are exported in bf16 once per
module and re-exported by the CLI. The float32 copy must compute what the bf16 graph's weights give in float32:
its outputs, read as TF Serving reads them (TF1 loader, tag `serve`, fresh process), equal those of a float32
folded copy of the model holding the bf16 servable's weights (`bf16_weights_in_fp32`) within FP32_TOL, while
the bf16 servable itself is further off (so the comparison can tell the two apart).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize_batchnorms, run_tf1
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

from covidseg_tf import export
from covidseg_tf.inference import Predictor
from covidseg_tf.inference.stages import ExportManifest
from covidseg_tf.models import build_unet
from covidseg_tf.optimize import fold_batchnorm
from covidseg_tf.upcast import float32_graph_def

S = 64
FP32_TOL = 2e-5


def bf16_values(saved_model: Path) -> int:
    """How many constants, dtype attributes and function arguments of a saved_model.pb are bfloat16 (an
    independent scan of the proto, not the rewrite under test)."""
    proto = saved_model_pb2.SavedModel.FromString((saved_model / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def

    def attrs(values) -> int:
        n = 0
        for a in values:
            n += a.type == types_pb2.DT_BFLOAT16 or a.tensor.dtype == types_pb2.DT_BFLOAT16
            n += sum(t == types_pb2.DT_BFLOAT16 for t in a.list.type)
        return n

    n = sum(attrs(node.attr.values()) for node in graph.node)
    for f in graph.library.function:
        n += sum(attrs(node.attr.values()) for node in f.node_def)
        n += sum(arg.type == types_pb2.DT_BFLOAT16 for arg in (*f.signature.input_arg, *f.signature.output_arg))
    return n


def bf16_weights_in_fp32(model: keras.Model) -> keras.Model:
    """The float32 folded copy of `model` holding the bf16 export's weights (each bfloat16 value upcast): what the
    upcast servable computes."""
    bf16, fp32 = fold_batchnorm(model, "bf16"), fold_batchnorm(model, "fp32")
    fp32.set_weights([np.asarray(w).astype(np.float32) for w in bf16.get_weights()])
    return fp32


@pytest.fixture(scope="module")
def models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    out = {"lung": build_unet("efficientnetb0", (S, S, 3), encoder_weights=None, name="lung_up"),
           "infection": build_unet("efficientnetb0", (S, S, 4), encoder_weights=None, name="infection_up")}
    for i, model in enumerate(out.values()):
        randomize_batchnorms(model, seed=i)
    return out


@pytest.fixture(scope="module")
def pixels() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (2, S, S, 3)).astype(np.float32)
    mask = (rng.uniform(size=(2, S, S, 1)) > 0.4).astype(np.float32)
    return {"lung": image, "infection": np.concatenate([image, mask], -1)}


@pytest.fixture(scope="module")
def expected(models, pixels) -> dict[str, np.ndarray]:
    """Each stage's probabilities on `pixels` from `bf16_weights_in_fp32`: what its float32 copy must give."""
    return {s: bf16_weights_in_fp32(models[s])(pixels[s], training=False).numpy() for s in ("lung", "infection")}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory) -> dict[str, Any]:
    """bf16 servables under `bf16/`, their float32 copies by `export --from bf16 --out fp32`, and one fp32 export."""
    root = tmp_path_factory.mktemp("upcast")
    bf16, fp32 = root / "bf16", root / "fp32"
    export.export_stage(models["lung"], "lung", bf16, precision="bf16")
    export.export_stage(models["infection"], "infection", bf16, precision="bf16")
    export.export_cascade(models["lung"], models["infection"], bf16, precision="bf16")
    plain = export.export_stage(models["lung"], "lung", root / "plain", precision="fp32")
    code = export.main(["--from", str(bf16), "--out", str(fp32)])
    return {"root": root, "bf16": bf16, "fp32": fp32, "plain": plain, "code": code}


@pytest.fixture(scope="module")
def served(exported, pixels, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """predict_pixels of every bf16 servable and its float32 copy, through the TF1 loader in a fresh process."""
    out = {}
    for servable, feed in (("lung", pixels["lung"]), ("infection", pixels["infection"]), ("cascade", pixels["lung"])):
        for kind in ("bf16", "fp32"):
            (result,) = run_tf1(exported[kind] / servable / "1", [{"signature": "predict_pixels",
                                                                   "feeds": {"pixels": feed}}],
                                tmp_path_factory.mktemp(f"{kind}_{servable}"))
            assert "outputs" in result, result
            out[f"{kind}/{servable}"] = result["outputs"]
    return out


def test_cli_writes_a_float32_copy_of_each_servable(exported):
    assert exported["code"] == 0
    for servable in ("lung", "infection", "cascade"):
        source, copy = exported["bf16"] / servable / "1", exported["fp32"] / servable / "1"
        old, new = ExportManifest.read(source), ExportManifest.read(copy)
        assert (old.precision, new.precision) == ("bf16", "fp32")
        assert new.extra["converted_from"] == {"path": str(source), "precision": "bf16",
                                               "exported_at": old.exported_at}
        assert (new.servable, new.image_size, new.channels, new.threshold, new.decision, new.signatures,
                new.max_side) == (old.servable, old.image_size, old.channels, old.threshold, old.decision,
                                  old.signatures, old.max_side)
        assert bf16_values(source) > 0 and bf16_values(copy) == 0
        assert (copy / "assets.extra" / "tf_serving_warmup_requests").is_file()


def test_signatures_keep_their_names_inputs_and_outputs(exported):
    for servable in ("lung", "infection", "cascade"):
        old = tf.saved_model.load(str(exported["bf16"] / servable / "1")).signatures
        new = tf.saved_model.load(str(exported["fp32"] / servable / "1")).signatures
        assert sorted(old) == sorted(new)
        for name in old:
            assert new[name].structured_input_signature == old[name].structured_input_signature
            assert {k: (v.dtype, v.shape.as_list()) for k, v in new[name].structured_outputs.items()} == {
                k: (v.dtype, v.shape.as_list()) for k, v in old[name].structured_outputs.items()}


@pytest.mark.parametrize("servable", ["lung", "infection"])
def test_stage_computes_the_bf16_weights_in_float32(served, expected, servable):
    want = expected[servable]
    got, bf16 = served[f"fp32/{servable}"][f"{servable}_prob"], served[f"bf16/{servable}"][f"{servable}_prob"]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=FP32_TOL, rtol=0)
    assert np.abs(bf16 - want).max() > 10 * FP32_TOL  # bf16 activations: the comparison tells them apart


def test_cascade_copy_matches_its_stages(served, expected):
    np.testing.assert_allclose(served["fp32/cascade"]["lung_prob"], expected["lung"], atol=FP32_TOL, rtol=0)
    assert sorted(served["fp32/cascade"]) == sorted(served["bf16/cascade"])
    np.testing.assert_allclose(served["fp32/cascade"]["infection_prob"], served["bf16/cascade"]["infection_prob"],
                               atol=0.05, rtol=0)


def test_predictor_loads_the_copies(exported, expected, pixels):
    predictor = Predictor.load(exported["fp32"] / "lung" / "1", exported["fp32"] / "infection" / "1")
    out = predictor.predict_pixels(tf.constant(pixels["lung"]))
    np.testing.assert_allclose(out["lung_prob"].numpy(), expected["lung"], atol=FP32_TOL, rtol=0)
    assert predictor.lung_model.manifest.precision == "fp32"


def test_one_version_folder_goes_to_the_next_free_version(exported):
    source = exported["bf16"] / "lung" / "1"
    assert export.main(["--from", str(source), "--out", str(exported["fp32"]), "--no-warmup"]) == 0
    copy = exported["fp32"] / "lung" / "2"
    assert ExportManifest.read(copy).extra["converted_from"]["path"] == str(source)
    assert not (copy / "assets.extra" / "tf_serving_warmup_requests").exists()
    assert not (exported["fp32"] / "infection" / "2").exists()


def test_a_float32_source_is_refused_and_nothing_written(exported, tmp_path, caplog):
    mixed = tmp_path / "mixed"
    for servable, source in (("lung", exported["plain"]), ("infection", exported["bf16"] / "infection" / "1")):
        (mixed / servable).mkdir(parents=True)
        (mixed / servable / "1").symlink_to(source, target_is_directory=True)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert export.main(["--from", str(mixed), "--out", str(out)]) == 2
    assert f"{mixed / 'lung' / '1'}: precision fp32" in caplog.text
    assert not out.exists() or not any(out.rglob("saved_model.pb"))  # the bf16 infection stage was not written


def test_a_folder_without_servables_is_refused(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert export.main(["--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "nothing: neither an exported version folder" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--tflite"], "--tflite cannot be combined"),
    (["--lung-model", "L.keras"], "--lung-model cannot be combined"),
    (["--threshold", "0.4"], "--threshold cannot be combined"),
    (["--precision", "bf16"], "--precision bf16 cannot be combined"),
])
def test_keras_export_flags_are_refused_with_from(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.parse_args(["--from", str(tmp_path), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_without_models_or_from_the_cli_says_what_it_needs(capsys):
    with pytest.raises(SystemExit):
        export.parse_args(["--lung-model", "L.keras"])
    assert "--lung-model and --infection-model are required (or --from DIR" in capsys.readouterr().err


def test_graph_def_rewrite_reaches_nested_functions():
    """A bf16 constant inside a function called from the graph is upcast, with the call's and the function's
    types, and the rewritten graph runs in float32 on the exactly upcast value."""
    value = np.float32(1.0 + 2.0**-7)  # exactly representable in bfloat16

    @tf.function
    def inner(x):
        return x * tf.constant(value, tf.bfloat16)

    @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
    def outer(x):
        return tf.cast(inner(tf.cast(x, tf.bfloat16)), tf.float32)

    concrete = outer.get_concrete_function()
    graph_def, n = float32_graph_def(concrete.graph.as_graph_def())
    assert n > 0 and len(graph_def.library.function) >= 1
    assert float32_graph_def(graph_def)[1] == 0
    wrapped = tf.compat.v1.wrap_function(lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    run = wrapped.prune(wrapped.graph.get_tensor_by_name(concrete.inputs[0].name),
                        wrapped.graph.get_tensor_by_name(concrete.outputs[0].name))
    x = np.float32(1.0 + 2.0**-10)  # not representable in bfloat16: rounded in the bf16 graph, kept in float32
    assert float(run(tf.constant(x))) == pytest.approx(float(x) * float(value), rel=1e-7)
    assert float(concrete(tf.constant(x))) != pytest.approx(float(x) * float(value), rel=1e-7)


def test_manifest_json_round_trips_the_conversion_record(exported):
    raw = json.loads((exported["fp32"] / "cascade" / "1" / ExportManifest.FILE).read_text())
    assert raw["precision"] == "fp32" and raw["converted_from"]["precision"] == "bf16"

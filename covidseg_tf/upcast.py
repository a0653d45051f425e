"""A bfloat16 servable re-exported in float32 from its SavedModel alone: for CPUs without bfloat16 units.

    python -m covidseg_tf.export --from saved_models --out saved_models_fp32     # every servable's newest version
    reexport_fp32("saved_models/cascade/5", "saved_models_fp32")                 # -> saved_models_fp32/cascade/1
                                                                                 # (covidseg_tf.export)

A `--precision bf16` export (covidseg_tf.optimize) stores its weights in bfloat16 and computes in bfloat16 between
float32 input preprocessing and float32 outputs. That is fast where the CPU has bfloat16 units (AVX512_BF16, AMX)
and slower than float32 where oneDNN emulates them (AVX2 only). The `.keras` files it came from are not shipped, so
this module makes the float32 servable from the SavedModel itself: every bfloat16 value converts to float32
exactly, so `float32_graph_def` rewrites each bfloat16 in the signature graphs and their function library (constant
tensors, op dtype attributes, function argument types) to float32. The copy holds the same weights and the same
graph (pre- and post-processing, decision, signatures), computed in float32: its outputs differ from the bf16
servable's only by the bfloat16 rounding of activations, and from a float32 export of the original `.keras` model
only by the bfloat16 rounding of the weights.

The new version goes to `<out>/<servable>/<N>` (the next free version, written to a temporary folder first, as
`covidseg_tf.export` writes), with the same manifest but `precision: "fp32"` and a `converted_from` entry, fresh
warm-up requests and the source's `stage.tflite` copied unchanged.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, graph_pb2, types_pb2

from covidseg_tf.files import integer_versions
from covidseg_tf.inference.stages import TFLITE_FILE, ExportManifest

log = logging.getLogger(__name__)

_BF16, _F32 = types_pb2.DT_BFLOAT16, types_pb2.DT_FLOAT


def _upcast_attr(attr: attr_value_pb2.AttrValue) -> int:
    """Rewrite the bfloat16 dtypes and tensors of one attribute value to float32 in place; returns how many."""
    kind = attr.WhichOneof("value")
    if kind == "type" and attr.type == _BF16:
        attr.type = _F32
        return 1
    if kind == "tensor" and attr.tensor.dtype == _BF16:
        values = tf.make_ndarray(attr.tensor).astype(np.float32)  # exact: bfloat16 is float32's upper half
        attr.tensor.CopyFrom(tf.make_tensor_proto(values, dtype=tf.float32))
        return 1
    if kind == "list":
        n = 0
        for i, t in enumerate(attr.list.type):
            if t == _BF16:
                attr.list.type[i] = _F32
                n += 1
        return n
    if kind == "func":
        return sum(_upcast_attr(a) for a in attr.func.attr.values())
    return 0


def _upcast_nodes(nodes: Any) -> int:
    return sum(_upcast_attr(a) for node in nodes for a in node.attr.values())


def _rename_functions(graph_def: graph_pb2.GraphDef, suffix: str) -> None:
    """Append `suffix` to the name of every function of `graph_def`'s library, and to every reference to it (an
    op calling it, a function-valued attribute such as PartitionedCall's `f`, a gradient entry), in place."""
    names = {f.signature.name: f"{f.signature.name}{suffix}" for f in graph_def.library.function}

    def attr(a: attr_value_pb2.AttrValue) -> None:
        kind = a.WhichOneof("value")
        if kind == "func":
            a.func.name = names.get(a.func.name, a.func.name)
            for inner in a.func.attr.values():
                attr(inner)
        elif kind == "list":
            for f in a.list.func:
                f.name = names.get(f.name, f.name)

    def nodes(node_defs: Any) -> None:
        for node in node_defs:
            node.op = names.get(node.op, node.op)
            for a in node.attr.values():
                attr(a)

    nodes(graph_def.node)
    for function in graph_def.library.function:
        function.signature.name = names[function.signature.name]
        nodes(function.node_def)
    for gradient in graph_def.library.gradient:
        gradient.function_name = names.get(gradient.function_name, gradient.function_name)
        gradient.gradient_func = names.get(gradient.gradient_func, gradient.gradient_func)


def float32_graph_def(graph_def: graph_pb2.GraphDef) -> tuple[graph_pb2.GraphDef, int]:
    """A copy of `graph_def` with every bfloat16 turned float32 (module docstring), and how many values changed.

    Covers the graph's nodes and each function of its library: its nodes, its argument and result types, and
    its attributes. A graph without bfloat16 comes back equal, with 0. A function that changes is renamed
    (`_fp32_<random hex>` appended, and every call to it), so the float32 copy can live in the same process as the
    bfloat16 original, whose functions TensorFlow has registered under the old names (the lung and cascade
    servables share their Stage-1 function, for one).

    >>> g = tf.Graph()
    >>> with g.as_default():
    ...     _ = tf.cast(tf.constant([1.5], tf.bfloat16), tf.float32)
    >>> out, n = float32_graph_def(g.as_graph_def())
    >>> n, sorted({node.attr["dtype"].type for node in out.node if node.op == "Const"}) == [types_pb2.DT_FLOAT]
    (2, True)
    """
    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    n = _upcast_nodes(out.node)
    for function in out.library.function:
        n += _upcast_nodes(function.node_def)
        for arg in (*function.signature.input_arg, *function.signature.output_arg):
            if arg.type == _BF16:
                arg.type = _F32
                n += 1
        n += sum(_upcast_attr(a) for a in function.attr.values())
        for attrs in function.arg_attr.values():
            n += sum(_upcast_attr(a) for a in attrs.attr.values())
    if n:
        _rename_functions(out, f"_fp32_{uuid.uuid4().hex[:12]}")
    return out, n


def float32_signature(fn: Any) -> tuple[Any, list[tf.TensorSpec], int]:
    """The float32 copy of one loaded signature function (a ConcreteFunction of `tf.saved_model.load(...)
    .signatures`): (a callable taking its inputs positionally and returning its output dict, their named
    TensorSpecs, how many bfloat16 values changed)."""
    graph_def, n = float32_graph_def(fn.graph.as_graph_def())
    specs = fn.structured_input_signature[1]
    placeholders = {t.op.name: t for t in fn.inputs}
    missing = [name for name in specs if name not in placeholders]
    if missing:
        raise ValueError(f"signature inputs {missing} have no placeholder of that name in the graph")
    wrapped = tf.compat.v1.wrap_function(lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    feeds = [wrapped.graph.get_tensor_by_name(placeholders[name].name) for name in specs]
    outputs = tf.nest.pack_sequence_as(fn.structured_outputs, fn.outputs)  # {output name: tensor of fn.graph}
    fetches = {key: wrapped.graph.get_tensor_by_name(t.name) for key, t in outputs.items()}
    pruned = wrapped.prune(feeds=feeds, fetches=fetches)
    input_signature = [tf.TensorSpec(spec.shape, spec.dtype, name=name) for name, spec in specs.items()]
    return (lambda *args: pruned(*args)), input_signature, n


def servable_versions(source: Path | str, servables: list[str] | tuple[str, ...]) -> list[Path]:
    """The version folders `--from source` re-exports: `source` itself when it is one (it holds an export
    manifest), else the newest version of each of `servables` under the base folder `source` (those present).
    ValueError naming `source` when there is none."""
    source = Path(source)
    if ExportManifest.find(source) is not None:
        return [source]
    found = [versions[max(versions)] for s in servables if (versions := integer_versions(source / s))]
    if not found:
        raise ValueError(f"{source}: neither an exported version folder (no {ExportManifest.FILE}) nor a base folder "
                         f"holding versions of {', '.join(servables)}")
    return found


def check_bf16(version_dir: Path | str) -> ExportManifest:
    """The manifest of `version_dir`, which must be a bf16 export (ValueError naming the folder otherwise)."""
    manifest = ExportManifest.read(version_dir)
    if manifest.precision != "bf16":
        raise ValueError(f"{version_dir}: precision {manifest.precision or 'fp32'} in its manifest; only bf16 "
                         "servables are re-exported (to fp32)")
    return manifest


def float32_servable(version_dir: Path | str) -> tuple[dict, ExportManifest, tuple[bytes, Any] | None]:
    """The float32 copy of the bf16 servable at `version_dir`, for `covidseg_tf.export.reexport_fp32` to write:
    ({signature name: (fn, input_signature)}, its new manifest, (the `stage.tflite` bytes, its manifest entry) or
    None). ValueError naming the folder when it is not a bf16 export."""
    version_dir = Path(version_dir)
    manifest = check_bf16(version_dir)
    loaded = tf.saved_model.load(str(version_dir))
    signatures, changed = {}, 0
    for name, fn in loaded.signatures.items():
        call, input_signature, n = float32_signature(fn)
        signatures[name] = (call, input_signature)
        changed += n
    log.info("%s: %d bfloat16 constants and dtypes made float32 in %d signatures", version_dir, changed,
             len(signatures))
    tflite_path = version_dir / TFLITE_FILE
    tflite = ((tflite_path.read_bytes(), manifest.tflite)
              if manifest.tflite is not None and tflite_path.is_file() else None)
    converted = {"path": str(version_dir), "precision": manifest.precision, "exported_at": manifest.exported_at}
    return signatures, manifest.replace(precision="fp32", extra={**manifest.extra, "converted_from": converted}), tflite

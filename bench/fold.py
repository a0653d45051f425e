"""BatchNorm folding (now in the product: covidseg_tf.optimize) and `compiled`, the timing harness's graph function.

`fold_batchnorm(model)` keeps each layer's own dtype policy here (a model built under "mixed_bfloat16" stays
mixed); the exported SavedModels use `covidseg_tf.optimize.frozen_stage(model, precision)`, i.e. folding plus
freezing, with bfloat16 weights for precision "bf16".
"""

from __future__ import annotations

from covidseg_tf.optimize import FoldedBatchNorm, fold_batchnorm, foldable_pairs  # noqa: F401  (re-exported)


def compiled(fn, spec, freeze: bool = False, jit_compile: bool = False):
    """A graph-compiled inference callable of `fn` for ONE fixed input signature `spec`.

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

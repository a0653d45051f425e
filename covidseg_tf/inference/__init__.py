"""Inference: model pixels and the input gate, stage models of every format, the decision, and the `Predictor`.

    from covidseg_tf.inference import Predictor
    predictor = Predictor.load("saved_models/lung", "saved_models/infection")
    [prediction] = predictor.predict([gray])      # gray: H x W uint8

Modules: `preprocess` (model pixels, the gate), `stages` (the `Stage` interface, `load_stage`, `ExportManifest`),
`postprocess` (`Decision`, `apply_decision`, severity and grades), `predictor` (`run_stages`, `Predictor`).
Nothing here imports training code.
"""

from covidseg_tf.inference.postprocess import Decision
from covidseg_tf.inference.predictor import Prediction, Predictor
from covidseg_tf.inference.stages import ExportManifest, Stage, load_stage

__all__ = ["Decision", "ExportManifest", "Prediction", "Predictor", "Stage", "load_stage"]

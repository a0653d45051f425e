"""The training optimizer: Keras' AdamW with its TensorFlow update fused into one op per variable.

Keras 3 writes AdamW's update in backend-neutral ops, per variable: the bias corrections, both moments, the step
and the decoupled weight decay come to ~44 graph ops for each trainable variable (~61 with the per-variable
clipnorm of Stage 2), recomputing the same scalars (learning rate, beta powers) for every one. For our U-Nets
(367 trainable variables in Stage 1, 240 in Stage 2) that is 60 % / 67 % of the traced train step's 27,136 /
22,030 ops, and a traced op costs memory for as long as the train function lives (its Python graph, the
function's definition and the executor's kernels): bench/RESULTS.md, "Training memory (issue 26)".

`FusedAdamW` computes those scalars once per step and updates each variable with TensorFlow's ResourceApplyAdam
(the same arithmetic as Keras' Adam, in the same order: alpha = lr * sqrt(1 - beta2^t) / (1 - beta1^t);
m += (g - m) * (1 - beta1); v += (g^2 - v) * (1 - beta2); var -= m * alpha / (sqrt(v) + epsilon)) and its
weight decay with ResourceApplyGradientDescent (var -= (var * weight_decay) * lr, Keras' order). Its variables,
their names and its config are AdamW's, so a run's backup saved with either optimizer restores into the other.
With another backend, amsgrad or under a tf.distribute strategy it is plain AdamW.
"""

from __future__ import annotations

import keras

from covidseg_tf.config import StageConfig


@keras.saving.register_keras_serializable(package="covidseg_tf")
class FusedAdamW(keras.optimizers.AdamW):
    """keras.optimizers.AdamW whose TensorFlow update step is one fused op per variable (module docstring)."""

    def _fused(self) -> bool:
        """Fused ops: TensorFlow, no amsgrad, no tf.distribute strategy (one that mirrors the variables gets
        Keras' update)."""
        if keras.backend.backend() != "tensorflow" or self.amsgrad:
            return False
        import tensorflow as tf

        return not tf.distribute.has_strategy()

    def _apply_weight_decay(self, variables):
        if not self._fused() or self.weight_decay is None:
            return super()._apply_weight_decay(variables)
        import tensorflow as tf

        lr = tf.cast(self.learning_rate, "float32")
        wd = tf.cast(self.weight_decay, "float32")
        scalars = {}

        def decay(variable):
            dtype = variable.dtype.base_dtype
            if dtype not in scalars:
                scalars[dtype] = (tf.cast(lr, dtype), tf.cast(wd, dtype))
            lr_, wd_ = scalars[dtype]
            tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr_, delta=variable * wd_)

        def apply(distribution, variables):
            for variable in variables:
                if self._use_weight_decay(variable):
                    variable = variable.value if isinstance(variable, keras.Variable) else variable
                    distribution.extended.update(variable, decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, variables)

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        if not self._fused():
            return super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
        import tensorflow as tf

        step = tf.cast(self.iterations + 1, "float32")
        base = {"lr": tf.cast(learning_rate, "float32"), "beta1_power": tf.pow(tf.constant(self.beta_1), step),
                "beta2_power": tf.pow(tf.constant(self.beta_2), step), "beta1": tf.constant(self.beta_1),
                "beta2": tf.constant(self.beta_2), "epsilon": tf.constant(self.epsilon)}
        scalars = {}

        def update(variable, grad):
            dtype = variable.dtype.base_dtype
            if dtype not in scalars:
                scalars[dtype] = {k: tf.cast(v, dtype) for k, v in base.items()}
            index = self._get_variable_index(variable)
            tf.raw_ops.ResourceApplyAdam(var=variable.handle, m=self._momentums[index].value.handle,
                                         v=self._velocities[index].value.handle, grad=tf.cast(grad, dtype),
                                         **scalars[dtype])

        for grad, variable in grads_and_vars:
            distribution.extended.update(variable, update, args=(grad,), group=False)


def make_optimizer(cfg: StageConfig, learning_rate=None) -> keras.optimizers.Optimizer:
    """The optimizer `covidseg_tf.train` trains `cfg` with: FusedAdamW with the stage's weight decay and clipnorm,
    at `learning_rate` (a float or a schedule; default cfg.learning_rate)."""
    return FusedAdamW(learning_rate=cfg.learning_rate if learning_rate is None else learning_rate,
                      weight_decay=cfg.weight_decay, clipnorm=cfg.clipnorm)

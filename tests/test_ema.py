"""EMA of the weights: the average against a NumPy recurrence (Keras's rule, timm ModelEmaV3's
warmup, once per update under gradient accumulation), saving and resuming it exactly, fit
not overwriting the weights, and evaluating with it (also under MirroredStrategy)."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit.training import ClassificationLoss, build_optimizer
from keras_vit.training import ema
from keras_vit.training.fused_optimizers import FusedSGD

TINY = keras_vit.ViTConfig(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
SHAPES = [(4, 3), (3,)]


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras_vit.create_model(TINY, image_size=8, num_classes=3)


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 255, (n, 8, 8, 3)).astype(np.float32),
            rng.integers(0, 3, n).astype(np.int32))


def numpy_ema(gradients, start, lr, decay, warmup, accumulation):
    """float64 truth: SGD w -= lr * mean(micro-batch grads) per update; after update t
    (0-based) a = d_t a + (1 - d_t) w with d_t = 0 at t = 0, then `decay`, or with warmup
    min(decay, 1 - (1 + t) ** (-2/3)) (timm/utils/model_ema.py ModelEmaV3.get_decay, its
    step - 1 = t)."""
    w = [s.astype(np.float64) for s in start]
    average = [x.copy() for x in w]
    for t in range(len(gradients) // accumulation):
        micro = gradients[t * accumulation:(t + 1) * accumulation]
        w = [x - lr * np.mean([g[i] for g in micro], axis=0) for i, x in enumerate(w)]
        d = min(decay, 1 - (1 + t) ** (-2 / 3)) if warmup else (0.0 if t == 0 else decay)
        average = [d * a + (1 - d) * x for a, x in zip(average, w)]
    return w, average


def keras_rule(gradients, start, lr, decay, accumulation):
    """Keras 3.15's average under accumulation (base_optimizer `_backend_apply_gradients`):
    a step at every micro-step s, decay 0 while s // accumulation == 0."""
    w = [x.astype(np.float64) for x in start]
    average = [x.copy() for x in w]
    for s in range(len(gradients)):
        if (s + 1) % accumulation == 0:
            micro = gradients[s + 1 - accumulation:s + 1]
            w = [x - lr * np.mean([g[i] for g in micro], axis=0) for i, x in enumerate(w)]
        d = 0.0 if s // accumulation == 0 else decay
        average = [d * a + (1 - d) * x for a, x in zip(average, w)]
    return average


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_average_follows_the_recurrence(warmup, accumulation):
    """8 updates (24 micro-steps with accumulation 3). Tolerance 1e-6 (float32 rounding of
    ~30 multiply-adds of O(1) values); a step too many or a wrong decay is off by > 1e-3."""
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    gradients = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES]
                 for _ in range(8 * accumulation)]
    variables = [keras.Variable(s) for s in start]
    optimizer = FusedSGD(learning_rate=0.1, momentum=0.0, use_ema=True, ema_momentum=0.7,
                         ema_warmup=warmup,
                         gradient_accumulation_steps=accumulation if accumulation > 1 else None)
    apply = tf.function(lambda g: optimizer.apply(g, variables))
    for grads in gradients:
        apply(grads)
    weights, average = numpy_ema(gradients, start, 0.1, 0.7, warmup, accumulation)
    averages = optimizer._model_variables_moving_average
    for variable, want_w, got_a, want_a in zip(variables, weights, averages, average):
        np.testing.assert_allclose(variable.numpy(), want_w, atol=1e-6)
        np.testing.assert_allclose(got_a.numpy(), want_a, atol=1e-6)
    if accumulation > 1:
        # Keras's own rule steps the average at every micro-step: the test can tell them apart.
        every_micro_step = keras_rule(gradients, start, 0.1, 0.7, accumulation)
        assert not np.allclose(every_micro_step[0], average[0], atol=1e-3)


def _compiled(seed=0, **settings):
    model = tiny_model(seed)
    optimizer = build_optimizer("adamw", 0.003, model=model, **settings)
    model.compile(optimizer, ClassificationLoss("softmax", 3), metrics=["accuracy"])
    return model


def test_fit_keeps_the_raw_weights():
    """Keras's finalize_variable_values would copy the EMA in at the end of fit; not here."""
    model = _compiled(ema_decay=0.9)
    seen = {}
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.update(
        weights=[v.numpy().copy() for v in model.trainable_variables]))
    model.fit(*_data(), batch_size=4, epochs=1, verbose=0, callbacks=[record])
    averages = ema.ema_values(model)
    for variable, before in zip(model.trainable_variables, seen["weights"]):
        np.testing.assert_array_equal(variable.numpy(), before)
    assert any(not np.allclose(averages[v.path], v.numpy()) for v in model.trainable_variables)
    ema.copy_ema_into_model(model)  # --export_ema
    for variable in model.trainable_variables:
        np.testing.assert_array_equal(variable.numpy(), averages[variable.path])


SETTINGS = dict(ema_decay=0.8, ema_warmup=True, layer_decay=0.7, weight_decay=0.05,
                gradient_accumulation_steps=2, global_clipnorm=1.0)


def test_save_load_and_continue_equals_uninterrupted(tmp_path):
    """save_weights after 2 updates -> a new model and optimizer -> load_weights: the same EMA
    bit for bit, and 2 more updates give what 4 uninterrupted updates give, exactly."""
    images, labels = _data()
    whole = _compiled(**SETTINGS)
    whole.fit(images, labels, batch_size=2, epochs=1, shuffle=False, verbose=0)  # 8 micro-steps
    first = _compiled(**SETTINGS)
    first.fit(images[:8], labels[:8], batch_size=2, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "state.weights.h5")
    first.save_weights(path)
    resumed = _compiled(seed=1, **SETTINGS)  # other initial weights: all must come from disk
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(path)
    for name, values in ema.ema_values(first).items():
        np.testing.assert_array_equal(ema.ema_values(resumed)[name], values)
    assert int(resumed.optimizer.iterations.numpy()) == 2
    resumed.fit(images[8:], labels[8:], batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert int(resumed.optimizer.iterations.numpy()) == int(whole.optimizer.iterations.numpy()) == 4
    for a, b in zip(resumed.trainable_variables, whole.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for name, values in ema.ema_values(whole).items():
        np.testing.assert_array_equal(ema.ema_values(resumed)[name], values)


def test_evaluation_with_ema_weights():
    images, labels = _data()
    model = _compiled(ema_decay=0.9)
    model.fit(images, labels, batch_size=4, epochs=2, verbose=0)
    raw = [v.numpy().copy() for v in model.trainable_variables]
    with_ema = ema.evaluate_with_ema(model, (images, labels), verbose=0)
    # Truth: the same model with the EMA values set by hand.
    twin = _compiled(seed=3, ema_decay=0.9)
    averages = ema.ema_values(model)
    for variable in twin.trainable_variables:
        variable.assign(averages[variable.path])
    by_hand = twin.evaluate(images, labels, return_dict=True, verbose=0)
    assert with_ema["loss"] == pytest.approx(by_hand["loss"], rel=1e-6)
    plain = model.evaluate(images, labels, return_dict=True, verbose=0)
    assert abs(plain["loss"] - with_ema["loss"]) > 1e-4  # the weights differ, so do the losses
    for variable, before in zip(model.trainable_variables, raw):
        np.testing.assert_array_equal(variable.numpy(), before)  # restored
    with pytest.raises(RuntimeError, match="inside"):
        with ema.ema_weights(model):
            raise RuntimeError("inside")
    for variable, before in zip(model.trainable_variables, raw):
        np.testing.assert_array_equal(variable.numpy(), before)  # restored after an exception


def test_zero_decay_average_equals_the_weights():
    """ema_momentum 0: the average is the last weights, so both evaluations agree exactly."""
    images, labels = _data()
    model = tiny_model()
    model.compile(FusedSGD(learning_rate=0.05, use_ema=True, ema_momentum=0.0),
                  ClassificationLoss("softmax", 3))
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert ema.evaluate_with_ema(model, (images, labels), verbose=0) == model.evaluate(
        images, labels, return_dict=True, verbose=0)


def test_callback_adds_val_ema_logs_on_validated_epochs():
    images, labels = _data()
    model = _compiled(ema_decay=0.9)
    history = model.fit(images, labels, batch_size=4, epochs=2, verbose=0,
                        validation_data=(images, labels), validation_freq=2,
                        callbacks=[ema.EmaEvaluation((images, labels))])
    logs = history.history
    assert len(logs["val_loss_ema"]) == len(logs["val_accuracy_ema"]) == 1  # epoch 2 only
    after = ema.evaluate_with_ema(model, (images, labels), verbose=0)
    assert logs["val_loss_ema"][0] == pytest.approx(after["loss"], rel=1e-6)
    assert logs["val_loss_ema"][0] != pytest.approx(logs["val_loss"][0], rel=1e-4)


def test_without_ema_the_helpers_say_so():
    model = _compiled()
    with pytest.raises(ema.EmaError, match="ema_decay"):
        ema.evaluate_with_ema(model, _data())
    with pytest.raises(ValueError, match="ema_warmup=True warms up an EMA"):
        build_optimizer("sgd", 0.1, ema_warmup=True)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        build_optimizer("sgd", 0.1, ema_decay=1.0)


# --- MirroredStrategy over 2 logical CPUs (subprocess: devices are set before TF starts) ----

def _run(strategy):
    images, labels = _data(32)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras_vit.create_model(TINY, image_size=8, num_classes=3)
        # No accumulation: Keras 3.15's accumulation all-reduces inside a cond, which
        # MirroredStrategy refuses ("merge_call called while defining a new graph").
        settings = dict(SETTINGS, gradient_accumulation_steps=1)
        model.compile(build_optimizer("adamw", 0.003, model=model, **settings),
                      ClassificationLoss("softmax", 3))
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    val = strategy.experimental_distribute_dataset(train)
    history = model.fit(strategy.experimental_distribute_dataset(train), epochs=2, verbose=0,
                        validation_data=val, callbacks=[ema.EmaEvaluation(val)])
    return {"weights": [float(np.abs(v.numpy()).sum()) for v in model.trainable_variables],
            "ema": [float(np.abs(a).sum()) for a in ema.ema_values(model).values()],
            "val_loss_ema": history.history["val_loss_ema"]}


def main():
    from tests.train_helpers import print_result, two_logical_cpus

    mirrored = tf.distribute.MirroredStrategy(two_logical_cpus())
    out = {"replicas": mirrored.num_replicas_in_sync,
           "one": _run(tf.distribute.get_strategy()), "two": _run(mirrored)}
    print_result(out)


@pytest.mark.slow
def test_mirrored_matches_one_device():
    """EMA (warmup) + layer decay + active clipping + weight decay on 2 replicas: the weights,
    the EMA and val_loss_ema of one device. rtol 1e-4 on sums of |w| (measured 2e-5: float32
    all-reduce order); Keras's per-replica clipping, which `fused_optimizers` replaces, is off
    by 0.14."""
    from tests.train_helpers import run_result_script

    out = run_result_script(__file__)
    assert out["replicas"] == 2
    for key in ("weights", "ema", "val_loss_ema"):
        np.testing.assert_allclose(out["two"][key], out["one"][key], rtol=1e-4, err_msg=key)
    assert out["one"]["ema"] != pytest.approx(out["one"]["weights"], rel=1e-4)


if __name__ == "__main__":
    main()


_JAX_SCRIPT = """
import numpy as np, keras
from keras_vit.training.fused_optimizers import FusedSGD
from tests.test_ema import SHAPES, numpy_ema
assert keras.backend.backend() == "jax"
rng = np.random.default_rng(0)
start = [rng.standard_normal(s).astype("float32") for s in SHAPES]
gradients = [[rng.standard_normal(s).astype("float32") for s in SHAPES] for _ in range(12)]
variables = [keras.Variable(s) for s in start]
optimizer = FusedSGD(learning_rate=0.1, momentum=0.0, use_ema=True, ema_momentum=0.7,
                     ema_warmup=True, gradient_accumulation_steps=3)
for grads in gradients:
    optimizer.apply(grads, variables)
weights, average = numpy_ema(gradients, start, 0.1, 0.7, True, 3)
averages = optimizer._model_variables_moving_average
for v, a, want_w, want_a in zip(variables, averages, weights, average):
    np.testing.assert_allclose(np.asarray(v), want_w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a), want_a, atol=1e-6)
print("ok")
"""


def test_jax_backend_average_follows_the_recurrence():
    """Keras's JAX optimizer path: the same once-per-update, warmed-up average."""
    from tests.train_helpers import REPO, subprocess_env

    pytest.importorskip("jax", reason="jax is a test extra: pip install -e '.[test]'")
    env = subprocess_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _JAX_SCRIPT], env=env, timeout=300,
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]

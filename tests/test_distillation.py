"""DeiT distillation (keras_vit/training/distillation.py) against hand computations in NumPy.

Truths: the hard loss is the cross-entropy on the teacher's argmax (written out by hand); the
soft loss is the float64 KL with temperature, its gradient tau * (softmax(s/tau) -
softmax(t/tau)), and DeiT's numel-reduced value (facebookresearch/deit losses.py) is ours / K;
a training step's loss is the hand combination (1 - alpha) * CE + alpha * KD of logits computed
in NumPy from the heads' weights; the teacher's weights never change and it runs once per
training batch and never in evaluation (a counter variable inside it); a tiny student distilled
from a tiny CNN trained on sklearn digits reaches the teacher's test top-1 within a margin.
"""

import keras
import numpy as np
import pytest

from keras_vit import create_model, save_npz
from keras_vit.training.distillation import (
    DISTILLATION_KINDS,
    DistillationError,
    Distiller,
    distillation_loss,
    load_teacher,
    student_heads,
)
from keras_vit.training.losses import ClassificationLoss
from keras_vit.training.metrics import TopKAccuracy
from pipelines.errors import MissingFileError, UserError

TINY = "d32_l2_h4_m64_p4"
K = 10


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _numpy_kl(student, teacher, tau):
    """float64 tau^2 * KL(softmax(t/tau) || softmax(s/tau)) per example."""
    log_t = _log_softmax(np.float64(teacher) / tau)
    log_s = _log_softmax(np.float64(student) / tau)
    return tau**2 * (np.exp(log_t) * (log_t - log_s)).sum(-1)


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


# --- the loss -----------------------------------------------------------------------------


def test_kinds():
    assert DISTILLATION_KINDS == ("soft", "hard")


def test_hard_loss_is_cross_entropy_on_the_teachers_argmax():
    teacher = np.array([[0.0, 5.0, 1.0], [3.0, 0.0, 2.9], [-1.0, -2.0, -0.5]], np.float32)
    argmax_by_hand = [1, 0, 2]
    student = np.array([[1.0, 2.0, 3.0], [0.5, -0.5, 0.0], [2.0, 0.0, 1.0]], np.float32)
    found = keras.ops.convert_to_numpy(distillation_loss(student, teacher, "hard"))
    expected = -_log_softmax(np.float64(student))[np.arange(3), argmax_by_hand]
    np.testing.assert_allclose(found, expected, rtol=1e-6)
    # tau plays no part in the hard kind.
    found_tau = keras.ops.convert_to_numpy(distillation_loss(student, teacher, "hard", tau=3.0))
    np.testing.assert_allclose(found_tau, expected, rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_loss_is_kl_with_temperature(tau):
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(0, 3, (2, 6, K)).astype(np.float32)
    found = keras.ops.convert_to_numpy(distillation_loss(student, teacher, "soft", tau))
    expected = _numpy_kl(student, teacher, tau)
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-6)
    assert np.all(found >= 0)
    # DeiT (losses.py, DistillationLoss.forward): kl_div(reduction="sum") * T^2 / numel,
    # summed over batch and classes; it equals our batch mean divided by K.
    log_t, log_s = _log_softmax(np.float64(teacher) / tau), _log_softmax(np.float64(student) / tau)
    deit = (np.exp(log_t) * (log_t - log_s)).sum() * tau**2 / student.size
    np.testing.assert_allclose(found.mean() / K, deit, rtol=1e-5)


def test_soft_loss_is_zero_for_equal_logits_and_its_gradient_is_the_known_one():
    import tensorflow as tf

    rng = np.random.default_rng(2)
    student = tf.constant(rng.normal(0, 2, (4, K)), tf.float32)
    teacher = tf.constant(rng.normal(0, 2, (4, K)), tf.float32)
    tau = 2.0
    same = keras.ops.convert_to_numpy(distillation_loss(teacher, teacher, "soft", tau))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([student, teacher])
        loss = tf.reduce_sum(distillation_loss(student, teacher, "soft", tau))
    # d/ds tau^2 KL(p_t || p_s) = tau * (softmax(s / tau) - softmax(t / tau)) (Hinton et al.).
    by_hand = tau * (np.exp(_log_softmax(student.numpy() / tau))
                     - np.exp(_log_softmax(teacher.numpy() / tau)))
    np.testing.assert_allclose(tape.gradient(loss, student).numpy(), by_hand, atol=1e-6)
    assert tape.gradient(loss, teacher) is None  # the teacher's logits are constants


@pytest.mark.parametrize("kind, tau", [("medium", 1.0), ("soft", 0.0), ("soft", -1.0)])
def test_bad_kind_or_tau_is_a_user_error(kind, tau):
    with pytest.raises(UserError, match="kind|tau"):
        distillation_loss(np.zeros((1, 3)), np.zeros((1, 3)), kind, tau)


# --- the Distiller --------------------------------------------------------------------------


def _distilled_student(seed=0):
    """A tiny distilled ViT whose two heads have random (not zero) weights."""
    keras.utils.set_random_seed(seed)
    student = create_model(TINY, image_size=16, num_classes=K, distillation_token=True)
    rng = np.random.default_rng(seed)
    head = student.get_layer("head")
    for dense in (head.class_head, head.distillation_head):
        dense.kernel.assign(rng.normal(0, 0.5, dense.kernel.shape))
        dense.bias.assign(rng.normal(0, 0.5, dense.bias.shape))
    return student


def _linear_teacher(size=16, seed=3, classes=K):
    """Pixels -> Flatten -> Dense: logits that NumPy computes from the weights."""
    rng = np.random.default_rng(seed)
    images = keras.Input((size, size, 3))
    dense = keras.layers.Dense(classes, name="logits")
    model = keras.Model(images, dense(keras.layers.Flatten()(images / 255.0)), name="linear")
    dense.kernel.assign(rng.normal(0, 0.05, dense.kernel.shape))
    dense.bias.assign(rng.normal(0, 0.5, dense.bias.shape))
    return model


def _numpy_teacher(teacher, images):
    dense = teacher.get_layer("logits")
    flat = np.float64(images).reshape(len(images), -1) / 255.0
    return flat @ np.float64(dense.kernel.numpy()) + np.float64(dense.bias.numpy())


def _numpy_heads(student, images):
    """(class logits, distillation logits) in float64 from the head's input features."""
    head = student.get_layer("head")
    features = keras.Model(student.input, head.input).predict(images, verbose=0)
    features = np.float64(features)
    kernel = lambda d: np.float64(d.kernel.numpy())  # noqa: E731
    bias = lambda d: np.float64(d.bias.numpy())  # noqa: E731
    return (features[:, 0] @ kernel(head.class_head) + bias(head.class_head),
            features[:, 1] @ kernel(head.distillation_head) + bias(head.distillation_head))


def _compiled(distiller, learning_rate=0.0, label_smoothing=0.1, **optimizer_options):
    distiller.compile(keras.optimizers.SGD(learning_rate, **optimizer_options),
                      loss=ClassificationLoss("softmax", K, label_smoothing),
                      metrics=[TopKAccuracy(1)])
    return distiller


def _numpy_cross_entropy(logits, labels, eps):
    targets = np.eye(K)[labels] * (1 - eps) + eps / K
    return -(targets * _log_softmax(logits)).sum(-1)


def test_heads_view_shares_the_students_layers_and_averages_to_its_output():
    student = _distilled_student()
    images = _images(4)
    class_logits, distillation_logits = student_heads(student).predict(images, verbose=0)
    np.testing.assert_allclose(0.5 * (class_logits + distillation_logits),
                               student.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
    expected_class, expected_distillation = _numpy_heads(student, images)
    np.testing.assert_allclose(class_logits, expected_class, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(distillation_logits, expected_distillation, rtol=1e-4, atol=1e-5)
    assert student_heads(create_model(TINY, image_size=16, num_classes=K)) is None


@pytest.mark.parametrize("kind, alpha, tau", [("hard", 0.5, 1.0), ("soft", 0.3, 2.0),
                                              ("soft", 1.0, 1.0), ("hard", 0.0, 1.0)])
def test_training_loss_is_the_hand_combination(kind, alpha, tau):
    student, teacher = _distilled_student(), _linear_teacher()
    images = _images(8)
    labels = np.random.default_rng(5).integers(0, K, 8)
    distiller = _compiled(Distiller(student, teacher, kind=kind, alpha=alpha, tau=tau))
    class_logits, distillation_logits = _numpy_heads(student, images)
    teacher_logits = _numpy_teacher(teacher, images)
    if kind == "hard":
        kd = -_log_softmax(distillation_logits)[np.arange(8), teacher_logits.argmax(-1)]
    else:
        kd = _numpy_kl(distillation_logits, teacher_logits, tau)
    expected = ((1 - alpha) * _numpy_cross_entropy(class_logits, labels, 0.1).mean()
                + alpha * kd.mean())
    # learning_rate 0: the logged loss and the metric are the step's own, weights unchanged.
    logs = distiller.train_on_batch(images, labels, return_dict=True)
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-4)
    student_top1 = np.mean(np.argmax(class_logits + distillation_logits, -1) == labels)
    np.testing.assert_allclose(logs["top1"], student_top1)


def test_without_a_distillation_token_both_terms_use_the_single_head():
    keras.utils.set_random_seed(0)
    student = create_model(TINY, image_size=16, num_classes=K, pooling="gap")
    head = student.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.5, head.kernel.shape))
    teacher = _linear_teacher()
    images, labels = _images(8), np.arange(8) % K
    distiller = _compiled(Distiller(student, teacher, kind="soft", alpha=0.4, tau=2.0))
    logits = np.float64(student.predict(images, verbose=0))
    expected = (0.6 * _numpy_cross_entropy(logits, labels, 0.1).mean()
                + 0.4 * _numpy_kl(logits, _numpy_teacher(teacher, images), 2.0).mean())
    logs = distiller.train_on_batch(images, labels, return_dict=True)
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-4)


def test_evaluation_is_the_students_own():
    student, teacher = _distilled_student(), _linear_teacher()
    images, labels = _images(8), np.arange(8) % K
    distiller = _compiled(Distiller(student, teacher, kind="hard", alpha=0.5))
    plain = _compiled_student(student)
    np.testing.assert_allclose(distiller.predict(images, verbose=0),
                               student.predict(images, verbose=0), rtol=1e-6)
    found = distiller.evaluate(images, labels, return_dict=True, verbose=0)
    expected = plain.evaluate(images, labels, return_dict=True, verbose=0)
    assert found.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(found[name], expected[name], rtol=1e-6)
    assert distiller.student is student


def _compiled_student(student):
    twin = keras.Model(student.inputs, student.outputs)
    twin.compile(loss=ClassificationLoss("softmax", K, 0.1), metrics=[TopKAccuracy(1)])
    return twin


@keras.saving.register_keras_serializable(package="keras_vit_tests")
class CallCounter(keras.layers.Layer):
    """Identity that counts its calls in a variable (a graph-safe side effect)."""

    def build(self, input_shape):
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                     name="calls")

    def call(self, inputs):
        self.calls.assign_add(1.0)
        return inputs


def _counting_cnn_teacher(seed=0):
    """A CNN with BatchNorm and Dropout (which training=False freezes) and a call counter."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((16, 16, 3))
    counter = CallCounter(name="counter")
    x = counter(images)
    x = keras.layers.Rescaling(1 / 255.0)(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(images, keras.layers.Dense(K)(x), name="cnn"), counter


def test_teacher_runs_once_per_training_batch_never_in_evaluation_and_is_not_trained():
    student = _distilled_student()
    teacher, counter = _counting_cnn_teacher()
    before = [w.numpy().copy() for w in teacher.weights if w.path != counter.calls.path]
    distiller = _compiled(Distiller(student, teacher, kind="soft", alpha=0.5), 0.1,
                          momentum=0.9)
    images, labels = _images(24), np.arange(24) % K
    student_before = [w.numpy().copy() for w in student.trainable_weights]
    distiller.fit(images, labels, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert float(counter.calls.numpy()) == 3  # 3 batches
    distiller.evaluate(images, labels, batch_size=8, verbose=0)
    distiller.predict(images, batch_size=8, verbose=0)
    assert float(counter.calls.numpy()) == 3
    after = [w.numpy() for w in teacher.weights if w.path != counter.calls.path]
    for old, new in zip(before, after):  # kernels and BatchNorm statistics alike
        np.testing.assert_array_equal(old, new)
    trained = {id(v) for v in distiller.trainable_variables}
    assert trained == {id(v) for v in student.trainable_variables}
    assert not trained & {id(v) for v in teacher.weights}
    changed = [not np.array_equal(a, b.numpy()) for a, b in zip(student_before,
                                                                  student.trainable_weights)]
    assert any(changed)


def test_teacher_of_another_size_gets_resized_images():
    """A constant image resized stays the same constant: teacher(resize(c16)) = teacher(c32)."""
    student = _distilled_student()
    teacher = _linear_teacher(size=32)
    distiller = Distiller(student, teacher)
    assert distiller.teacher.input_shape == (None, 16, 16, 3)
    constant16 = np.full((2, 16, 16, 3), 77.0, np.float32)
    constant16[1] = 200.0
    constant32 = np.repeat(np.repeat(constant16, 2, axis=1), 2, axis=2)
    found = distiller.teacher.predict(constant16, verbose=0)
    np.testing.assert_allclose(found, _numpy_teacher(teacher, constant32), rtol=1e-4, atol=1e-4)


def test_teacher_with_other_classes_or_bad_settings_is_refused():
    student = _distilled_student()
    with pytest.raises(DistillationError, match="predicts 7 classes, the student needs 10"):
        Distiller(student, _linear_teacher(classes=7))
    for settings in (dict(alpha=1.5), dict(alpha=-0.1), dict(kind="soft", tau=0.0),
                     dict(kind="none")):
        with pytest.raises(DistillationError):
            Distiller(student, _linear_teacher(), **settings)


def test_mixed_precision_and_gradient_accumulation():
    """Under mixed_bfloat16 with 2 accumulated micro-batches per update the losses are float32,
    the teacher still runs once per micro-batch and the student's weights move every 2."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        student = create_model(TINY, image_size=16, num_classes=K, distillation_token=True)
        teacher, counter = _counting_cnn_teacher()
        distiller = Distiller(student, teacher, kind="hard", alpha=0.5)
        distiller.compile(keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2),
                          loss=ClassificationLoss("softmax", K), metrics=[TopKAccuracy(1)])
        images, labels = _images(32), np.arange(32) % K
        output = distiller(images[:4], training=True)
        dtypes = {name: keras.backend.standardize_dtype(v.dtype) for name, v in output.items()}
        assert dtypes == dict.fromkeys(("class", "distillation", "teacher"), "float32")
        calls_before_fit = float(counter.calls.numpy())
        history = distiller.fit(images, labels, batch_size=8, epochs=1, verbose=0,
                                shuffle=False)
    finally:
        keras.config.set_dtype_policy(previous)
    assert np.isfinite(history.history["loss"][0])
    assert float(counter.calls.numpy()) - calls_before_fit == 4  # 4 micro-batches
    assert int(distiller.optimizer.iterations.numpy()) == 2  # updates, not micro-batches


# --- load_teacher ---------------------------------------------------------------------------


def test_load_teacher_opens_a_keras_file_of_any_architecture(tmp_path):
    cnn, _ = _counting_cnn_teacher()
    path = str(tmp_path / "cnn.keras")
    cnn.compile(optimizer="adam", loss="mse")  # compile state that load_teacher leaves out
    cnn.save(path)
    teacher = load_teacher(path, num_classes=K, image_size=16)
    assert not teacher.trainable and not teacher.trainable_weights
    images = _images(4)
    np.testing.assert_allclose(teacher.predict(images, verbose=0),
                               cnn.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
    resized = load_teacher(path, num_classes=K, image_size=32)
    assert resized.input_shape == (None, 32, 32, 3)


def test_load_teacher_opens_model_directories_and_checkpoints(tmp_path):
    keras.utils.set_random_seed(0)
    vit = create_model(TINY, image_size=16, num_classes=K, pooling="gap")
    head = vit.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.5, head.kernel.shape))
    (tmp_path / "run").mkdir()
    vit.save(str(tmp_path / "run" / "model.keras"))
    save_npz(vit, str(tmp_path / "vit.npz"))
    images = _images(4)
    expected = vit.predict(images, verbose=0)
    for source in (str(tmp_path / "run"), str(tmp_path / "vit.npz"),
                   "checkpoint:" + str(tmp_path / "vit.npz")):
        teacher = load_teacher(source, num_classes=K, image_size=16)
        assert not teacher.trainable_weights
        np.testing.assert_allclose(teacher.predict(images, verbose=0), expected,
                                   rtol=1e-4, atol=1e-5)


def test_load_teacher_errors_name_the_flag(tmp_path):
    cnn, _ = _counting_cnn_teacher()
    path = str(tmp_path / "cnn.keras")
    cnn.save(path)
    with pytest.raises(DistillationError, match=r"--teacher=.*predicts 10 classes, the student "
                                                r"needs 100"):
        load_teacher(path, num_classes=100, image_size=16)
    with pytest.raises(MissingFileError, match="missing.keras"):
        load_teacher(str(tmp_path / "missing.keras"), num_classes=K, image_size=16)
    (tmp_path / "junk.keras").write_text("not a zip")
    with pytest.raises(UserError, match="junk.keras"):
        load_teacher(str(tmp_path / "junk.keras"), num_classes=K, image_size=16)


# --- end to end -----------------------------------------------------------------------------


def _digits(size=16):
    """sklearn digits as [0, 255] RGB of `size` px, a fixed 1437 / 360 train / test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.images * (255.0 / 16.0)
    scale = size // 8
    pixels = np.kron(pixels, np.ones((scale, scale)))[..., None].repeat(3, -1)
    order = np.random.default_rng(0).permutation(len(pixels))
    pixels, labels = pixels[order].astype(np.float32), digits.target[order].astype(np.int32)
    return (pixels[:1437], labels[:1437]), (pixels[1437:], labels[1437:])


def _digits_cnn_teacher(train):
    """A small CNN trained on the digits: about 0.98 test top-1 in 15 epochs (~6 s)."""
    keras.utils.set_random_seed(0)
    images = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(images)
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Dense(64, activation="relu")(keras.layers.Flatten()(x))
    teacher = keras.Model(images, keras.layers.Dense(K)(x), name="digits_cnn")
    teacher.compile(keras.optimizers.Adam(3e-3), loss=ClassificationLoss("softmax", K),
                    metrics=[TopKAccuracy(1)])
    teacher.fit(*train, batch_size=64, epochs=15, verbose=0)
    return teacher


STUDENT_EPOCHS = 30
#: The distilled student's test top-1 may trail the teacher's by at most this much. Measured
#: (2-core CPU, Keras 3.15): teacher 0.983, student 0.939 (gap 0.044), the distillation head
#: agreeing with the teacher on 0.928; the same tiny ViT trained on the labels alone plateaus
#: near 0.95 on this split, so the margin is the student's capacity, not an ignored teacher
#: (the agreement check below).
MARGIN = 0.06


@pytest.mark.slow
def test_tiny_student_distilled_from_a_digits_teacher_reaches_its_top1():
    train, test = _digits()
    teacher = _digits_cnn_teacher(train)
    teacher_top1 = teacher.evaluate(*test, return_dict=True, verbose=0)["top1"]
    assert teacher_top1 > 0.95  # a teacher worth distilling from
    keras.utils.set_random_seed(0)
    student = create_model(TINY, image_size=16, num_classes=K, distillation_token=True)
    distiller = Distiller(student, teacher, kind="hard", alpha=0.5)
    steps = STUDENT_EPOCHS * -(-len(train[0]) // 64)
    distiller.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
                      loss=ClassificationLoss("softmax", K), metrics=[TopKAccuracy(1)])
    distiller.fit(*train, batch_size=64, epochs=STUDENT_EPOCHS, verbose=0)
    student_top1 = _compiled_student(student).evaluate(*test, return_dict=True,
                                                       verbose=0)["top1"]
    _, distillation_logits = student_heads(student).predict(test[0], verbose=0)
    teacher_classes = teacher.predict(test[0], verbose=0).argmax(-1)
    agreement = np.mean(distillation_logits.argmax(-1) == teacher_classes)
    print(f"teacher top-1 {teacher_top1:.4f}, distilled student top-1 {student_top1:.4f}, "
          f"distillation head agrees with the teacher on {agreement:.4f}")
    assert student_top1 >= teacher_top1 - MARGIN
    assert agreement >= 0.9


# --- MirroredStrategy -----------------------------------------------------------------------

STEPS = 3


def _mirrored_curve(strategy):
    """Losses and final student weights of STEPS SGD steps of a Distiller under `strategy`."""
    import tensorflow as tf

    images, labels = _images(48, seed=7), np.arange(48) % K
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    with strategy.scope():
        distiller = _compiled(Distiller(_distilled_student(), _linear_teacher(), kind="soft",
                                        alpha=0.5, tau=2.0), 0.05)
    losses = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))
    distiller.fit(strategy.experimental_distribute_dataset(dataset), epochs=1,
                  steps_per_epoch=STEPS, callbacks=[callback], verbose=0, shuffle=False)
    return losses, [float(np.abs(v.numpy()).sum()) for v in distiller.trainable_weights]


def main():
    import tensorflow as tf

    from tests.train_helpers import print_result, two_logical_cpus

    mirrored = tf.distribute.MirroredStrategy(two_logical_cpus())
    out = {"replicas": mirrored.num_replicas_in_sync,
           "one": _mirrored_curve(tf.distribute.get_strategy()),
           "two": _mirrored_curve(mirrored)}
    print_result(out)


@pytest.mark.slow
def test_mirrored_strategy_over_two_devices_matches_one_device():
    """The teacher term is reduced as the compiled loss (1/replicas each): 2 replicas of 8
    give one device's 16-image loss and update."""
    from tests.train_helpers import run_result_script

    out = run_result_script(__file__)
    assert out["replicas"] == 2
    np.testing.assert_allclose(out["two"][0], out["one"][0], rtol=1e-5)
    np.testing.assert_allclose(out["two"][1], out["one"][1], rtol=1e-5)


if __name__ == "__main__":
    main()

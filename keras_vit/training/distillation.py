"""DeiT's knowledge distillation (Touvron et al. 2021, Section 5): a student learns from the
labels and from a teacher's predictions.

    teacher = load_teacher("teacher_dir/", num_classes=1000, image_size=224)
    distiller = Distiller(student, teacher, kind="hard", alpha=0.5)
    distiller.compile(optimizer, loss=ClassificationLoss("softmax", 1000), metrics=[...])
    distiller.fit(data)
    distiller.student.save("student.keras")

The loss of a training batch is DeiT's (facebookresearch/deit, losses.py, `DistillationLoss.
forward`, commit ae4dba9):

    loss = (1 - alpha) * compiled_loss(labels, class-head logits)
           + alpha * distillation_loss(distillation-head logits, teacher logits)

A student with a distillation token (`create_model(..., distillation_token=True)`) has two
heads (`layers.DistilledHead`): the class head learns from the labels, the distillation head
from the teacher, and at inference the model outputs their mean (timm's
`VisionTransformerDistilled`). A student without one uses its single head for both terms
(the paper's "usual distillation", Table 3).
"""

import os

import keras
from keras import ops

from keras_vit import layers
from keras_vit.checkpoints import check_finite
from keras_vit.loading import load_classifier
from pipelines.errors import MissingFileError, UserError

DISTILLATION_KINDS = ("soft", "hard")


class DistillationError(UserError):
    """A teacher or a distillation setting that cannot work; the message says how to fix it."""


def _check_kind_and_tau(kind, tau):
    if kind not in DISTILLATION_KINDS:
        raise DistillationError(
            f"distillation kind must be one of {DISTILLATION_KINDS}, got {kind!r}.")
    if not tau > 0:
        raise DistillationError(f"distillation temperature tau must be > 0, got {tau!r}.")


def distillation_loss(student_logits, teacher_logits, kind="hard", tau=1.0):
    """DeiT's distillation loss per example.

    hard: softmax cross-entropy of the student on the teacher's argmax class (DeiT, Eq. 3).
    soft: tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)) (DeiT, Eq. 2;
    Hinton et al. 2015 for the tau^2), summed over the classes.

    Reduction: DeiT's code (losses.py) sums the soft loss over batch and classes and divides by
    `outputs_kd.numel()` = batch * K ("legacy PyTorch behavior", deit issue 61), i.e. its value
    is this one divided by K. We keep the per-example KL of the paper's equation, which Keras
    then averages over the batch, as timm does (timm/task/token_distillation.py,
    `F.kl_div(..., reduction="batchmean") * T**2`): the soft term does not shrink with the
    number of classes, so alpha weighs the same on 10 and on 1000 classes. To reproduce DeiT's
    soft runs exactly, scale alpha's soft term by 1/K. The hard loss is the same in both.

    Args:
        student_logits: (batch, K) logits of the student's distillation head.
        teacher_logits: (batch, K) logits of the teacher; no gradient flows into them.
        kind: one of DISTILLATION_KINDS.
        tau: the softmax temperature of "soft" (> 0); "hard" ignores it.

    Returns:
        float32 (batch,): the loss of each example (nats).

    Raises:
        DistillationError: an unknown kind or tau <= 0.
    """
    _check_kind_and_tau(kind, tau)
    student = ops.cast(student_logits, "float32")
    teacher = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
    if kind == "hard":
        targets = ops.one_hot(ops.argmax(teacher, axis=-1), student.shape[-1], dtype="float32")
        return -ops.sum(targets * ops.log_softmax(student, axis=-1), axis=-1)
    log_teacher = ops.log_softmax(teacher / tau, axis=-1)
    log_student = ops.log_softmax(student / tau, axis=-1)
    kl = ops.sum(ops.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    return (tau * tau) * kl


@keras.saving.register_keras_serializable(package="keras_vit")
class DistillationLoss(keras.losses.Loss):
    """`distillation_loss` as a Keras loss: called as `loss(teacher_logits, student_logits)`,
    it is reduced exactly as the compiled loss (batch mean, sample weights, and the 1/replicas
    scaling of `tf.distribute`), so both terms of the total add up consistently.

    Args:
        kind, tau: as for `distillation_loss`.
        name, reduction, dtype: as for `keras.losses.Loss`.
    """

    def __init__(self, kind="hard", tau=1.0, name="distillation_loss",
                 reduction="sum_over_batch_size", dtype=None):
        _check_kind_and_tau(kind, tau)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.kind = kind
        self.tau = float(tau)

    def call(self, y_true, y_pred):
        return distillation_loss(y_pred, y_true, self.kind, self.tau)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "tau": self.tau}


def student_heads(student):
    """A functional view of `student` returning its class and distillation logits, sharing
    its layers; None when the student has no distillation token.

    Args:
        student: a keras_vit functional model; a distilled one has a `layers.DistilledHead`
            named "head" on the (B, 2, D) class and distillation token features.

    Returns:
        A `keras.Model` from the student's images to [(B, K), (B, K)] float32 logits (class
        head, distillation head), or None.
    """
    head = _layer_or_none(student, "head")
    if not isinstance(head, layers.DistilledHead):
        return None
    # The same computation as `DistilledHead.call`, stopping before the mean of the heads.
    features = ops.cast(head.input, "float32")
    class_logits = head.class_head(features[:, 0])
    distillation_logits = head.distillation_head(features[:, 1])
    return keras.Model(student.inputs, [class_logits, distillation_logits],
                       name=f"{student.name}_heads")


def _layer_or_none(model, name):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def teacher_for_size(teacher, image_shape):
    """`teacher`, taking images of `image_shape`: itself when it takes them (or any size),
    else a model that resizes the images bilinearly (antialiased) to the teacher's size first.

    Args:
        teacher: a `keras.Model` from [0, 255] pixels (B, H_t, W_t, 3) to logits (B, K).
        image_shape: (height, width) of the student's images.

    Returns:
        A `keras.Model` from (B, height, width, 3) pixels to the teacher's logits.
    """
    teacher_shape = _fixed_input_size(teacher)
    if teacher_shape is None or teacher_shape == tuple(image_shape):
        return teacher
    images = keras.Input((*image_shape, 3), name="images")
    resized = ops.image.resize(images, teacher_shape, interpolation="bilinear", antialias=True)
    return keras.Model(images, teacher(resized, training=False), name=f"{teacher.name}_resized")


def _fixed_input_size(model):
    """(H, W) of a model's single image input, or None when it takes any size."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return None
    if not isinstance(shape, tuple) or len(shape) != 4:
        return None
    size = tuple(shape[1:3])
    return None if None in size else size


class Distiller(keras.Model):
    """A student trained on the labels and on a frozen teacher (DeiT); evaluates as the student.

    Compile it as the student (`compile(optimizer, loss=ClassificationLoss(...), metrics=...)`):
    in training, the total loss is `(1 - alpha) * compiled loss(labels, class logits) +
    alpha * DistillationLoss(teacher logits, distillation logits)` (module docstring), plus the
    student's own added losses; the metrics see the student's output (the mean of its two
    heads, or its single head). `evaluate` and `predict` run the student alone: the teacher is
    called once per training batch (in `call(training=True)`), never in `test_step`.

    Create it, and load the teacher, under the strategy's scope and the dtype policy of the
    run, so the teacher's variables are placed and cast as the student's. Backups
    (`save_weights`) hold the teacher's weights beside the student's; save `distiller.student`
    as the model.

    Args:
        student: a keras_vit functional model, images (B, H, W, 3) in [0, 255] -> logits
            (B, K); with a distillation token its distillation head learns from the teacher.
        teacher: any `keras.Model` from [0, 255] float pixels (B, H_t, W_t, 3) to logits
            (B, K); images are resized to (H_t, W_t) in the graph when they differ. It is made
            non-trainable and runs with training=False, its logits cast to float32 with the
            gradient stopped.
        kind: "hard" (the teacher's argmax, DeiT's default) or "soft".
        alpha: weight of the distillation term in [0, 1]; the labels get 1 - alpha.
        tau: temperature of the soft kind (> 0).
        name: the model's name; default "<student name>_distiller".

    Raises:
        DistillationError: a bad kind, alpha or tau, or a teacher whose classes differ from
            the student's.
    """

    def __init__(self, student, teacher, *, kind="hard", alpha=0.5, tau=1.0, name=None):
        _check_kind_and_tau(kind, tau)
        if not 0.0 <= alpha <= 1.0:
            raise DistillationError(f"distillation alpha must be in [0, 1], got {alpha!r}.")
        super().__init__(name=name or f"{student.name}_distiller")
        self.kind, self.alpha, self.tau = kind, float(alpha), float(tau)
        self._student = student
        self._heads = student_heads(student)
        teacher.trainable = False
        self.teacher = teacher_for_size(teacher, student.input_shape[1:3])
        _check_classes(self.teacher, int(student.output_shape[-1]),
                       f"the teacher {teacher.name!r}")
        self.distillation = DistillationLoss(kind, tau)
        # Built already: its student, heads view and teacher are built models and it has no
        # variables of its own. Keras builds a subclassed model only at its first step (on the
        # default strategy), after the backup callback's restore, which needs it built.
        self.built = True

    @property
    def student(self):
        """The plain student model (to evaluate, save or export)."""
        return self._student

    def call(self, images, training=False):
        """Evaluation: the student's logits (B, K). Training: a dict of float32 (B, K) logits,
        "class" and "distillation" (the same tensor for a student without a distillation
        token), and "teacher" (gradient stopped)."""
        if not training:
            return self._student(images, training=False)
        if self._heads is None:
            class_logits = distillation_logits = self._student(images, training=True)
        else:
            class_logits, distillation_logits = self._heads(images, training=True)
        teacher_logits = ops.stop_gradient(
            ops.cast(self.teacher(images, training=False), "float32"))
        return {"class": ops.cast(class_logits, "float32"),
                "distillation": ops.cast(distillation_logits, "float32"),
                "teacher": teacher_logits}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled loss on an evaluation output; DeiT's combination on a training one."""
        if not isinstance(y_pred, dict):
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if self._compile_loss is None:
            raise DistillationError("Distiller needs the label loss: compile it with "
                                    "loss=ClassificationLoss(...) as the student.")
        # `Trainer.compute_loss`'s pieces (compiled loss, added losses), with the two terms
        # weighted as DeiT's `DistillationLoss.forward`.
        labels_loss = self._compile_loss(y, y_pred["class"], sample_weight)
        teacher_loss = self.distillation(y_pred["teacher"], y_pred["distillation"], sample_weight)
        total = (1.0 - self.alpha) * labels_loss + self.alpha * teacher_loss
        for loss in self.losses:
            total = total + self._aggregate_additional_loss(loss)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Metrics of the student's output, in training too."""
        return super().compute_metrics(x, y, student_output(y_pred), sample_weight)


def student_output(y_pred):
    """The student's inference logits from a `Distiller`'s output: the mean of the class and
    distillation heads in training (what `DistilledHead` outputs), else `y_pred` itself."""
    if not isinstance(y_pred, dict):
        return y_pred
    return 0.5 * (y_pred["class"] + y_pred["distillation"])


def _check_classes(teacher, num_classes, what):
    """Raises a DistillationError naming `what` unless the teacher predicts num_classes."""
    found = _num_outputs(teacher)
    if found != num_classes:
        raise DistillationError(
            f"{what} predicts {found} classes, the student needs {num_classes}: distil from a "
            "teacher trained on the same classes (in the same order).")


def _num_outputs(model):
    shape = model.output_shape
    if not isinstance(shape, tuple) or len(shape) != 2:
        raise DistillationError(
            f"the teacher {model.name!r} must output one (batch, classes) tensor of logits; "
            f"its output shape is {shape}.")
    return int(shape[-1])


def load_teacher(source, *, num_classes, image_size):
    """The teacher of `--teacher=source`, frozen, taking the student's images.

    Args:
        source: a `.keras` file of any architecture taking [0, 255] float pixels
            (`keras.saving.load_model`, safe_mode=True, compile=False); or anything
            `keras_vit.load_classifier` opens: a model directory (model.keras), a checkpoint
            file or folder, or a registry name, each optionally with --model's prefixes
            pretrained:, checkpoint: or npz:. A checkpoint keeps its own image size and head.
        num_classes: K, the student's classes; the teacher must predict as many.
        image_size: the student's side in pixels (or (height, width)); the returned model
            takes those images and resizes them to the teacher's size when it differs.

    Returns:
        A non-trainable `keras.Model` from (B, height, width, 3) [0, 255] pixels to (B, K)
        logits. Load it under the run's strategy scope and dtype policy: a checkpoint teacher
        is built in that policy; a .keras teacher keeps the policy it was saved with.

    Raises:
        DistillationError: the teacher predicts another number of classes, or has not one
            (batch, classes) output (the message names --teacher).
        MissingFileError, CheckpointError: `source` does not exist or cannot be opened.
    """
    from keras_vit.training.config import CHECKPOINT_PREFIXES  # config imports this module.

    path = str(source)
    for prefix in CHECKPOINT_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix):]
    if path.endswith(".keras"):
        teacher = _load_keras_teacher(path)
    else:
        teacher, _ = load_classifier(path)
    teacher.trainable = False
    _check_classes(teacher, num_classes, f"--teacher={source!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return teacher_for_size(teacher, size)


def _load_keras_teacher(path):
    """A .keras file's model of any architecture, uncompiled, its weights checked finite."""
    if not os.path.exists(path):
        raise MissingFileError(f"--teacher={path!r}: no such .keras file.")
    try:
        # safe_mode: a Lambda layer's code is refused, not run; compile=False: the
        # teacher's loss and metrics (maybe custom) are not needed.
        teacher = keras.saving.load_model(path, compile=False, safe_mode=True)
    except (ValueError, TypeError, OSError) as error:
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else repr(error)
        raise DistillationError(
            f"--teacher={path!r} could not be loaded as a Keras model: {reason} Expected a "
            "file written by keras.Model.save whose layers are Keras's or keras_vit's.") from error
    check_finite(((v.path, v.numpy()) for v in teacher.weights), path)
    return teacher

"""Few-shot linear evaluation of a representation, as big_vision's `fewshot_lsr`.

big_vision (google-research/big_vision `big_vision/evaluators/fewshot_lsr.py`, defaults from
`big_vision/configs/common_fewshot.py`) judges a pre-training run by how well a closed-form
linear classifier on its pre-logits separates a few labelled examples per class; the ViT and
AugReg papers report its 1/5/10/25-shot accuracies. The recipe, followed here step by step:

1. Shots: for seed s, `rng = np.random.default_rng(s)` draws one permutation of each class's
   training indices (classes 0..C-1 in order, empty ones included); the k-shot set is the
   first k of each (all of a class that has fewer). Seeds 0..seeds-1; the result is the mean.
2. Whitening with the k-shot set's own per-dimension mean and standard deviation (+1e-5),
   then a constant feature `BIAS_CONSTANT` = 100 is appended: its weight is the bias, large
   so that the shared L2 penalty barely touches it (it is still regularised, as there).
3. Targets: one-hot rescaled to {-1, +1}, (N, C).
4. Ridge regression w = argmin |x w - y|^2 + l2 |w|^2 with l2 = `DEFAULT_L2_REG` = 2^10, the
   config's fixed value (big_vision sweeps nothing at evaluation time), solved through the
   eigendecomposition of x^T x when N >= D or of x x^T when D > N (`lsr_cache`).
5. Prediction: argmax of x_test w, the test set whitened with the k-shot statistics.

Differences from big_vision: the math is NumPy float64 (there float32 under JAX on the
CPU), so accuracies can differ from big_vision's only where a test point sits within
rounding of a decision boundary. `linear_probe` is the full-data logistic-regression probe
(scikit-learn), which big_vision does not have.
"""

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from absl import logging

from pipelines.errors import UserError

BIAS_CONSTANT = 100.0
WHITENING_EPSILON = 1e-5
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3
DEFAULT_L2_REG = 2.0 ** 10
_MAX_CLASSES_NAMED = 10


class FewshotError(UserError):
    """Few-shot or linear-probe inputs that cannot be evaluated; the message says why."""


# --- Features from a model -------------------------------------------------------------------


def extract_features(feature_model, dataset, *, max_examples=None, log_every=100):
    """Runs `feature_model` in inference mode over `dataset` and collects its outputs.

    Args:
        feature_model: a `keras.Model` (run with `predict_on_batch`) or a callable
            `f(images, training=False)` with ONE output (batch, D), e.g.
            `keras_vit.feature_extractor(model, output="pre_logits")`.
        dataset: an iterable (a `tf.data.Dataset`, a list) of (images, labels) batches;
            labels int (batch,) or one-hot / soft (batch, C), taken by argmax.
        max_examples: stop after this many examples (the last batch is cut); None: all.
        log_every: log the count and images/s every this many batches (0: only at the end).

    Returns:
        (features, labels): float32 (N, D) and int64 (N,).

    Raises:
        FewshotError: the model has several outputs or a (batch, ...) output of rank other
            than 2, the labels have an unusable shape, or the dataset yields nothing.
    """
    if max_examples is not None and int(max_examples) < 1:
        raise FewshotError(f"max_examples must be a positive count or None, found "
                           f"{max_examples!r}.")
    _check_single_output(feature_model)
    features, labels = [], []
    count, batches = 0, 0
    start = time.perf_counter()
    first_end = None
    for batch in dataset:
        images, batch_labels = _split_batch(batch)
        if max_examples is not None and count + len(batch_labels) > max_examples:
            keep = int(max_examples) - count
            images, batch_labels = images[:keep], batch_labels[:keep]
        features.append(_run_model(feature_model, images))
        labels.append(_labels_to_ints(batch_labels))
        if len(labels[-1]) != len(features[-1]):
            raise FewshotError(f"A batch has {len(features[-1])} images but "
                               f"{len(labels[-1])} labels; the dataset must pair them.")
        count += len(labels[-1])
        batches += 1
        first_end = first_end or time.perf_counter()
        if log_every and batches % log_every == 0:
            logging.info("Features: %d examples, %.1f images/s.", count,
                         _rate(count - len(labels[0]), time.perf_counter() - first_end))
        if max_examples is not None and count >= max_examples:
            break
    if not count:
        raise FewshotError("The dataset yielded no examples; check its files and split.")
    seconds = time.perf_counter() - start
    logging.info("Features of %d examples in %.1f s (%.1f images/s).", count, seconds,
                 _rate(count, seconds))
    return (np.concatenate(features).astype(np.float32),
            np.concatenate(labels).astype(np.int64))


def _rate(count, seconds):
    return count / max(seconds, 1e-9)


def _check_single_output(feature_model):
    """Refuses, before any data is read, a Keras model that is known not to give (batch, D)."""
    try:
        outputs = getattr(feature_model, "outputs", None)
    except ValueError:  # A Sequential model not built yet knows no outputs.
        outputs = None
    if isinstance(outputs, (list, tuple)) and len(outputs) > 1:
        raise FewshotError(_one_output_message(f"{len(outputs)} outputs"))
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        shape = tuple(outputs[0].shape)
        if len(shape) != 2:
            raise FewshotError(_one_output_message(f"an output of shape {shape}"))


def _one_output_message(found):
    return (f"Few-shot evaluation needs a model with one (batch, D) output, found {found}; "
            f"pass a pooled feature extractor, "
            f"keras_vit.feature_extractor(model, output=\"pre_logits\").")


def _split_batch(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise FewshotError(f"The dataset must yield (images, labels) pairs, found a "
                           f"{type(batch).__name__}"
                           + (f" of {len(batch)} items." if hasattr(batch, "__len__") else "."))
    return batch


def _run_model(feature_model, images):
    """One batch through the model in inference mode, as a NumPy (batch, D) array."""
    import keras  # Here, not at the top: the math below never needs a backend.

    if keras.backend.backend() != "tensorflow":
        images = np.asarray(images)  # A tf.data batch is a tf.Tensor; JAX takes NumPy.
    if hasattr(feature_model, "predict_on_batch"):
        outputs = feature_model.predict_on_batch(images)
    else:
        outputs = feature_model(images, training=False)
    if isinstance(outputs, (list, tuple, dict)):
        raise FewshotError(_one_output_message(f"{len(outputs)} outputs"))
    outputs = np.asarray(keras.ops.convert_to_numpy(outputs))
    if outputs.ndim != 2:
        raise FewshotError(_one_output_message(f"an output of shape {outputs.shape}"))
    return outputs


def _labels_to_ints(labels):
    """(batch,) int64 class indices from int (batch,) or one-hot / soft (batch, C) labels."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] >= 2:
        return np.argmax(labels, axis=1).astype(np.int64)
    if labels.ndim == 1 and (np.issubdtype(labels.dtype, np.integer)
                             or np.all(np.mod(labels, 1) == 0)):
        return labels.astype(np.int64)
    raise FewshotError(f"Labels must be integer class indices (batch,) or one-hot / soft "
                       f"(batch, C) with C >= 2, found dtype {labels.dtype} shape "
                       f"{labels.shape}; squeeze (batch, 1) labels to (batch,).")


# --- Closed-form least squares (big_vision's _precompute_cache / _eig_fewshot_acc_fn) ---------


def lsr_cache(features, labels, num_classes):
    """Whitening statistics and the eigendecomposition behind every l2's ridge solution.

    With x (N, D+1) the whitened features plus the bias column and y (N, C) the {-1, +1}
    targets, the ridge solution is (A) (x^T x + l2 I)^-1 x^T y when N >= D+1, or
    (B) x^T (x x^T + l2 I)^-1 y otherwise; with q diag(eigs) q^T the eigendecomposition of
    x^T x (A) or x x^T (B), both are lhs diag(1 / (eigs + l2)) rhs (see `lsr_weights`).

    Args:
        features: (N, D) float training features.
        labels: (N,) int class indices in [0, num_classes).
        num_classes: C, the number of target columns.

    Returns:
        {"eigs": (M,), "lhs": (D+1, M), "rhs": (M, C), "mean": (1, D), "std": (1, D)},
        float64; M = D+1 in case (A), N in case (B).
    """
    x = _check_features(features, "training features").astype(np.float64)
    y = _check_labels(labels, len(x), "training labels", num_classes)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + WHITENING_EPSILON
    x = _whiten_with_bias(x, mean, std)
    y = 2.0 * np.eye(num_classes)[y] - 1.0
    num_points, dim = x.shape
    if num_points >= dim:
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ y), q
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ y, x.T @ q
    return {"eigs": eigs, "lhs": lhs, "rhs": rhs, "mean": mean, "std": std}


def lsr_weights(cache, l2_reg=DEFAULT_L2_REG):
    """(D+1, C) float64 ridge weights for `l2_reg` from an `lsr_cache`; the last row is the
    bias feature's (multiply by `BIAS_CONSTANT` for the intercept)."""
    _check_l2(l2_reg)
    scaling = 1.0 / (cache["eigs"] + float(l2_reg))
    return (cache["lhs"] * scaling[None, :]) @ cache["rhs"]


def lsr_accuracy(cache, test_features, test_labels, l2_reg=DEFAULT_L2_REG):
    """Top-1 accuracy in [0, 1] of the ridge classifier of `cache` on a test set.

    Args:
        cache: from `lsr_cache`.
        test_features: (T, D) float, whitened here with the cache's training statistics.
        test_labels: (T,) int in [0, C).
        l2_reg: the ridge penalty, > 0.
    """
    num_classes = cache["rhs"].shape[1]
    x = _check_features(test_features, "test features")
    y = _check_labels(test_labels, len(x), "test labels", num_classes)
    _check_same_dim(cache["mean"].shape[1], x.shape[1])
    return _accuracy(cache, x, y, l2_reg)


def _accuracy(cache, x, y, l2_reg):
    scores = _whiten_with_bias(x, cache["mean"], cache["std"]) @ lsr_weights(cache, l2_reg)
    return float(np.mean(np.argmax(scores, axis=1) == y))


def _whiten_with_bias(x, mean, std):
    x = (x - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


# --- Shots and seeds ----------------------------------------------------------------------------


@dataclass
class FewshotResult:
    """Few-shot accuracies.

    Attributes:
        accuracy: {shots: mean top-1 accuracy in [0, 1] over the seeds}.
        per_seed: {shots: [accuracy of seed 0, seed 1, ...]}.
        num_train, num_test: examples in the full training and test sets.
        num_classes: C, the classifier's number of classes.
    """

    accuracy: dict = field(default_factory=dict)
    per_seed: dict = field(default_factory=dict)
    num_train: int = 0
    num_test: int = 0
    num_classes: int = 0


def select_shots(labels, shots, seed, num_classes):
    """Indices of the `shots`-shot training set of `seed`, exactly as big_vision draws it.

    `np.random.default_rng(seed).permutation` of each class's indices, classes 0..C-1 in
    order, then the first `shots` of each (all of a class with fewer), concatenated by class.
    The permutations depend on the seed only, so a larger shot count extends a smaller one.

    Returns:
        (K,) int64 indices into `labels`.
    """
    permutations = _class_permutations(np.asarray(labels), seed, num_classes)
    return _first_shots(permutations, shots)


def _class_permutations(labels, seed, num_classes):
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.where(labels == c)[0]) for c in range(num_classes)]


def _first_shots(permutations, shots):
    return np.concatenate([p[:shots] for p in permutations]).astype(np.int64)


def fewshot_accuracies(train_features, train_labels, test_features, test_labels, *,
                       shots=DEFAULT_SHOTS, seeds=DEFAULT_SEEDS, l2_reg=DEFAULT_L2_REG,
                       num_classes=None):
    """big_vision's few-shot evaluation: per shot count, the mean accuracy over seeds.

    Args:
        train_features, train_labels: (N, D) float and (N,) int, the pool the shots are
            drawn from (big_vision: e.g. the first 65000 ImageNet training images).
        test_features, test_labels: (T, D) and (T,), all of them scored.
        shots: the examples per class, each >= 1.
        seeds: number of draws, seeds 0..seeds-1.
        l2_reg: the ridge penalty, > 0 (default big_vision's fixed 2^10).
        num_classes: default 1 + the largest label of either set.

    Returns:
        A `FewshotResult`. A class with fewer training examples than a shot count uses all
        it has (one warning names such classes).
    """
    shots = _check_shots(shots)
    seeds = _check_count(seeds, "seeds", "the number of random draws")
    _check_l2(l2_reg)
    x_train = _check_features(train_features, "training features")
    x_test = _check_features(test_features, "test features")
    _check_same_dim(x_train.shape[1], x_test.shape[1])
    y_train = _check_labels(train_labels, len(x_train), "training labels", num_classes)
    y_test = _check_labels(test_labels, len(x_test), "test labels", num_classes)
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    _warn_short_classes(np.bincount(y_train, minlength=num_classes), shots)
    per_seed = {k: [] for k in shots}
    for seed in range(seeds):
        permutations = _class_permutations(y_train, seed, num_classes)
        for k in shots:
            index = _first_shots(permutations, k)
            cache = lsr_cache(x_train[index], y_train[index], num_classes)
            per_seed[k].append(_accuracy(cache, x_test, y_test, l2_reg))
    accuracy = {k: float(np.mean(v)) for k, v in per_seed.items()}
    logging.info("Few-shot accuracy (%d seeds): %s.", seeds,
                 ", ".join(f"{k}-shot {a:.4f}" for k, a in accuracy.items()))
    return FewshotResult(accuracy=accuracy, per_seed=per_seed, num_train=len(x_train),
                         num_test=len(x_test), num_classes=num_classes)


def _warn_short_classes(counts, shots):
    short = [(c, int(n)) for c, n in enumerate(counts) if n < max(shots)]
    if not short:
        return
    named = ", ".join(f"class {c} has {n}" for c, n in short[:_MAX_CLASSES_NAMED])
    more = (f" and {len(short) - _MAX_CLASSES_NAMED} more classes"
            if len(short) > _MAX_CLASSES_NAMED else "")
    logging.warning("Few-shot training set: %s%s training examples, fewer than %d shots; those "
                    "draws use all a class has.", named, more, max(shots))


# --- Linear probe ----------------------------------------------------------------------------


def linear_probe(train_features, train_labels, test_features, test_labels, *, c=1.0,
                 max_iter=1000):
    """Top-1 test accuracy of a logistic-regression probe on all the training features.

    scikit-learn's `LogisticRegression` (lbfgs; multinomial for 3+ classes, its only
    choice since scikit-learn 1.7; one logistic for 2) with inverse L2 strength `c`, on
    features standardised by a `StandardScaler` fitted on the training set.

    Args:
        train_features, train_labels: (N, D) float, (N,) int, at least two classes.
        test_features, test_labels: (T, D) float, (T,) int.
        c: inverse regularisation strength, > 0.
        max_iter: lbfgs iterations, >= 1; reaching it without converging logs a warning.

    Returns:
        The accuracy in [0, 1].
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not float(c) > 0:
        raise FewshotError(f"The probe's c must be > 0, found {c!r}.")
    max_iter = _check_count(max_iter, "max_iter", "the probe's lbfgs iterations")
    x_train = _check_features(train_features, "training features")
    x_test = _check_features(test_features, "test features")
    _check_same_dim(x_train.shape[1], x_test.shape[1])
    y_train = _check_labels(train_labels, len(x_train), "training labels", None)
    y_test = _check_labels(test_labels, len(x_test), "test labels", None)
    if len(np.unique(y_train)) < 2:
        raise FewshotError(f"A linear probe needs training examples of at least 2 classes, "
                           f"found only class {y_train[0]}; use a larger training set.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=float(c), max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x_train, y_train)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logging.warning("The linear probe did not converge in %d lbfgs iterations; raise "
                        "max_iter for a firmer accuracy.", max_iter)
    return float(np.mean(probe.predict(x_test) == y_test))


# --- Checks ------------------------------------------------------------------------------------


def _check_features(features, what):
    """`features` as a float array, not copied when already float: a pool of millions of
    training features stays float32, only the drawn shots become float64 (`lsr_cache`)."""
    x = np.asarray(features)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if x.ndim != 2 or not x.shape[0] or not x.shape[1]:
        raise FewshotError(f"The {what} must be a non-empty (examples, D) array, found shape "
                           f"{x.shape}; check the dataset and that the model gives pooled "
                           f"(batch, D) features.")
    if not np.all(np.isfinite(x)):
        rows = int(np.sum(~np.all(np.isfinite(x), axis=1)))
        raise FewshotError(f"The {what} hold NaN or infinite values ({rows} of {len(x)} "
                           f"examples); the model producing them has diverged or overflowed "
                           f"(try float32 instead of float16/bfloat16, or an earlier "
                           f"checkpoint).")
    return x


def _check_labels(labels, count, what, num_classes):
    y = np.asarray(labels)
    if y.shape != (count,):
        raise FewshotError(f"Expected {count} {what} (one per feature row), found shape "
                           f"{y.shape}; features and labels must come from the same examples.")
    if not np.issubdtype(y.dtype, np.integer):
        raise FewshotError(f"The {what} must be integer class indices, found dtype {y.dtype}; "
                           f"take the argmax of one-hot labels.")
    y = y.astype(np.int64)
    if num_classes is None and y.min() < 0:
        raise FewshotError(f"The {what} must be class indices >= 0, found {y.min()}; check "
                           f"the label offset.")
    if num_classes is not None and (y.min() < 0 or y.max() >= int(num_classes)):
        raise FewshotError(f"The {what} must lie in [0, {int(num_classes)}), found "
                           f"{y.min()}..{y.max()}; check the label offset or pass a larger "
                           f"num_classes.")
    return y


def _check_same_dim(train_dim, test_dim):
    if train_dim != test_dim:
        raise FewshotError(f"Training features have {train_dim} dimensions, test features "
                           f"{test_dim}; extract both with the same feature model.")


def _check_shots(shots):
    shots = (shots,) if np.isscalar(shots) else tuple(shots)
    if not shots or any(isinstance(k, bool) or int(k) != k or k < 1 for k in shots):
        raise FewshotError(f"Shots must be positive integers (examples per class), found "
                           f"{shots!r}; e.g. (1, 5, 10, 25).")
    return tuple(dict.fromkeys(int(k) for k in shots))


def _check_count(value, name, meaning):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise FewshotError(f"{name} ({meaning}) must be an integer >= 1, found {value!r}.")
    return int(value)


def _check_l2(l2_reg):
    if not (np.isfinite(l2_reg) and l2_reg > 0):
        raise FewshotError(f"l2_reg must be a finite number > 0, found {l2_reg!r}; "
                           f"big_vision uses {DEFAULT_L2_REG:g}.")

"""Layer-wise learning-rate decay: the groups (against ports of timm's and MAE's rules) and the
updates of SGD and AdamW with the factors (against hand computations in NumPy)."""

import os
import re
import subprocess
import sys
from collections import defaultdict
from itertools import chain

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit.training import ClassificationLoss, build_optimizer
from keras_vit.training.layer_decay import (LayerDecayError, layer_ids,
                                            learning_rate_multipliers)

TINY = keras_vit.ViTConfig(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)


def tiny_model(seed=0, **options):
    keras.utils.set_random_seed(seed)
    return keras_vit.create_model(TINY, image_size=8, num_classes=3, **options)


# --- The groups ---------------------------------------------------------------------------

#: Our variable path -> timm's parameter name (timm/models/vision_transformer.py `Block`,
#: `VisionTransformer.__init__`, deit.py `VisionTransformerDistilled`), written by hand.
_TIMM_NAMES = [
    (r"patch_embedding/projection/kernel", "patch_embed.proj.weight"),
    (r"patch_embedding/projection/bias", "patch_embed.proj.bias"),
    (r"class_token/token", "cls_token"),
    (r"distillation_token/token", "dist_token"),
    (r"register_tokens/token", "reg_token"),
    (r"position_embedding/embedding", "pos_embed"),
    (r"encoder/block_(\d+)/attention_norm/gamma", r"blocks.\1.norm1.weight"),
    (r"encoder/block_(\d+)/attention_norm/beta", r"blocks.\1.norm1.bias"),
    (r"encoder/block_(\d+)/attention/qkv/(kernel|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder/block_(\d+)/attention/out/(kernel|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder/block_(\d+)/attention_scale/scale", r"blocks.\1.ls1.gamma"),
    (r"encoder/block_(\d+)/mlp_norm/gamma", r"blocks.\1.norm2.weight"),
    (r"encoder/block_(\d+)/mlp_norm/beta", r"blocks.\1.norm2.bias"),
    (r"encoder/block_(\d+)/mlp/dense_1/(kernel|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder/block_(\d+)/mlp/dense_2/(kernel|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder/block_(\d+)/mlp_scale/scale", r"blocks.\1.ls2.gamma"),
    (r"encoder/encoder_norm/(gamma|beta)", r"norm.\1"),
    (r"fc_norm/(gamma|beta)", r"fc_norm.\1"),
    (r"pooling/(.*)", r"attn_pool.\1"),
    (r"pre_logits/(kernel|bias)", r"pre_logits.fc.\1"),
    (r"head/class_head/(kernel|bias)", r"head.\1"),
    (r"head/distillation_head/(kernel|bias)", r"head_dist.\1"),
    (r"head/(kernel|bias)", r"head.\1"),
]


def timm_name(path):
    for pattern, name in _TIMM_NAMES:
        if re.fullmatch(pattern, path):
            return re.sub(pattern, name, path)
    raise AssertionError(f"no timm name for {path}")


def timm_layer_ids(names):
    """A port of timm's grouping for layer decay: `param_groups_layer_decay`
    (timm/optim/_param_groups.py: `layer_map.get(name, layer_max)`) over
    `group_with_matcher(..., reverse=True)` (timm/models/_manipulate.py) with deit.py
    `VisionTransformerDistilled.group_matcher`."""
    matcher = [(re.compile(r"^cls_token|pos_embed|patch_embed|dist_token"), (0,), None),
               (re.compile(r"^blocks\.(\d+)"), (1,), None),
               (re.compile(r"^norm"), (1,), (99999,))]

    def grouping(name):
        for match_fn, prefix, suffix in matcher:
            found = match_fn.match(name)
            if found:
                parts = (prefix, found.groups(), suffix)
                return tuple(map(float, chain.from_iterable(filter(None, parts))))
        return (float("inf"),)

    groups = defaultdict(list)
    for name in names:
        groups[grouping(name)].append(name)
    ids, lid = {}, -1
    for key in sorted(groups):
        if lid < 0 or key[-1] != 99999:  # MATCH_PREV_GROUP joins the previous group
            lid += 1
        ids.update({name: lid for name in groups[key]})
    return ids


def mae_layer_id(name, num_blocks):
    """facebookresearch/mae util/lr_decay.py `get_layer_id_for_vit`, num_layers = L + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def test_b16_groups_match_timm_and_mae():
    """ViT-B/16 (12 blocks) with a distillation token, 4 registers and LayerScale: our ids are
    timm's grouping except where the module docstring says (final norm with the head, as MAE
    and BEiT; registers with the class token), and MAE's except for the extra tokens."""
    keras.utils.set_random_seed(0)
    model = keras_vit.create_model("B/16", image_size=32, num_classes=5, distillation_token=True,
                                   num_registers=4, layer_scale=1e-5)
    ours = layer_ids(model)
    names = {path: timm_name(path) for path in ours}
    timm = timm_layer_ids(names.values())
    assert max(timm.values()) == 13  # stem, 12 blocks (norm with block 11), head
    for path, name in names.items():
        expected = timm[name]
        if name.startswith("norm."):
            expected = 13  # timm: 12 (with the last block); BEiT / MAE: L + 1
        if name == "reg_token":
            expected = 0  # timm: unmatched, layer_max; here an input token
        assert ours[path] == expected, (path, name)
        if name not in ("dist_token", "reg_token"):
            assert ours[path] == mae_layer_id(name, 12), (path, name)
    assert ours["encoder/block_0/mlp/dense_1/kernel"] == 1
    assert ours["encoder/block_11/attention_scale/scale"] == 12
    assert ours["head/distillation_head/kernel"] == 13


@pytest.mark.parametrize("options", [dict(pooling="map", representation_size=8),
                                     dict(pooling="gap", norm_after_pooling=True)])
def test_heads_after_the_blocks_get_the_full_rate(options):
    model = tiny_model(**options)
    multipliers = learning_rate_multipliers(model, 0.5)
    assert set(multipliers) == {v.path for v in model.trainable_variables}
    top = [p for p in multipliers if not p.startswith(("encoder/", "patch_embedding/",
                                                         "position_embedding/"))]
    assert top and all(multipliers[p] == 1.0 for p in top)
    assert all(multipliers[timm] == 0.125 for timm in ("patch_embedding/projection/kernel",
                                                       "position_embedding/embedding"))


def test_frozen_teacher_and_views_of_the_student_do_not_count():
    """A wrapper holding the student, a view of its layers and a frozen ViT teacher (as a
    distillation model does): the groups are the student's own."""
    student = tiny_model()
    keras.utils.set_random_seed(1)
    teacher = keras_vit.create_model(TINY, image_size=8, num_classes=3, name="teacher")
    teacher.trainable = False
    view = keras.Model(student.inputs, [student.get_layer("encoder").output, student.output],
                       name="student_view")
    images = keras.Input((8, 8, 3))
    wrapper = keras.Model(images, [student(images), view(images)[1], teacher(images)])
    assert layer_ids(wrapper) == layer_ids(student)
    teacher.trainable = True  # two trainable encoders: which to decay is ambiguous
    with pytest.raises(LayerDecayError, match="holds 2 such models"):
        layer_ids(wrapper)


def test_unknown_variables_are_named():
    vit = tiny_model()
    images = keras.Input((8, 8, 3))
    adapted = keras.layers.Conv2D(3, 1, name="stem_adapter")(images)
    wrapped = keras.Model(images, vit(adapted))
    with pytest.raises(LayerDecayError, match="stem_adapter/kernel"):
        layer_ids(wrapped)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(LayerDecayError, match="Vision Transformer"):
        layer_ids(plain)


def test_rejects_bad_settings():
    model = tiny_model()
    for bad in (-0.1, 1.5):
        with pytest.raises(LayerDecayError, match=r"layer_decay must be in \(0, 1\]"):
            build_optimizer("sgd", 0.1, model=model, layer_decay=bad)
    with pytest.raises(ValueError, match="needs build_optimizer\\(model=...\\)"):
        build_optimizer("adamw", 0.1, layer_decay=0.75)
    optimizer = build_optimizer("sgd", 0.1, model=model, layer_decay=0.75)
    with pytest.raises(ValueError, match="no factor for the variable"):
        optimizer.build(tiny_model(seed=1, pooling="map").trainable_variables)


# --- The updates --------------------------------------------------------------------------

#: Hand-written multipliers for layer_decay = 0.5, L = 2: decay ** (3 - id).
HAND = {
    "patch_embedding/projection/kernel": 0.125,
    "position_embedding/embedding": 0.125,
    "class_token/token": 0.125,
    "encoder/block_0/attention/qkv/kernel": 0.25,
    "encoder/block_1/mlp/dense_2/bias": 0.5,
    "encoder/encoder_norm/gamma": 1.0,
    "head/kernel": 1.0,
}


def _gradients(model, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(v.shape).astype(np.float32) for v in model.trainable_variables]


def test_one_sgd_step_scales_each_group():
    """w1 = w0 - lr * multiplier * g for each group (SGD without momentum, fused kernel)."""
    model = tiny_model()
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    optimizer = build_optimizer("sgd", 0.1, model=model, momentum=0.0, layer_decay=0.5)
    grads = _gradients(model)
    tf.function(lambda: optimizer.apply(grads, model.trainable_variables))()
    for variable, gradient in zip(model.trainable_variables, grads):
        if variable.path in HAND:
            expected = before[variable.path] - 0.1 * HAND[variable.path] * gradient
            np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6, atol=1e-7,
                                       err_msg=variable.path)
    assert set(HAND) <= set(before)


def _adamw_by_hand(w, grads_per_step, lrs, multiplier, wd, decayed, b1=0.9, b2=0.999, eps=1e-7):
    """NumPy AdamW (Keras's form, float64): decoupled decay at the scaled rate, then Adam."""
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        rate = lr * multiplier
        if decayed:
            w = w - rate * wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - rate * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    return w


def test_adamw_with_weight_decay_layer_decay_and_schedule():
    """3 AdamW steps under a warmup schedule: each variable follows NumPy AdamW at
    lr_t * multiplier, its weight decay too (kernels only). Tolerance atol 2e-6: the float32
    rounding of TensorFlow's Adam kernel (tests/test_fused_optimizers.py); a wrong factor is
    off by lr * (1 - factor) ~ 1e-3."""
    model = tiny_model()
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    schedule = keras.optimizers.schedules.PolynomialDecay(0.004, 10, 0.001)
    optimizer = build_optimizer("adamw", schedule, model=model, weight_decay=0.5,
                                layer_decay=0.5)
    steps = [_gradients(model, seed) for seed in range(3)]
    apply = tf.function(lambda g: optimizer.apply(g, model.trainable_variables))
    for grads in steps:
        apply(grads)
    lrs = [float(schedule(t)) for t in range(3)]
    for index, variable in enumerate(model.trainable_variables):
        if variable.path not in HAND:
            continue
        expected = _adamw_by_hand(before[variable.path], [s[index] for s in steps], lrs,
                                  HAND[variable.path], 0.5, variable.path.endswith("/kernel"))
        np.testing.assert_allclose(variable.numpy(), expected, rtol=0, atol=2e-6,
                                   err_msg=variable.path)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_accumulation_and_clipping_compose_with_layer_decay(name):
    """2 micro-batches of 4 == one batch of 8, with clipping, weight decay and layer decay."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 8).astype(np.int32)
    results = []
    for accumulation in (1, 2):
        model = tiny_model()
        optimizer = build_optimizer(name, 0.05, model=model, weight_decay=0.1, momentum=0.9,
                                    global_clipnorm=0.5, layer_decay=0.6,
                                    gradient_accumulation_steps=accumulation)
        model.compile(optimizer, ClassificationLoss("softmax", 3))
        model.fit(images, labels, batch_size=8 // accumulation, epochs=1, shuffle=False, verbose=0)
        results.append([v.numpy() for v in model.trainable_variables])
    initial = [v.numpy() for v in tiny_model().trainable_variables]
    assert any(not np.allclose(a, b) for a, b in zip(results[0], initial))
    for large, accumulated in zip(*results):
        np.testing.assert_allclose(accumulated, large, rtol=1e-5, atol=1e-6)


def test_multipliers_survive_serialization():
    model = tiny_model()
    optimizer = build_optimizer("adamw", 0.01, model=model, weight_decay=0.1, layer_decay=0.7,
                                ema_decay=0.99, ema_warmup=True)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert restored.learning_rate_multipliers == learning_rate_multipliers(model, 0.7)
    assert restored.ema_warmup and restored.use_ema and restored.ema_momentum == 0.99


_JAX_SCRIPT = """
import numpy as np, keras, keras_vit
from keras_vit.training import build_optimizer
assert keras.backend.backend() == "jax"
keras.utils.set_random_seed(0)
model = keras_vit.create_model(keras_vit.ViTConfig(4, 16, 2, 2, 32), image_size=8, num_classes=3)
variables = model.trainable_variables
before = [np.asarray(v) for v in variables]
rng = np.random.default_rng(0)
grads = [rng.standard_normal(v.shape).astype("float32") for v in variables]
optimizer = build_optimizer("sgd", 0.1, model=model, momentum=0.0, weight_decay=0.5,
                            layer_decay=0.5)
optimizer.apply(grads, variables)
hand = {"patch_embedding/projection/kernel": 0.125, "encoder/block_0/attention/qkv/kernel": 0.25,
        "encoder/block_1/mlp/dense_2/bias": 0.5, "head/kernel": 1.0, "class_token/token": 0.125}
for v, w0, g in zip(variables, before, grads):
    if v.path in hand:
        rate = 0.1 * hand[v.path]
        decayed = w0 - rate * 0.5 * w0 if v.path.endswith("/kernel") else w0
        np.testing.assert_allclose(np.asarray(v), decayed - rate * g, rtol=1e-6, atol=1e-7,
                                   err_msg=v.path)
print("ok")
"""


def test_jax_backend_scales_updates_and_weight_decay():
    """Keras's own update path (JAX): the same per-group factors, decay included."""
    pytest.importorskip("jax", reason="jax is a test extra: pip install -e '.[test]'")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _JAX_SCRIPT], env=env, timeout=300,
                            capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]

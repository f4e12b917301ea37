"""The recipe flags of issue 17 through tools/train.py and `keras_vit.training.train`: layer
decay, EMA (evaluated, resumed, exported), CutMix/mixup, random erasing, repeated augmentation,
torchvision's crop, remat, distillation from a saved teacher, TensorBoard every N steps.

The pieces are checked against hand computations in their own tests (test_layer_decay.py,
test_ema.py, test_augmentation_recipes.py, test_distillation.py, test_remat.py,
test_step_logging.py); here the truth is what a run must leave behind: the numbers results.json
reports are those of the saved model on the eval data, a killed and resumed run equals an
uninterrupted one, and the model directory loads as before.
"""

import json
import os
import signal

import keras
import numpy as np
import pytest

import keras_vit
import pipelines
from keras_vit.training import backup, train
from tests.train_helpers import (TINY_FLAGS, convert_digits, run_train, subprocess_env,
                                 tiny_config)

# Every augmentation of the recipes at once, on the tiny digits run of TINY_FLAGS.
RECIPE_FLAGS = dict(
    augment="crop_flip",
    crop_sampler="torchvision",
    crop_min_area=0.5,
    randaugment="2,10",
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    random_erase=0.25,
    aug_repeats=2,
    layer_decay=0.75,
    ema_decay=0.9,
    ema_warmup=True,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return convert_digits(tmp_path_factory.mktemp("digits"))


def _top1_on_digits(model, digits):
    """Top-1 of `model` on the digits test split, counted here with NumPy."""
    data = pipelines.build_dataset(digits, split="test", image_size=16, batch_size=64,
                                   training=False)
    correct = total = 0
    for images, labels in data:
        logits = model.predict_on_batch(images)
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels.numpy()))
        total += int(labels.shape[0])
    return correct / total


def _saved_weights(model_dir):
    model = keras.models.load_model(os.path.join(model_dir, "model.keras"))
    return [np.asarray(weight) for weight in model.weights]


def _assert_killed_at_20_resumes_to_the_uninterrupted_model(flags, tmp_path):
    """Trains `flags` (40 steps) whole, and killed right after the step-20 backup then resumed;
    the two saved models must be equal to float rounding."""
    whole = run_train(**flags, model_dir=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_train(env=subprocess_env(**{backup.FAULT_ENV: "renamed:kill:20"}), **flags,
                       model_dir=tmp_path / "resumed")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_train(**flags, model_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert results["resumed_from_step"] == 20 and results["steps"] == 40
    for a, b in zip(_saved_weights(tmp_path / "whole"), _saved_weights(tmp_path / "resumed")):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ema_run_reports_both_models_and_exports_the_chosen_one(digits, tmp_path):
    results = {}
    for export_ema in (False, True):
        model_dir = tmp_path / f"export_ema_{export_ema}"
        results[export_ema] = train(tiny_config(
            digits, model_dir, **RECIPE_FLAGS, export_ema=export_ema, total_steps=30,
            checkpoint_every_steps=10, eval_every_steps=10, learning_rate=0.01))
        assert results[export_ema]["saved_weights"] == ("ema" if export_ema else "raw")
        model, _ = keras_vit.load_classifier(str(model_dir))
        # The saved model is the one whose accuracy results.json reports under its name.
        key = "eval_top1_ema" if export_ema else "eval_top1"
        assert _top1_on_digits(model, digits) == pytest.approx(results[export_ema][key], abs=1e-6)
    # Deterministic runs: the two trained the same weights; only the export differs.
    assert results[False]["eval_top1"] == pytest.approx(results[True]["eval_top1"], abs=1e-6)
    raw, averaged = (_saved_weights(tmp_path / f"export_ema_{e}") for e in (False, True))
    assert any(not np.allclose(a, b) for a, b in zip(raw, averaged))


@pytest.mark.slow
def test_a_killed_recipe_run_resumes_to_the_uninterrupted_weights_and_ema(digits, tmp_path):
    # Truth: an uninterrupted run. --deterministic with stateless crops, RandAugment, erasing,
    # mixing and repeats: a resumed run that continues the data, the augmentation draws and the EMA where
    # the backup left them ends at the same EMA weights (exported), to float rounding.
    flags = TINY_FLAGS | RECIPE_FLAGS | dict(train_data=digits, eval_data=digits,
                                             total_steps=40, eval_every_steps=40,
                                             export_ema=True)
    _assert_killed_at_20_resumes_to_the_uninterrupted_model(flags, tmp_path)


@pytest.mark.slow
def test_distillation_from_a_saved_teacher_trains_and_saves_the_student(digits, tmp_path):
    teacher_dir = tmp_path / "teacher"
    train(tiny_config(digits, teacher_dir, total_steps=40, eval_every_steps=20,
                      learning_rate=0.01))
    student_dir = tmp_path / "student"
    results = train(tiny_config(
        digits, student_dir, model="d32_l2_h4_m64_p4", pooling="token", distillation_token=True,
        teacher=str(teacher_dir / "model.keras"), distillation="hard", total_steps=40,
        eval_every_steps=20, learning_rate=0.01, remat=True))
    # Above chance (0.1) by 3 standard deviations of a guess on the 360 test digits.
    assert results["steps"] == 40 and results["eval_top1"] > 0.15
    student, class_names = keras_vit.load_classifier(str(student_dir))
    assert class_names == [str(i) for i in range(10)]
    assert student.get_layer("head").__class__.__name__ == "DistilledHead"
    assert _top1_on_digits(student, digits) == pytest.approx(results["eval_top1"], abs=1e-6)
    # Checkpoints hold the student alone: they load into the saved model's architecture.
    checkpoint = sorted((student_dir / "checkpoints").iterdir())[-1]
    student.load_weights(str(checkpoint))
    assert _top1_on_digits(student, digits) == pytest.approx(results["eval_top1"], abs=1e-6)


@pytest.mark.slow
def test_a_killed_distillation_run_resumes_to_the_uninterrupted_student(digits, tmp_path):
    # Truth: an uninterrupted run; the Distiller's backup (student, EMA, optimizer) must be
    # restorable before its first step, on the default strategy too.
    teacher = keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, num_classes=10,
                                     pooling="gap")
    teacher.save(tmp_path / "teacher.keras")
    flags = TINY_FLAGS | dict(train_data=digits, eval_data=digits, total_steps=40,
                              eval_every_steps=40, pooling="token", distillation_token=True,
                              teacher=tmp_path / "teacher.keras", distillation="soft",
                              ema_decay=0.9, export_ema=True)
    _assert_killed_at_20_resumes_to_the_uninterrupted_model(flags, tmp_path)


def test_a_teacher_with_other_classes_is_refused_naming_the_flag(digits, tmp_path):
    teacher = keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, num_classes=7)
    teacher.save(tmp_path / "teacher.keras")
    result = run_train(**TINY_FLAGS, train_data=digits, eval_data=digits,
                       model_dir=tmp_path / "run", teacher=tmp_path / "teacher.keras")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--teacher" in result.stderr and "7" in result.stderr


@pytest.mark.slow
def test_tensorboard_gets_scalars_every_log_every_steps(digits, tmp_path):
    from keras_vit.analysis import curves

    train(tiny_config(digits, tmp_path, total_steps=20, log_every_steps=5,
                      checkpoint_every_steps=10, eval_every_steps=10))
    scalars = curves.read_scalars(str(tmp_path / "logs"))
    steps_of = {tag: list(np.asarray(steps).astype(int))
                for run in scalars.values() for tag, (steps, _) in run.items()}
    learning_rate = [steps for tag, steps in steps_of.items() if "learning_rate" in tag
                     and steps and max(steps) == 20]
    assert [5, 10, 15, 20] in learning_rate, steps_of


def test_the_recipe_pieces_work_in_a_model_fit_script(digits):
    # docs/training.md's "In your own model.fit" script at digits size: every piece composes,
    # and the EMA evaluation lands in the History beside the raw one.
    from keras_vit.training import (ClassificationLoss, Distiller, EmaEvaluation, TopKAccuracy,
                                    WarmupDecay, build_optimizer)

    teacher = keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, num_classes=10)
    student = keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, num_classes=10,
                                     pooling="token", distillation_token=True, remat=True)
    optimizer = build_optimizer(
        "adamw", WarmupDecay(1e-3, total_steps=20, warmup_steps=2), model=student,
        weight_decay=0.05, layer_decay=0.65, ema_decay=0.9, ema_warmup=True)
    model = Distiller(student, teacher, kind="hard", alpha=0.5)
    model.compile(optimizer=optimizer, metrics=[TopKAccuracy(1)],
                  loss=ClassificationLoss("softmax", 10, label_smoothing=0.1))
    train_data = pipelines.build_dataset(
        digits, split="train", image_size=16, batch_size=16, mixup_alpha=0.8, cutmix_alpha=1.0,
        random_erase=0.25, aug_repeats=2, crop_sampler="torchvision", crop_area_range=(0.5, 1.0),
        seed=0)
    eval_data = pipelines.build_dataset(digits, split="test", image_size=16, batch_size=64)
    history = model.fit(train_data, steps_per_epoch=10, epochs=2, validation_data=eval_data,
                        callbacks=[EmaEvaluation(eval_data)], verbose=0)
    assert set(history.history) >= {"val_top1", "val_top1_ema", "val_loss_ema"}
    assert int(optimizer.iterations) == 20

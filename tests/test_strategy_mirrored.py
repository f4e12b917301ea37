"""MirroredStrategy over 2 logical CPU devices gives the loss curve of one device.

Logical devices must be configured before TensorFlow initializes, so the comparison runs in a
subprocess: `python tests/test_strategy_mirrored.py` prints JSON.
"""

import numpy as np
import pytest

STEPS = 6


def _curve(strategy, config):
    import keras
    import tensorflow as tf

    from keras_vit.training import build_model, compile_model

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (48, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 48).astype(np.int32)
    # The same global batches of 16 for both: the mirrored run splits each one 8 + 8.
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).repeat()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(config, 10)
        compile_model(model, config, 10)
    losses = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))
    model.fit(strategy.experimental_distribute_dataset(dataset), epochs=1, steps_per_epoch=STEPS,
              callbacks=[callback], verbose=0, shuffle=False)
    return losses, [float(np.abs(v.numpy()).sum()) for v in model.trainable_weights]


def main():
    from tests.train_helpers import print_result, two_logical_cpus

    two_logical_cpus()  # create_strategy("mirrored") then mirrors over both
    from keras_vit.training import TrainConfig, create_strategy

    config = TrainConfig(model="d32_l2_h4_m64_p4", image_size=16, pooling="gap",
                         optimizer="adamw", learning_rate=0.003, weight_decay=0.1,
                         warmup_steps=2, total_steps=STEPS, grad_clip_norm=1.0,
                         label_smoothing=0.1, train_data="x", model_dir="x")
    mirrored = create_strategy("mirrored")
    out = {"replicas": mirrored.num_replicas_in_sync}
    out["one"] = _curve(create_strategy("default"), config)
    out["two"] = _curve(mirrored, config)
    print_result(out)


@pytest.mark.slow
def test_two_logical_devices_match_one_device():
    from tests.train_helpers import run_result_script

    out = run_result_script(__file__)
    assert out["replicas"] == 2
    (loss_one, weights_one), (loss_two, weights_two) = out["one"], out["two"]
    assert len(loss_one) == len(loss_two) == STEPS
    assert loss_one[-1] < loss_one[0]  # it trains
    # Same global batch, gradients all-reduced: equal up to float32 summation order.
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
    np.testing.assert_allclose(weights_two, weights_one, rtol=1e-5)


if __name__ == "__main__":
    main()

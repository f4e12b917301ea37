r"""Draws what a ViT learned, as in the paper's Figures 6 and 7, or a run's training curves.

    python tools/visualize.py attention --checkpoint=/tmp/run --output=rollout.png a.jpg b.jpg
    python tools/visualize.py posemb --checkpoint=ViT-B_16.npz --output=posemb.png
    python tools/visualize.py attention_distance --checkpoint=/tmp/run --data=/tmp/digits \
        --split=test --num_images=64 --output=distance.png
    python tools/visualize.py curves --checkpoint=/tmp/run --output=curves.png

KIND:
  attention            attention rollout (Abnar & Zuidema 2020) over each image (Figure 6)
  posemb               cosine similarity of the position embeddings (Figure 7, centre)
  attention_distance   mean attention distance per head against depth (Figure 7, right)
  curves               loss, accuracy and learning rate from MODEL_DIR/logs (TensorBoard),
                       against optimizer update steps (--x_axis=epoch: against epochs)
See docs/analysis.md.
"""

import os

import numpy as np
from absl import app, flags

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
import keras_vit
import pipelines
from keras_vit import analysis, inference, load_classifier
from keras_vit import class_names as class_names_lib
from keras_vit.analysis import curves, figures
from keras_vit import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, cli.CHECKPOINT_HELP)
_OUTPUT = flags.DEFINE_string("output", None, "PNG file to write.", required=True)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Input side in pixels. Default: the model's. A checkpoint is "
    "resampled to it; a dynamic-size model takes any multiple of its patch.")
_LABELS = flags.DEFINE_string("labels", None, "Class names for the titles of `attention`.")
_DATA = flags.DEFINE_string(
    "data", None, "Images for attention / attention_distance from a dataset (a TFRecord "
    "directory or pattern, or tfds:NAME) instead of image files.")
_SPLIT = flags.DEFINE_string("split", "test", "Split of --data.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "How many images of --data to use.")
_RESIDUAL_WEIGHT = flags.DEFINE_float(
    "residual_weight", 0.5, "Rollout: weight of the identity added to each attention map.")
_LOGDIR = flags.DEFINE_string(
    "logdir", None, "curves: TensorBoard log directory (default: CHECKPOINT/logs).")
_X_AXIS = flags.DEFINE_enum(
    "x_axis", "step", ["step", "epoch"], "curves: against optimizer update steps (the "
    "--log_every_steps scalars; a run logged without them falls back to epochs unless "
    "--x_axis is given) or against epochs (--checkpoint_every_steps chunks).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Data dir of prepared TFDS datasets.")
_ALLOW_NON_FINITE = flags.DEFINE_bool(
    "allow_non_finite_weights", False, "Load a model whose weights hold NaN or Inf (refused by "
    "default).")


def _model():
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required for this KIND.")
    return load_classifier(
        _CHECKPOINT.value, image_size=_IMAGE_SIZE.value, class_names_path=_LABELS.value,
        allow_non_finite=_ALLOW_NON_FINITE.value)


def _images(paths, image_size):
    """(images (B, S, S, 3) in [0, 255], titles) from files, else from --data."""
    if paths:
        return inference.load_images(paths, image_size), [os.path.basename(p) for p in paths]
    if not _DATA.value:
        raise app.UsageError("Give image files after KIND, or --data=SOURCE.")
    dataset = pipelines.build_dataset(
        _DATA.value, split=_SPLIT.value, image_size=image_size, batch_size=_NUM_IMAGES.value,
        training=False, tfds_data_dir=_TFDS_DATA_DIR.value)
    images, labels = next(iter(dataset))
    return images.numpy(), [f"label {int(label)}" for label in labels.numpy()]


def draw_attention(paths):
    model, class_names = _model()
    _, patch_size, num_prefix_tokens = analysis.model_geometry(model)
    image_size = inference.input_image_size(model, _IMAGE_SIZE.value)
    images, titles = _images(paths, image_size)
    grid_size = (image_size // patch_size,) * 2  # a dynamic-size model's grid follows the images
    attention = analysis.attention_maps(model, images)
    maps = analysis.rollout_map(
        analysis.attention_rollout(attention, _RESIDUAL_WEIGHT.value), grid_size,
        num_prefix_tokens)
    class_names = class_names_lib.resolve_class_names(int(model.output_shape[-1]), class_names)
    indices, probabilities = inference.top_k_predictions(
        inference.predict_logits(model, images), 1)
    titles = [f"{title}: {class_names[i[0]]} ({p[0]:.2f})"
              for title, i, p in zip(titles, indices, probabilities)]
    return figures.attention_figure(images, maps, titles)


def draw_posemb(paths):
    del paths
    model, _ = _model()
    grid_size, _, num_prefix_tokens = analysis.model_geometry(model)
    embedding = np.asarray(model.get_layer("position_embedding").embedding)
    return figures.position_embedding_figure(
        analysis.position_embedding_similarity(embedding, grid_size, num_prefix_tokens))


def draw_attention_distance(paths):
    model, _ = _model()
    _, patch_size, num_prefix_tokens = analysis.model_geometry(model)
    image_size = inference.input_image_size(model, _IMAGE_SIZE.value)
    images, _ = _images(paths, image_size)
    grid_size = (image_size // patch_size,) * 2
    distances = analysis.mean_attention_distance(
        analysis.attention_maps(model, images), grid_size, patch_size, num_prefix_tokens)
    print("mean attention distance (pixels), layer x head:")
    for layer, row in enumerate(distances, 1):
        print(f"  layer {layer:2d}: " + " ".join(f"{d:6.1f}" for d in row))
    return figures.attention_distance_figure(
        distances, image_size=image_size,
        title=f"{model.name}, {len(images)} images")


def draw_curves(paths):
    del paths
    logdir = _LOGDIR.value
    if logdir is None:
        if not _CHECKPOINT.value or not os.path.isdir(_CHECKPOINT.value):
            raise app.UsageError("curves needs --logdir=DIR or --checkpoint=MODEL_DIR.")
        logdir = os.path.join(_CHECKPOINT.value, "logs")
    scalars = analysis.read_scalars(logdir)
    x_axis = _X_AXIS.value if _X_AXIS.present else curves.default_x_axis(scalars)
    if x_axis != _X_AXIS.value:
        print(f"{logdir} has no --log_every_steps scalars (step_*): drawing against epochs.")
    groups = analysis.group_curves(scalars, x_axis)
    if not groups:
        raise keras_vit.UserError(
            f"{logdir} has no loss, accuracy or learning-rate scalars per {x_axis}; "
            f"try --x_axis={'step' if x_axis == 'epoch' else 'epoch'}.")
    return figures.curves_figure(groups, "optimizer step" if x_axis == "step" else x_axis,
                                 title=logdir)


#: KIND -> the function that draws it from the image files given after KIND.
DRAW = {
    "attention": draw_attention,
    "posemb": draw_posemb,
    "attention_distance": draw_attention_distance,
    "curves": draw_curves,
}


def main(argv):
    if len(argv) < 2 or argv[1] not in DRAW:
        found = argv[1] if len(argv) > 1 else "nothing"
        raise app.UsageError(f"KIND must be one of {', '.join(DRAW)}; got {found}.")
    kind, paths = argv[1], argv[2:]
    if paths and kind in ("posemb", "curves"):
        raise app.UsageError(f"{kind} takes no image files, got {paths}.")
    figure = DRAW[kind](paths)
    figures.save(figure, _OUTPUT.value)
    print(f"Wrote {_OUTPUT.value} ({figures.panel_count(figure)} panels)")


def run():
    """Console script `keras-vit-visualize`."""
    cli.run(main)


if __name__ == "__main__":
    run()

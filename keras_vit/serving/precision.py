"""The precision a SavedModel is exported in: float32, or bfloat16 weights and compute.

Keras's `mixed_bfloat16` policy keeps the variables in float32 and casts every weight to
bfloat16 each time a layer runs (a Cast op per weight per call, reading 4 bytes per weight). A
bfloat16 export instead stores each weight once in bfloat16 (2 bytes) and computes in bfloat16
with no cast of a weight in the graph: `bfloat16_model` rebuilds the model under the `bfloat16`
policy and copies the weights in, rounded to bfloat16.

Two kinds of layer keep float32, both with their own float32 variables so nothing is cast per
call either:

- every `LayerNormalization` (keras_vit's `layers.LayerNorm` included): both compute it in
  float32 whatever the policy, so bfloat16 scale and offset would be cast on each call;
- the model's output layer (the head): the logits are computed in float32, as under
  `mixed_bfloat16`.

Activations are cast between the two (as under `mixed_bfloat16`); `weight_casts` finds a weight
cast in a written SavedModel, which the exporter refuses.
"""

from __future__ import annotations

import os

import keras
from tensorflow.core.protobuf import saved_model_pb2

PRECISIONS = ("float32", "bfloat16")


def _keeps_float32(layer, output_layers) -> bool:
    return layer.name in output_layers or isinstance(layer, keras.layers.LayerNormalization)


def _bfloat16_layer(layer, output_layers):
    """A new, unbuilt copy of `layer` under the bfloat16 policy (see the module docstring).

    Called with bfloat16 as the global policy, which the sublayers made in a layer's __init__
    (an encoder's blocks) or build (an attention's projections) take.
    """
    config = layer.get_config()
    config["dtype"] = "float32" if _keeps_float32(layer, output_layers) else "bfloat16"
    copy = layer.__class__.from_config(config)
    for sublayer in copy._flatten_layers(include_self=False):
        if isinstance(sublayer, keras.layers.LayerNormalization):
            # Before it is built, so that its variables are made in float32.
            sublayer.dtype_policy = "float32"
    return copy


def _expected_dtype(path, float32_paths) -> str:
    return "float32" if any(path.startswith(prefix) for prefix in float32_paths) else "bfloat16"


def bfloat16_model(model: keras.Model) -> keras.Model:
    """A copy of the functional `model` with bfloat16 weights and compute, float32 logits.

    Args:
        model: a functional classifier, float32 (batch, size, size, 3) -> logits (batch, K), of
            any dtype policy (float32, or trained under mixed_bfloat16).

    Returns:
        The copy: each weight of `model` rounded to bfloat16, except LayerNorm and head weights,
        which stay float32 (module docstring). Its outputs are the logits, float32.

    Raises:
        ExportError: the copy's weights do not match the model's one for one (a layer whose
            config does not rebuild it).
    """
    from keras_vit.serving.export import ExportError  # export imports this module

    output_layers = {tensor._keras_history.operation.name for tensor in model.outputs}
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("bfloat16")
    try:
        copy = keras.models.clone_model(
            model, clone_function=lambda layer: _bfloat16_layer(layer, output_layers))
    finally:
        keras.config.set_dtype_policy(previous)
    if len(copy.weights) != len(model.weights):
        raise ExportError(
            f"The bfloat16 copy of {model.name} has {len(copy.weights)} weights, the model "
            f"{len(model.weights)}: a layer's config does not rebuild it; export in float32.")
    for source, target in zip(model.weights, copy.weights):
        if tuple(source.shape) != tuple(target.shape):
            raise ExportError(
                f"The bfloat16 copy's weight {target.path} has shape {tuple(target.shape)}, the "
                f"model's {source.path} {tuple(source.shape)}; export in float32.")
        target.assign(keras.ops.cast(source.value, target.dtype))
    _check_weight_dtypes(copy, output_layers, ExportError)
    return copy


def _check_weight_dtypes(copy, output_layers, error_class):
    """Every floating weight of `copy` in bfloat16 but those of LayerNorms and the head."""
    float32_paths = tuple(
        sublayer.path + "/" for sublayer in copy._flatten_layers()
        if sublayer is not copy and _keeps_float32(sublayer, output_layers))
    for weight in copy.weights:
        expected = _expected_dtype(weight.path, float32_paths)
        if "float" in str(weight.dtype) and str(weight.dtype) != expected:
            raise error_class(
                f"The bfloat16 copy's weight {weight.path} is {weight.dtype}, expected "
                f"{expected}: its layer does not take the bfloat16 policy; export in float32.")


def float32_model(model: keras.Model) -> keras.Model:
    """`model` itself if it computes in float32, else a float32 copy of it (a model trained
    under mixed_bfloat16 computes in bfloat16): the reference every export is checked against."""
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model.layers):
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = keras.models.clone_model(
            model, clone_function=lambda layer: layer.__class__.from_config(
                {**layer.get_config(), "dtype": "float32"}))
    finally:
        keras.config.set_dtype_policy(previous)
    for source, target in zip(model.weights, copy.weights):
        target.assign(keras.ops.cast(source.value, "float32"))
    return copy


def model_in_precision(model, precision):
    """`model` in float32 (`float32_model`) for "float32", its bfloat16 copy for "bfloat16";
    an ExportError for another precision."""
    from keras_vit.serving.export import ExportError  # export imports this module

    if precision not in PRECISIONS:
        raise ExportError(
            f"precision must be one of {', '.join(PRECISIONS)} for a SavedModel, "
            f"got {precision!r}. (float16 and int8 are LiteRT and OpenVINO exports.)")
    return float32_model(model) if precision == "float32" else bfloat16_model(model)


def check_no_weight_casts(saved_model_dir):
    """An ExportError when the SavedModel casts a weight as it reads it (`weight_casts`)."""
    from keras_vit.serving.export import ExportError  # export imports this module

    casts = weight_casts(saved_model_dir)
    if casts:
        raise ExportError(
            f"The bfloat16 SavedModel casts {len(casts)} weights on every call (e.g. "
            f"{casts[0]}): a layer kept float32 weights but computes in bfloat16. Export in "
            "float32, or report the layer.")


def _graphs(saved_model_dir: str) -> list[tuple[str, list]]:
    """(name, NodeDefs) of the SavedModel's graph and of each function of its library."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as stream:
        saved_model.ParseFromString(stream.read())
    graphs = []
    for meta_graph in saved_model.meta_graphs:
        graphs.append(("graph", list(meta_graph.graph_def.node)))
        graphs.extend((function.signature.name, list(function.node_def))
                      for function in meta_graph.graph_def.library.function)
    return graphs


def weight_casts(saved_model_dir: str) -> list[str]:
    """`function/node` names of the Cast ops in a SavedModel that cast a variable as it is read.

    Under `mixed_bfloat16` there is one per weight per call; a bfloat16 export has none.
    """
    casts = []
    for graph_name, nodes in _graphs(saved_model_dir):
        read_ops = {node.name for node in nodes if node.op == "ReadVariableOp"}
        # An input is "name", "name:0" (graphs) or "name:value:0" (functions).
        casts.extend(
            f"{graph_name}/{node.name}" for node in nodes
            if node.op == "Cast" and node.input and node.input[0].split(":")[0] in read_ops)
    return sorted(casts)


def variable_dtypes(saved_model_dir: str) -> dict[str, str]:
    """{checkpoint key: dtype name} of the SavedModel's stored variables (its variables/)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(saved_model_dir, "variables", "variables"))
    return {
        key: dtype.name for key, dtype in reader.get_variable_to_dtype_map().items()
        if not key.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")
    }

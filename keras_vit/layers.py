"""Keras layers of the Vision Transformer (Dosovitskiy et al. 2020, Eq. 1-4).

Every layer here is written with `keras.ops` and `keras.layers`, so a model built from them
runs on the TensorFlow and the JAX backends alike; the one exception is an inference fast path
of the attention's and the MLP's Dense layers on the TensorFlow backend
(`_flat_dense_tensorflow`), the same math as the backend-neutral code beside it.
Shapes use B = batch, T = tokens, N = patches, D = hidden size, H = heads.

Initializers follow google-research/vision_transformer (Flax's defaults where it sets none):
the patch projection's kernel is LeCun-normal; the query, key, value, attention-output and MLP
kernels are Xavier-uniform; the MLP biases N(0, 1e-6); the other biases zero; the position
embedding N(0, 0.02); the class token zero; LayerNorm scale one and offset zero. The options
other projects' ViTs need (`layer_scale`, register and distillation tokens, the MAP head) take
timm's or big_vision's initializers.
"""

import keras
from keras import ops

from keras_vit import posemb
from keras_vit.variants import check_pooling

LAYER_NORM_EPSILON = 1e-6  # The original code's LayerNorm epsilon (Flax default).


def _layer_norm(name, epsilon=LAYER_NORM_EPSILON):
    return LayerNorm(epsilon=epsilon, name=name)


@keras.saving.register_keras_serializable(package="keras_vit")
class LayerNorm(keras.layers.LayerNormalization):
    """Keras's LayerNormalization, computed as `(x - mean) / sqrt(var + epsilon) * gamma +
    beta` in float32.

    Same weights, config and result as the Keras layer (to float32 rounding; this order is the
    more accurate one); only the arithmetic differs. Keras computes `x * inv + (-mean * inv +
    beta)` with `inv = gamma * rsqrt(var + epsilon)`, which none of OpenVINO's MVN fusion
    patterns matches (openvino: src/common/transformations/src/transformations/
    common_optimizations/mvn_fusion.cpp), so an OpenVINO export of it runs every LayerNorm as
    two reductions and a handful of element-wise ops. This form is MVNFusionWithoutConstants'
    pattern and becomes one MVN op (the reduction axes must be a list: TensorFlow's scalar
    axes break the match). It also runs a few percent faster in TensorFlow (bench/NOTES.md,
    "LayerNorm form").

    Input and output: (..., features), any float dtype; computed in float32 at least. Only
    the last axis (the default) is normalized.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.rms_scaling or not (self.center and self.scale):
            raise ValueError(
                f"LayerNorm {self.name!r} computes the centred, scaled and shifted form only; "
                f"got center={self.center}, scale={self.scale}, rms_scaling={self.rms_scaling}. "
                "Use keras.layers.LayerNormalization (or RMSNormalization) for those.")

    def build(self, input_shape):
        super().build(input_shape)
        rank = len(input_shape)
        if [axis % rank for axis in self.axis] != [rank - 1]:
            raise ValueError(
                f"LayerNorm {self.name!r} normalizes the last axis only; got axis {self.axis} "
                f"for inputs of shape {tuple(input_shape)}. Use keras.layers.LayerNormalization.")

    def call(self, inputs):
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, compute_dtype)
        axes = [-1]  # a list, as the MVN match needs (build checked the axis)
        centered = x - ops.mean(x, axis=axes, keepdims=True)
        variance = ops.mean(ops.square(centered), axis=axes, keepdims=True)
        normalized = centered / ops.sqrt(variance + self.epsilon)
        outputs = normalized * ops.cast(self.gamma, compute_dtype) + ops.cast(self.beta, compute_dtype)
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_vit")
class PixelNormalization(keras.layers.Layer):
    """[0, 255] RGB pixels -> (pixels / 255 - mean) / std, per channel: a checkpoint's input
    normalisation inside the model, so every caller feeds the same [0, 255] images.

    Google's checkpoints expect [-1, 1] (mean = std = 0.5); timm's DeiT the ImageNet mean and
    std. Computed as one multiply-add, x · scale + offset with scale = 1 / (255 std) and
    offset = -mean / std, which for mean = std = 0.5 is exactly Google's x / 127.5 - 1.

    Args:
        mean: 3 per-channel means, on [0, 1] pixels.
        std: 3 per-channel standard deviations, on [0, 1] pixels.
        eval_crop_fraction: the central fraction of each side the checkpoint's evaluation
            keeps before resizing (timm's crop_pct), or None for the whole image. Not applied
            here: recorded with the model for the tools' evaluation preprocessing.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), eval_crop_fraction=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.mean = _three_floats("mean", mean)
        self.std = _three_floats("std", std)
        if any(value <= 0 for value in self.std):
            raise ValueError(f"std must be positive, got {self.std}.")
        if eval_crop_fraction is not None and not 0.0 < eval_crop_fraction <= 1.0:
            raise ValueError(f"eval_crop_fraction must be in (0, 1], got {eval_crop_fraction}.")
        self.eval_crop_fraction = None if eval_crop_fraction is None else float(eval_crop_fraction)

    def call(self, images):
        """(B, height, width, 3) pixels in [0, 255] -> normalised, the same shape."""
        scale = [1.0 / (255.0 * s) for s in self.std]
        offset = [-m / s for m, s in zip(self.mean, self.std)]
        if len(set(scale)) == 1 and len(set(offset)) == 1:
            scale, offset = scale[0], offset[0]  # Scalars: Google's exact x / 127.5 - 1.
        return (images * ops.convert_to_tensor(scale, images.dtype)
                + ops.convert_to_tensor(offset, images.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std,
                "eval_crop_fraction": self.eval_crop_fraction}


def _three_floats(name, values):
    values = tuple(float(value) for value in values)
    if len(values) != 3:
        raise ValueError(f"{name} must hold 3 per-channel values (RGB), got {values}.")
    return values


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchEmbedding(keras.layers.Layer):
    """Splits images into P×P patches and projects each to D (Eq. 1, the matrix E).

    A Conv2D whose kernel size and stride both equal P applies the same (P·P·3, D) matrix to
    every non-overlapping patch: it is exactly "flatten each patch, then Dense", and its kernel
    (P, P, 3, D) is the layout of the original checkpoints' `embedding/kernel`.

    Args:
        patch_size: side P of the square patches, in pixels.
        hidden_size: width D of the patch embeddings.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, patch_size, hidden_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.hidden_size = int(hidden_size)
        self.projection = keras.layers.Conv2D(
            self.hidden_size,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="valid",
            kernel_initializer="lecun_normal",
            name="projection",
        )

    def build(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        for side_name, side in (("height", height), ("width", width)):
            if side is not None and side % self.patch_size:
                raise ValueError(
                    f"Image {side_name} {side} is not divisible by the patch size "
                    f"{self.patch_size}. Use an image_size that is a multiple of "
                    f"{self.patch_size}."
                )
        self.projection.build(input_shape)

    def call(self, images):
        """Embeds every patch.

        Args:
            images: (B, height, width, channels), both sides multiples of P.

        Returns:
            (B, N, D) with N = (height / P) · (width / P), the patches in row-major order.
        """
        # A model of dynamic image size learns its sides only here; the strided convolution
        # would silently drop the last rows and columns of a side that is no multiple of P.
        check_patch_grid(ops.shape(images)[1:3], self.patch_size)
        patches = self.projection(images)
        return ops.reshape(patches, (ops.shape(patches)[0], -1, self.hidden_size))

    def compute_output_shape(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        num_patches = None
        if height is not None and width is not None:
            num_patches = (height // self.patch_size) * (width // self.patch_size)
        return (input_shape[0], num_patches, self.hidden_size)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "hidden_size": self.hidden_size}


def check_patch_grid(image_sides, patch_size):
    """Raises unless both image sides are positive multiples of the patch size.

    Static sides (Python ints: a fixed-size model, eager calls, JAX) raise a ValueError now;
    sides known only when the graph runs (a TensorFlow function or SavedModel traced for any
    size) get an in-graph assertion with the same message, as keras.ops has no assert.

    Args:
        image_sides: (height, width), ints or scalar integer tensors.
        patch_size: P, in pixels.
    """
    message = (f"Image height and width must be positive multiples of the patch size "
               f"{patch_size}; resize or crop the images to such a size (e.g. "
               f"{16 * patch_size}x{16 * patch_size}).")
    for side_name, side in zip(("height", "width"), image_sides):
        if side is None:
            continue
        if isinstance(side, int):
            if side < patch_size or side % patch_size:
                raise ValueError(f"{message} Got {side_name} {side}.")
        elif keras.backend.backend() == "tensorflow":
            import tensorflow as tf  # Only here: the graph-time check of a TF graph.

            tf.debugging.assert_equal(
                tf.logical_and(side >= patch_size, side % patch_size == 0), True,
                message=f"{message} Got another {side_name}.")


@keras.saving.register_keras_serializable(package="keras_vit")
class ClassToken(keras.layers.Layer):
    """Prepends learned tokens to the sequence: the class token x_class (Eq. 1), a (1, 1, D)
    weight, and in the same way DeiT's distillation token and register tokens (Darcet et al.
    2023), (1, num_tokens, D).

    Args:
        num_tokens: how many tokens to prepend.
        initializer: of the (1, num_tokens, D) weight; zeros as the original's class token.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, num_tokens=1, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = int(num_tokens)
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}.")
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.token = self.add_weight(
            name="token", shape=(1, self.num_tokens, input_shape[-1]), initializer=self.initializer
        )

    def call(self, tokens):
        """Prepends the tokens to every image's sequence.

        Args:
            tokens: (B, T, D).

        Returns:
            (B, num_tokens + T, D), this layer's tokens first.
        """
        batch_size = ops.shape(tokens)[0]
        token = ops.cast(self.token, tokens.dtype)
        token = ops.broadcast_to(token, (batch_size, self.num_tokens, ops.shape(tokens)[-1]))
        return ops.concatenate([token, tokens], axis=1)

    def compute_output_shape(self, input_shape):
        num_tokens = None if input_shape[1] is None else input_shape[1] + self.num_tokens
        return (input_shape[0], num_tokens, input_shape[2])

    def get_config(self):
        return {**super().get_config(), "num_tokens": self.num_tokens,
                "initializer": keras.initializers.serialize(self.initializer)}


@keras.saving.register_keras_serializable(package="keras_vit")
class AddPositionEmbedding(keras.layers.Layer):
    """Adds the learned 1-D position embedding E_pos (Eq. 1), a (1, T, D) weight.

    T = num_prefix_tokens + grid_size[0] · grid_size[1]: the prefix tokens (class,
    distillation, register) first, then the patches in row-major order of their grid_size
    grid. A model whose position embedding covers the patches only (big_vision, timm's
    `no_embed_class`) adds it before the prefix tokens are prepended, with num_prefix_tokens=0.

    With `patch_size` set (`create_model(dynamic_image_size=True)`), the layer is called with
    the model's images too and resamples the patch part of its weight, in the graph, to the
    images' grid (height / P, width / P): the numbers `posemb.resample` gives offline
    (`posemb.resample_ops`), as timm's `dynamic_img_size` and big_vision's flexi ViT resample
    per call. At grid_size itself the weight is added as it is.

    Args:
        grid_size: (rows, columns) of the patch grid the weight is trained for.
        num_prefix_tokens: tokens before the patches that have a position embedding.
        patch_size: None for a fixed grid; else P, and `call` takes the images.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, grid_size, num_prefix_tokens=1, patch_size=None, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(side) for side in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.patch_size = None if patch_size is None else int(patch_size)

    @property
    def num_tokens(self):
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def build(self, tokens_shape, images_shape=None):
        input_shape = tokens_shape
        fixed_length = self.patch_size is None and input_shape[1] is not None
        if fixed_length and input_shape[1] != self.num_tokens:
            raise ValueError(
                f"AddPositionEmbedding expects {self.num_tokens} tokens "
                f"({self.num_prefix_tokens} prefix + {self.grid_size[0]}x{self.grid_size[1]} "
                f"patches), got {input_shape[1]}."
            )
        self.embedding = self.add_weight(
            name="embedding",
            shape=(1, self.num_tokens, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, tokens, images=None):
        """Adds the position embedding to every image's tokens.

        Args:
            tokens: (B, T, D).
            images: with `patch_size` only: the model's images (B, height, width, C), whose
                grid (height / P, width / P) the embedding is resampled to.

        Returns:
            (B, T, D): tokens + E_pos.
        """
        if (self.patch_size is None) != (images is None):
            raise ValueError(
                f"AddPositionEmbedding {self.name!r} "
                + ("takes the images (patch_size is set): call it as layer(tokens, images)."
                   if images is None else "has a fixed grid (patch_size=None): call it as "
                   "layer(tokens), without images."))
        embedding = self.embedding
        if images is not None:
            sides = ops.shape(images)[1:3]
            grid = tuple(side // self.patch_size for side in sides)
            # Static sides equal to the built grid (a fixed-size call) skip the resample op.
            if not all(isinstance(side, int) for side in grid) or grid != self.grid_size:
                embedding = posemb.resample_ops(embedding, self.grid_size, grid,
                                                self.num_prefix_tokens)
        return tokens + ops.cast(embedding, tokens.dtype)

    def compute_output_shape(self, tokens_shape, images_shape=None):
        return tokens_shape

    def resampled(self, new_grid_size):
        """This layer's embedding resampled to a new patch grid (`posemb.resample`).

        The patch part is resampled bilinearly on its 2-D grid; the class-token position is
        kept as is.

        Args:
            new_grid_size: (new_h, new_w), rows and columns of the new patch grid.

        Returns:
            A float32 NumPy array (1, num_prefix_tokens + new_h · new_w, D).
        """
        return posemb.resample(
            ops.convert_to_numpy(self.embedding), self.grid_size, new_grid_size,
            self.num_prefix_tokens,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "grid_size": self.grid_size,
            "num_prefix_tokens": self.num_prefix_tokens,
            "patch_size": self.patch_size,
        }


def _runs_flat_on_tensorflow(dense, training):
    """Whether `_dense` takes `_flat_dense_tensorflow` for this Dense and call.

    Only on the TensorFlow backend at inference. Training keeps Keras's Dense: a training graph
    keeps the GELU's pre-activation for the backward pass, so the MLP's first matmul does not
    fuse there and Keras's Dense measured faster (bench/NOTES.md, lever 10); the other Dense
    layers were not measured in training. Also only for a Dense with a bias and no activation
    of its own (the GELU is the caller's), and not quantized (`model.quantize`: its kernel is
    in its own format and its call is its own).
    """
    return (not training and keras.backend.backend() == "tensorflow"
            and getattr(dense, "quantization_mode", None) is None and dense.use_bias
            and dense.activation is keras.activations.linear)


def _flat_dense_tensorflow(dense, tokens, gelu_approximate=None):
    """`dense(tokens)`, then a GELU if `gelu_approximate` is not None, as TensorFlow ops on the
    Dense layer's own variables: (..., D) -> (..., units), in the Dense's compute dtype.

    A 2-D MatMul, a BiasAdd and a GELU, which TensorFlow's graph rewriter fuses into one oneDNN
    matmul: Keras's Dense on (B, T, D) inputs emits a tensordot (a reshape between its MatMul and
    the bias) and an AddV2, which it does not fuse (bench/NOTES.md has the measurements). The
    exporters to LiteRT, ONNX and OpenVINO read the same graph: a 2-D MatMul with its bias is
    their fully connected layer.
    """
    import tensorflow as tf  # Here only: the JAX backend must not need TensorFlow.

    kernel = dense.kernel  # Read once: with LoRA enabled, each read adds the low-rank product.
    # Cast as Keras's Dense casts its inputs: to its own compute dtype, whatever the caller's.
    flat = ops.cast(tf.reshape(tokens, (-1, kernel.shape[0])), dense.compute_dtype)
    outputs = tf.matmul(flat, ops.cast(kernel, flat.dtype))
    outputs = tf.nn.bias_add(outputs, ops.cast(dense.bias, flat.dtype))
    if gelu_approximate is not None:
        outputs = tf.nn.gelu(outputs, approximate=gelu_approximate)
    return tf.reshape(outputs, tf.concat([tf.shape(tokens)[:-1], [dense.units]], axis=0))


def _dense(dense, tokens, training):
    """`dense(tokens)`, as `_flat_dense_tensorflow` where `_runs_flat_on_tensorflow`."""
    if _runs_flat_on_tensorflow(dense, training):
        return _flat_dense_tensorflow(dense, tokens)
    return dense(tokens)


@keras.saving.register_keras_serializable(package="keras_vit")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head self-attention (the paper's MSA, Eq. 2 and its Appendix A).

    The query, key and value projections are one fused (D, 3·D) Dense: one matrix multiply
    instead of three. Its columns are [query | key | value], each in (head, head_dim) order,
    which is the original checkpoints' (D, H, D/H) kernels reshaped and concatenated. On the
    TensorFlow backend at inference it and the output Dense run as `_flat_dense_tensorflow`.

    Args:
        num_heads: attention heads H; must divide D.
        dropout_rate: dropout on the attention probabilities.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, num_heads, dropout_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.dropout_rate = float(dropout_rate)
        self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout")

    def build(self, input_shape):
        hidden_size = input_shape[-1]
        if hidden_size % self.num_heads:
            raise ValueError(
                f"hidden size {hidden_size} is not divisible by num_heads {self.num_heads}."
            )
        self.head_dim = hidden_size // self.num_heads
        # Xavier-uniform over (D, D) for each of q, k, v, as the original's per-projection init:
        # on the fused (D, 3D) kernel, fan_avg is 2D, so scale 2 gives limit sqrt(3 / D).
        self.qkv = keras.layers.Dense(
            3 * hidden_size,
            kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_avg", "uniform"),
            name="qkv",
        )
        self.qkv.build(input_shape)
        self.out = keras.layers.Dense(
            hidden_size, kernel_initializer="glorot_uniform", name="out"
        )
        self.out.build(input_shape)

    def call(self, tokens, training=None, return_attention_scores=False, first_query_only=False):
        """Attends every token (or only the first) to all T tokens.

        Args:
            tokens: (B, T, D).
            training: whether dropout is active.
            return_attention_scores: also return the attention probabilities.
            first_query_only: only the first token attends; keys and values still come from
                all T tokens.

        Returns:
            (B, T, D), or (B, 1, D) with `first_query_only`; with `return_attention_scores`
            also the float32 attention probabilities (B, H, T, T), or (B, H, 1, T): softmax
            over the last axis, before dropout.
        """
        batch_size, num_tokens = ops.shape(tokens)[0], ops.shape(tokens)[1]
        hidden_size = self.num_heads * self.head_dim
        qkv = ops.reshape(
            _dense(self.qkv, tokens, training),
            (batch_size, num_tokens, 3, self.num_heads, self.head_dim),
        )
        # Queries, keys and values stay in (B, T, H, D/H), the projection's own layout: the
        # einsums below read it as is, with no transposed copies in either direction
        # (bench/NOTES.md). unstack, not qkv[:, :, 0] etc.: the gradient of an unstack is one
        # stack, while each strided slice's gradient writes a zero-filled copy of all of qkv.
        query, key, value = ops.unstack(qkv, 3, axis=2)
        num_queries = num_tokens
        if first_query_only:
            query, num_queries = query[:, :1], 1
        query = query * ops.cast(self.head_dim ** -0.5, query.dtype)
        scores = ops.einsum("bqhd,bkhd->bhqk", query, key)  # (B, H, queries, T)
        # Softmax in float32 even under mixed precision: bfloat16 sums lose small weights.
        probabilities = ops.softmax(ops.cast(scores, "float32"), axis=-1)
        attended = ops.einsum(
            "bhqk,bkhd->bqhd",
            ops.cast(self.dropout(probabilities, training=training), value.dtype),
            value,
        )
        attended = ops.reshape(attended, (batch_size, num_queries, hidden_size))
        outputs = _dense(self.out, attended, training)
        if return_attention_scores:
            return outputs, probabilities
        return outputs

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "dropout_rate": self.dropout_rate}


@keras.saving.register_keras_serializable(package="keras_vit")
class StochasticDepth(keras.layers.Layer):
    """Drops a residual branch per example during training (Huang et al. 2016, "drop path").

    In training each example's branch is zeroed with probability `rate` and scaled by
    1 / (1 - rate) otherwise, so the expectation is unchanged; at inference it is the identity.

    Args:
        rate: drop probability, in [0, 1).
        seed: seed of the drop mask's random generator; None for a random one.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}.")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        """Zeroes whole examples of a branch's output in training; the identity otherwise.

        Args:
            inputs: (B, ...), one branch output per example.
            training: whether to drop.

        Returns:
            The shape of `inputs`: each example zeroed or scaled by 1 / (1 - rate).
        """
        if not training or self.rate == 0.0:
            return inputs
        keep_probability = 1.0 - self.rate
        mask_shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        keep = keras.random.uniform(mask_shape, seed=self.seed_generator) < keep_probability
        return inputs * ops.cast(keep, inputs.dtype) / ops.cast(keep_probability, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _mlp_dense(units, name):
    # The original's MLP initialization: Xavier-uniform kernel, N(0, 1e-6) bias.
    return keras.layers.Dense(
        units,
        kernel_initializer="glorot_uniform",
        bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
        name=name,
    )


@keras.saving.register_keras_serializable(package="keras_vit")
class MlpBlock(keras.layers.Layer):
    """The encoder block's MLP (Eq. 3): Dense(mlp_dim) -> GELU -> Dropout -> Dense(D) -> Dropout.

    On the TensorFlow backend at inference, the first Dense and the GELU run as one fused oneDNN
    matmul, the GELU in the compute dtype, and the second Dense as a fused MatMul and BiasAdd
    (`_flat_dense_tensorflow`); training keeps Keras's Dense and a float32 GELU.

    Args:
        mlp_dim: hidden width of the MLP.
        dropout_rate: dropout after the GELU and after the second Dense.
        approximate: True (default) for GELU's tanh approximation, as `flax.linen.gelu` that
            trained Google's checkpoints; False for the exact (erf) GELU.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, mlp_dim, dropout_rate=0.0, approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.approximate = bool(approximate)
        self.dense_1 = _mlp_dense(self.mlp_dim, "dense_1")
        self.dropout_1 = keras.layers.Dropout(self.dropout_rate, name="dropout_1")
        self.dense_2 = None  # Built in build(), once D is known.
        self.dropout_2 = keras.layers.Dropout(self.dropout_rate, name="dropout_2")

    def build(self, input_shape):
        self.dense_2 = _mlp_dense(input_shape[-1], "dense_2")
        self.dense_1.build(input_shape)
        self.dense_2.build(tuple(input_shape[:-1]) + (self.mlp_dim,))

    def call(self, tokens, training=None):
        """Applies the MLP to every token.

        Args:
            tokens: (B, T, D).
            training: whether dropout is active.

        Returns:
            (B, T, D), in the layer's compute dtype.
        """
        if _runs_flat_on_tensorflow(self.dense_1, training):
            hidden = _flat_dense_tensorflow(self.dense_1, tokens, gelu_approximate=self.approximate)
        else:
            hidden = self.dense_1(tokens)
            # GELU in float32 even under mixed precision: TensorFlow's CPU kernels run bfloat16
            # element-wise ops several times slower than float32 ones (bench/NOTES.md).
            hidden = ops.cast(
                keras.activations.gelu(ops.cast(hidden, "float32"), approximate=self.approximate),
                hidden.dtype,
            )
        hidden = self.dropout_1(hidden, training=training)
        return self.dropout_2(_dense(self.dense_2, hidden, training), training=training)

    def get_config(self):
        return {
            **super().get_config(),
            "mlp_dim": self.mlp_dim,
            "dropout_rate": self.dropout_rate,
            "approximate": self.approximate,
        }


@keras.saving.register_keras_serializable(package="keras_vit")
class LayerScale(keras.layers.Layer):
    """Multiplies each channel of a residual branch by a learned scale (CaiT, Touvron et al.
    2021; timm's `ls1`/`ls2`, DeiT III and DINOv2): a (D,) weight.

    Args:
        init_value: the initial value of every scale (timm's `init_values`, e.g. 1e-5).
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, init_value=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value))

    def call(self, tokens):
        """(B, T, D) -> (B, T, D), each channel scaled."""
        return tokens * ops.cast(self.scale, tokens.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable(package="keras_vit")
class TransformerBlock(keras.layers.Layer):
    """One pre-LayerNorm encoder block (Eq. 2 and 3), one line per residual branch:

        z' = z + DropPath(LayerScale(Dropout(MSA(LN(z)))))
        z  = z' + DropPath(LayerScale(MLP(LN(z'))))

    (LayerScale only with `layer_scale`.)

    Args:
        num_heads: attention heads H; must divide D.
        mlp_dim: hidden width of the MLP (`MlpBlock`).
        dropout_rate: dropout on the attention output and in the MLP.
        attention_dropout_rate: dropout on the attention probabilities.
        stochastic_depth_rate: probability of dropping a residual branch, per example, in
            training (`StochasticDepth`).
        layer_scale: None for none, else the initial value of both branches' `LayerScale`.
        approximate_gelu: the MLP's GELU form (`MlpBlock`'s `approximate`).
        layer_norm_epsilon: epsilon of both LayerNorms.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(
        self,
        num_heads,
        mlp_dim,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        layer_scale=None,
        approximate_gelu=True,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout_rate = float(attention_dropout_rate)
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.layer_scale = None if layer_scale is None else float(layer_scale)
        self.approximate_gelu = bool(approximate_gelu)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.attention_norm = _layer_norm("attention_norm", self.layer_norm_epsilon)
        self.attention = MultiHeadSelfAttention(
            self.num_heads, self.attention_dropout_rate, name="attention"
        )
        self.attention_dropout = keras.layers.Dropout(self.dropout_rate, name="attention_output_dropout")
        self.mlp_norm = _layer_norm("mlp_norm", self.layer_norm_epsilon)
        self.mlp = MlpBlock(self.mlp_dim, self.dropout_rate, self.approximate_gelu, name="mlp")
        self.drop_path = StochasticDepth(self.stochastic_depth_rate, name="drop_path")
        self.attention_scale = self.mlp_scale = None
        if self.layer_scale is not None:
            self.attention_scale = LayerScale(self.layer_scale, name="attention_scale")
            self.mlp_scale = LayerScale(self.layer_scale, name="mlp_scale")

    def build(self, input_shape):
        # The MLP before the attention: a Dense draws its initializer's seed when it is created,
        # and the MLP's second Dense is created here. This order gives a seeded model the same
        # initial weights as the blocks before MlpBlock existed.
        for layer in (self.attention_norm, self.mlp, self.attention, self.mlp_norm,
                      self.attention_scale, self.mlp_scale):
            if layer is not None:
                layer.build(input_shape)

    def _scaled(self, scale, branch):
        return branch if scale is None else scale(branch)

    def call(self, tokens, training=None, return_attention_scores=False, class_token_only=False):
        """Runs the block.

        Args:
            tokens: (B, T, D).
            training: whether dropout and stochastic depth are active.
            return_attention_scores: also return the attention probabilities.
            class_token_only: compute the first token's output alone; it still attends to all T
                tokens.

        Returns:
            (B, T, D), or (B, 1, D) with `class_token_only`; with `return_attention_scores` also
            the attention probabilities (B, H, T, T), or (B, H, 1, T).
        """
        # The attention computes its probabilities either way: returning them costs nothing.
        attended, probabilities = self.attention(
            self.attention_norm(tokens), training=training, return_attention_scores=True,
            first_query_only=class_token_only,
        )
        if class_token_only:
            tokens = tokens[:, :1]  # Only the class token's residual stream goes on.
        attended = self._scaled(self.attention_scale, self.attention_dropout(attended, training=training))
        tokens = tokens + self.drop_path(attended, training=training)
        transformed = self._scaled(self.mlp_scale, self.mlp(self.mlp_norm(tokens), training=training))
        tokens = tokens + self.drop_path(transformed, training=training)
        if return_attention_scores:
            return tokens, probabilities
        return tokens

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "dropout_rate": self.dropout_rate,
            "attention_dropout_rate": self.attention_dropout_rate,
            "stochastic_depth_rate": self.stochastic_depth_rate,
            "layer_scale": self.layer_scale,
            "approximate_gelu": self.approximate_gelu,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


@keras.saving.register_keras_serializable(package="keras_vit")
class Encoder(keras.layers.Layer):
    """The Transformer encoder: `num_layers` blocks, then the final LayerNorm (Eq. 4's LN).

    Stochastic depth grows linearly with depth, from 0 at the first block to
    `stochastic_depth_rate` at the last (Huang et al. 2016; timm and big_vision do the same).

    `class_token_only=True` is for a classifier that reads only the class token's output
    (token pooling): the last block then computes that token alone, and the output is (B, 1, D),
    equal to the first row of the full output. It skips the last block's MLP and attention
    output for the other T - 1 tokens, whose results nothing reads: ~6% of ViT-B/16's FLOP
    (`keras_vit.flops`; timings in bench/NOTES.md). `return_attention_scores=True` still runs
    every token, so that every attention map is whole.

    Args:
        num_layers: encoder blocks L.
        num_heads: attention heads H per block; must divide D.
        mlp_dim: hidden width of each block's MLP.
        dropout_rate: dropout on the attention outputs and in the MLPs.
        attention_dropout_rate: dropout on the attention probabilities.
        stochastic_depth_rate: drop-path rate of the last block.
        class_token_only: whether the last block computes the class token alone (above).
        layer_scale, approximate_gelu, layer_norm_epsilon: every block's (`TransformerBlock`).
        final_norm: False to end without the final LayerNorm (timm's `fc_norm` models
            normalise after pooling instead).
        remat: rematerialise each block in training: the backward pass recomputes a block's
            activations from its input instead of keeping them (`_rematerialised_block`). A
            memory/time trade, not an architecture choice: the weights and outputs are the
            same, and `model_options` leaves it out.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(
        self,
        num_layers,
        num_heads,
        mlp_dim,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        class_token_only=False,
        layer_scale=None,
        approximate_gelu=True,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        final_norm=True,
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.remat = bool(remat)
        self.block_options = {
            "layer_scale": None if layer_scale is None else float(layer_scale),
            "approximate_gelu": bool(approximate_gelu),
            "layer_norm_epsilon": float(layer_norm_epsilon),
        }
        self.final_norm = bool(final_norm)
        self.class_token_only = bool(class_token_only)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout_rate = float(attention_dropout_rate)
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.blocks = [
            TransformerBlock(
                self.num_heads,
                self.mlp_dim,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                stochastic_depth_rate=self.stochastic_depth_rate * index / max(self.num_layers - 1, 1),
                **self.block_options,
                name=f"block_{index}",
            )
            for index in range(self.num_layers)
        ]
        self.norm = None
        if self.final_norm:
            self.norm = _layer_norm("encoder_norm", self.block_options["layer_norm_epsilon"])

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape)
        if self.norm is not None:
            self.norm.build(input_shape)

    def call(self, tokens, training=None, return_attention_scores=False):
        """Runs every block, then the final LayerNorm (if `final_norm`).

        Args:
            tokens: (B, T, D).
            training: whether dropout and stochastic depth are active.
            return_attention_scores: also return every block's attention probabilities.

        Returns:
            (B, T, D), or (B, 1, D) with `class_token_only` (and no attention scores); with
            `return_attention_scores` also the attention probabilities of every block
            stacked, (B, num_layers, H, T, T), first block first.
        """
        attention_maps = []
        for block in self.blocks:
            if return_attention_scores:
                tokens, probabilities = block(tokens, training=training, return_attention_scores=True)
                attention_maps.append(probabilities)
            else:
                last = block is self.blocks[-1]
                run = _rematerialised_block if self.remat and training else _plain_block
                tokens = run(block, tokens, training, self.class_token_only and last)
        if self.norm is not None:
            tokens = self.norm(tokens)
        if return_attention_scores:
            return tokens, ops.stack(attention_maps, axis=1)
        return tokens

    def get_config(self):
        return {
            **super().get_config(),
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "dropout_rate": self.dropout_rate,
            "attention_dropout_rate": self.attention_dropout_rate,
            "stochastic_depth_rate": self.stochastic_depth_rate,
            "class_token_only": self.class_token_only,
            **self.block_options,
            "final_norm": self.final_norm,
            "remat": self.remat,
        }


def _plain_block(block, tokens, training, class_token_only):
    return block(tokens, training=training, class_token_only=class_token_only)


def _seed_generators(layer):
    """Every `keras.random.SeedGenerator` of `layer` and its sub-layers (dropout, drop path)."""
    # Keras keeps a layer's own generators in `_seed_generators` (what `Layer.variables` reads).
    return [generator for sub_layer in layer._flatten_layers(include_self=True, recursive=True)
            for generator in sub_layer._seed_generators]


def _rematerialised_block(block, tokens, training, class_token_only):
    """`block(tokens)` under `keras.remat` (tf.recompute_grad / jax.checkpoint): only the
    block's input (B, T, D) is kept for the backward pass, which runs the block again.

    Keras's `RematScope` would wrap the block's `call` the same way, but neither it nor
    `keras.remat` handles random layers: the recomputation draws new dropout and drop-path
    masks on TensorFlow (wrong gradients), and on JAX the seed update made inside the
    checkpoint leaks a tracer. So the seed generators' states enter the rematerialised
    function as inputs and leave it as outputs: the recomputation starts from the same seeds
    and draws the same masks, and the states advance once per step, as without remat.
    """
    generators = _seed_generators(block)

    # The states are arguments, not captured tensors: captured ones gave TensorFlow's
    # recomputation other seeds. (tf.recompute_grad then warns, a few times per process,
    # that it cannot watch integer tensors; they need no gradient.)
    def forward(tokens, *states):
        for generator, state in zip(generators, states):
            generator.state.assign(state)
        outputs = block(tokens, training=training, class_token_only=class_token_only)
        return (outputs, *(ops.convert_to_tensor(g.state.value) for g in generators))

    outputs, *states = keras.remat(forward)(tokens, *(g.state.value for g in generators))
    for generator, state in zip(generators, states):
        generator.state.assign(state)
    return outputs


@keras.saving.register_keras_serializable(package="keras_vit")
class TokenPooling(keras.layers.Layer):
    """Reduces the encoder output to one vector per image (or two, for DeiT's two heads).

    Args:
        pooling: "token", the class token's output y = z_L^0 (Eq. 4); "gap", the mean of the
            patch tokens, prefix tokens excluded (timm's "avg"). ("map" is `AttentionPooling`.)
        num_prefix_tokens: tokens before the patches (class, distillation, register).
        distillation: with "token", return the class and the distillation token's outputs.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, pooling="token", num_prefix_tokens=None, distillation=False, **kwargs):
        super().__init__(**kwargs)
        check_pooling(pooling)
        if pooling not in ("token", "gap"):
            raise ValueError(f"TokenPooling pools 'token' or 'gap', got {pooling!r}.")
        self.pooling = pooling
        # None: the layer's old default, a class token exactly with token pooling.
        self.num_prefix_tokens = int(pooling == "token" if num_prefix_tokens is None
                                     else num_prefix_tokens)
        self.distillation = bool(distillation)

    def call(self, tokens):
        """Pools each image's tokens.

        Args:
            tokens: (B, T, D), the prefix tokens first.

        Returns:
            (B, D); with `distillation`, (B, 2, D): the class and distillation tokens.
        """
        if self.pooling == "token":
            return tokens[:, :2] if self.distillation else tokens[:, 0]
        if self.num_prefix_tokens:
            tokens = tokens[:, self.num_prefix_tokens:]
        return ops.mean(tokens, axis=1)

    def compute_output_shape(self, input_shape):
        if self.distillation and self.pooling == "token":
            return (input_shape[0], 2, input_shape[2])
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "pooling": self.pooling,
                "num_prefix_tokens": self.num_prefix_tokens, "distillation": self.distillation}


@keras.saving.register_keras_serializable(package="keras_vit")
class AttentionPooling(keras.layers.Layer):
    """Multihead attention pooling, the "MAP" head (Lee et al. 2019; big_vision's `MAPHead`,
    timm's `AttentionPoolLatent`): a learned probe attends to every token, then a residual MLP.

        y = MHA(probe, z);  y = y + MLP(LN(y));  output y[:, 0]

    The key and value projections are one fused (D, 2·D) Dense, columns [key | value] in
    (head, head_dim) order (timm's `kv`).

    Args:
        num_heads: attention heads; must divide D.
        mlp_dim: hidden width of the MLP.
        approximate_gelu: the MLP's GELU form.
        layer_norm_epsilon: of the LayerNorm before the MLP.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, num_heads, mlp_dim, approximate_gelu=True,
                 layer_norm_epsilon=LAYER_NORM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.approximate_gelu = bool(approximate_gelu)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.norm = _layer_norm("norm", self.layer_norm_epsilon)
        self.mlp = MlpBlock(self.mlp_dim, 0.0, self.approximate_gelu, name="mlp")

    def build(self, input_shape):
        hidden_size = input_shape[-1]
        if hidden_size % self.num_heads:
            raise ValueError(
                f"hidden size {hidden_size} is not divisible by num_heads {self.num_heads}.")
        self.head_dim = hidden_size // self.num_heads
        self.probe = self.add_weight(name="probe", shape=(1, 1, hidden_size),
                                     initializer="glorot_uniform")
        self.query = keras.layers.Dense(hidden_size, kernel_initializer="glorot_uniform", name="query")
        self.key_value = keras.layers.Dense(
            2 * hidden_size, kernel_initializer="glorot_uniform", name="key_value")
        self.out = keras.layers.Dense(hidden_size, kernel_initializer="glorot_uniform", name="out")
        probe_shape = (input_shape[0], 1, hidden_size)
        self.query.build(probe_shape)
        self.key_value.build(input_shape)
        for layer in (self.out, self.norm, self.mlp):
            layer.build(probe_shape)

    def call(self, tokens):
        """(B, T, D) -> (B, D): the probe's output."""
        batch_size, num_tokens = ops.shape(tokens)[0], ops.shape(tokens)[1]
        probe = ops.broadcast_to(ops.cast(self.probe, tokens.dtype),
                                 (batch_size, 1, ops.shape(tokens)[-1]))
        query = ops.reshape(self.query(probe), (batch_size, 1, self.num_heads, self.head_dim))
        key_value = ops.reshape(self.key_value(tokens),
                                (batch_size, num_tokens, 2, self.num_heads, self.head_dim))
        key, value = ops.unstack(key_value, 2, axis=2)
        query = query * ops.cast(self.head_dim ** -0.5, query.dtype)
        scores = ops.einsum("bqhd,bkhd->bhqk", query, key)
        probabilities = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), value.dtype)
        attended = ops.einsum("bhqk,bkhd->bqhd", probabilities, value)
        pooled = self.out(ops.reshape(attended, (batch_size, 1, self.num_heads * self.head_dim)))
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "mlp_dim": self.mlp_dim,
                "approximate_gelu": self.approximate_gelu,
                "layer_norm_epsilon": self.layer_norm_epsilon}


@keras.saving.register_keras_serializable(package="keras_vit")
class DistilledHead(keras.layers.Layer):
    """DeiT's two heads at inference: the mean of the class head on the class token and the
    distillation head on the distillation token (timm's `VisionTransformerDistilled`).

    Args:
        num_classes: classes of both heads; None for no heads, which averages the two tokens'
            features instead (timm's pre-logits of a distilled model).
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, num_classes=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.class_head = self.distillation_head = None
        if self.num_classes is not None:
            # Zero-initialised in float32 as the single head (`model._head`).
            self.class_head = keras.layers.Dense(
                self.num_classes, kernel_initializer="zeros", dtype="float32", name="class_head")
            self.distillation_head = keras.layers.Dense(
                self.num_classes, kernel_initializer="zeros", dtype="float32",
                name="distillation_head")

    def build(self, input_shape):
        if self.class_head is not None:
            feature_shape = (input_shape[0], input_shape[-1])
            self.class_head.build(feature_shape)
            self.distillation_head.build(feature_shape)

    def call(self, features):
        """(B, 2, D) class and distillation features -> (B, num_classes) or (B, D), float32."""
        features = ops.cast(features, "float32")
        if self.class_head is None:
            return ops.mean(features, axis=1)
        return 0.5 * (self.class_head(features[:, 0]) + self.distillation_head(features[:, 1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes or input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}

"""Keras layers of the Vision Transformer (Dosovitskiy et al. 2020, Eq. 1-4).

Every layer here is written with `keras.ops` and `keras.layers`, so a model built from them
runs on the TensorFlow and the JAX backends alike; the one exception is an inference fast path
for the MLP on the TensorFlow backend (`_dense_gelu_tensorflow`), the same math as the
backend-neutral code beside it. Shapes use B = batch, T = tokens,
N = patches, D = hidden size, H = heads.

Initializers follow google-research/vision_transformer: Xavier-uniform kernels, tiny normal
MLP biases, N(0, 0.02) position embeddings, a zero class token.
"""

import keras
from keras import ops

from keras_vit import posemb

_LAYER_NORM_EPSILON = 1e-6  # The original code's LayerNorm epsilon (Flax default).


def _layer_norm(name):
    return keras.layers.LayerNormalization(epsilon=_LAYER_NORM_EPSILON, name=name)


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchEmbedding(keras.layers.Layer):
    """Splits images into P×P patches and projects each to D (Eq. 1, the matrix E).

    A Conv2D whose kernel size and stride both equal P applies the same (P·P·3, D) matrix to
    every non-overlapping patch: it is exactly "flatten each patch, then Dense", and its kernel
    (P, P, 3, D) is the layout of the original checkpoints' `embedding/kernel`.

    Input: (B, height, width, channels), both sides divisible by P. Output: (B, N, D) with
    N = (height / P) · (width / P), patches in row-major order.
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


@keras.saving.register_keras_serializable(package="keras_vit")
class ClassToken(keras.layers.Layer):
    """Prepends the learned class token x_class (Eq. 1). (B, N, D) -> (B, 1 + N, D)."""

    def build(self, input_shape):
        self.token = self.add_weight(
            name="token", shape=(1, 1, input_shape[-1]), initializer="zeros"
        )

    def call(self, tokens):
        batch_size = ops.shape(tokens)[0]
        token = ops.cast(self.token, tokens.dtype)
        token = ops.broadcast_to(token, (batch_size, 1, ops.shape(tokens)[-1]))
        return ops.concatenate([token, tokens], axis=1)

    def compute_output_shape(self, input_shape):
        num_tokens = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], num_tokens, input_shape[2])


@keras.saving.register_keras_serializable(package="keras_vit")
class AddPositionEmbedding(keras.layers.Layer):
    """Adds the learned 1-D position embedding E_pos (Eq. 1). (B, T, D) -> (B, T, D).

    T = num_prefix_tokens + grid_size[0] · grid_size[1]: the class token (if any) first, then
    the patches in row-major order of their grid_size grid.
    """

    def __init__(self, grid_size, num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(side) for side in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)

    @property
    def num_tokens(self):
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def build(self, input_shape):
        if input_shape[1] is not None and input_shape[1] != self.num_tokens:
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

    def call(self, tokens):
        return tokens + ops.cast(self.embedding, tokens.dtype)

    def resampled(self, new_grid_size):
        """Returns this layer's embedding resampled to a new patch grid, as a NumPy array.

        The patch part is resampled bilinearly on its 2-D grid; the class-token position is
        kept as is. Output shape (1, num_prefix_tokens + new_h · new_w, D).
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
        }


@keras.saving.register_keras_serializable(package="keras_vit")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head self-attention (the paper's MSA, Eq. 2 and its Appendix A).

    The query, key and value projections are one fused (D, 3·D) Dense: one matrix multiply
    instead of three. Its columns are [query | key | value], each in (head, head_dim) order,
    which is the original checkpoints' (D, H, D/H) kernels reshaped and concatenated.

    Input (B, T, D). Output (B, T, D), and with `return_attention_scores=True` also the
    attention probabilities (B, H, T, T) (softmax over the last axis, before dropout).
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
        """With `first_query_only`, only the first token attends: output (B, 1, D) (and
        attention (B, H, 1, T)); keys and values still come from all T tokens."""
        batch_size, num_tokens = ops.shape(tokens)[0], ops.shape(tokens)[1]
        hidden_size = self.num_heads * self.head_dim
        qkv = ops.reshape(
            self.qkv(tokens), (batch_size, num_tokens, 3, self.num_heads, self.head_dim)
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
        outputs = self.out(attended)
        if return_attention_scores:
            return outputs, probabilities
        return outputs

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "dropout_rate": self.dropout_rate}


@keras.saving.register_keras_serializable(package="keras_vit")
class StochasticDepth(keras.layers.Layer):
    """Drops a residual branch per example during training (Huang et al. 2016, "drop path").

    Input (B, ...). In training each example's branch is zeroed with probability `rate` and
    scaled by 1 / (1 - rate) otherwise, so the expectation is unchanged; at inference it is
    the identity.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}.")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
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


def _dense_gelu_tensorflow(inputs, dense):
    """GELU(inputs @ kernel + bias) for (B, T, D) inputs, as ops TensorFlow's oneDNN fuses.

    TensorFlow's graph rewriter fuses MatMul + BiasAdd + GELU into one oneDNN matmul only for
    a 2-D MatMul followed by a BiasAdd op; Keras's
    Dense on 3-D inputs emits a tensordot and an AddV2, which it does not fuse. Measured on
    ViT-B/16 inference: 19% faster under mixed_bfloat16, 9% in float32 (bench/NOTES.md).
    Inference only: a training graph keeps the pre-activation for the backward pass, so nothing
    is fused there and the backend-neutral path (float32 GELU) is faster.
    """
    import tensorflow as tf

    flat = tf.reshape(inputs, (-1, inputs.shape[-1]))
    hidden = tf.matmul(flat, ops.cast(dense.kernel, flat.dtype))
    hidden = tf.nn.bias_add(hidden, ops.cast(dense.bias, flat.dtype))
    hidden = tf.nn.gelu(hidden, approximate=True)
    return tf.reshape(hidden, tf.concat([tf.shape(inputs)[:-1], [dense.units]], axis=0))


@keras.saving.register_keras_serializable(package="keras_vit")
class TransformerBlock(keras.layers.Layer):
    """One pre-LayerNorm encoder block (Eq. 2 and 3).

        z' = z + DropPath(Dropout(MSA(LN(z))))
        z  = z' + DropPath(MLP(LN(z')))       MLP: Dense(mlp_dim) -> GELU -> Dropout -> Dense(D) -> Dropout

    GELU is the tanh approximation, as `flax.linen.gelu` that trained Google's checkpoints.
    Input and output (B, T, D); with `return_attention_scores=True` also (B, H, T, T).
    """

    def __init__(
        self,
        num_heads,
        mlp_dim,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout_rate = float(attention_dropout_rate)
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.attention_norm = _layer_norm("attention_norm")
        self.attention = MultiHeadSelfAttention(
            self.num_heads, self.attention_dropout_rate, name="attention"
        )
        self.attention_dropout = keras.layers.Dropout(self.dropout_rate, name="attention_output_dropout")
        self.mlp_norm = _layer_norm("mlp_norm")
        self.mlp_dense_1 = keras.layers.Dense(
            self.mlp_dim,
            kernel_initializer="glorot_uniform",
            bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
            name="mlp_dense_1",
        )
        self.mlp_dropout_1 = keras.layers.Dropout(self.dropout_rate, name="mlp_dropout_1")
        self.mlp_dense_2 = None  # Built in build(), once D is known.
        self.mlp_dropout_2 = keras.layers.Dropout(self.dropout_rate, name="mlp_dropout_2")
        self.drop_path = StochasticDepth(self.stochastic_depth_rate, name="drop_path")

    def build(self, input_shape):
        hidden_size = input_shape[-1]
        self.mlp_dense_2 = keras.layers.Dense(
            hidden_size,
            kernel_initializer="glorot_uniform",
            bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
            name="mlp_dense_2",
        )
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.mlp_norm.build(input_shape)
        self.mlp_dense_1.build(input_shape)
        self.mlp_dense_2.build(tuple(input_shape[:-1]) + (self.mlp_dim,))

    def call(self, tokens, training=None, return_attention_scores=False, class_token_only=False):
        """With `class_token_only`, the block computes the first token's output alone:
        (B, T, D) -> (B, 1, D), the attention (B, H, 1, T); all T tokens are still attended to."""
        attended = self.attention(
            self.attention_norm(tokens),
            training=training,
            return_attention_scores=return_attention_scores,
            first_query_only=class_token_only,
        )
        if return_attention_scores:
            attended, probabilities = attended
        attended = self.attention_dropout(attended, training=training)
        if class_token_only:
            tokens = tokens[:, :1]
        tokens = tokens + self.drop_path(attended, training=training)

        normed = self.mlp_norm(tokens)
        # A quantized Dense (model.quantize) keeps its own kernel format: use its call.
        if (not training and keras.backend.backend() == "tensorflow"
                and getattr(self.mlp_dense_1, "quantization_mode", None) is None):
            hidden = _dense_gelu_tensorflow(normed, self.mlp_dense_1)
        else:
            hidden = self.mlp_dense_1(normed)
            # GELU in float32 even under mixed precision: TensorFlow's CPU kernels run bfloat16
            # element-wise ops several times slower than float32 ones (bench/NOTES.md).
            hidden = ops.cast(
                keras.activations.gelu(ops.cast(hidden, "float32"), approximate=True),
                hidden.dtype,
            )
        hidden = self.mlp_dropout_1(hidden, training=training)
        hidden = self.mlp_dropout_2(self.mlp_dense_2(hidden), training=training)
        tokens = tokens + self.drop_path(hidden, training=training)
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
        }


@keras.saving.register_keras_serializable(package="keras_vit")
class Encoder(keras.layers.Layer):
    """The Transformer encoder: `num_layers` blocks, then the final LayerNorm (Eq. 4's LN).

    Stochastic depth grows linearly with depth, from 0 at the first block to
    `stochastic_depth_rate` at the last (Huang et al. 2016; timm and big_vision do the same).

    Input (B, T, D). Output (B, T, D); with `return_attention_scores=True` also the attention
    probabilities of every block stacked, (B, num_layers, H, T, T), first block first.

    `class_token_only=True` is for a classifier that reads only the class token's output
    (token pooling): the last block then computes that token alone, and the output is (B, 1, D),
    equal to the first row of the full output. It skips the last block's MLP and attention
    output for the other T - 1 tokens, whose results nothing reads: ~6% of ViT-B/16's forward
    and backward (bench/NOTES.md, lever 14). `return_attention_scores=True` still runs every
    token, so that every attention map is whole.
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
        **kwargs,
    ):
        super().__init__(**kwargs)
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
                name=f"block_{index}",
            )
            for index in range(self.num_layers)
        ]
        self.norm = _layer_norm("encoder_norm")

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape)
        self.norm.build(input_shape)

    def call(self, tokens, training=None, return_attention_scores=False):
        attention_maps = []
        for block in self.blocks:
            if return_attention_scores:
                tokens, probabilities = block(tokens, training=training, return_attention_scores=True)
                attention_maps.append(probabilities)
            else:
                last = block is self.blocks[-1]
                tokens = block(tokens, training=training,
                               class_token_only=self.class_token_only and last)
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
        }


@keras.saving.register_keras_serializable(package="keras_vit")
class TokenPooling(keras.layers.Layer):
    """Reduces the encoder output to one vector per image. (B, T, D) -> (B, D).

    "token": the class token's output y = z_L^0 (Eq. 4). "gap": the mean of the patch tokens
    (the model then has no class token).
    """

    def __init__(self, pooling="token", **kwargs):
        super().__init__(**kwargs)
        if pooling not in ("token", "gap"):
            raise ValueError(f"pooling must be 'token' or 'gap', got {pooling!r}.")
        self.pooling = pooling

    def call(self, tokens):
        if self.pooling == "token":
            return tokens[:, 0]
        return ops.mean(tokens, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "pooling": self.pooling}

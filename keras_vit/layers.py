"""Keras layers of the Vision Transformer (Dosovitskiy et al. 2020, Eq. 1-4).

Every layer here is written with `keras.ops` and `keras.layers`, so a model built from them
runs on the TensorFlow and the JAX backends alike; the one exception is an inference fast path
of `MlpBlock` on the TensorFlow backend, the same math as the backend-neutral code beside it.
Shapes use B = batch, T = tokens, N = patches, D = hidden size, H = heads.

Initializers follow google-research/vision_transformer (Flax's defaults where it sets none):
the patch projection's kernel is LeCun-normal; the query, key, value, attention-output and MLP
kernels are Xavier-uniform; the MLP biases N(0, 1e-6); the other biases zero; the position
embedding N(0, 0.02); the class token zero; LayerNorm scale one and offset zero.
"""

import keras
from keras import ops

from keras_vit import posemb
from keras_vit.variants import check_pooling

_LAYER_NORM_EPSILON = 1e-6  # The original code's LayerNorm epsilon (Flax default).


def _layer_norm(name):
    return keras.layers.LayerNormalization(epsilon=_LAYER_NORM_EPSILON, name=name)


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
    """Prepends the learned class token x_class (Eq. 1), a (1, 1, D) weight."""

    def build(self, input_shape):
        self.token = self.add_weight(
            name="token", shape=(1, 1, input_shape[-1]), initializer="zeros"
        )

    def call(self, tokens):
        """Prepends the class token to every image's patch tokens.

        Args:
            tokens: (B, N, D).

        Returns:
            (B, 1 + N, D), the class token first.
        """
        batch_size = ops.shape(tokens)[0]
        token = ops.cast(self.token, tokens.dtype)
        token = ops.broadcast_to(token, (batch_size, 1, ops.shape(tokens)[-1]))
        return ops.concatenate([token, tokens], axis=1)

    def compute_output_shape(self, input_shape):
        num_tokens = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], num_tokens, input_shape[2])


@keras.saving.register_keras_serializable(package="keras_vit")
class AddPositionEmbedding(keras.layers.Layer):
    """Adds the learned 1-D position embedding E_pos (Eq. 1), a (1, T, D) weight.

    T = num_prefix_tokens + grid_size[0] · grid_size[1]: the class token (if any) first, then
    the patches in row-major order of their grid_size grid.

    Args:
        grid_size: (rows, columns) of the patch grid.
        num_prefix_tokens: tokens before the patches: 1 with a class token, else 0.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
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
        """Adds the position embedding to every image's tokens.

        Args:
            tokens: (B, T, D).

        Returns:
            (B, T, D): tokens + E_pos.
        """
        return tokens + ops.cast(self.embedding, tokens.dtype)

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
        }


@keras.saving.register_keras_serializable(package="keras_vit")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head self-attention (the paper's MSA, Eq. 2 and its Appendix A).

    The query, key and value projections are one fused (D, 3·D) Dense: one matrix multiply
    instead of three. Its columns are [query | key | value], each in (head, head_dim) order,
    which is the original checkpoints' (D, H, D/H) kernels reshaped and concatenated.

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

    On the TensorFlow backend at inference, the first Dense and the GELU run as a 2-D MatMul, a
    BiasAdd and a GELU op on the Dense layer's own variables (the GELU in the compute dtype):
    TensorFlow's graph rewriter fuses those three into one oneDNN matmul, while Keras's Dense on
    (B, T, D) inputs emits a tensordot and an AddV2, which it does not fuse (bench/NOTES.md has
    the measurements). Training keeps Keras's Dense and a float32 GELU: a training graph keeps
    the pre-activation for the backward pass, so nothing fuses there, and that is the faster
    path. A quantized Dense (`model.quantize`) also keeps its own call: its kernel is in its own
    format.

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
        hidden = self.dropout_1(self._dense_gelu(tokens, training), training=training)
        return self.dropout_2(self.dense_2(hidden), training=training)

    def _dense_gelu(self, tokens, training):
        """GELU(tokens @ kernel + bias) of the first Dense: (B, T, D) -> (B, T, mlp_dim)."""
        if (not training and keras.backend.backend() == "tensorflow"
                and getattr(self.dense_1, "quantization_mode", None) is None):
            return self._fused_dense_gelu_tensorflow(tokens)
        hidden = self.dense_1(tokens)
        # GELU in float32 even under mixed precision: TensorFlow's CPU kernels run bfloat16
        # element-wise ops several times slower than float32 ones (bench/NOTES.md).
        return ops.cast(
            keras.activations.gelu(ops.cast(hidden, "float32"), approximate=self.approximate),
            hidden.dtype,
        )

    def _fused_dense_gelu_tensorflow(self, tokens):
        """`_dense_gelu` as the 2-D MatMul, BiasAdd and GELU ops that oneDNN fuses (TF only)."""
        import tensorflow as tf  # Here only: the JAX backend must not need TensorFlow.

        dense = self.dense_1
        flat = tf.reshape(tokens, (-1, tokens.shape[-1]))
        hidden = tf.matmul(flat, ops.cast(dense.kernel, flat.dtype))
        hidden = tf.nn.bias_add(hidden, ops.cast(dense.bias, flat.dtype))
        hidden = tf.nn.gelu(hidden, approximate=self.approximate)
        return tf.reshape(hidden, tf.concat([tf.shape(tokens)[:-1], [dense.units]], axis=0))

    def get_config(self):
        return {
            **super().get_config(),
            "mlp_dim": self.mlp_dim,
            "dropout_rate": self.dropout_rate,
            "approximate": self.approximate,
        }


@keras.saving.register_keras_serializable(package="keras_vit")
class TransformerBlock(keras.layers.Layer):
    """One pre-LayerNorm encoder block (Eq. 2 and 3), one line per residual branch:

        z' = z + DropPath(Dropout(MSA(LN(z))))
        z  = z' + DropPath(MLP(LN(z')))

    Args:
        num_heads: attention heads H; must divide D.
        mlp_dim: hidden width of the MLP (`MlpBlock`).
        dropout_rate: dropout on the attention output and in the MLP.
        attention_dropout_rate: dropout on the attention probabilities.
        stochastic_depth_rate: probability of dropping a residual branch, per example, in
            training (`StochasticDepth`).
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
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
        self.mlp = MlpBlock(self.mlp_dim, self.dropout_rate, name="mlp")
        self.drop_path = StochasticDepth(self.stochastic_depth_rate, name="drop_path")

    def build(self, input_shape):
        # The MLP before the attention: a Dense draws its initializer's seed when it is created,
        # and the MLP's second Dense is created here. This order gives a seeded model the same
        # initial weights as the blocks before MlpBlock existed.
        for layer in (self.attention_norm, self.mlp, self.attention, self.mlp_norm):
            layer.build(input_shape)

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
        tokens = tokens + self.drop_path(
            self.attention_dropout(attended, training=training), training=training)
        tokens = tokens + self.drop_path(
            self.mlp(self.mlp_norm(tokens), training=training), training=training)
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
        """Runs every block, then the final LayerNorm.

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
    """Reduces the encoder output to one vector per image.

    Args:
        pooling: one of `variants.POOLINGS`: "token", the class token's output y = z_L^0
            (Eq. 4); "gap", the mean of the patch tokens (the model then has no class token).
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, pooling="token", **kwargs):
        super().__init__(**kwargs)
        check_pooling(pooling)
        self.pooling = pooling

    def call(self, tokens):
        """Pools each image's tokens into one vector.

        Args:
            tokens: (B, T, D), the class token first with "token".

        Returns:
            (B, D).
        """
        if self.pooling == "token":
            return tokens[:, 0]
        return ops.mean(tokens, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "pooling": self.pooling}

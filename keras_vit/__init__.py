"""keras_vit: the Vision Transformer (Dosovitskiy et al. 2020) for Keras 3.

    model = keras_vit.create_model("B/16", image_size=224, num_classes=1000)
    model = keras_vit.from_checkpoint("augreg_B/16_i21k", image_size=384, num_classes=10)
    model = keras_vit.from_npz("ViT-B_16.npz", image_size=384, num_classes=10)
    keras_vit.save_npz(model, "mine.npz")
    keras_vit.save_timm(model, "mine_timm/")
"""

from keras_vit.checkpoints import (
    CheckpointError,
    CheckpointNotFoundError,
    from_npz,
    load_npz,
    save_npz,
)
from keras_vit.formats.timm import save_timm
from keras_vit.class_names import read_class_names, resolve_class_names, write_class_names
from keras_vit.layers import (
    AddPositionEmbedding,
    AttentionPooling,
    ClassToken,
    DistilledHead,
    Encoder,
    LayerNorm,
    LayerScale,
    MlpBlock,
    MultiHeadSelfAttention,
    PatchEmbedding,
    PixelNormalization,
    StochasticDepth,
    TokenPooling,
    TransformerBlock,
)
from keras_vit.features import feature_extractor
from keras_vit.loading import load_classifier
from keras_vit.model import ModelOptions, attention_model, create_model, set_remat
from keras_vit.sources import from_checkpoint
from keras_vit.flexi import resample_patch_embedding
from keras_vit.posemb import resample as resample_position_embedding
from keras_vit.variants import POOLINGS, VARIANTS, ViTConfig, parse_variant
from pipelines.errors import MissingExtraError, MissingFileError, UserError

__version__ = "0.1.0"

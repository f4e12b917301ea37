"""What a trained ViT does: attention rollout, attention distance, position-embedding
similarity (the paper's Figures 6 and 7), training curves, and the figures that draw them.

`attention` runs the model once for its attention maps (`attention_maps`) and does the rest in
NumPy; `embeddings` is NumPy; `curves` reads TensorBoard event files with TensorFlow. `figures`
turns their arrays into matplotlib figures and is the only one importing matplotlib.
"""

from keras_vit.analysis.attention import (
    attention_maps,
    attention_rollout,
    mean_attention_distance,
    model_geometry,
    patch_distances,
    rollout_map,
)
from keras_vit.analysis.curves import CURVE_GROUPS, group_curves, read_scalars
from keras_vit.analysis.embeddings import position_embedding_similarity

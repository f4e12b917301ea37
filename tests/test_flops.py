"""keras_vit.flops: analytic FLOP counts against hand computations."""

import pytest

import keras_vit
from keras_vit import flops


def test_b16_224_matches_the_hand_count():
    # By hand, multiply-adds per image, T = 197 tokens, D = 768, M = 3072:
    #   patch projection 196 x 768 x 768                          =    115,605,504
    #   one block: 197 x (3·768² + 768² + 2·768·3072) + 2·197²·768 = 1,453,954,560
    #   12 blocks                                                  = 17,447,454,720
    #   head 768 x 1000                                            =        768,000
    #   total 17,563,828,224 multiply-adds = 35,127,656,448 FLOP (~35.1 GFLOP, bench/model.py's header).
    assert flops.forward_flops("B/16", image_size=224, num_classes=1000) == 35_127_656_448


def test_class_token_only_last_block_by_hand():
    # The last block for the class token alone: q, k, v for all 197 tokens 197 x 3·768²
    # = 348,585,984; one query row 2·197·768 = 302,592; output projection 768² = 589,824;
    # MLP 2·768·3072 = 4,718,592; 354,196,992 in all, against 1,453,954,560 for a full block.
    # 17,563,828,224 - 1,453,954,560 + 354,196,992 = 16,464,070,656 multiply-adds.
    assert flops.forward_flops("B/16", class_token_only=True) == 2 * 16_464_070_656
    with pytest.raises(ValueError, match="pooling='token'"):
        flops.forward_flops("B/16", pooling="gap", class_token_only=True)


def test_tiny_config_by_hand():
    # 8x8 image, patch 4: 4 patches, 5 tokens with the class token; D = 8, M = 16, 2 blocks.
    #   patch 4 x 48 x 8 = 1,536; block 5·(3·64 + 64 + 2·8·16) + 2·25·8 = 2,560 + 400 = 2,960;
    #   2 blocks 5,920; pre-logits 8 x 6 = 48; head 6 x 3 = 18. Total 7,522 multiply-adds.
    config = keras_vit.ViTConfig(patch_size=4, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16)
    assert flops.forward_flops(config, image_size=8, num_classes=3, representation_size=6) == 2 * 7_522
    # "gap" pooling has no class token: 4 tokens, block 4·512 + 2·16·8 = 2,304; no head.
    assert flops.forward_flops(config, image_size=8, num_classes=0, pooling="gap") == 2 * (
        1_536 + 2 * 2_304)


def test_training_step_is_three_forwards_and_rectangular_images_count_their_patches():
    assert flops.training_step_flops("S/16", image_size=(224, 160)) == 3 * flops.forward_flops(
        "S/16", image_size=(224, 160))
    # 14 x 10 = 140 patches against 14 x 14 = 196: fewer FLOP.
    assert flops.forward_flops("S/16", image_size=(224, 160)) < flops.forward_flops("S/16")


def test_mlp_matmul_flops():
    # 8 images x 197 tokens x 768 x 3072 multiply-adds.
    assert flops.mlp_matmul_flops("B/16", batch_size=8) == 2 * 8 * 197 * 768 * 3072


def test_bad_image_size_names_the_patch_size():
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        flops.forward_flops("B/16", image_size=100)

"""The plain-ViT architectures timm registers, and the constructor arguments keras_vit honours.

Read from huggingface/pytorch-image-models at aa4b5850c154: `timm/models/vision_transformer.py`
(VisionTransformer.__init__ defaults, the @register_model functions), `timm/models/deit.py`
and `timm/models/_pretrained.py` (PretrainedCfg). Data for `keras_vit.formats.timm`.
"""

# timm's VisionTransformer.__init__ defaults (vision_transformer.py) for the arguments that
# change the weights or the outputs. LayerNorm is timm.layers.LayerNorm, eps=1e-6; act_layer
# None is nn.GELU, the exact erf form.
VIT_DEFAULTS = dict(
    patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
    class_token=True, global_pool="token", fc_norm=None, init_values=None, no_embed_class=False,
    reg_tokens=0, act_layer=None, pool_include_prefix=False, img_size=224,
)
# model_args keras_vit can honour only at timm's default value, each with the one it needs.
FIXED_ARGS = dict(
    qkv_bias=(True,), qk_norm=(False,), proj_bias=(True,), pre_norm=(False,),
    final_norm=(True,), scale_attn_norm=(False,), scale_mlp_norm=(False,), in_chans=(3,),
    pos_embed=("learn",), norm_layer=(None, "layernorm"), embed_norm_layer=(None,),
    act_layer=(None, "gelu", "gelu_tanh"), global_pool=("token", "avg", "map"),
    dynamic_img_pad=(False,), block_fn=(None,), mlp_layer=(None,), attn_layer=(None,),
    embed_layer=(None,),
)
FREE_ARGS = frozenset((
    "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "class_token", "fc_norm",
    "init_values", "no_embed_class", "reg_tokens", "img_size", "pool_include_prefix",
    "num_classes",
))
# Training-time or resolution-handling arguments: no effect on the weights or the logits.
IGNORED_ARGS = frozenset((
    "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
    "drop_path_rate", "weight_init", "fix_init", "dynamic_img_size",
))
# timm's PretrainedCfg defaults (timm/models/_pretrained.py): what timm uses for a field a
# folder's pretrained_cfg leaves out (it does not fall back to the architecture's registry cfg).
PRETRAINED_DEFAULTS = dict(
    crop_pct=0.875, crop_mode="center", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
POOLINGS = {"token": "token", "avg": "gap", "map": "map"}
ANY = "any"  # a wanted argument whose every value builds the same model

# The plain-ViT architectures timm registers (@register_model) whose arguments keras_vit can
# express: name -> (patch_size, embed_dim, depth, num_heads, mlp_ratio, other model_args).
# Generated from timm/models/vision_transformer.py and deit.py (pytorch-image-models at
# aa4b5850c154); the CLIP (pre_norm), SwiGLU, qkv_bias=False, parallel-block and RMSNorm ones
# are left out, for keras_vit has none of those.
_PLAIN = {}
_GAP = dict(class_token=False, global_pool="avg", fc_norm=False)  # norm, then average
_GAP_TANH = dict(_GAP, act_layer="gelu_tanh")
_AVG = dict(global_pool="avg")  # average, then fc_norm
_LAYER_SCALE = dict(init_values=1e-5)
_FLEXI = dict(no_embed_class=True)
_DEIT3 = dict(init_values=1e-6, no_embed_class=True)
_DISTILLED = dict(distilled=True)  # deit.py's VisionTransformerDistilled, not a model_arg
_DINOV2_REG4 = dict(init_values=1e-5, no_embed_class=True, reg_tokens=4)
_TIPS_REG1 = dict(init_values=1.0, no_embed_class=True, reg_tokens=1)
_SIGLIP = dict(class_token=False, global_pool="map")
_SIGLIP_TANH = dict(_SIGLIP, act_layer="gelu_tanh")
_REG1_GAP = dict(class_token=False, global_pool="avg", init_values=1e-5, no_embed_class=True,
                 reg_tokens=1)
_REG4_GAP = dict(_REG1_GAP, reg_tokens=4)
_REG4_GAP_NO_LS = dict(class_token=False, global_pool="avg", no_embed_class=True, reg_tokens=4)
_REG4_GAP_NORM_FIRST = dict(_GAP, reg_tokens=4)
_REG4_MAP = dict(_SIGLIP, reg_tokens=4)

ARCHITECTURES = {
    "vit_tiny_patch16_224": (16, 192, 12, 3, 4.0, _PLAIN),
    "vit_tiny_patch16_384": (16, 192, 12, 3, 4.0, _PLAIN),
    "vit_small_patch32_224": (32, 384, 12, 6, 4.0, _PLAIN),
    "vit_small_patch32_384": (32, 384, 12, 6, 4.0, _PLAIN),
    "vit_small_patch16_224": (16, 384, 12, 6, 4.0, _PLAIN),
    "vit_small_patch16_384": (16, 384, 12, 6, 4.0, _PLAIN),
    "vit_small_patch8_224": (8, 384, 12, 6, 4.0, _PLAIN),
    "vit_base_patch32_224": (32, 768, 12, 12, 4.0, _PLAIN),
    "vit_base_patch32_384": (32, 768, 12, 12, 4.0, _PLAIN),
    "vit_base_patch16_224": (16, 768, 12, 12, 4.0, _PLAIN),
    "vit_base_patch16_384": (16, 768, 12, 12, 4.0, _PLAIN),
    "vit_base_patch8_224": (8, 768, 12, 12, 4.0, _PLAIN),
    "vit_large_patch32_224": (32, 1024, 24, 16, 4.0, _PLAIN),
    "vit_large_patch32_384": (32, 1024, 24, 16, 4.0, _PLAIN),
    "vit_large_patch16_224": (16, 1024, 24, 16, 4.0, _PLAIN),
    "vit_large_patch16_384": (16, 1024, 24, 16, 4.0, _PLAIN),
    "vit_large_patch14_224": (14, 1024, 24, 16, 4.0, _PLAIN),
    "vit_huge_patch14_224": (14, 1280, 32, 16, 4.0, _PLAIN),
    "vit_giant_patch14_224": (14, 1408, 40, 16, 48 / 11, _PLAIN),
    "vit_gigantic_patch14_224": (14, 1664, 48, 16, 64 / 13, _PLAIN),
    "vit_base_patch16_gap_224": (16, 768, 12, 16, 4.0, _GAP),
    "vit_huge_patch14_gap_224": (14, 1280, 32, 16, 4.0, _GAP),
    "vit_huge_patch16_gap_448": (16, 1280, 32, 16, 4.0, _GAP),
    "vit_giant_patch16_gap_224": (16, 1408, 40, 16, 48 / 11, _GAP),
    "vit_base_patch32_plus_256": (32, 896, 12, 14, 4.0, _LAYER_SCALE),
    "vit_base_patch16_plus_240": (16, 896, 12, 14, 4.0, _LAYER_SCALE),
    "vit_small_patch16_36x1_224": (16, 384, 36, 6, 4.0, _LAYER_SCALE),
    "eva_large_patch14_196": (14, 1024, 24, 16, 4.0, _AVG),
    "eva_large_patch14_336": (14, 1024, 24, 16, 4.0, _AVG),
    "flexivit_small": (16, 384, 12, 6, 4.0, _FLEXI),
    "flexivit_base": (16, 768, 12, 12, 4.0, _FLEXI),
    "flexivit_large": (16, 1024, 24, 16, 4.0, _FLEXI),
    "vit_small_patch14_dinov2": (14, 384, 12, 6, 4.0, _LAYER_SCALE),
    "vit_base_patch14_dinov2": (14, 768, 12, 12, 4.0, _LAYER_SCALE),
    "vit_large_patch14_dinov2": (14, 1024, 24, 16, 4.0, _LAYER_SCALE),
    "vit_small_patch14_reg4_dinov2": (14, 384, 12, 6, 4.0, _DINOV2_REG4),
    "vit_base_patch14_reg4_dinov2": (14, 768, 12, 12, 4.0, _DINOV2_REG4),
    "vit_large_patch14_reg4_dinov2": (14, 1024, 24, 16, 4.0, _DINOV2_REG4),
    "vit_base_patch14_reg1_tipsv2": (14, 768, 12, 12, 4.0, _TIPS_REG1),
    "vit_large_patch14_reg1_tipsv2": (14, 1024, 24, 16, 4.0, _TIPS_REG1),
    "vit_so400m_patch14_reg1_tipsv2": (14, 1152, 27, 16, 4304 / 1152, _TIPS_REG1),
    "vit_base_patch32_siglip_256": (32, 768, 12, 12, 4.0, _SIGLIP_TANH),
    "vit_base_patch16_siglip_224": (16, 768, 12, 12, 4.0, _SIGLIP),
    "vit_base_patch16_siglip_256": (16, 768, 12, 12, 4.0, _SIGLIP),
    "vit_base_patch16_siglip_384": (16, 768, 12, 12, 4.0, _SIGLIP),
    "vit_base_patch16_siglip_512": (16, 768, 12, 12, 4.0, _SIGLIP),
    "vit_large_patch16_siglip_256": (16, 1024, 24, 16, 4.0, _SIGLIP),
    "vit_large_patch16_siglip_384": (16, 1024, 24, 16, 4.0, _SIGLIP),
    "vit_large_patch16_siglip_512": (16, 1024, 24, 16, 4.0, _SIGLIP_TANH),
    "vit_so400m_patch14_siglip_224": (14, 1152, 27, 16, 3.7362, _SIGLIP),
    "vit_so400m_patch14_siglip_378": (14, 1152, 27, 16, 3.7362, _SIGLIP),
    "vit_so400m_patch14_siglip_384": (14, 1152, 27, 16, 3.7362, _SIGLIP),
    "vit_so400m_patch16_siglip_256": (16, 1152, 27, 16, 3.7362, _SIGLIP_TANH),
    "vit_so400m_patch16_siglip_384": (16, 1152, 27, 16, 3.7362, _SIGLIP_TANH),
    "vit_so400m_patch16_siglip_512": (16, 1152, 27, 16, 3.7362, _SIGLIP_TANH),
    "vit_giantopt_patch16_siglip_256": (16, 1536, 40, 16, 4.0, _SIGLIP_TANH),
    "vit_giantopt_patch16_siglip_384": (16, 1536, 40, 16, 4.0, _SIGLIP_TANH),
    "vit_base_patch32_siglip_gap_256": (32, 768, 12, 12, 4.0, _GAP_TANH),
    "vit_base_patch16_siglip_gap_224": (16, 768, 12, 12, 4.0, _GAP),
    "vit_base_patch16_siglip_gap_256": (16, 768, 12, 12, 4.0, _GAP),
    "vit_base_patch16_siglip_gap_384": (16, 768, 12, 12, 4.0, _GAP),
    "vit_base_patch16_siglip_gap_512": (16, 768, 12, 12, 4.0, _GAP),
    "vit_large_patch16_siglip_gap_256": (16, 1024, 24, 16, 4.0, _GAP),
    "vit_large_patch16_siglip_gap_384": (16, 1024, 24, 16, 4.0, _GAP),
    "vit_large_patch16_siglip_gap_512": (16, 1024, 24, 16, 4.0, _GAP_TANH),
    "vit_so400m_patch14_siglip_gap_224": (14, 1152, 27, 16, 3.7362, _GAP),
    "vit_so400m_patch14_siglip_gap_378": (14, 1152, 27, 16, 3.7362, _GAP),
    "vit_so400m_patch14_siglip_gap_384": (14, 1152, 27, 16, 3.7362, _GAP),
    "vit_so400m_patch14_siglip_gap_448": (14, 1152, 27, 16, 3.7362, _GAP),
    "vit_so400m_patch14_siglip_gap_896": (14, 1152, 27, 16, 3.7362, _GAP),
    "vit_so400m_patch16_siglip_gap_256": (16, 1152, 27, 16, 3.7362, _GAP_TANH),
    "vit_so400m_patch16_siglip_gap_384": (16, 1152, 27, 16, 3.7362, _GAP_TANH),
    "vit_so400m_patch16_siglip_gap_512": (16, 1152, 27, 16, 3.7362, _GAP_TANH),
    "vit_giantopt_patch16_siglip_gap_256": (16, 1536, 40, 16, 4.0, _GAP_TANH),
    "vit_giantopt_patch16_siglip_gap_384": (16, 1536, 40, 16, 4.0, _GAP_TANH),
    "vit_wee_patch16_reg1_gap_256": (16, 256, 14, 4, 5.0, _REG1_GAP),
    "vit_little_patch16_reg1_gap_256": (16, 320, 14, 5, 5.6, _REG1_GAP),
    "vit_little_patch16_reg4_gap_256": (16, 320, 14, 5, 5.6, _REG4_GAP),
    "vit_medium_patch16_reg1_gap_256": (16, 512, 12, 8, 4.0, _REG1_GAP),
    "vit_medium_patch16_reg4_gap_256": (16, 512, 12, 8, 4.0, _REG4_GAP),
    "vit_mediumd_patch16_reg4_gap_256": (16, 512, 20, 8, 4.0, _REG4_GAP),
    "vit_mediumd_patch16_reg4_gap_384": (16, 512, 20, 8, 4.0, _REG4_GAP),
    "vit_betwixt_patch16_reg1_gap_256": (16, 640, 12, 10, 4.0, _REG1_GAP),
    "vit_betwixt_patch16_reg4_gap_256": (16, 640, 12, 10, 4.0, _REG4_GAP),
    "vit_betwixt_patch16_reg4_gap_384": (16, 640, 12, 10, 4.0, _REG4_GAP),
    "vit_base_patch16_reg4_gap_256": (16, 768, 12, 12, 4.0, _REG4_GAP_NO_LS),
    "vit_so150m_patch16_reg4_map_256": (16, 896, 18, 14, 2.572, _REG4_MAP),
    "vit_so150m_patch16_reg4_gap_256": (16, 896, 18, 14, 2.572, _REG4_GAP_NORM_FIRST),
    "vit_so150m_patch16_reg4_gap_384": (16, 896, 18, 14, 2.572, _REG4_GAP_NORM_FIRST),
    "deit_tiny_patch16_224": (16, 192, 12, 3, 4.0, _PLAIN),
    "deit_small_patch16_224": (16, 384, 12, 6, 4.0, _PLAIN),
    "deit_base_patch16_224": (16, 768, 12, 12, 4.0, _PLAIN),
    "deit_base_patch16_384": (16, 768, 12, 12, 4.0, _PLAIN),
    "deit_tiny_distilled_patch16_224": (16, 192, 12, 3, 4.0, _DISTILLED),
    "deit_small_distilled_patch16_224": (16, 384, 12, 6, 4.0, _DISTILLED),
    "deit_base_distilled_patch16_224": (16, 768, 12, 12, 4.0, _DISTILLED),
    "deit_base_distilled_patch16_384": (16, 768, 12, 12, 4.0, _DISTILLED),
    "deit3_small_patch16_224": (16, 384, 12, 6, 4.0, _DEIT3),
    "deit3_small_patch16_384": (16, 384, 12, 6, 4.0, _DEIT3),
    "deit3_medium_patch16_224": (16, 512, 12, 8, 4.0, _DEIT3),
    "deit3_base_patch16_224": (16, 768, 12, 12, 4.0, _DEIT3),
    "deit3_base_patch16_384": (16, 768, 12, 12, 4.0, _DEIT3),
    "deit3_large_patch16_224": (16, 1024, 24, 16, 4.0, _DEIT3),
    "deit3_large_patch16_384": (16, 1024, 24, 16, 4.0, _DEIT3),
    "deit3_huge_patch14_224": (14, 1280, 32, 16, 4.0, _DEIT3),
}


def architecture_args(name):
    """timm's constructor arguments for a registered architecture name, or None if unknown.

    `name` may carry a pretrained tag ("vit_base_patch16_224.augreg2_in21k_ft_in1k"). The result
    is VisionTransformer's defaults overridden by the registered model_args, plus "distilled"
    (True for DeiT's VisionTransformerDistilled).
    """
    row = ARCHITECTURES.get(str(name).split(".", 1)[0])
    if row is None:
        return None
    patch_size, embed_dim, depth, num_heads, mlp_ratio, extra = row
    return dict(VIT_DEFAULTS, distilled=False, patch_size=patch_size, embed_dim=embed_dim,
                depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio) | extra

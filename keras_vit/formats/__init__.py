"""Readers of other projects' ViT checkpoints, each into keras_vit's canonical layout.

One module per project, each with one table of key names, citing that project's own code:
`big_vision` (.npz), `timm` (Hub folders and .safetensors), `huggingface` (transformers ViT
folders). `common` holds what they share. Every reader is NumPy only: no Keras, no torch.
"""

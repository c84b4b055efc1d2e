"""Image (2D timm, 3D ViT) and text (transformers) encoders, registered by name."""

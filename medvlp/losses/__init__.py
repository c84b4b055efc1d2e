"""Pure loss functions shared by the methods."""

from medvlp.losses.contrastive import clip_loss, info_nce, siglip_loss

__all__ = ["clip_loss", "info_nce", "siglip_loss"]

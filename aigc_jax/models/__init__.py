"""Flax linen networks. Modules are static; parameters are plain pytrees."""

from aigc_jax.models.classifiers import (
  CLASSIFIERS,
  ResNet18,
  SmallCNN,
  count_params,
  make_classifier,
)
from aigc_jax.models.unet import DDPM_CIFAR10, DDPMUNet, timestep_embedding

__all__ = [
  "CLASSIFIERS",
  "DDPM_CIFAR10",
  "DDPMUNet",
  "ResNet18",
  "SmallCNN",
  "count_params",
  "make_classifier",
  "timestep_embedding",
]

"""Flax linen networks. Modules are static; parameters are plain pytrees."""

from aigc_jax.models.classifiers import (
  CLASSIFIERS,
  ContrastiveNet,
  LeNet5,
  ResNet18,
  SmallCNN,
  count_params,
  make_classifier,
)
from aigc_jax.models.generators import (
  GENERATORS,
  MLPVAE,
  ConvDiscriminator,
  ConvGenerator,
  MLPDiscriminator,
  MLPGenerator,
  load_mnist_gan_generator,
  load_mnist_lenet5,
  load_mnist_vae,
)
from aigc_jax.models.inception import (
  FIDInceptionV3,
  fid_features,
  load_fid_inception,
)
from aigc_jax.models.lpips import (
  LPIPS,
  LPIPS_BACKBONES,
  imagenet_features,
  load_lpips,
  lpips_distance,
  lpips_weights_path,
  resize_for_lpips,
)
from aigc_jax.models.unet import DDPM_CIFAR10, DDPMUNet, timestep_embedding

__all__ = [
  "CLASSIFIERS",
  "DDPM_CIFAR10",
  "GENERATORS",
  "LPIPS",
  "LPIPS_BACKBONES",
  "MLPVAE",
  "ContrastiveNet",
  "ConvDiscriminator",
  "ConvGenerator",
  "DDPMUNet",
  "FIDInceptionV3",
  "LeNet5",
  "MLPDiscriminator",
  "MLPGenerator",
  "ResNet18",
  "SmallCNN",
  "count_params",
  "fid_features",
  "imagenet_features",
  "load_fid_inception",
  "load_lpips",
  "load_mnist_gan_generator",
  "load_mnist_lenet5",
  "load_mnist_vae",
  "lpips_distance",
  "lpips_weights_path",
  "make_classifier",
  "resize_for_lpips",
  "timestep_embedding",
]

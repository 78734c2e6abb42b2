"""What an unauthorised trainer does to protected images."""

from aigc_jax.purify.iss import (
  ISS_METHODS,
  bit_depth_reduction,
  grayscale,
  squeeze,
)
from aigc_jax.purify.jcdp import (
  GUIDANCE_SCHEDULES,
  OFFICIAL_SCALE,
  diffusion_purify,
  guidance_weights,
  jcdp_purify,
  joint_energy,
  lpips_guidance_distance,
  mse_distance,
  per_image_purifier,
)
from aigc_jax.purify.transforms import (
  blur_model_images,
  gaussian_blur,
  jpeg_compress,
)

__all__ = [
  "GUIDANCE_SCHEDULES",
  "ISS_METHODS",
  "OFFICIAL_SCALE",
  "bit_depth_reduction",
  "blur_model_images",
  "diffusion_purify",
  "gaussian_blur",
  "grayscale",
  "guidance_weights",
  "jcdp_purify",
  "joint_energy",
  "jpeg_compress",
  "lpips_guidance_distance",
  "mse_distance",
  "per_image_purifier",
  "squeeze",
]

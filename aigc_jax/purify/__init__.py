"""What an unauthorised trainer does to protected images."""

from aigc_jax.purify.iss import (
  ISS_METHODS,
  bit_depth_reduction,
  grayscale,
  squeeze,
)
from aigc_jax.purify.transforms import gaussian_blur, jpeg_compress

__all__ = [
  "ISS_METHODS",
  "bit_depth_reduction",
  "gaussian_blur",
  "grayscale",
  "jpeg_compress",
  "squeeze",
]

"""ISS, Image Shortcut Squeezing (Liu, Zhao, Larson, ICML 2023): simple
compressions of the training images that remove unlearnable perturbations'
shortcuts (arXiv 2301.13838).

Perturbations from slightly trained surrogates are low-frequency and colourful
(grayscale removes them); those from fully trained surrogates are
high-frequency (JPEG removes them). uint8 in, uint8 out, as the training data
would be stored; applied once to the training set, never to the test set.
"""

import numpy as np

from aigc_jax.data.images import check_uint8_images
from aigc_jax.purify.transforms import jpeg_compress

# ITU-R 601-2 luma, as Pillow's convert("L") (torchvision's Grayscale).
_LUMA = np.array([299, 587, 114], np.int64)


def grayscale(images: np.ndarray) -> np.ndarray:
  """Luma in every channel (the shape is kept, as ISS's `Grayscale(3)`);
  rounds like Pillow: (299 R + 587 G + 114 B + 500) // 1000."""
  check_uint8_images(images)
  if images.shape[-1] == 1:
    return images.copy()
  if images.shape[-1] != 3:
    raise ValueError(f"Grayscale needs 1 or 3 channels, got {images.shape}.")
  luma = (images.astype(np.int64) @ _LUMA + 500) // 1000
  return np.repeat(luma[..., None], 3, axis=-1).astype(np.uint8)


def bit_depth_reduction(images: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the top `bits` bits of every value (torchvision's
  `RandomPosterize(bits, p=1)`)."""
  check_uint8_images(images)
  if not 1 <= bits <= 8:
    raise ValueError(f"Bit depth {bits} must be in [1, 8].")
  return images & np.uint8((0xFF << (8 - bits)) & 0xFF)


ISS_METHODS = ("grayscale", "jpeg", "bdr")


def squeeze(
  images: np.ndarray, method: str, *, quality: int = 10, bits: int = 4
) -> np.ndarray:
  """One ISS compression by name: "grayscale", "jpeg" (at `quality`, 10 in
  ISS's table) or "bdr" (bit-depth reduction to `bits`)."""
  if method == "grayscale":
    return grayscale(images)
  if method == "jpeg":
    return jpeg_compress(images, quality)
  if method == "bdr":
    return bit_depth_reduction(images, bits)
  raise ValueError(f"Unknown ISS method {method!r}; choose from {ISS_METHODS}.")

"""Lossy image transforms an unauthorised trainer may apply to protected
images before training: JPEG compression and Gaussian blur (uint8 in, uint8
out, as the data would be stored), and the blur as a pure function of
[-1, 1] images for use inside jitted code."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from PIL import Image

from aigc_jax.data.images import check_uint8_images


def jpeg_compress(images: np.ndarray, quality: int = 75) -> np.ndarray:
  """Encodes and decodes each image as JPEG at `quality` (Pillow, 4:2:0)."""
  check_uint8_images(images)
  if not 1 <= quality <= 95:
    raise ValueError(f"JPEG quality {quality} must be in [1, 95].")
  out = np.empty_like(images)
  for i, img in enumerate(images):
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(buf))
    out[i] = decoded.reshape(img.shape)
  return out


def gaussian_blur(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
  """Blurs each channel with a Gaussian of standard deviation `sigma`
  pixels (reflecting at the borders), rounding back to uint8."""
  check_uint8_images(images)
  if sigma <= 0:
    raise ValueError(f"Blur sigma {sigma} must be positive.")
  blurred = scipy.ndimage.gaussian_filter(
    images.astype(np.float64), sigma=(0, sigma, sigma, 0), mode="reflect"
  )
  return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def blur_model_images(images: jax.Array, sigma: float) -> jax.Array:
  """A Gaussian blur of [-1, 1] NHWC images (each channel, reflecting at
  the borders as `gaussian_blur` does), pure and differentiable."""
  if sigma <= 0:
    raise ValueError(f"Blur sigma {sigma} must be positive.")
  radius = max(1, int(np.ceil(4 * sigma)))
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (t / sigma) ** 2)
  w = jnp.asarray(w / w.sum(), images.dtype)
  x = jnp.pad(
    images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), "symmetric"
  )
  n = 2 * radius + 1
  h, wd = images.shape[1:3]
  x = sum(w[i] * x[:, i : i + h] for i in range(n))
  return sum(w[i] * x[:, :, i : i + wd] for i in range(n))

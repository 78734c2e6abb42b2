"""aigc_jax.purify's transforms: ISS (grayscale, bit depth, JPEG) and the
blurs (JCDP has test_jcdp.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from aigc_jax.purify import (
  bit_depth_reduction,
  gaussian_blur,
  grayscale,
  jpeg_compress,
  squeeze,
)


def _rgb(n=6, size=8, seed=0):
  return np.random.default_rng(seed).integers(
    0, 256, (n, size, size, 3), np.uint8
  )


def test_grayscale_and_bit_depth_match_pillow():
  images = _rgb()
  gray = grayscale(images)
  assert gray.shape == images.shape
  for img, out in zip(images, gray, strict=True):
    want = np.asarray(Image.fromarray(img).convert("L"))
    np.testing.assert_array_equal(out[..., 0], want)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
  for bits in (1, 3, 8):
    out = bit_depth_reduction(images, bits)
    for img, o in zip(images, out, strict=True):
      want = np.asarray(ImageOps.posterize(Image.fromarray(img), bits))
      np.testing.assert_array_equal(o, want)
  np.testing.assert_array_equal(
    squeeze(images, "bdr", bits=3), bit_depth_reduction(images, 3)
  )
  np.testing.assert_array_equal(squeeze(images, "grayscale"), gray)
  assert squeeze(images, "jpeg", quality=10).shape == images.shape
  with pytest.raises(ValueError, match="grayscale"):
    squeeze(images, "median")
  with pytest.raises(ValueError, match="Bit depth"):
    bit_depth_reduction(images, 0)
  with pytest.raises(TypeError, match="uint8"):
    grayscale(images.astype(np.float32))


def test_jpeg_and_blur():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 16, 3), np.uint8)
  jpg = jpeg_compress(images, 75)
  assert jpg.shape == images.shape and jpg.dtype == np.uint8
  assert 0 < np.abs(jpg.astype(int) - images).mean() < 60
  blurred = gaussian_blur(images, 1.0)
  assert blurred.std() < images.std()
  gray = jpeg_compress(images[..., :1], 75)
  assert gray.shape == (3, 16, 16, 1)
  with pytest.raises(ValueError, match="quality"):
    jpeg_compress(images, 0)
  with pytest.raises(TypeError, match="uint8"):
    gaussian_blur(images.astype(np.float32), 1.0)


def test_blur_of_model_images_is_the_uint8_blur_and_differentiable():
  from aigc_jax.purify import blur_model_images

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 16, 1), np.uint8)
  x = jnp.asarray(images / 127.5 - 1.0, jnp.float32)
  blurred = (np.asarray(blur_model_images(x, 1.0)) + 1.0) * 127.5
  # scipy's filter, rounded to uint8: within rounding of the pure one.
  assert np.abs(blurred - gaussian_blur(images, 1.0)).max() <= 0.51
  grad = jax.grad(lambda v: blur_model_images(v, 1.0)[0, 8, 8, 0])(x)
  np.testing.assert_allclose(float(grad.sum()), 1.0, rtol=1e-5)
  per_image = jax.vmap(lambda v: blur_model_images(v[None], 1.0)[0])(x)
  np.testing.assert_allclose(per_image, blur_model_images(x, 1.0), atol=1e-6)

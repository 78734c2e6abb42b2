"""How much a perturbation changes an image: PSNR and SSIM."""

import jax
import jax.numpy as jnp


def psnr(a: jax.Array, b: jax.Array, max_val: float = 2.0) -> jax.Array:
  """Per-image peak signal-to-noise ratio in dB (max_val 2 for [-1, 1])."""
  mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
  return 10.0 * jnp.log10(max_val**2 / mse)


def _gaussian_window(size: int, sigma: float) -> jax.Array:
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  w = jnp.exp(-(x**2) / (2 * sigma**2))
  return w / w.sum()


def _blur(x: jax.Array, window: jax.Array) -> jax.Array:
  """Separable 'valid' filtering of each channel of NHWC images."""
  c = x.shape[-1]
  k = window.shape[0]
  kh = jnp.tile(window.reshape(k, 1, 1, 1), (1, 1, 1, c))
  kw = jnp.tile(window.reshape(1, k, 1, 1), (1, 1, 1, c))
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda y, w: jax.lax.conv_general_dilated(
    y, w, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c
  )
  return conv(conv(x, kh), kw)


def ssim_components(
  a: jax.Array,
  b: jax.Array,
  *,
  max_val: float = 2.0,
  filter_size: int = 11,
  filter_sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> tuple[jax.Array, jax.Array]:
  """Per-image mean SSIM and mean contrast-structure term cs, Wang et al.
  (2004) Eq. (13) with an 11x11 Gaussian window of σ = 1.5.

  Raises:
    ValueError: images smaller than the window (pass a smaller
      filter_size).
  """
  if min(a.shape[1:3]) < filter_size:
    raise ValueError(
      f"Images of size {a.shape[1:3]} are smaller than the SSIM window "
      f"{filter_size}; pass filter_size <= {min(a.shape[1:3])}."
    )
  w = _gaussian_window(filter_size, filter_sigma)
  c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
  mu_a, mu_b = _blur(a, w), _blur(b, w)
  var_a = _blur(a * a, w) - mu_a**2
  var_b = _blur(b * b, w) - mu_b**2
  cov = _blur(a * b, w) - mu_a * mu_b
  cs = (2 * cov + c2) / (var_a + var_b + c2)
  luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
  axes = tuple(range(1, a.ndim))
  return jnp.mean(luminance * cs, axis=axes), jnp.mean(cs, axis=axes)


def ssim(a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
  """Per-image structural similarity (1 for identical images)."""
  return ssim_components(a, b, **kwargs)[0]

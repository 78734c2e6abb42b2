"""How much an image changed: PSNR, SSIM and multi-scale SSIM."""

import math

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


# Wang, Simoncelli and Bovik (2003), the five scales of their Table 1 fit.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _halve(x: jax.Array) -> jax.Array:
  """2x2 average pooling (odd trailing rows and columns dropped)."""
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  x = x[:, :h, :w]
  return x.reshape(x.shape[0], h // 2, 2, w // 2, 2, x.shape[3]).mean((2, 4))


def ms_ssim(
  a: jax.Array,
  b: jax.Array,
  *,
  weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
  max_val: float = 2.0,
  filter_size: int = 11,
  filter_sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> jax.Array:
  """Per-image multi-scale SSIM, Wang et al. (2003) Eq. (7):

    MS-SSIM = SSIM_M^{w_M} prod_{j=1..M-1} cs_j^{w_j}

  over M = len(weights) scales, each half the size of the previous one
  (2x2 average pooling). cs_j is the image mean of SSIM's
  contrast-structure map at scale j and SSIM_M the mean SSIM (luminance
  times contrast-structure) at the coarsest scale, as in TensorFlow's
  `ssim_multiscale` and pytorch-msssim; negative means count as 0.
  Differentiable, so `1 - ms_ssim` is a perceptual loss.

  Weights that do not sum to 1 are used as given. For 28x28 digits pass
  fewer scales and a smaller window, e.g. `weights=MS_SSIM_WEIGHTS[:3]`,
  `filter_size=7` (28 -> 14 -> 7).

  Raises:
    ValueError: images smaller than filter_size * 2**(M - 1), with the
      largest filter_size and the number of scales that would fit.
  """
  scales = len(weights)
  need = filter_size * 2 ** (scales - 1)
  size = min(a.shape[1:3])
  if size < need:
    fits = max(0, math.floor(math.log2(size / filter_size)) + 1)
    raise ValueError(
      f"{scales}-scale MS-SSIM with a {filter_size}x{filter_size} window "
      f"needs images of at least {need}x{need}; got {tuple(a.shape[1:3])}. "
      f"Pass fewer weights (at most {fits} scales fit this window) or "
      f"filter_size <= {size // 2 ** (scales - 1)}."
    )
  kwargs = dict(
    max_val=max_val,
    filter_size=filter_size,
    filter_sigma=filter_sigma,
    k1=k1,
    k2=k2,
  )
  # Clamped above 0 (not at 0) so that the fractional powers keep a finite
  # gradient where a contrast-structure mean reaches 0.
  floor = 1e-8
  value = 1.0
  for j, w in enumerate(weights):
    full, cs = ssim_components(a, b, **kwargs)
    last = j == scales - 1
    value = value * jnp.maximum(full if last else cs, floor) ** w
    if not last:
      a, b = _halve(a), _halve(b)
  return value

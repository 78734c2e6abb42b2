"""How much an image changed: PSNR, SSIM and multi-scale SSIM."""

import jax
import jax.numpy as jnp


def psnr(a: jax.Array, b: jax.Array, max_val: float = 2.0) -> jax.Array:
  """Per-image peak signal-to-noise ratio in dB (max_val 2 for [-1, 1])."""
  mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
  return 10.0 * jnp.log10(max_val**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype=jnp.float32) -> jax.Array:
  x = jnp.arange(size, dtype=dtype) - (size - 1) / 2
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
  per_channel: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Mean SSIM and mean contrast-structure term cs, Wang et al. (2004)
  Eq. (13) with an 11x11 Gaussian window of σ = 1.5, 'valid' filtering.

  Returns per-image means, shape (N,), or with `per_channel` the means
  over each channel's pixels, (N, C), as TensorFlow's and pytorch-msssim's
  MS-SSIM use them.

  Raises:
    ValueError: images smaller than the window (pass a smaller
      filter_size).
  """
  if min(a.shape[1:3]) < filter_size:
    raise ValueError(
      f"Images of size {a.shape[1:3]} are smaller than the SSIM window "
      f"{filter_size}; pass filter_size <= {min(a.shape[1:3])}."
    )
  w = _gaussian_window(filter_size, filter_sigma, a.dtype)
  c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
  mu_a, mu_b = _blur(a, w), _blur(b, w)
  var_a = _blur(a * a, w) - mu_a**2
  var_b = _blur(b * b, w) - mu_b**2
  cov = _blur(a * b, w) - mu_a * mu_b
  cs = (2 * cov + c2) / (var_a + var_b + c2)
  luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
  axes = (1, 2) if per_channel else tuple(range(1, a.ndim))
  return jnp.mean(luminance * cs, axis=axes), jnp.mean(cs, axis=axes)


def ssim(a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
  """Per-image structural similarity (1 for identical images)."""
  return ssim_components(a, b, **kwargs)[0]


# Wang, Simoncelli and Bovik (2003), the five scales of their Table 1 fit.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# How each reference halves an odd height or width before 2x2 averaging:
# pytorch-msssim's `avg_pool2d(padding=1)` adds a zero row on both sides and
# counts it in the mean (the last one falls outside every window);
# TensorFlow's `ssim_multiscale` repeats the last row ('SYMMETRIC' padding).
MS_SSIM_CONVENTIONS = ("pytorch_msssim", "tensorflow")


def _halve(x: jax.Array, convention: str) -> jax.Array:
  """2x2 average pooling, an odd size first padded as `convention` does."""
  ph, pw = x.shape[1] % 2, x.shape[2] % 2
  if convention == "pytorch_msssim":
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  else:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="symmetric")
  h, w = x.shape[1] // 2, x.shape[2] // 2
  x = x[:, : 2 * h, : 2 * w]
  return x.reshape(x.shape[0], h, 2, w, 2, x.shape[3]).mean((2, 4))


def _positive_power(x: jax.Array, w: float) -> jax.Array:
  """max(x, 0)^w, with gradient 0 where x ≤ 0 (a fractional power's is
  infinite at 0): the references' relu before the power, differentiable."""
  positive = x > 0
  return jnp.where(positive, jnp.where(positive, x, 1.0) ** w, 0.0)


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
  convention: str = "pytorch_msssim",
) -> jax.Array:
  """Per-image multi-scale SSIM, Wang et al. (2003) Eq. (7):

    MS-SSIM = mean over channels of SSIM_M^{w_M} prod_{j<M} cs_j^{w_j}

  over M = len(weights) scales, each half the size of the previous one
  (2x2 average pooling). cs_j is the mean over a channel's pixels of SSIM's
  contrast-structure map at scale j and SSIM_M the mean SSIM (luminance
  times contrast-structure) at the coarsest scale. As in pytorch-msssim
  (1.0.0) and TensorFlow's `ssim_multiscale`, the product is taken per
  channel and then averaged, and a negative mean counts as 0 (so clearly
  dissimilar images score 0). The two references differ only where a
  scale has an odd height or width (`convention`, see
  `MS_SSIM_CONVENTIONS`); tests/test_metrics.py checks both against
  float64 references. Differentiable (gradient 0 through a term clamped
  at 0), so `1 - ms_ssim` is a perceptual loss.

  Weights that do not sum to 1 are used as given. For 28x28 digits pass
  fewer scales and a smaller window, e.g. `weights=MS_SSIM_WEIGHTS[:3]`,
  `filter_size=7` (28 -> 14 -> 7).

  Raises:
    ValueError: an unknown convention, or images whose coarsest scale is
      smaller than the window, with the scales and window that would fit.
  """
  if convention not in MS_SSIM_CONVENTIONS:
    raise ValueError(
      f"Unknown MS-SSIM convention {convention!r}; choose one of "
      f"{MS_SSIM_CONVENTIONS}."
    )
  scales = len(weights)
  size = min(a.shape[1:3])
  sizes = [size]
  for _ in range(scales - 1):
    sizes.append(-(-sizes[-1] // 2))  # both references round odd sizes up
  if sizes[-1] < filter_size:
    fits = sum(s >= filter_size for s in sizes)
    raise ValueError(
      f"{scales}-scale MS-SSIM with a {filter_size}x{filter_size} window "
      f"needs a coarsest scale of at least {filter_size}x{filter_size}; "
      f"images of {tuple(a.shape[1:3])} reach {sizes[-1]}. Pass fewer "
      f"weights (at most {fits} scales fit this window) or "
      f"filter_size <= {sizes[-1]}."
    )
  kwargs = dict(
    max_val=max_val,
    filter_size=filter_size,
    filter_sigma=filter_sigma,
    k1=k1,
    k2=k2,
    per_channel=True,
  )
  value = 1.0
  for j, w in enumerate(weights):
    full, cs = ssim_components(a, b, **kwargs)
    last = j == scales - 1
    value = value * _positive_power(full if last else cs, w)
    if not last:
      a, b = _halve(a, convention), _halve(b, convention)
  return jnp.mean(value, axis=-1)

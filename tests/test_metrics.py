"""Distribution distances, image quality and shares with intervals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from aigc_jax import metrics


def test_frechet_distance():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((2000, 4))
  assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  shifted = a + np.array([3.0, 0, 0, 0])
  assert metrics.frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-6)
  scaled = 2 * a  # Σ_b = 4Σ_a: Tr(Σ + 4Σ - 2·2Σ) = Tr Σ ≈ 4
  assert metrics.frechet_distance(a, scaled) == pytest.approx(4.0, rel=0.1)
  with pytest.raises(ValueError, match="N >= 2"):
    metrics.frechet_distance(a[:1], a)


def test_precision_recall():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((300, 2))
  p, r = metrics.precision_recall(real, real + 1e-9)
  assert p == pytest.approx(1.0) and r == pytest.approx(1.0)
  collapsed = real[:5] + 0.001 * rng.standard_normal((5, 2))
  p, r = metrics.precision_recall(real, np.repeat(collapsed, 20, axis=0))
  assert p > 0.9 and r < 0.3  # good quality, poor coverage
  far = real + 100
  p, r = metrics.precision_recall(real, far)
  assert p == 0 and r == 0


def test_psnr_and_ssim():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
  noisy = x + 0.2 * jax.random.normal(jax.random.key(1), x.shape)
  assert bool(jnp.all(metrics.ssim(x, noisy) < 0.95))
  assert bool(jnp.all(metrics.psnr(x, noisy) < metrics.psnr(x, x + 0.01)))
  np.testing.assert_allclose(
    metrics.psnr(x, x + 0.02), 20 * np.log10(2 / 0.02), rtol=1e-4
  )
  g = jax.grad(lambda y: metrics.ssim(x, y, filter_size=7).sum())(noisy)
  assert g.shape == x.shape and bool(jnp.any(g != 0))
  values = jax.vmap(lambda s: metrics.ssim(x, x + s, filter_size=7).mean())(
    jnp.array([0.0, 0.1, 0.3])
  )
  assert values[0] > values[1] > values[2]
  with pytest.raises(ValueError, match="filter_size"):
    metrics.ssim(x[:, :8, :8], x[:, :8, :8])


def _ms_ssim_tensorflow_numpy(a, b, weights, size, sigma, max_val=2.0):
  """TensorFlow's `ssim_multiscale` written out in float64 for one (H, W, C)
  pair: per-channel SSIM terms, an odd size padded by repeating its last
  row ('SYMMETRIC'), relu, the product over scales per channel, then the
  mean over channels."""
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  window = np.outer(g, g) / g.sum() ** 2
  c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
  per_channel = []
  for ch in range(a.shape[-1]):
    u, v = a[..., ch], b[..., ch]
    value = 1.0
    for j, w in enumerate(weights):
      blur = lambda y: signal.correlate2d(y, window, mode="valid")
      mu_u, mu_v = blur(u), blur(v)
      cov = blur(u * v) - mu_u * mu_v
      var_sum = blur(u * u) - mu_u**2 + blur(v * v) - mu_v**2
      cs = (2 * cov + c2) / (var_sum + c2)
      lum = (2 * mu_u * mu_v + c1) / (mu_u**2 + mu_v**2 + c1)
      term = (lum * cs).mean() if j == len(weights) - 1 else cs.mean()
      value *= max(term, 0.0) ** w
      pad = ((0, u.shape[0] % 2), (0, u.shape[1] % 2))
      u, v = np.pad(u, pad, "symmetric"), np.pad(v, pad, "symmetric")
      halve = lambda y: y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2)
      u, v = halve(u).mean((1, 3)), halve(v).mean((1, 3))
    per_channel.append(value)
  return float(np.mean(per_channel))


def _ms_ssim_pairs(shape, seed=1):
  """Smooth RGB images in [-1, 1]: two noisy copies and one unrelated
  image, whose MS-SSIM both references put at exactly 0."""
  rng = np.random.default_rng(seed)
  smooth = lambda y: signal.convolve2d(y, np.ones((5, 5)) / 25, "same")
  image = lambda: np.stack(
    [np.tanh(3 * smooth(rng.normal(size=shape))) for _ in range(3)], -1
  )
  a = np.stack([image(), image(), image()])
  b = np.clip(a + rng.normal(scale=0.2, size=a.shape), -1, 1)
  b[2] = -a[2]  # the unrelated (negated) image
  return a, b


# Odd sizes at several scales, so that the two conventions differ.
MS_SSIM_CASES = [
  (metrics.MS_SSIM_WEIGHTS, 7, 1.5, (101, 107)),
  (metrics.MS_SSIM_WEIGHTS, 11, 1.5, (165, 171)),
]


@pytest.mark.parametrize("weights, size, sigma, shape", MS_SSIM_CASES)
def test_ms_ssim_matches_pytorch_msssim_in_float64(weights, size, sigma, shape):
  torch = pytest.importorskip("torch")
  pytorch_msssim = pytest.importorskip("pytorch_msssim")
  a, b = _ms_ssim_pairs(shape)
  nchw = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  ref = pytorch_msssim.ms_ssim(
    nchw(a),
    nchw(b),
    data_range=2.0,
    size_average=False,
    win_size=size,
    win_sigma=sigma,
    weights=list(weights),
  ).numpy()
  assert 0.1 < ref[0] < 0.99 and ref[2] == 0.0
  with jax.enable_x64(True):
    ours = metrics.ms_ssim(
      jnp.asarray(a), jnp.asarray(b), filter_size=size, filter_sigma=sigma
    )
    # pytorch-msssim builds its Gaussian window in float32: 1e-9 apart.
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("weights, size, sigma, shape", MS_SSIM_CASES)
def test_ms_ssim_matches_tensorflows_convention_in_float64(
  weights, size, sigma, shape
):
  a, b = _ms_ssim_pairs(shape)
  with jax.enable_x64(True):
    kwargs = dict(filter_size=size, filter_sigma=sigma)
    ours = metrics.ms_ssim(
      jnp.asarray(a), jnp.asarray(b), convention="tensorflow", **kwargs
    )
    other = metrics.ms_ssim(jnp.asarray(a), jnp.asarray(b), **kwargs)
  ref = [
    _ms_ssim_tensorflow_numpy(a[i], b[i], weights, size, sigma)
    for i in range(len(a))
  ]
  assert ref[2] == 0.0
  np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
  # The conventions differ only in how odd sizes are halved.
  assert 1e-6 < abs(float(ours[0] - other[0])) < 1e-2


def test_ms_ssim_is_differentiable_where_a_term_is_clamped_to_0():
  a, b = (jnp.asarray(x, jnp.float32) for x in _ms_ssim_pairs((101, 107)))
  kwargs = dict(filter_size=7)
  g = jax.grad(lambda y: (1 - metrics.ms_ssim(a, y, **kwargs)).sum())(b)
  assert bool(jnp.all(jnp.isfinite(g)))
  assert not bool(jnp.any(g[2])) and bool(jnp.any(g[0]))


def test_ms_ssim_names_the_fix_for_small_images_and_bad_conventions():
  x = jnp.zeros((1, 28, 28, 1))
  with pytest.raises(ValueError, match="coarsest scale of at least 11x11"):
    metrics.ms_ssim(x, x)
  with pytest.raises(ValueError, match="at most 2 scales"):
    metrics.ms_ssim(x, x, weights=(0.3, 0.3, 0.4), filter_size=11)
  with pytest.raises(ValueError, match="convention"):
    metrics.ms_ssim(x, x, weights=(1.0,), filter_size=7, convention="matlab")


def test_share_interval_is_wilsons():
  from aigc_jax.metrics import share_interval

  # Wilson's 95% interval for 50 of 100 is 0.404-0.596; at 0 and at n it
  # keeps a width instead of collapsing to a point.
  np.testing.assert_allclose(
    share_interval(50, 100), (0.4038, 0.5962), atol=1e-4
  )
  lo, hi = share_interval(0, 100)
  assert lo == 0.0 and 0.03 < hi < 0.04
  lo, hi = share_interval(100, 100)
  assert 0.96 < lo < 0.97 and hi == pytest.approx(1.0)
  with pytest.raises(ValueError, match="successes"):
    share_interval(5, 4)

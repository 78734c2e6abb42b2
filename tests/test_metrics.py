"""Distribution distances, image quality and shares with intervals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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

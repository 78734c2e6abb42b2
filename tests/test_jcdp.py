"""JCDP: the guidance terms, the guided step, and purification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import diffusion, purify
from aigc_jax.models import load_lpips

SCHEDULE = diffusion.make_schedule("linear", 1000)


@pytest.fixture(scope="module")
def alex():
  return load_lpips("alex")


def _eps_fn(x, t):
  # A stand-in denoiser: cheap, smooth, and dependent on x and t.
  return 0.3 * jnp.tanh(x) * (t[:, None, None, None] / 1000.0 + 0.5)


def _protected(n=4, size=8, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1, 1, (n, size, size, channels)), jnp.float32)


def test_guidance_terms_vanish_when_the_trajectory_equals_the_reference(alex):
  x_u = _protected()
  t = jnp.full((len(x_u),), 7, jnp.int32)
  key = jax.random.key(3)
  # The energy's reference is x_u diffused to t with noise drawn from `key`.
  reference = diffusion.q_sample(
    SCHEDULE, x_u, t, jax.random.normal(key, x_u.shape)
  )
  weights = jnp.ones(1000)
  energy = purify.joint_energy(
    x_u,
    SCHEDULE,
    weights * 1e4,
    weights * 1e2,
    purify.lpips_guidance_distance(alex, size=32),
  )
  np.testing.assert_allclose(energy(reference, t, key), 0.0, atol=1e-6)
  grad = diffusion.energy_gradient(energy, reference, t, key)
  np.testing.assert_allclose(grad, 0.0, atol=1e-5)
  # Away from the reference both terms pull toward it.
  away = reference + 0.1
  assert np.all(np.asarray(energy(away, t, key)) > 0)
  step = -diffusion.energy_gradient(energy, away, t, key)
  assert float(jnp.sum(step * (reference - away))) > 0


def test_zero_guidance_is_the_unguided_purification(alex):
  x_u = _protected()
  key = jax.random.key(0)
  unguided = purify.diffusion_purify(
    _eps_fn, x_u, key, SCHEDULE, t_star=3, rounds=2
  )
  for form in purify.GUIDANCE_SCHEDULES:
    guided = purify.jcdp_purify(
      _eps_fn,
      x_u,
      key,
      SCHEDULE,
      t_star=3,
      rounds=2,
      split=1,
      form=form,
      mse_scale=0.0,
      lpips_scale=0.0,
      lpips_variables=alex,
      lpips_size=32,
    )
    np.testing.assert_array_equal(guided, unguided)


def test_the_guided_step_with_zero_energy_is_the_plain_step():
  x = _protected()
  key = jax.random.key(1)
  zero = lambda x, t, k: jnp.zeros(x.shape[0])
  plain = diffusion.ddpm_step(_eps_fn, x, jnp.int32(5), key, SCHEDULE)
  guided = diffusion.ddpm_step(
    _eps_fn, x, jnp.int32(5), key, SCHEDULE, energy_fn=zero
  )
  np.testing.assert_array_equal(guided, plain)


def test_original_schedule_splits_the_terms_and_matches_the_released_scale():
  mse, lp = purify.guidance_weights(
    SCHEDULE, "original", mse_scale=1.0, lpips_scale=1.0, split=10
  )
  assert np.all(mse[:11] == 0) and np.all(mse[11:] > 0)
  assert np.all(lp[11:] == 0) and np.all(lp[:11] > 0)
  # protection-methods.md §1.4: s_19 = 2.55e5, over the batch of 500.
  official, _ = purify.guidance_weights(
    SCHEDULE,
    "original",
    mse_scale=purify.OFFICIAL_SCALE,
    lpips_scale=0.0,
  )
  np.testing.assert_allclose(official[19] * 500, 2.55e5, rtol=5e-3)
  paper = purify.guidance_weights(
    SCHEDULE, "paper", mse_scale=2.0, lpips_scale=3.0
  )
  assert np.all(paper[0] == 2.0) and np.all(paper[1] == 3.0)
  with pytest.raises(ValueError, match="Unknown guidance schedule"):
    purify.guidance_weights(SCHEDULE, "gdmp", mse_scale=1, lpips_scale=1)


def test_mse_guidance_keeps_the_output_closer_to_the_protected_input():
  x_u = _protected(n=8)
  key = jax.random.key(2)
  kwargs = dict(t_star=20, rounds=2)
  unguided = purify.diffusion_purify(_eps_fn, x_u, key, SCHEDULE, **kwargs)
  guided = purify.jcdp_purify(
    _eps_fn,
    x_u,
    key,
    SCHEDULE,
    form="paper",
    mse_scale=2e4,
    lpips_scale=0.0,
    **kwargs,
  )
  dist = lambda y: float(jnp.mean((y - x_u) ** 2))
  assert dist(guided) < 0.5 * dist(unguided)


@pytest.mark.optimized_xla  # unoptimised, its LPIPS gradients run 100x slower
def test_jcdp_composes_with_vmap_over_guidance_scales(alex):
  x_u = _protected(n=2)
  key = jax.random.key(4)

  def run(scale):
    return purify.jcdp_purify(
      _eps_fn,
      x_u,
      key,
      SCHEDULE,
      t_star=4,
      rounds=1,
      split=1,
      form="paper",
      mse_scale=scale,
      lpips_scale=scale / 100,
      lpips_variables=alex,
      lpips_size=32,
    )

  scales = jnp.array([0.0, 1e3, 1e4])
  batched = jax.jit(jax.vmap(run))(scales)
  single = jax.jit(run)  # one compilation for the three scales
  for i, s in enumerate(scales):
    np.testing.assert_allclose(batched[i], single(s), atol=1e-5)
  assert not np.allclose(batched[1], batched[2])


def test_jcdp_is_deterministic_and_names_its_missing_pieces():
  x_u = _protected()
  key = jax.random.key(5)
  kwargs = dict(t_star=5, rounds=1, form="paper", lpips_scale=0.0)
  a = purify.jcdp_purify(_eps_fn, x_u, key, SCHEDULE, mse_scale=1e3, **kwargs)
  b = purify.jcdp_purify(_eps_fn, x_u, key, SCHEDULE, mse_scale=1e3, **kwargs)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="needs its network"):
    purify.jcdp_purify(_eps_fn, x_u, key, SCHEDULE, t_star=5, rounds=1)
  with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
    purify.jcdp_purify(
      _eps_fn, 255 * x_u, key, SCHEDULE, mse_scale=1.0, **kwargs
    )

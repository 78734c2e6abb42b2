"""The diffusion engine: parity with diffusers, composition with vmap/grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import diffusion as dm

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

DIFFUSERS_NAMES = {
  "linear": "linear",
  "scaled_linear": "scaled_linear",
  "cosine": "squaredcos_cap_v2",
}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_NAMES))
def test_schedules_match_diffusers(name):
  ours = dm.make_schedule(name, 1000)
  # diffusers keeps DDPM's endpoints unless told Stable Diffusion's.
  ends = {"beta_start": 0.00085, "beta_end": 0.012}
  ref = schedulers.DDPMScheduler(
    num_train_timesteps=1000,
    beta_schedule=DIFFUSERS_NAMES[name],
    **(ends if name == "scaled_linear" else {}),
  )
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), atol=1e-5)
  np.testing.assert_allclose(
    ours.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-5
  )


def test_unknown_schedule_lists_choices():
  with pytest.raises(ValueError, match="cosine"):
    dm.make_schedule("sigmoid")


def _random(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())


def _nhwc(t):
  return np.transpose(t.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_step_matches_diffusers(t):
  schedule = dm.linear_schedule(1000)
  ref = schedulers.DDPMScheduler(num_train_timesteps=1000)
  x, eps = _random((2, 4, 4, 3), 0), _random((2, 4, 4, 3), 1)
  gen = torch.Generator().manual_seed(7)
  expected = ref.step(_nchw(eps), t, _nchw(x), generator=gen).prev_sample
  noise = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(7))
  ours = dm.ddpm_update(schedule, x, t, eps, _nhwc(noise))
  np.testing.assert_allclose(ours, _nhwc(expected), atol=1e-5)


@pytest.mark.parametrize(
  ("spacing", "offset"), [("leading", 0), ("leading", 1), ("trailing", 0)]
)
def test_ddim_timesteps_match_diffusers(spacing, offset):
  ref = schedulers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
  ref.set_timesteps(50)
  ours = dm.ddim_timesteps(1000, 50, spacing=spacing, offset=offset)
  np.testing.assert_array_equal(ours, ref.timesteps.numpy())


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t", [980, 20])
def test_ddim_step_matches_diffusers(eta, t):
  schedule = dm.linear_schedule(1000)
  ref = schedulers.DDIMScheduler(num_train_timesteps=1000)
  ref.set_timesteps(50)
  x, eps, noise = (_random((2, 4, 4, 3), s) for s in range(3))
  expected = ref.step(
    _nchw(eps), t, _nchw(x), eta=eta, variance_noise=_nchw(noise)
  ).prev_sample
  ours = dm.ddim_update(schedule, x, t, t - 20, eps, noise, eta=eta)
  np.testing.assert_allclose(ours, _nhwc(expected), atol=1e-5)


# --- Composition: every public function under vmap or grad. ---------------


def test_schedules_vmap_over_parameters():
  ends = jnp.array([0.01, 0.02])
  abar = jax.vmap(lambda e: dm.linear_schedule(100, beta_end=e).alphas_cumprod)(
    ends
  )
  assert abar.shape == (2, 100)
  assert abar[0, -1] > abar[1, -1]  # less noise keeps more signal
  for build in (dm.scaled_linear_schedule, dm.cosine_schedule):
    ab = jax.vmap(lambda s, b=build: b(50, s).alphas_cumprod)(
      jnp.array([1e-3, 8e-3])
    )
    assert ab.shape == (2, 50) and bool(jnp.all(jnp.diff(ab) < 0))
  grad = jax.grad(lambda b: dm.schedule_from_betas(b).alphas_cumprod[-1])(
    jnp.full((10,), 0.1)
  )
  np.testing.assert_allclose(grad, -(0.9**9), rtol=1e-5)


def test_forward_process_inverts_and_differentiates():
  s = dm.linear_schedule(1000)
  x0, noise = _random((3, 4, 4, 1), 0), _random((3, 4, 4, 1), 1)
  t = jnp.array([0, 400, 999])
  xt = dm.q_sample(s, x0, t, noise)
  np.testing.assert_allclose(dm.predict_x0(s, xt, t, noise), x0, atol=1e-3)
  np.testing.assert_allclose(dm.predict_eps(s, xt, t, x0), noise, atol=1e-3)
  # d x_t / d x_0 = √ᾱ_t per pixel.
  g = jax.grad(lambda x: dm.q_sample(s, x, t, noise).sum())(x0)
  np.testing.assert_allclose(
    g[:, 0, 0, 0], jnp.sqrt(s.alphas_cumprod[t]), rtol=1e-6
  )
  # The posterior mean at the true x0 moves toward x0 as t falls: vmap over t.
  means = jax.vmap(lambda tt: dm.posterior_mean(s, x0, xt, tt))(
    jnp.stack([t, t])
  )
  assert means.shape == (2, *x0.shape)
  var = jax.vmap(lambda tt: dm.reverse_variance(s, tt, "fixed_large"))(
    jnp.stack([t, t + 0])
  )
  np.testing.assert_allclose(var[0, 1:], s.betas[t[1:]], rtol=1e-6)


def test_reverse_variance_kinds():
  s = dm.linear_schedule(1000)
  small = dm.reverse_variance(s, jnp.arange(1000), "fixed_small")
  large = dm.reverse_variance(s, jnp.arange(1000), "fixed_large")
  assert bool(jnp.all(small <= large * (1 + 1e-4)))  # β̃_t <= β_t
  np.testing.assert_allclose(large[0], s.posterior_variance[1], rtol=1e-6)
  with pytest.raises(ValueError, match="fixed_small"):
    dm.reverse_variance(s, 0, "learned")


def test_timestep_policies():
  s = dm.linear_schedule(1000)
  for policy in (
    dm.uniform_policy(1000),
    dm.window_policy(1000, 0, 200),
    dm.signal_policy(s),
    dm.snr_weight_policy(s),
    dm.concept_focal_policy(1000),
  ):
    np.testing.assert_allclose(policy.probs.sum(), 1.0, rtol=1e-5)
  # MACE's density puts most of its mass between t1 = 200 and t2 = 400.
  focal = dm.concept_focal_policy(1000).probs
  assert float(focal[200:401].sum()) > 0.8
  assert 200 <= int(focal.argmax()) <= 400
  t = dm.sample_timesteps(
    jax.random.key(0), dm.window_policy(1000, 10, 20), (500,)
  )
  assert int(t.min()) >= 10 and int(t.max()) < 20
  ts = jax.vmap(lambda k: dm.sample_timesteps(k, dm.uniform_policy(10), (4,)))(
    jax.random.split(jax.random.key(1), 3)
  )
  assert ts.shape == (3, 4)
  early = dm.signal_policy(s).probs
  assert early[0] > early[-1]
  assert (
    dm.snr_weight_policy(s).weights[0] > dm.snr_weight_policy(s).weights[-1]
  )
  with pytest.raises(ValueError, match="window"):
    dm.window_policy(1000, 500, 100)


def test_denoising_loss_is_zero_for_the_true_noise_and_differentiable():
  s = dm.linear_schedule(100)
  x0 = jnp.asarray(_random((4, 16, 16, 1), 0)).clip(-1, 1)

  def oracle(xt, t):  # recovers ε exactly from x_t because it knows x0
    return dm.predict_eps(s, xt, t, x0)

  loss = dm.denoising_loss(oracle, x0, jax.random.key(0), s)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  zero = lambda xt, t: jnp.zeros_like(xt)
  loss = dm.denoising_loss(zero, x0, jax.random.key(0), s)
  np.testing.assert_allclose(loss, 1.0, atol=0.3)  # E‖ε‖²/D = 1, D = 256

  def scaled(a, x):
    return dm.denoising_loss(
      lambda xt, t: a * xt, x, jax.random.key(0), s
    ).mean()

  ga, gx = jax.grad(scaled, argnums=(0, 1))(0.5, x0)
  assert np.isfinite(ga) and gx.shape == x0.shape and bool(jnp.any(gx != 0))
  per_key = jax.vmap(lambda k: dm.denoising_loss(zero, x0, k, s))(
    jax.random.split(jax.random.key(0), 3)
  )
  assert per_key.shape == (3, 4)


def test_guided_step_with_zero_energy_equals_unguided():
  s = dm.linear_schedule(1000)
  x = jnp.asarray(_random((2, 4, 4, 1), 0))
  eps_fn = lambda xt, t: 0.1 * xt
  key = jax.random.key(3)
  plain = dm.ddpm_step(eps_fn, x, 500, key, s)
  zero = lambda y, t, k: 0.0 * jnp.sum(y**2, axis=(1, 2, 3))
  np.testing.assert_array_equal(
    dm.ddpm_step(eps_fn, x, 500, key, s, energy_fn=zero), plain
  )


def test_guidance_pulls_toward_reference_and_vmaps_over_scale():
  s = dm.linear_schedule(1000)
  x = jnp.asarray(_random((2, 4, 4, 1), 0))
  ref = jnp.zeros_like(x)
  eps_fn = lambda xt, t: jnp.zeros_like(xt)
  mse = lambda y, t, k: jnp.sum((y - ref) ** 2, axis=(1, 2, 3))

  def step(scale):
    energy = dm.sum_energies([mse], [scale])
    return dm.ddpm_step(eps_fn, x, 900, jax.random.key(0), s, energy_fn=energy)

  scales = jnp.array([0.0, 1.0, 10.0])
  outs = jax.vmap(step)(scales)
  # Exact form: the mean moves by -σ² λ ∇E = -σ² λ 2 (x - ref), toward ref.
  var = dm.reverse_variance(s, 900)
  for i in (1, 2):
    shift = outs[i] - outs[0]
    np.testing.assert_allclose(
      shift, -var * scales[i] * 2 * (x - ref), rtol=1e-4, atol=1e-6
    )
    assert float(jnp.sum(shift * (ref - x))) > 0
  g = dm.energy_gradient(mse, x, jnp.zeros(2, jnp.int32), jax.random.key(0))
  np.testing.assert_allclose(g, 2 * x, rtol=1e-6)
  gm = jax.grad(
    lambda v: dm.guided_mean(x, v, x, 0, jax.random.key(0), mse).sum()
  )(1.0)
  np.testing.assert_allclose(gm, -(2 * x).sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="one scale per energy"):
    dm.sum_energies([mse], [1.0, 2.0])


def test_samplers_scan_and_vmap():
  s = dm.linear_schedule(100)
  x0 = jnp.full((2, 4, 4, 1), 0.5)
  oracle = lambda xt, t: dm.predict_eps(s, xt, t, x0)
  noise = jnp.asarray(_random((2, 4, 4, 1), 0))
  out = dm.ddpm_sample(oracle, noise, jax.random.key(0), s)
  np.testing.assert_allclose(out, x0, atol=1e-4)
  out = dm.ddim_sample(oracle, noise, jax.random.key(0), s, num_steps=10)
  np.testing.assert_allclose(out, x0, atol=1e-4)
  # vmap the DDIM sampler over eta and the mean/variance over timesteps.
  outs = jax.vmap(
    lambda e: dm.ddim_sample(
      oracle, noise, jax.random.key(0), s, num_steps=10, eta=e
    )
  )(jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(outs, jnp.stack([x0, x0]), atol=1e-4)
  mv = jax.vmap(lambda t: dm.ddpm_mean_variance(s, noise, t, noise)[1])(
    jnp.arange(3)
  )
  assert mv.shape == (3, 2, 1, 1, 1)
  g = jax.grad(
    lambda x: dm.ddim_update(s, x, 50, 40, 0.1 * x, jnp.zeros_like(x)).sum()
  )(noise)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_diffuse_and_denoise():
  s = dm.linear_schedule(1000)
  x0 = jnp.asarray(_random((2, 4, 4, 1), 0)).clip(-1, 1)
  oracle = lambda xt, t: dm.predict_eps(s, xt, t, x0)
  out = dm.diffuse_and_denoise(
    oracle, x0, jax.random.key(0), s, t_star=50, rounds=2
  )
  np.testing.assert_allclose(out, x0, atol=1e-4)
  # A denoiser that knows nothing blurs toward its prior: larger t*, further.
  zero = lambda xt, t: jnp.zeros_like(xt)
  dists = jax.vmap(
    lambda k: jnp.abs(
      dm.diffuse_and_denoise(zero, x0, k, s, t_star=300) - x0
    ).mean()
  )(jax.random.split(jax.random.key(0), 2))
  assert dists.shape == (2,)
  g = jax.grad(
    lambda x: dm.diffuse_and_denoise(
      oracle, x, jax.random.key(0), s, t_star=5
    ).sum()
  )(x0)
  assert g.shape == x0.shape
  with pytest.raises(ValueError, match="outside"):
    dm.diffuse_and_denoise(zero, x0, jax.random.key(0), s, t_star=1000)
  with pytest.raises(ValueError, match="rounds"):
    dm.diffuse_and_denoise(zero, x0, jax.random.key(0), s, t_star=10, rounds=0)


def test_remaining_functions_compose_with_vmap_and_grad():
  s = dm.linear_schedule(100)
  x, eps = (
    jnp.asarray(_random((2, 4, 4, 1), 0)),
    jnp.asarray(_random((2, 4, 4, 1), 1)),
  )
  t = jnp.array([10, 90])
  # predict_x0 / predict_eps are linear in their image argument.
  g = jax.grad(lambda e: dm.predict_x0(s, x, t, e).sum())(eps)
  np.testing.assert_allclose(
    g[:, 0, 0, 0],
    -jnp.sqrt(1 - s.alphas_cumprod[t]) / jnp.sqrt(s.alphas_cumprod[t]),
    rtol=1e-5,
  )
  g = jax.grad(lambda x0: dm.predict_eps(s, x, t, x0).sum())(x)
  assert bool(jnp.all(g < 0))
  # ddpm_update over a batch of noises; ddpm_sample over keys.
  outs = jax.vmap(lambda z: dm.ddpm_update(s, x, 50, eps, z))(
    jnp.stack([eps, -eps])
  )
  mean = dm.ddpm_mean_variance(s, x, 50, eps)[0]
  np.testing.assert_allclose((outs[0] + outs[1]) / 2, mean, atol=1e-6)
  samples = jax.vmap(
    lambda k: dm.ddpm_sample(lambda y, tt: 0.0 * y, x, k, s, t_start=5)
  )(jax.random.split(jax.random.key(0), 2))
  assert samples.shape == (2, *x.shape) and not jnp.allclose(
    samples[0], samples[1]
  )
  # Schedules by name and the schedule-derived policies under vmap.
  abar = jax.vmap(
    lambda e: dm.make_schedule("linear", 10, beta_end=e).alphas_cumprod
  )(jnp.array([0.01, 0.02]))
  assert abar.shape == (2, 10)
  probs = jax.vmap(
    lambda e: dm.signal_policy(dm.linear_schedule(10, 1e-4, e)).probs
  )(jnp.array([0.01, 0.5]))
  assert probs[1, -1] < probs[0, -1]  # more noise: late steps matter less
  w = jax.vmap(
    lambda e: dm.snr_weight_policy(dm.linear_schedule(10, 1e-4, e)).weights
  )(jnp.array([0.01, 0.5]))
  np.testing.assert_allclose(w.mean(axis=1), 1.0, rtol=1e-5)


def test_image_range_is_checked_at_the_entry_points():
  s = dm.linear_schedule(10)
  zero = lambda xt, t: jnp.zeros_like(xt)
  x255 = jnp.full((1, 4, 4, 1), 200.0)
  with pytest.raises(ValueError, match="to_model_range"):
    dm.denoising_loss(zero, x255, jax.random.key(0), s)
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    dm.diffuse_and_denoise(zero, x255, jax.random.key(0), s, t_star=3)
  with pytest.raises(ValueError, match="NHWC"):
    dm.denoising_loss(zero, jnp.zeros((4, 4)), jax.random.key(0), s)

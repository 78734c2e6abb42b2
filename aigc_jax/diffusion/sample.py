"""Reverse diffusion: DDPM ancestral and DDIM samplers as `lax.scan` loops.

Three layers, each usable alone:
  * `*_update`: the arithmetic of one step given ε̂ and the noise (what parity
    tests against diffusers check);
  * `*_step`: one step given a denoiser `eps_fn(x_t, t)` and a key;
  * `*_sample` and `diffuse_and_denoise`: whole loops.
Timesteps inside a loop are scalars shared by the batch.
"""

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.data.images import check_model_images
from aigc_jax.diffusion.guidance import EnergyFn, guided_mean
from aigc_jax.diffusion.loss import EpsFn
from aigc_jax.diffusion.process import (
  posterior_mean,
  predict_x0,
  q_sample,
  reverse_variance,
)
from aigc_jax.diffusion.schedules import NoiseSchedule


def _batch_t(t: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.full((x.shape[0],), t, jnp.int32)


def ddpm_mean_variance(
  schedule: NoiseSchedule,
  x_t: jax.Array,
  t: jax.Array,
  eps: jax.Array,
  *,
  variance: str = "fixed_small",
  clip_x0: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """μ_θ(x_t, t) and σ_t² of p(x_{t-1} | x_t), Ho et al. (2020) Eq. (11).

  The mean is computed through x̂_0 (clipped to [-1, 1] when `clip_x0`), as in
  Ho et al.'s code and diffusers' DDPMScheduler.
  """
  tb = _batch_t(t, x_t)
  x0 = predict_x0(schedule, x_t, tb, eps)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  var = reverse_variance(schedule, tb, variance)
  return posterior_mean(schedule, x0, x_t, tb), var.reshape(
    var.shape + (1,) * (x_t.ndim - 1)
  )


def ddpm_update(
  schedule: NoiseSchedule,
  x_t: jax.Array,
  t: jax.Array,
  eps: jax.Array,
  noise: jax.Array,
  *,
  variance: str = "fixed_small",
  clip_x0: bool = True,
) -> jax.Array:
  """x_{t-1} = μ_θ + σ_t z, with no noise added at t = 0."""
  mean, var = ddpm_mean_variance(
    schedule, x_t, t, eps, variance=variance, clip_x0=clip_x0
  )
  return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * noise


def ddpm_step(
  eps_fn: EpsFn,
  x_t: jax.Array,
  t: jax.Array,
  key: jax.Array,
  schedule: NoiseSchedule,
  *,
  variance: str = "fixed_small",
  clip_x0: bool = True,
  energy_fn: EnergyFn | None = None,
) -> jax.Array:
  """One guided ancestral step: x_{t-1} ~ N(μ_θ - σ_t² ∇E(x_t), σ_t² I).

  Args:
    eps_fn: the denoiser, `eps_fn(x_t, t)` with t of shape (B,).
    x_t: the current sample, (B, H, W, C).
    t: the current (scalar) timestep.
    key: randomness for the ancestral noise and the energy.
    schedule: the noise schedule.
    variance: "fixed_small" or "fixed_large" (see `reverse_variance`).
    clip_x0: clip the predicted x̂_0 to [-1, 1] before forming the mean.
    energy_fn: optional guidance energy, `energy_fn(x_t, t, key) -> (B,)`.

  Returns:
    x_{t-1}.
  """
  noise_key, energy_key = jax.random.split(key)
  mean, var = ddpm_mean_variance(
    schedule,
    x_t,
    t,
    eps_fn(x_t, _batch_t(t, x_t)),
    variance=variance,
    clip_x0=clip_x0,
  )
  mean = guided_mean(mean, var, x_t, _batch_t(t, x_t), energy_key, energy_fn)
  noise = jax.random.normal(noise_key, x_t.shape, x_t.dtype)
  return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * noise


def ddpm_sample(
  eps_fn: EpsFn,
  x_start: jax.Array,
  key: jax.Array,
  schedule: NoiseSchedule,
  *,
  t_start: int | None = None,
  variance: str = "fixed_small",
  clip_x0: bool = True,
  energy_fn: EnergyFn | None = None,
) -> jax.Array:
  """Ancestral sampling from x_{t_start} down to x_{-1} = the clean estimate.

  Args:
    eps_fn: the denoiser.
    x_start: x at step `t_start` (pure noise for full sampling).
    key: randomness; step t uses `fold_in(key, t)`.
    schedule: the noise schedule.
    t_start: the first reverse step (static); T - 1 when None.
    variance: see `ddpm_step`.
    clip_x0: see `ddpm_step`.
    energy_fn: optional guidance energy (see `ddpm_step`).

  Returns:
    The denoised batch.
  """
  t_start = schedule.num_timesteps - 1 if t_start is None else t_start
  _check_t(t_start, schedule)

  def body(x, t):
    x = ddpm_step(
      eps_fn,
      x,
      t,
      jax.random.fold_in(key, t),
      schedule,
      variance=variance,
      clip_x0=clip_x0,
      energy_fn=energy_fn,
    )
    return x, None

  x, _ = jax.lax.scan(body, x_start, jnp.arange(t_start, -1, -1))
  return x


def ddim_timesteps(
  num_timesteps: int,
  num_steps: int,
  *,
  spacing: str = "leading",
  offset: int = 0,
) -> np.ndarray:
  """The visited timesteps, in decreasing order, as in diffusers' schedulers.

  "leading": (0, r, 2r, ...) + offset with r = T // num_steps (Song et al.
  2021); "trailing": round(T, T - r, ..., r) - 1 with r = T / num_steps, which
  always starts from the noisiest step (Lin et al. 2024, Table 2).
  """
  if not 0 < num_steps <= num_timesteps:
    raise ValueError(
      f"num_steps={num_steps} must be in [1, {num_timesteps}] "
      "(the number of training timesteps)."
    )
  if spacing == "leading":
    ratio = num_timesteps // num_steps
    steps = (np.arange(num_steps) * ratio)[::-1] + offset
  elif spacing == "trailing":
    ratio = num_timesteps / num_steps
    steps = np.round(np.arange(num_timesteps, 0, -ratio)).astype(int) - 1
  else:
    raise ValueError(
      f"Unknown timestep spacing {spacing!r}; use 'leading' or 'trailing'."
    )
  return steps.astype(np.int32)


def ddim_update(
  schedule: NoiseSchedule,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  eps: jax.Array,
  noise: jax.Array,
  *,
  eta: float | jax.Array = 0.0,
  clip_x0: bool = True,
) -> jax.Array:
  """One DDIM step x_t -> x_{t_prev}, Song et al. (2021) Eq. (12).

  σ_t = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev); η = 0 is deterministic,
  η = 1 matches DDPM's posterior variance. `t_prev < 0` means ᾱ_prev = 1.
  Unlike diffusers' FlaxDDIMScheduler, η > 0 really adds σ_t z.
  """
  abar = schedule.alphas_cumprod[t]
  abar_prev = jnp.where(
    t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0
  )
  x0 = (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  var = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
  std = eta * jnp.sqrt(var)
  direction = jnp.sqrt(1.0 - abar_prev - std**2) * eps
  return jnp.sqrt(abar_prev) * x0 + direction + std * noise


def ddim_sample(
  eps_fn: EpsFn,
  x_start: jax.Array,
  key: jax.Array,
  schedule: NoiseSchedule,
  *,
  num_steps: int = 50,
  eta: float | jax.Array = 0.0,
  clip_x0: bool = True,
  spacing: str = "leading",
  offset: int = 0,
) -> jax.Array:
  """DDIM sampling from pure noise in `num_steps` steps (static).

  `spacing` and `offset` (a scheduler's `steps_offset`) pick the visited
  timesteps as `ddim_timesteps` does.
  """
  steps = ddim_timesteps(
    schedule.num_timesteps, num_steps, spacing=spacing, offset=offset
  )
  prev = np.append(steps[1:], -1).astype(np.int32)

  def body(x, ts):
    t, t_prev = ts
    noise = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype)
    eps = eps_fn(x, _batch_t(t, x))
    x = ddim_update(
      schedule, x, t, t_prev, eps, noise, eta=eta, clip_x0=clip_x0
    )
    return x, None

  x, _ = jax.lax.scan(body, x_start, (jnp.asarray(steps), jnp.asarray(prev)))
  return x


def diffuse_and_denoise(
  eps_fn: EpsFn,
  x0: jax.Array,
  key: jax.Array,
  schedule: NoiseSchedule,
  *,
  t_star: int,
  rounds: int = 1,
  variance: str = "fixed_small",
  clip_x0: bool = True,
  energy_fn: EnergyFn | None = None,
) -> jax.Array:
  """Partial diffusion: noise x0 to step t* with q(x_t* | x0), then run the
  (optionally guided) ancestral reverse process from t* to 0; repeat `rounds`
  times, each round starting from the previous output (Nie et al. 2022;
  LE's JCDP with `energy_fn`).

  Args:
    eps_fn: the denoiser.
    x0: the images to purify, (B, H, W, C) in [-1, 1].
    key: randomness; round r uses `fold_in(key, r)`.
    schedule: the noise schedule.
    t_star: the diffusion depth (static), 0 <= t* < T.
    rounds: diffuse-and-denoise repetitions (static).
    variance: see `ddpm_step`.
    clip_x0: see `ddpm_step`.
    energy_fn: optional guidance energy (see `ddpm_step`).

  Returns:
    The purified images.
  """
  check_model_images(x0, "x0")
  _check_t(t_star, schedule)
  if rounds < 1:
    raise ValueError(f"rounds={rounds} must be at least 1.")

  def one_round(x, r):
    noise_key, reverse_key = jax.random.split(jax.random.fold_in(key, r))
    noise = jax.random.normal(noise_key, x.shape, x.dtype)
    x_t = q_sample(schedule, x, _batch_t(t_star, x), noise)
    x = ddpm_sample(
      eps_fn,
      x_t,
      reverse_key,
      schedule,
      t_start=t_star,
      variance=variance,
      clip_x0=clip_x0,
      energy_fn=energy_fn,
    )
    return x, None

  x, _ = jax.lax.scan(one_round, x0, jnp.arange(rounds))
  return x


def _check_t(t: int, schedule: NoiseSchedule) -> None:
  if not 0 <= t < schedule.num_timesteps:
    raise ValueError(
      f"Timestep {t} is outside [0, {schedule.num_timesteps - 1}] for a "
      f"schedule of {schedule.num_timesteps} steps."
    )

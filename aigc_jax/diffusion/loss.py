"""The ε-prediction denoising loss, Ho et al. (2020) Eq. (14)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aigc_jax.data.images import check_model_images
from aigc_jax.diffusion.process import q_sample
from aigc_jax.diffusion.schedules import NoiseSchedule
from aigc_jax.diffusion.timesteps import (
  TimestepPolicy,
  sample_timesteps,
  uniform_policy,
)

# eps_fn(x_t, t) -> ε̂: a denoiser with its parameters (and dropout key) bound.
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def denoising_loss(
  eps_fn: EpsFn,
  x0: jax.Array,
  key: jax.Array,
  schedule: NoiseSchedule,
  *,
  policy: TimestepPolicy | None = None,
  latents: bool = False,
) -> jax.Array:
  """Per-example w(t) ‖ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖², t ~ p(t).

  The squared error is averaged over pixels, so with the uniform policy this
  is the DDPM "L_simple" objective. Differentiable in both the parameters bound
  into `eps_fn` (training) and `x0` (protective perturbations).

  Args:
    eps_fn: the denoiser, `eps_fn(x_t, t)` with t of shape (B,).
    x0: clean images, (B, H, W, C) in [-1, 1].
    key: randomness for t and ε.
    schedule: the noise schedule.
    policy: p(t) and w(t); uniform with unit weights when None.
    latents: x0 are latents of any shape and range (latent diffusion), not
      images, so they are not checked as images.

  Returns:
    The loss of each example, shape (B,).
  """
  if not latents:
    check_model_images(x0, "x0")
  if policy is None:
    policy = uniform_policy(schedule.num_timesteps)
  t_key, noise_key = jax.random.split(key)
  t = sample_timesteps(t_key, policy, (x0.shape[0],))
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  eps = eps_fn(q_sample(schedule, x0, t, noise), t)
  per_pixel = jnp.square(noise - eps).reshape(x0.shape[0], -1)
  return policy.weights[t] * per_pixel.mean(axis=-1)

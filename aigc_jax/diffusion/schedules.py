"""Noise schedules: the beta_t sequence and everything derived from it.

A schedule is a `NoiseSchedule` of plain arrays, so it can be passed through
`jit`, `vmap` and `grad` like any other pytree. Index `t` runs from 0 to T-1;
`alphas_cumprod[t]` is ᾱ_t of Ho et al. (2020), the signal kept after t+1
noising steps.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class NoiseSchedule(NamedTuple):
  """The discrete forward process q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I).

  Attributes:
    betas: β_t, shape (T,).
    alphas_cumprod: ᾱ_t = Π_{s<=t} (1 - β_s), shape (T,).
  """

  betas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[-1]

  @property
  def alphas_cumprod_prev(self) -> jax.Array:
    """ᾱ_{t-1}, with ᾱ_{-1} = 1 (no noise before the first step)."""
    ones = jnp.ones_like(self.alphas_cumprod[..., :1])
    return jnp.concatenate([ones, self.alphas_cumprod[..., :-1]], axis=-1)

  @property
  def step_betas(self) -> jax.Array:
    """β_t recomputed as 1 - ᾱ_t/ᾱ_{t-1}.

    Equal to `betas` in exact arithmetic; in float32 it is consistent with
    1 - ᾱ_t, so identities such as μ̃_0(x_0, x_t) = x_0 hold to rounding (as
    in diffusers' schedulers).
    """
    return 1.0 - self.alphas_cumprod / self.alphas_cumprod_prev

  @property
  def posterior_variance(self) -> jax.Array:
    """β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t), Ho et al. Eq. (7)."""
    return (
      self.step_betas
      * (1.0 - self.alphas_cumprod_prev)
      / (1.0 - self.alphas_cumprod)
    )


def schedule_from_betas(betas: jax.Array) -> NoiseSchedule:
  """Builds a schedule from β_t; ᾱ_t is their running product of (1 - β)."""
  betas = jnp.asarray(betas, jnp.float32)
  return NoiseSchedule(betas, jnp.cumprod(1.0 - betas, axis=-1))


def linear_schedule(
  num_timesteps: int = 1000,
  beta_start: float | jax.Array = 1e-4,
  beta_end: float | jax.Array = 0.02,
) -> NoiseSchedule:
  """β_t linear in t, the DDPM schedule (Ho et al. 2020, §4)."""
  frac = jnp.linspace(0.0, 1.0, num_timesteps, dtype=jnp.float32)
  return schedule_from_betas(beta_start + (beta_end - beta_start) * frac)


def scaled_linear_schedule(
  num_timesteps: int = 1000,
  beta_start: float | jax.Array = 0.00085,
  beta_end: float | jax.Array = 0.012,
) -> NoiseSchedule:
  """√β_t linear in t: the latent-diffusion / Stable Diffusion schedule."""
  frac = jnp.linspace(0.0, 1.0, num_timesteps, dtype=jnp.float32)
  start, end = jnp.sqrt(beta_start), jnp.sqrt(beta_end)
  return schedule_from_betas((start + (end - start) * frac) ** 2)


def cosine_schedule(
  num_timesteps: int = 1000,
  offset: float | jax.Array = 0.008,
  max_beta: float = 0.999,
) -> NoiseSchedule:
  """ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), Nichol & Dhariwal (2021) Eq. (17).

  β_t = 1 - ᾱ(t+1)/ᾱ(t), clipped at `max_beta` to avoid a singularity at T.
  In the complementary angles c(t) = π/2 - φ(t) = (1 - t/T)/(1 + s) · π/2,
  with a = c(t+1) and b = c(t), this is (sin²b - sin²a)/sin²b
  = sin(b+a) sin(b-a) / sin²b: no float32 cancellation anywhere, even at T.
  """
  # Angles from exact integer counts, so b - a and b + a are each one rounding.
  unit = (math.pi / 2) / (num_timesteps * (1.0 + offset))
  remaining = jnp.arange(num_timesteps, 0, -1, dtype=jnp.float32)  # T - t
  betas = (
    jnp.sin((2.0 * remaining - 1.0) * unit)
    * jnp.sin(unit)
    / jnp.sin(remaining * unit) ** 2
  )
  return schedule_from_betas(jnp.minimum(betas, max_beta))


SCHEDULES = {
  "linear": linear_schedule,
  "scaled_linear": scaled_linear_schedule,
  "cosine": cosine_schedule,
}


def make_schedule(
  name: str, num_timesteps: int = 1000, **kwargs
) -> NoiseSchedule:
  """Looks a schedule up by name: one of `SCHEDULES`."""
  if name not in SCHEDULES:
    raise ValueError(
      f"Unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}."
    )
  return SCHEDULES[name](num_timesteps, **kwargs)

"""The forward process q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0).

All functions take integer timesteps `t` of shape (B,) (or scalars) and images
of shape (B, ...); per-timestep coefficients are broadcast over the trailing
image axes.
"""

import jax
import jax.numpy as jnp

from aigc_jax.diffusion.schedules import NoiseSchedule


def _at(values: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
  """values[t] reshaped to broadcast against `like` (B, ...)."""
  v = jnp.take(values, jnp.asarray(t, jnp.int32), axis=-1)
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def q_sample(
  schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
  """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, Ho et al. (2020) Eq. (4)."""
  abar = _at(schedule.alphas_cumprod, t, x0)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def predict_x0(
  schedule: NoiseSchedule, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
  """x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t, the inverse of `q_sample`."""
  abar = _at(schedule.alphas_cumprod, t, x_t)
  return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def predict_eps(
  schedule: NoiseSchedule, x_t: jax.Array, t: jax.Array, x0: jax.Array
) -> jax.Array:
  """ε̂ = (x_t - √ᾱ_t x̂_0) / √(1-ᾱ_t), the noise implied by a clean estimate."""
  abar = _at(schedule.alphas_cumprod, t, x_t)
  return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def posterior_mean(
  schedule: NoiseSchedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> jax.Array:
  """μ̃_t(x_t, x_0) of q(x_{t-1} | x_t, x_0), Ho et al. (2020) Eq. (7)."""
  abar = _at(schedule.alphas_cumprod, t, x_t)
  abar_prev = _at(schedule.alphas_cumprod_prev, t, x_t)
  beta = _at(schedule.step_betas, t, x_t)
  coef_x0 = beta * jnp.sqrt(abar_prev) / (1.0 - abar)
  coef_xt = (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) / (1.0 - abar)
  return coef_x0 * x0 + coef_xt * x_t


VARIANCES = ("fixed_small", "fixed_large")


def reverse_variance(
  schedule: NoiseSchedule, t: jax.Array, kind: str = "fixed_small"
) -> jax.Array:
  """σ_t² of the reverse step p(x_{t-1} | x_t) = N(μ, σ_t² I).

  Args:
    schedule: the noise schedule.
    t: integer timesteps.
    kind: "fixed_small" is the posterior variance β̃_t (lower bound of Ho et
      al. §3.2); "fixed_large" is β_t with σ_0² = β̃_1 as in Ho et al.'s code,
      so that log σ_0² stays finite (diffusers keeps β_0 there instead).

  Returns:
    σ_t², with the shape of `t`.
  """
  if kind == "fixed_small":
    # β̃_0 = 0 exactly; clip as diffusers does so that log-variances stay finite.
    values = jnp.maximum(schedule.posterior_variance, 1e-20)
  elif kind == "fixed_large":
    values = schedule.betas.at[..., 0].set(schedule.posterior_variance[..., 1])
  else:
    raise ValueError(f"Unknown variance {kind!r}; choose one of {VARIANCES}.")
  return jnp.take(values, jnp.asarray(t, jnp.int32), axis=-1)

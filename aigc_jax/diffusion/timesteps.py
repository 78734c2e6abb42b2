"""Which timesteps a denoising objective looks at, and how much each counts.

A `TimestepPolicy` holds a sampling distribution p(t) and a loss weight w(t),
both as arrays over the T timesteps. DDPM training uses the uniform policy
with unit weights (Ho et al. 2020, Eq. (14)); EUDP chooses them from the noise
schedule so a protective perturbation is optimised where it matters most.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from aigc_jax.diffusion.schedules import NoiseSchedule


class TimestepPolicy(NamedTuple):
  """p(t) and w(t) over the T timesteps.

  Attributes:
    probs: sampling probabilities, shape (T,), summing to 1.
    weights: loss weights, shape (T,).
  """

  probs: jax.Array
  weights: jax.Array


def sample_timesteps(
  key: jax.Array, policy: TimestepPolicy, shape: tuple[int, ...]
) -> jax.Array:
  """Draws integer timesteps t ~ p(t) of the given shape."""
  return jax.random.categorical(key, jnp.log(policy.probs), shape=shape)


def uniform_policy(num_timesteps: int) -> TimestepPolicy:
  """p(t) uniform over all steps, w(t) = 1: the DDPM "simple" loss."""
  ones = jnp.ones((num_timesteps,), jnp.float32)
  return TimestepPolicy(ones / num_timesteps, ones)


def window_policy(num_timesteps: int, t_min: int, t_max: int) -> TimestepPolicy:
  """p(t) uniform on t_min <= t < t_max and zero elsewhere; w(t) = 1."""
  if not 0 <= t_min < t_max <= num_timesteps:
    raise ValueError(
      f"Timestep window [{t_min}, {t_max}) must satisfy "
      f"0 <= t_min < t_max <= {num_timesteps}."
    )
  t = jnp.arange(num_timesteps)
  mask = ((t >= t_min) & (t < t_max)).astype(jnp.float32)
  return TimestepPolicy(mask / mask.sum(), jnp.ones_like(mask))


def signal_policy(schedule: NoiseSchedule) -> TimestepPolicy:
  """p(t) ∝ √ᾱ_t, the factor by which a perturbation of x_0 reaches x_t."""
  signal = jnp.sqrt(schedule.alphas_cumprod)
  return TimestepPolicy(signal / signal.sum(), jnp.ones_like(signal))


def snr_sampling_policy(schedule: NoiseSchedule) -> TimestepPolicy:
  """p(t) ∝ √SNR(t) = √ᾱ_t / √(1 - ᾱ_t), w(t) = 1: timesteps drawn in
  proportion to how far a perturbation of x_0 stands above the noise added
  at t (EUDP's "timestep-aware sampling based on forward-process noise
  scales")."""
  abar = schedule.alphas_cumprod
  root_snr = jnp.sqrt(abar / (1.0 - abar))
  return TimestepPolicy(root_snr / root_snr.sum(), jnp.ones_like(root_snr))


def snr_weight_policy(schedule: NoiseSchedule) -> TimestepPolicy:
  """p(t) uniform with w(t) ∝ √SNR(t) = √(ᾱ_t / (1 - ᾱ_t)), mean weight 1."""
  abar = schedule.alphas_cumprod
  root_snr = jnp.sqrt(abar / (1.0 - abar))
  t = abar.shape[-1]
  return TimestepPolicy(
    jnp.full((t,), 1.0 / t, jnp.float32), root_snr / root_snr.mean()
  )


def concept_focal_policy(
  num_timesteps: int,
  t1: float = 200.0,
  t2: float = 400.0,
  gamma: float = 0.05,
) -> TimestepPolicy:
  """MACE's concept-focal importance sampling (Lu et al. 2024, Eq. 5).

  p(t) ∝ σ(γ(t − t1)) − σ(γ(t − t2)): most mass on t1 ≤ t ≤ t2, where the
  cross-attention maps settle the layout of the concept; w(t) = 1.
  """
  t = jnp.arange(num_timesteps, dtype=jnp.float32)
  density = jax.nn.sigmoid(gamma * (t - t1)) - jax.nn.sigmoid(gamma * (t - t2))
  return TimestepPolicy(density / density.sum(), jnp.ones_like(density))

"""Energy guidance for the reverse process.

An energy function scores how far the current trajectory x_t is from what the
caller wants (for JCDP: the protected image diffused to the same step). The
guided reverse step shifts the posterior mean by -σ_t² ∇_x E(x_t), so that
p(x_{t-1} | x_t) ∝ N(μ, σ_t²) · exp(-E) to first order (Dhariwal & Nichol 2021,
Eq. (10) with E = -log p(y | x)).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

# energy_fn(x_t, t, key) -> per-example energies, shape (B,).
EnergyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def energy_gradient(
  energy_fn: EnergyFn, x: jax.Array, t: jax.Array, key: jax.Array
) -> jax.Array:
  """∇_x of each example's energy (examples are independent, so the gradient
  of the sum is the per-example gradient)."""
  return jax.grad(lambda y: jnp.sum(energy_fn(y, t, key)))(x)


def guided_mean(
  mean: jax.Array,
  variance: jax.Array,
  x: jax.Array,
  t: jax.Array,
  key: jax.Array,
  energy_fn: EnergyFn | None,
) -> jax.Array:
  """μ - σ_t² ∇_x E(x_t): the guided mean; μ unchanged when energy_fn is None.

  This is the LE paper's x*_{t-1} ~ N(μ_φ + σ_t² (d1 + d2), σ_t² I) with
  d = -∇ E for E = λ1 D_m + λ2 D_p.
  """
  if energy_fn is None:
    return mean
  return mean - variance * energy_gradient(energy_fn, x, t, key)


def sum_energies(
  energy_fns: Sequence[EnergyFn], scales: Sequence[float | jax.Array]
) -> EnergyFn:
  """Σ_i λ_i E_i: combines energies (λ may be traced, e.g. under vmap)."""
  if len(energy_fns) != len(scales):
    raise ValueError(
      f"Got {len(energy_fns)} energy functions but {len(scales)} scales; "
      "pass one scale per energy."
    )

  def energy(x, t, key):
    keys = jax.random.split(key, len(energy_fns))
    return sum(
      s * fn(x, t, k) for fn, s, k in zip(energy_fns, scales, keys, strict=True)
    )

  return energy

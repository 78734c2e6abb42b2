"""Joint-Conditional Diffusion Purification (JCDP), the purifier of LE
(Jiang et al., ACM MM 2023), and its unguided special case, AVATAR-style
diffusion purification (Dolatabadi et al. 2023; Nie et al. 2022).

The protected image x_u is diffused to t* and denoised by a DDPM trained on
other, clean data, so that the output lies on the clean manifold. JCDP guides
each reverse step toward x_u diffused to the same step, x_t (the paper's
reverse step; Jiang et al., ACM MM 2023):

  x*_{t-1} ~ N(μ_φ(x*_t, t) + σ_t² (d1 + d2), σ_t² I),
  d1 = -λ1(t) ∇ D_m(x*_t, x_t),   d2 = -λ2(t) ∇ D_p(x*_t, x_t),

with D_m the per-image mean squared error and D_p LPIPS. This is the shared
guided reverse step (`diffusion.ddpm_step` with an energy) with the energy
λ1 D_m + λ2 D_p; nothing else is specific to JCDP.

Two schedules for λ(t), the paper's and its released code's:
  * "paper": λ1 and λ2 constant, both terms at every step;
  * "original": the released code's, λ(t) = scale · √(1-ᾱ_t) / √ᾱ_t, with
    the MSE term alone for t > `split` and the LPIPS term alone for
    t <= `split`. The released config (guide_scale 70000, ptb 8, means over a
    batch of 500) is `OFFICIAL_SCALE` for both terms.
The reference x_t takes fresh noise at every step and is always built from
the original protected input, never from the previous round's output, as in
the released code.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from aigc_jax.data.images import check_model_images
from aigc_jax.diffusion.guidance import EnergyFn
from aigc_jax.diffusion.loss import EpsFn
from aigc_jax.diffusion.process import q_sample
from aigc_jax.diffusion.sample import diffuse_and_denoise
from aigc_jax.diffusion.schedules import NoiseSchedule
from aigc_jax.models.lpips import lpips_distance, resize_for_lpips

GUIDANCE_SCHEDULES = ("paper", "original")

# The released config's strength in the "original" schedule: its scale
# 1 / m = guide_scale / (2 ptb / 255 / 3) with guide_scale = 70000, ptb = 8,
# divided by the batch of 500 its MSE and LPIPS are averaged over.
OFFICIAL_SCALE = 70000.0 / (2 * 8.0 / 255 / 3) / 500

# distance(x, y) -> (B,): a per-image distance between two NHWC batches.
Distance = Callable[[jax.Array, jax.Array], jax.Array]


def mse_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """D_m: the mean squared error of each image, (B,)."""
  return jnp.mean((x - y) ** 2, axis=tuple(range(1, x.ndim)))


def lpips_guidance_distance(
  lpips_variables: dict, *, size: int | None = None
) -> Distance:
  """D_p: LPIPS between the two batches, after a bilinear resize to
  `size` x `size` when the images are smaller than the backbone accepts."""

  def distance(x, y):
    if size is not None:
      x, y = resize_for_lpips(x, size), resize_for_lpips(y, size)
    return lpips_distance(lpips_variables, x, y)

  return distance


def guidance_weights(
  schedule: NoiseSchedule,
  form: str,
  *,
  mse_scale: float | jax.Array,
  lpips_scale: float | jax.Array,
  split: int = 10,
) -> tuple[jax.Array, jax.Array]:
  """λ1(t) and λ2(t) for every timestep, each of shape (T,).

  Args:
    schedule: the noise schedule.
    form: "paper" (constant λ, both terms at every step) or "original" (the
      released code's growing scale and its MSE-early, LPIPS-late split).
    mse_scale: the strength of d1 (may be traced, e.g. under vmap).
    lpips_scale: the strength of d2.
    split: for "original", the last step guided by the MSE term is split + 1.

  Returns:
    (λ1, λ2).
  """
  if form not in GUIDANCE_SCHEDULES:
    raise ValueError(
      f"Unknown guidance schedule {form!r}; use one of {GUIDANCE_SCHEDULES}."
    )
  ones = jnp.ones_like(schedule.alphas_cumprod)
  if form == "paper":
    return mse_scale * ones, lpips_scale * ones
  abar = schedule.alphas_cumprod
  growth = jnp.sqrt(1.0 - abar) / jnp.sqrt(abar)
  late = jnp.arange(abar.shape[-1]) > split
  return (
    mse_scale * growth * late,
    lpips_scale * growth * ~late,
  )


def weighted_term(
  weight: jax.Array, distance: Distance, x: jax.Array, y: jax.Array
) -> jax.Array:
  """weight * distance(x, y), without evaluating the distance at steps
  whose weight is zero (the "original" schedule zeroes each term on half
  the steps, and LPIPS costs more than the denoiser on small images).

  `weight` is per image, (B,). A `lax.cond` on whether any is non-zero
  skips the work when the step is not vmapped over (vmap over images keeps
  the step shared); vmapped over weights it becomes a select and computes
  both sides, with the same result.
  """
  return jax.lax.cond(
    jnp.any(weight != 0),
    lambda: weight * distance(x, y),
    lambda: jnp.zeros(x.shape[:1], x.dtype),
  )


def joint_energy(
  protected: jax.Array,
  schedule: NoiseSchedule,
  mse_weights: jax.Array,
  lpips_weights: jax.Array,
  perceptual: Distance | None,
) -> EnergyFn:
  """E(x*_t) = λ1(t) D_m(x*_t, x_t) + λ2(t) D_p(x*_t, x_t), where
  x_t = √ᾱ_t x_u + √(1-ᾱ_t) ε' is the protected input diffused to step t
  with fresh noise ε' drawn from the step's key.

  `perceptual` may be None when the LPIPS weights are all zero (pure MSE
  guidance); its term is then left out of the computation.
  """

  def energy(x, t, key):
    noise = jax.random.normal(key, protected.shape, protected.dtype)
    reference = q_sample(schedule, protected, t, noise)
    value = weighted_term(mse_weights[t], mse_distance, x, reference)
    if perceptual is not None:
      value += weighted_term(lpips_weights[t], perceptual, x, reference)
    return value

  return energy


def jcdp_purify(
  eps_fn: EpsFn,
  protected: jax.Array,
  key: jax.Array,
  schedule: NoiseSchedule,
  *,
  t_star: int = 20,
  rounds: int = 4,
  form: str = "original",
  mse_scale: float | jax.Array = OFFICIAL_SCALE,
  lpips_scale: float | jax.Array = OFFICIAL_SCALE,
  split: int = 10,
  lpips_variables: dict | None = None,
  lpips_size: int | None = None,
  variance: str = "fixed_large",
) -> jax.Array:
  """LE's purification: `rounds` times diffuse to t* and denoise with the
  joint-conditional guided step (the defaults are the released config).

  Args:
    eps_fn: the DDPM denoiser, trained on clean data other than `protected`.
    protected: the protected images, (B, H, W, C) in [-1, 1].
    key: randomness.
    schedule: the DDPM's noise schedule.
    t_star: the diffusion depth (static).
    rounds: diffuse-and-denoise repetitions (static).
    form: "paper" or "original" (see `guidance_weights`).
    mse_scale: the strength λ1 of the MSE term (may be traced).
    lpips_scale: the strength λ2 of the LPIPS term (may be traced).
    split: see `guidance_weights`.
    lpips_variables: from `models.load_lpips`; None only for MSE-only
      guidance (`lpips_scale=0`).
    lpips_size: resize to this side before LPIPS (for small images).
    variance: the reverse variance; the released code uses "fixed_large".

  Returns:
    The purified images in [-1, 1].
  """
  check_model_images(protected, "protected")
  mse_weights, lpips_weights = guidance_weights(
    schedule, form, mse_scale=mse_scale, lpips_scale=lpips_scale, split=split
  )
  if lpips_variables is None:
    if not isinstance(lpips_scale, jax.core.Tracer) and lpips_scale == 0:
      perceptual = None
    else:
      raise ValueError(
        "The LPIPS guidance term needs its network: pass "
        "lpips_variables=aigc_jax.models.load_lpips('alex'), or set "
        "lpips_scale=0 for MSE-only guidance."
      )
  else:
    perceptual = lpips_guidance_distance(lpips_variables, size=lpips_size)
  energy = joint_energy(
    protected, schedule, mse_weights, lpips_weights, perceptual
  )
  return diffuse_and_denoise(
    eps_fn,
    protected,
    key,
    schedule,
    t_star=t_star,
    rounds=rounds,
    variance=variance,
    energy_fn=energy,
  )


def diffusion_purify(
  eps_fn: EpsFn,
  protected: jax.Array,
  key: jax.Array,
  schedule: NoiseSchedule,
  *,
  t_star: int = 20,
  rounds: int = 4,
  variance: str = "fixed_large",
) -> jax.Array:
  """Unguided purification, the AVATAR-style baseline: the same diffusion
  and reverse process as `jcdp_purify` without the joint conditioning."""
  return diffuse_and_denoise(
    eps_fn,
    protected,
    key,
    schedule,
    t_star=t_star,
    rounds=rounds,
    variance=variance,
  )


def per_image_purifier(
  eps_fn_of: Callable[[Any], EpsFn],
  schedule: NoiseSchedule,
  key: jax.Array,
  guidance: dict | None,
  **common,
) -> Callable[[Any, dict | None, jax.Array, jax.Array], jax.Array]:
  """`fn(params, lpips_variables, images, indices) -> purified`, jitted: a
  batch in [-1, 1] purified image by image, image i with its own key
  `fold_in(key, i)` (vmapped), so that the result depends neither on the
  batch nor on the device count. The weights are arguments, not constants
  baked into the program.

  Args:
    eps_fn_of: `params -> eps_fn`, the purifying DDPM.
    schedule: its noise schedule.
    key: randomness, folded with each image's index.
    guidance: None for AVATAR-style `diffusion_purify`; else `jcdp_purify`'s
      guidance keywords (form, mse_scale, lpips_scale, split, lpips_size).
    **common: t_star, rounds, variance.
  """

  def purify_one(params, lpips_variables, x, index):
    k = jax.random.fold_in(key, index)
    if guidance is None:
      out = diffusion_purify(eps_fn_of(params), x[None], k, schedule, **common)
    else:
      out = jcdp_purify(
        eps_fn_of(params),
        x[None],
        k,
        schedule,
        lpips_variables=lpips_variables,
        **guidance,
        **common,
      )
    return jnp.clip(out[0], -1.0, 1.0)

  return jax.jit(jax.vmap(purify_one, in_axes=(None, None, 0, 0)))

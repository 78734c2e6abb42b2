"""Feature unlearning for pre-trained generators (Moon, Cho and Kim, "Feature
Unlearning for Pre-trained GANs and VAEs", AAAI 2024, arXiv 2303.05699).

A user marks generated samples that show a feature (positive latents) and
some that do not (negative latents). The feature's direction in latent space
is z_e = mean(Z+) - mean(Z-); a latent whose projection on z_e reaches the
threshold t has the feature (sim = 1), and moving it back along z_e onto the
threshold removes it. The generator g_θ, initialised from the frozen
pre-trained f, is fine-tuned so that

  L_recon   = (1 - sim) ||g_θ(z) - f(z)||_1
  L_unlearn = sim ||g_θ(z) - f(ẑ)||_1
  L_percep  = sim (1 - MS-SSIM(g_θ(z), f(ẑ)))
  L         = α (L_unlearn + L_percep) + L_recon,   ẑ = z - (proj(z) - t) ẑ_e

with z ~ p(z) fresh every step. Everything takes a `generator(params, z)`
function that maps (B, d) latents to NHWC images in [-1, 1]; hierarchical
latents are flattened into one vector first (the paper's footnote 1).

Implementation choice (the paper leaves it open): the shift uses the unit
vector ẑ_e = z_e / ||z_e||, so the shifted latent lands exactly on the
threshold; `unit_shift=False` gives the literal z - (proj - t) z_e.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aigc_jax.metrics import MS_SSIM_WEIGHTS, ms_ssim

GeneratorFn = Callable[[Any, jax.Array], jax.Array]

# MS-SSIM for 28x28 digits: the first three of the five standard scales
# (28 -> 14 -> 7) with a 7x7 window; the 11x11, five-scale default needs
# 176x176 images.
DIGIT_MS_SSIM = {
  "weights": MS_SSIM_WEIGHTS[:3],
  "filter_size": 7,
  "filter_sigma": 1.0,
}


def _check_latents(z: jax.Array, name: str) -> None:
  if z.ndim != 2:
    raise ValueError(
      f"{name} must be (N, latent_dim), got shape {z.shape}; flatten "
      "hierarchical or spatial latents into one vector per sample first."
    )
  if z.shape[0] == 0:
    raise ValueError(
      f"{name} is empty: label at least one sample with and one without "
      "the feature."
    )


def target_direction(z_pos: jax.Array, z_neg: jax.Array) -> jax.Array:
  """z_e = mean(Z+) - mean(Z-), the feature's direction (step 2)."""
  _check_latents(z_pos, "z_pos")
  _check_latents(z_neg, "z_neg")
  return z_pos.mean(0) - z_neg.mean(0)


def latent_projection(z: jax.Array, direction: jax.Array) -> jax.Array:
  """proj_{z_e}(z) = z_eᵀ z / ||z_e||, per latent: (B, d) -> (B,)."""
  return z @ direction / jnp.linalg.norm(direction)


def projection_threshold(
  z_pos: jax.Array, z_neg: jax.Array, direction: jax.Array
) -> jax.Array:
  """t: the mean projection of all labelled latents, positive and negative
  together (step 3)."""
  return latent_projection(jnp.concatenate([z_pos, z_neg]), direction).mean()


def has_feature(
  z: jax.Array, direction: jax.Array, threshold: jax.Array
) -> jax.Array:
  """sim(z, z_e): 1.0 where proj_{z_e}(z) >= t, else 0.0 (step 4)."""
  return (latent_projection(z, direction) >= threshold).astype(z.dtype)


def remove_feature(
  z: jax.Array,
  direction: jax.Array,
  threshold: jax.Array,
  *,
  unit_shift: bool = True,
) -> jax.Array:
  """ẑ = z - (proj_{z_e}(z) - t) ẑ_e: z moved along the feature direction
  onto the threshold (step 5). Applied to every latent; the losses use it
  only where sim = 1."""
  shift = direction / jnp.linalg.norm(direction) if unit_shift else direction
  excess = latent_projection(z, direction) - threshold
  return z - excess[:, None] * shift


def feature_unlearning_losses(
  generator: GeneratorFn,
  params: Any,
  teacher_params: Any,
  z: jax.Array,
  direction: jax.Array,
  threshold: jax.Array,
  *,
  unit_shift: bool = True,
  ms_ssim_kwargs: dict | None = None,
) -> dict[str, jax.Array]:
  """The three losses of step 6, each the batch mean of the per-latent
  term (masked terms count as 0, so each is E_z[...]).

  Args:
    generator: `generator(params, z) -> images` in [-1, 1].
    params: the student's parameters (θ).
    teacher_params: the frozen pre-trained parameters (f).
    z: (B, d) latents from the prior.
    direction: z_e, (d,).
    threshold: t.
    unit_shift: see `remove_feature`.
    ms_ssim_kwargs: passed to `metrics.ms_ssim` (default `DIGIT_MS_SSIM`).

  Returns:
    {"recon", "unlearn", "percep", "share"}: the losses and the share of
    the batch with the feature.
  """
  sim = jax.lax.stop_gradient(has_feature(z, direction, threshold))
  z_free = remove_feature(z, direction, threshold, unit_shift=unit_shift)
  teacher = jax.lax.stop_gradient(
    generator(teacher_params, jnp.concatenate([z, z_free]))
  )
  keep, target = teacher[: z.shape[0]], teacher[z.shape[0] :]
  student = generator(params, z)
  l1 = lambda a, b: jnp.abs(a - b).mean(axis=tuple(range(1, a.ndim)))
  similarity = ms_ssim(student, target, **(ms_ssim_kwargs or DIGIT_MS_SSIM))
  return {
    "recon": ((1 - sim) * l1(student, keep)).mean(),
    "unlearn": (sim * l1(student, target)).mean(),
    "percep": (sim * (1 - similarity)).mean(),
    "share": sim.mean(),
  }


class FeatureUnlearningState(NamedTuple):
  """The student's parameters and optimiser state."""

  step: jax.Array
  params: Any
  opt_state: Any


def init_feature_unlearning(
  params: Any, optimizer: optax.GradientTransformation
) -> FeatureUnlearningState:
  """The student starts as a copy of the pre-trained generator."""
  return FeatureUnlearningState(
    jnp.zeros((), jnp.int32), params, optimizer.init(params)
  )


def feature_unlearning_step(
  state: FeatureUnlearningState,
  z: jax.Array,
  *,
  generator: GeneratorFn,
  teacher_params: Any,
  direction: jax.Array,
  threshold: jax.Array,
  optimizer: optax.GradientTransformation,
  alpha: float = 1.0,
  unit_shift: bool = True,
  ms_ssim_kwargs: dict | None = None,
) -> tuple[FeatureUnlearningState, dict[str, jax.Array]]:
  """One optimiser step on L = α (L_unlearn + L_percep) + L_recon.

  Returns:
    The new state and the losses (with "loss", the total).
  """

  def loss_fn(params):
    parts = feature_unlearning_losses(
      generator,
      params,
      teacher_params,
      z,
      direction,
      threshold,
      unit_shift=unit_shift,
      ms_ssim_kwargs=ms_ssim_kwargs,
    )
    total = alpha * (parts["unlearn"] + parts["percep"]) + parts["recon"]
    return total, parts

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return FeatureUnlearningState(state.step + 1, params, opt_state), {
    "loss": loss,
    **parts,
  }


def unlearn_feature(
  generator: GeneratorFn,
  params: Any,
  direction: jax.Array,
  threshold: jax.Array,
  key: jax.Array,
  *,
  steps: int,
  batch_size: int = 64,
  learning_rate: float = 1e-4,
  alpha: float = 1.0,
  unit_shift: bool = True,
  ms_ssim_kwargs: dict | None = None,
) -> tuple[Any, dict[str, jax.Array]]:
  """Fine-tunes a copy of `params` with Adam for `steps` steps, z ~ N(0, I)
  drawn fresh each step (a `lax.scan`; jit it, or drive
  `feature_unlearning_step` yourself for checkpoints and progress).

  Returns:
    (the student's parameters, the losses at every step).
  """
  optimizer = optax.adam(learning_rate)
  step = lambda state, k: feature_unlearning_step(
    state,
    jax.random.normal(k, (batch_size, direction.shape[0])),
    generator=generator,
    teacher_params=params,
    direction=direction,
    threshold=threshold,
    optimizer=optimizer,
    alpha=alpha,
    unit_shift=unit_shift,
    ms_ssim_kwargs=ms_ssim_kwargs,
  )
  state, losses = jax.lax.scan(
    step,
    init_feature_unlearning(params, optimizer),
    jax.random.split(key, steps),
  )
  return state.params, losses


# Labelling the feature (step 1): which generated samples show it.


def classifier_labels(
  logits: jax.Array, target_class: int, min_probability: float = 0.5
) -> jax.Array:
  """True where a classifier gives `target_class` at least
  `min_probability` (for digits: "this sample is a 1")."""
  return jax.nn.softmax(logits)[:, target_class] >= min_probability


def stroke_thickness(images: jax.Array, level: float = 0.0) -> jax.Array:
  """Mean stroke width in pixels of bright-on-dark strokes, per image.

  Ink is every pixel above `level` ([-1, 1] images); a stroke of width w
  and length L covers A ≈ w L pixels of which B ≈ 2 L lie on its edge (an
  ink pixel with a 4-neighbour that is background), so w ≈ 2 A / B.
  Images with no ink get 0.
  """
  ink = (images[..., 0] > level).astype(jnp.float32)
  padded = jnp.pad(ink, ((0, 0), (1, 1), (1, 1)))
  interior = (
    padded[:, :-2, 1:-1]
    * padded[:, 2:, 1:-1]
    * padded[:, 1:-1, :-2]
    * padded[:, 1:-1, 2:]
  )
  area = ink.sum((1, 2))
  edge = (ink * (1 - interior)).sum((1, 2))
  return 2 * area / jnp.maximum(edge, 1.0)


def top_fraction_labels(scores: jax.Array, fraction: float = 0.1) -> jax.Array:
  """True for the top `fraction` of `scores`: the positive set of a
  non-binary feature (the paper takes the top 10%)."""
  if not 0 < fraction < 1:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
  return scores >= jnp.quantile(scores, 1 - fraction)

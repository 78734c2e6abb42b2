"""UDP and EUDP: unlearnable perturbations against diffusion-model training,
and AdvDM, the fixed-model baseline.

UDP solves the max-min problem (protection-methods.md §4.2)

  max_{‖δ_i‖ ≤ ε} min_θ Σ_i E_{t~p(t), ε} w(t) ‖ε - ε_θ(√ᾱ_t (x_i + δ_i)
                                                  + √(1-ᾱ_t) ε, t)‖²,

alternating surrogate-training steps on the protected images (inner min) with
PGD ascent on δ (outer max). EUDP lets the noise schedule choose p(t) and
w(t) (`EUDP_POLICIES`). AdvDM (Liang et al. 2023) is the outer max alone,
against a fixed model trained on clean data.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aigc_jax.diffusion import (
  EpsFn,
  NoiseSchedule,
  TimestepPolicy,
  denoising_loss,
  signal_policy,
  snr_weight_policy,
  uniform_policy,
  window_policy,
)
from aigc_jax.protect.pgd import Budget, apply_perturbation, pgd
from aigc_jax.train.ddpm import DDPMState, ddpm_eps_fn, ddpm_train_step


def _early(s: NoiseSchedule) -> TimestepPolicy:
  return window_policy(s.num_timesteps, 0, s.num_timesteps // 5)


def _late(s: NoiseSchedule) -> TimestepPolicy:
  return window_policy(
    s.num_timesteps, 4 * s.num_timesteps // 5, s.num_timesteps
  )


# Which timesteps the perturbation is optimised against, and their weights.
EUDP_POLICIES: dict[str, Callable[[NoiseSchedule], TimestepPolicy]] = {
  "uniform": lambda s: uniform_policy(s.num_timesteps),  # = UDP
  "signal": signal_policy,  # p(t) ∝ √ᾱ_t, the share of δ that reaches x_t
  "snr": snr_weight_policy,  # w(t) ∝ √SNR(t)
  "early": _early,  # t < T/5, where δ dominates the added noise
  "late": _late,  # t >= 4T/5, a control: δ is drowned by noise
}


def eudp_policy(name: str, schedule: NoiseSchedule) -> TimestepPolicy:
  """The timestep policy called `name` (one of `EUDP_POLICIES`)."""
  if name not in EUDP_POLICIES:
    raise ValueError(
      f"Unknown EUDP policy {name!r}; choose one of {sorted(EUDP_POLICIES)}."
    )
  return EUDP_POLICIES[name](schedule)


def denoising_objective(
  eps_fn: EpsFn,
  schedule: NoiseSchedule,
  *,
  policy: TimestepPolicy | None = None,
  num_draws: int = 1,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The per-example denoising loss of protected images, averaged over
  `num_draws` Monte-Carlo draws of (t, ε) to steady the PGD gradient."""

  def objective(x_adv, key):
    keys = jax.random.split(key, num_draws)
    losses = jax.vmap(
      lambda k: denoising_loss(eps_fn, x_adv, k, schedule, policy=policy)
    )(keys)
    return losses.mean(axis=0)

  return objective


def udp_perturbation(
  eps_fn: EpsFn,
  x: jax.Array,
  delta: jax.Array,
  key: jax.Array,
  schedule: NoiseSchedule,
  *,
  budget: Budget,
  steps: int,
  step_size: float,
  policy: TimestepPolicy | None = None,
  num_draws: int = 1,
) -> jax.Array:
  """The outer max: PGD ascent of the denoising loss on δ for a fixed model.

  With a model trained on clean data this is AdvDM; inside `udp_round` it is
  UDP's (EUDP's, with a schedule-based `policy`) perturbation step.

  Args:
    eps_fn: the surrogate denoiser with its parameters bound.
    x: clean images in [-1, 1], (B, H, W, C).
    delta: the current perturbation (model units), x's shape.
    key: randomness for the timesteps and noise.
    schedule: the noise schedule.
    budget: the perturbation budget (`aigc_jax.protect.budget`).
    steps: PGD steps.
    step_size: PGD step in model units.
    policy: p(t), w(t) (uniform: UDP).
    num_draws: (t, ε) draws per gradient.

  Returns:
    The new δ.
  """
  objective = denoising_objective(
    eps_fn, schedule, policy=policy, num_draws=num_draws
  )
  delta, _ = pgd(
    objective, x, delta, key, budget=budget, steps=steps, step_size=step_size
  )
  return delta


def udp_round(
  state: DDPMState,
  x: jax.Array,
  delta: jax.Array,
  key: jax.Array,
  *,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  schedule: NoiseSchedule,
  budget: Budget,
  inner_steps: int,
  batch_size: int,
  pgd_steps: int,
  step_size: float,
  ema_decay: float = 0.999,
  policy: TimestepPolicy | None = None,
  num_draws: int = 1,
) -> tuple[DDPMState, jax.Array]:
  """One max-min alternation on a chunk of images.

  The surrogate takes `inner_steps` training steps on random minibatches of
  the protected chunk (the inner min, on the uniform DDPM loss the
  unauthorised trainer uses), then δ takes `pgd_steps` ascent steps against
  the updated surrogate on the whole chunk (the outer max).

  Args:
    state: the surrogate DDPM's state.
    x: the clean chunk in [-1, 1], (N, H, W, C).
    delta: the chunk's perturbation, (N, H, W, C).
    key: this round's key.
    model, optimizer, schedule, ema_decay: the surrogate's trainer.
    budget, pgd_steps, step_size, policy, num_draws: the outer max.
    inner_steps: surrogate steps per round (0: AdvDM against a fixed model).
    batch_size: surrogate minibatch size (at most the chunk's size).

  Returns:
    The new surrogate state and δ.
  """
  train_key, pgd_key = jax.random.split(key)
  protected = apply_perturbation(x, delta)
  batch_size = min(batch_size, x.shape[0])  # a small last chunk

  def train_one(s, i):
    idx = jax.random.choice(
      jax.random.fold_in(train_key, i), x.shape[0], (batch_size,), replace=False
    )
    s, _ = ddpm_train_step(
      s,
      protected[idx],
      train_key,
      model=model,
      optimizer=optimizer,
      schedule=schedule,
      ema_decay=ema_decay,
    )
    return s, None

  state, _ = jax.lax.scan(train_one, state, jnp.arange(inner_steps))
  eps_fn = ddpm_eps_fn(model, state.params)
  delta = udp_perturbation(
    eps_fn,
    x,
    delta,
    pgd_key,
    schedule,
    budget=budget,
    steps=pgd_steps,
    step_size=step_size,
    policy=policy,
    num_draws=num_draws,
  )
  return state, delta

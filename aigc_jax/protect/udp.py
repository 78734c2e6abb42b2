"""UDP and EUDP: unlearnable perturbations against diffusion-model training,
and AdvDM, the fixed-model baseline.

UDP solves the max-min problem (protection-methods.md §4.2)

  max_{‖δ_i‖ ≤ ε} min_θ Σ_i E_{t~p(t), ε} w(t) ‖ε - ε_θ(√ᾱ_t (x_i + δ_i)
                                                  + √(1-ᾱ_t) ε, t)‖²,

alternating surrogate-training steps on the protected images (inner min:
`aigc_jax.train.ddpm_train_step` on x + δ) with PGD ascent on δ (outer max:
`udp_perturbation`). EUDP lets the noise schedule choose p(t) and w(t)
(`EUDP_POLICIES`). AdvDM (Liang et al. 2023) is the outer max alone, against a
fixed model trained on clean data.

The alternation is driven from the host (`experiments/udp.py`,
`protect_dataset`), each half jitted once: on XLA:CPU a `lax.scan` over DDPM
training steps ran 20x slower per step than the same step jitted alone
(6.7 s vs 0.34 s, digits UNet). PGD's few steps are cheaper unrolled on a
CPU (`unroll`).
"""

from collections.abc import Callable

import jax

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
from aigc_jax.protect.pgd import Budget, pgd


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
  # w(t) ∝ √SNR(t). A weight only scales each image's gradient, which the
  # L-inf sign step discards: with num_draws=1 this is `uniform` (measured,
  # README), and it differs only when several draws are averaged.
  "snr": snr_weight_policy,
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
  encode: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The per-example denoising loss of protected images, averaged over
  `num_draws` Monte-Carlo draws of (t, ε) to steady the PGD gradient.

  With `encode` (e.g. a latent-diffusion VAE encoder,
  `aigc_jax.sd.encode_images`) the loss is that of the latents of the
  protected images: the perturbation still lives on the pixels, and its
  gradient passes through the encoder (the latent-diffusion setting of UDP).
  """

  def objective(x_adv, key):
    x0 = x_adv if encode is None else encode(x_adv)
    keys = jax.random.split(key, num_draws)
    losses = jax.vmap(
      lambda k: denoising_loss(
        eps_fn, x0, k, schedule, policy=policy, latents=encode is not None
      )
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
  unroll: int | bool = 1,
  encode: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """The outer max: PGD ascent of the denoising loss on δ for a fixed model.

  With a model trained on clean data this is AdvDM; alternated with surrogate
  training on x + δ it is UDP's (EUDP's, with a schedule-based `policy`)
  perturbation step.

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
    unroll: `lax.scan` unrolling of the PGD steps (see `pgd`).
    encode: images -> what `eps_fn` denoises (see `denoising_objective`).

  Returns:
    The new δ.
  """
  objective = denoising_objective(
    eps_fn, schedule, policy=policy, num_draws=num_draws, encode=encode
  )
  delta, _ = pgd(
    objective,
    x,
    delta,
    key,
    budget=budget,
    steps=steps,
    step_size=step_size,
    unroll=unroll,
  )
  return delta

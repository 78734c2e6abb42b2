"""UDP and EUDP: unlearnable perturbations against diffusion-model training,
the readings of their max-min problem, and AdvDM, the fixed-model baseline.

UDP (Zhao et al., arXiv 2306.01902) protects images with a sample-wise δ,
‖δ_i‖ ≤ ρ, found by "a max-min objective ... to maximise the divergence
between a diffusion model trained on protected data and the clean-data
distribution, solved via bi-level optimisation". The paper's body and code
are not public, so its exact objective could not be read; this module
implements the readings of that sentence as objectives for the one PGD loop
(`aigc_jax.protect.pgd`), each selectable by name (`READINGS`):

* `max`: ascend the protected images' *own* denoising loss under a surrogate
  trained on them (inner min: surrogate steps on x + δ; outer max: PGD on
  δ). High-entropy noise is near-optimal for it, which is why it can tie
  with random noise of the same size.
* `min`: *descend* the same loss against the same alternating surrogate: the
  error-minimising shortcut of unlearnable examples (Huang et al. 2021,
  Eq. 2) carried to the denoising loss, as SDS(−) (Xue et al., ICLR 2024)
  finds descent the stronger direction against latent diffusion.
* `bilevel`: ascend a *clean* reference loss after K differentiated
  surrogate updates on x + δ (MetaPoison's unrolled bi-level step, Huang et
  al. 2020, Eq. 3): δ is chosen for what the model trained on it becomes.
* `advdm`: ascend the denoising loss of a fixed model trained on clean data
  (Liang et al. 2023), no surrogate training.

Encoder attacks for latent models are in `aigc_jax.protect.encoder`. EUDP
lets the noise schedule choose p(t) and w(t) (`EUDP_POLICIES`); every
denoising reading takes a policy.

The alternation of surrogate steps with perturbation steps is
`aigc_jax.protect.alternation`, driven from the host with each half jitted
once: on XLA:CPU a `lax.scan` over DDPM training steps ran 20x slower per
step than the same step jitted alone (6.7 s vs 0.34 s, digits UNet).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from aigc_jax.diffusion import (
  EpsFn,
  NoiseSchedule,
  TimestepPolicy,
  denoising_loss,
  signal_policy,
  snr_sampling_policy,
  snr_weight_policy,
  uniform_policy,
  window_policy,
)
from aigc_jax.protect.encoder import latent_distance_objective
from aigc_jax.protect.pgd import Budget, Objective, pgd


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
  # L-inf sign step discards: with num_draws=1 this is `uniform` (measured:
  # docs/results/udp.md), and it differs only when several draws are
  # averaged.
  "snr": snr_weight_policy,
  # p(t) ∝ √ᾱ_t / √(1-ᾱ_t) = √SNR(t), the ratio of the part of δ that
  # reaches x_t (√ᾱ_t δ) to the noise added there: t is drawn where δ is
  # least drowned, and still now and then where the model is trained.
  "snr_sampling": snr_sampling_policy,
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
  ascent: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """PGD on δ of the denoising loss under a fixed model.

  With a model trained on clean data this is AdvDM; alternated with surrogate
  training on x + δ it is UDP's (EUDP's, with a schedule-based `policy`)
  perturbation step, the `max` reading; with `ascent=False` the `min`
  reading's.

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
    ascent: ascend the loss (max, AdvDM) or descend it (min).

  Returns:
    The new δ and the mean loss before each step, (steps,).
  """
  objective = denoising_objective(
    eps_fn, schedule, policy=policy, num_draws=num_draws, encode=encode
  )
  return pgd(
    objective,
    x,
    delta,
    key,
    budget=budget,
    steps=steps,
    step_size=step_size,
    ascent=ascent,
    unroll=unroll,
  )


class Reading(NamedTuple):
  """How a reading of the max-min problem is run.

  Attributes:
    trains_surrogate: the surrogate keeps training on x + δ between
      perturbation rounds (the inner min).
    ascent: PGD ascends the objective (False: descends it).
    objective: "denoising", "bilevel", "encoder" or "none" (no optimisation:
      the random control).
  """

  trains_surrogate: bool
  ascent: bool
  objective: str


READINGS: dict[str, Reading] = {
  "random": Reading(False, True, "none"),
  "advdm": Reading(False, True, "denoising"),
  "max": Reading(True, True, "denoising"),
  "min": Reading(True, False, "denoising"),
  "bilevel": Reading(True, True, "bilevel"),
  # PhotoGuard's encoder attack (Salman et al. 2023, Eq. 4) and its
  # untargeted form; see aigc_jax.protect.encoder.
  "encoder_away": Reading(False, True, "encoder"),
  "encoder_target": Reading(False, False, "encoder"),
  # The same distance taken after the decoder: the VAE's reconstruction
  # D(E(x + δ)) toward the target image (`encode` is then D∘E and the
  # reference the target's pixels). What a latent model learns is rendered
  # through D, and D ignores much of the latent: toward the nearest four
  # at 64/255, the latent form left concept success at 73% (clean 80%, one
  # trainer seed), this form at 26% (clean 82%, three; docs/results/udp.md).
  "decoded_target": Reading(False, False, "encoder"),
}
# Earlier names: "udp" is max with uniform t, "eudp:<policy>" max with one
# of `EUDP_POLICIES`.
_ALIASES = {"udp": "max", "eudp": "max"}


def parse_method(method: str) -> tuple[str, Reading, str | None]:
  """(reading name, `Reading`, policy name or None) of a method name such as
  "max", "max:early", "bilevel:signal", "eudp:early" or "random".

  Denoising and bi-level readings take a policy (uniform when absent);
  "eudp" needs one. The others take none.
  """
  kind, _, policy = method.partition(":")
  name = _ALIASES.get(kind, kind)
  if name not in READINGS:
    raise ValueError(
      f"Unknown protection method {method!r}; use one of {sorted(READINGS)} "
      f"(':<policy>' after a denoising or bilevel one, policies "
      f"{sorted(EUDP_POLICIES)}), 'udp' or 'eudp:<policy>'."
    )
  reading = READINGS[name]
  takes_policy = reading.objective in ("denoising", "bilevel")
  if policy and not takes_policy:
    raise ValueError(
      f"{method!r}: the {name} reading takes no timestep policy; drop "
      f"':{policy}'."
    )
  if kind == "eudp" and not policy:
    raise ValueError(
      f"{method!r} needs a policy: 'eudp:<policy>' with one of "
      f"{sorted(EUDP_POLICIES)}."
    )
  if policy and policy not in EUDP_POLICIES:
    raise ValueError(
      f"Unknown EUDP policy {policy!r} in {method!r}; choose one of "
      f"{sorted(EUDP_POLICIES)}."
    )
  return name, reading, (policy or "uniform") if takes_policy else None


Params = Any


def bilevel_objective(
  train_loss: Callable[[Params, jax.Array, jax.Array], jax.Array],
  reference_loss: Callable[[Params, jax.Array], jax.Array],
  params: Params,
  *,
  inner_steps: int = 1,
  inner_lr: float,
) -> Objective:
  """The bi-level reading: a clean reference loss after `inner_steps`
  differentiated gradient steps of the surrogate on the protected images.

    J(x + δ) = L_ref(θ_K),  θ_k = θ_{k-1} − η ∇_θ L_train(θ_{k-1}, x + δ),

  ascended in δ, so that the model a trainer would get from x + δ is poor on
  the clean data (MetaPoison, Huang et al. 2020, Eq. 3, with K unrolled SGD
  steps). The gradient reaches δ only through the updates, i.e. through the
  mixed second derivative ∂²L_train/∂θ∂x; `jax.grad` of this pure function
  is the whole implementation.

  Args:
    train_loss: `(params, x_adv, key) -> scalar`, the trainer's loss on the
      protected batch.
    reference_loss: `(params, key) -> scalar`, e.g. the denoising loss of the
      clean images under fixed draws, or the divergence of ε̂ from the
      pretrained model's.
    params: θ_0, the surrogate's current parameters.
    inner_steps: K (static).
    inner_lr: η. A step as long as a first Adam step (lr per coordinate)
      wrecks a UNet's look-ahead; SGD steps of the size of a training step's
      effect keep it informative.

  Returns:
    `objective(x_adv, key) -> (B,)`, J repeated per example (the PGD loop sums
    per-example losses; the sign and normalised steps do not see the factor).
  """

  def objective(x_adv, key):
    keys = jax.random.split(key, inner_steps + 1)
    p = params
    for k in range(inner_steps):
      grads = jax.grad(train_loss)(p, x_adv, keys[k])
      p = jax.tree.map(lambda w, g: w - inner_lr * g, p, grads)
    return jnp.broadcast_to(reference_loss(p, keys[-1]), x_adv.shape[:1])

  return objective


def reading_objective(
  name: str,
  *,
  eps_fn_of: Callable[[Params], EpsFn],
  params: Params,
  clean: jax.Array,
  schedule: NoiseSchedule,
  policy: TimestepPolicy | None = None,
  num_draws: int = 1,
  encode: Callable[[jax.Array], jax.Array] | None = None,
  reference: jax.Array | None = None,
  bilevel_steps: int = 1,
  bilevel_lr: float = 0.0,
) -> Objective:
  """The objective of reading `name` (a key of `READINGS`, not "random").

  Args:
    name: the reading.
    eps_fn_of: `params -> eps_fn`, the surrogate's denoiser with everything
      but its parameters bound (e.g. the text condition).
    params: the surrogate's current parameters.
    clean: the clean images of the chunk, [-1, 1]: the bi-level reading's
      reference data.
    schedule, policy, num_draws, encode: as `denoising_objective`.
    reference: the encoder readings' latents (`encode(clean)` to move away
      from, a target latent to move toward; for `decoded_target`, `encode`
      is the VAE's reconstruction and `reference` the target images).
    bilevel_steps, bilevel_lr: K and η of `bilevel_objective`.
  """
  reading = READINGS.get(name)
  if reading is None or reading.objective == "none":
    raise ValueError(f"{name!r} is not an optimised reading.")
  denoising = lambda p, **kw: denoising_objective(
    eps_fn_of(p), schedule, num_draws=num_draws, encode=encode, **kw
  )
  if reading.objective == "denoising":
    return denoising(params, policy=policy)
  if reading.objective == "bilevel":
    if bilevel_lr <= 0:
      raise ValueError("The bilevel reading needs bilevel_lr > 0.")
    return bilevel_objective(
      lambda p, x_adv, k: denoising(p, policy=policy)(x_adv, k).mean(),
      lambda p, k: denoising(p)(clean, k).mean(),
      params,
      inner_steps=bilevel_steps,
      inner_lr=bilevel_lr,
    )
  if encode is None or reference is None:
    raise ValueError(
      f"The {name} reading attacks a latent model's encoder: pass `encode` "
      "and the `reference` latents."
    )
  return latent_distance_objective(encode, reference)

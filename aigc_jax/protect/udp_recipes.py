"""Config-driven recipes of the protections against diffusion models: UDP's
readings, EUDP, AdvDM, the encoder attacks and their random controls.

They read an experiment config's `protect` block (`methods`, `eps`, `norm`,
`step_size`, `pgd_steps`, `rounds`, `inner_steps`, `batch_size`,
`chunk_size`, `surrogate`: "ddpm" or "text_to_image"), `surrogate` (the
pixel DDPM a reading trains or attacks), `eval.robust_method` and `seed`;
see `experiments/configs/udp.py`.
`protect_methods` protects a dataset with every method on the alternation
engine (`protect.alternate`) and keeps each set beside its clean images in
the workdir (`protect/<method>/protected.npz`); `protection_steps` builds a
pixel DDPM surrogate's two halves, and `reading_step` is one reading's PGD
step, shared with the latent (text-to-image) surrogate. Import it as `from
aigc_jax.protect import udp_recipes` (it builds on `aigc_jax.eval`).
"""

import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from aigc_jax import data, diffusion, parallel, protect, record, train
from aigc_jax.eval import ddpm
from aigc_jax.metrics import psnr, ssim
from aigc_jax.train import ddpm_eps_fn

# What the attacker may do to the robust method's set (`eval.attacks`).
ATTACKS = ("jpeg", "blur", "le")


def check_methods(config) -> None:
  """Fails now, not after minutes of protection, on a method name the
  library does not know, a reading this surrogate cannot run, or a
  robustness row of a method that is not run."""
  robust = config.eval.robust_method
  unknown = set(config.eval.attacks) - set(ATTACKS)
  if unknown:
    raise ValueError(
      f"Unknown eval.attacks {sorted(unknown)}; choose from {ATTACKS}."
    )
  if "le" in config.eval.attacks and "le" not in config.eval:
    raise ValueError(
      "eval.attacks names 'le' but the config has no eval.le block (LE's "
      "purifying DDPM); add one as the latent settings do, or drop 'le'."
    )
  if robust and robust not in config.protect.methods:
    raise ValueError(
      f"eval.robust_method {robust!r} is not among protect.methods "
      f"{tuple(config.protect.methods)}."
    )
  for i, method in enumerate(config.protect.methods):
    reference = equal_l2_reference(method)
    if reference is not None:
      if reference not in config.protect.methods[:i]:
        raise ValueError(
          f"{method!r} draws noise of {reference!r}'s L2 norms: list "
          f"{reference!r} before it in protect.methods."
        )
      continue
    _, reading, _ = protect.parse_method(method)
    if reading.objective == "encoder" and config.protect.surrogate == "ddpm":
      raise ValueError(
        f"{method!r} attacks a latent model's encoder; a pixel DDPM has none. "
        "Use it with a text-to-image surrogate (the concept default or :sd)."
      )
    if reading.objective == "bilevel" and config.protect.bilevel_lr <= 0:
      raise ValueError(
        f"{method!r} needs protect.bilevel_lr > 0 (the unrolled SGD step)."
      )


class ProtectionSteps(NamedTuple):
  """The two halves of the alternation, jitted once for every method.

  Attributes:
    inner_min: `(state, batch) -> (state, metrics)`, one surrogate step on
      protected images (donates `state`).
    perturb: `(state, chunk, delta, key, policy, reading) -> (delta, trace)`,
      `pgd_steps` PGD steps of the reading's objective (`reading` static).
    schedule: the surrogate's noise schedule.

  With conditions (a text-to-image surrogate, `latent_recipes`), a minibatch is
  `(images, conditions)`.
  """

  inner_min: Callable
  perturb: Callable
  schedule: diffusion.NoiseSchedule


def protection_key(config) -> jax.Array:
  """The root key of the protection: the surrogate's steps fold in 1, the
  perturbation 2."""
  return jax.random.fold_in(jax.random.key(config.seed), 7)


def reading_step(config, reading, chunk, delta, key, **objective_args):
  """`config.protect.pgd_steps` PGD steps on δ of `reading`'s objective
  (`protect.reading_objective` with `objective_args`) on a chunk: the
  perturbation half of the alternation, for any surrogate."""
  p = config.protect
  objective = protect.reading_objective(
    reading,
    clean=chunk.x,
    num_draws=p.num_draws,
    bilevel_steps=p.bilevel_steps,
    bilevel_lr=p.bilevel_lr,
    **objective_args,
  )
  return protect.pgd(
    objective,
    chunk.x,
    delta,
    key,
    budget=protect.budget(p.eps, p.norm),
    steps=p.pgd_steps,
    step_size=protect.step_size(p.step_size),
    ascent=protect.READINGS[reading].ascent,
    unroll=protect.default_unroll(),
  )


def protection_steps(config, mesh) -> ProtectionSteps:
  model, schedule, optimizer = ddpm.build_ddpm(config.surrogate)
  rep, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  key = protection_key(config)
  inner_min = jax.jit(
    functools.partial(
      train.ddpm_train_step,
      key=jax.random.fold_in(key, 1),
      model=model,
      optimizer=optimizer,
      schedule=schedule,
      ema_decay=config.surrogate.train.ema_decay,
    ),
    out_shardings=(rep, rep),
    donate_argnums=0,
  )

  def perturb(state, chunk, delta, k, policy, reading):
    return reading_step(
      config,
      reading,
      chunk,
      delta,
      k,
      eps_fn_of=lambda params: ddpm_eps_fn(model, params),
      params=state.params,
      schedule=schedule,
      policy=policy,
    )

  perturb = jax.jit(
    perturb, static_argnames="reading", out_shardings=(shard, rep)
  )
  return ProtectionSteps(inner_min, perturb, schedule)


def protect_dataset(
  config, workdir, method, images, surrogate, mesh, steps, conditions=None
):
  """Protects uint8 `images` with `method` through the alternation engine
  (`protect.alternate`), chunk by chunk; resumable in `workdir`.

  Per chunk, `rounds` alternations: `inner_steps` surrogate steps on
  minibatches of the protected chunk (for readings that train it), then
  `pgd_steps` steps of the reading's objective (`steps`, from
  `protection_steps`). The random control draws ±eps and optimises nothing.
  `conditions` (one row per image, e.g. caption embeddings) go with their
  images into both halves.

  Returns:
    The protected uint8 images and the objective's trace (chunks, rounds,
    PGD steps).
  """
  p = config.protect
  name, reading, policy_name = protect.parse_method(method)
  b = protect.budget(p.eps, p.norm)
  if reading.objective == "none":
    delta0 = lambda k, shape: protect.random_perturbation(k, shape, b)
  else:
    delta0 = lambda k, shape: protect.init_perturbation(
      k, shape, b, random_start=p.random_start
    )
  policy = None
  if policy_name is not None:
    policy = protect.eudp_policy(policy_name, steps.schedule)
  rounds = 0 if reading.objective == "none" else p.rounds
  key = jax.random.fold_in(protection_key(config), 2)
  bar = tqdm(
    total=len(protect.chunk_bounds(len(images), p.chunk_size)[1:]) * rounds,
    desc=f"protect {method}",
    disable=jax.process_index() != 0,
  )
  delta, traces, _ = protect.alternate(
    data.to_model_range(images),
    delta0,
    surrogate,
    key,
    perturbation_step=lambda state, chunk, d, k: steps.perturb(
      state, chunk, d, k, policy, name
    ),
    model_step=steps.inner_min if reading.trains_surrogate else None,
    schedule=protect.Schedule(
      rounds, p.inner_steps, p.batch_size, p.chunk_size
    ),
    mesh=mesh,
    seed=config.seed,
    conditions=conditions,
    workdir=workdir,
    progress=bar.update,
  )
  bar.close()
  return protect.quantize_protected(images, delta, b), traces


def protect_methods(
  config, workdir, clean, labels, surrogate, mesh, steps, writer, **kwargs
):
  """Every method of `config.protect.methods` on `clean` (uint8), each in
  `workdir/protect/<method>/` with `protected.npz` (uint8 `clean` and
  `protected` side by side, and `labels`: anyone can check the budget
  without this code) and a noise grid. Returns the training sets (clean
  first), the perturbation table rows, the seconds per method and the
  objective traces; `kwargs` go to `protect_dataset`."""
  sets, perturbations, seconds, traces = {"clean": clean}, {}, {}, {}
  for method in config.protect.methods:
    start = time.time()
    mdir = os.path.join(workdir, "protect", record.slug(method))
    reference = equal_l2_reference(method)
    if reference is None:
      protected, traces[method] = protect_dataset(
        config, mdir, method, clean, surrogate, mesh, steps, **kwargs
      )
      seconds[method] = protect.spent_seconds(mdir)
    else:
      protected = random_at_equal_l2(config, clean, sets[reference])
      traces[method] = np.zeros((0, 0, 0), np.float32)
      seconds[method] = round(time.time() - start, 1)
    record.save_arrays(
      os.path.join(mdir, "protected.npz"),
      clean=clean,
      protected=protected,
      labels=labels,
    )
    data.noise_grid(
      os.path.join(mdir, "grid.png"), clean, protected, config.protect.eps
    )
    sets[method] = protected
    perturbations[method] = perturbation_table_row(clean, protected, config)
    writer.write(
      0,
      {
        f"perturbation/{method}/{k}": v
        for k, v in perturbations[method].items()
      },
    )
  return sets, perturbations, seconds, traces


EQUAL_L2 = "random_l2:"


def equal_l2_reference(method: str) -> str | None:
  """The method whose L2 norms "random_l2:<method>" copies, or None."""
  return method[len(EQUAL_L2) :] if method.startswith(EQUAL_L2) else None


def random_at_equal_l2(config, clean, reference) -> np.ndarray:
  """The random control at equal L2 (`protect.random_like`): for each image,
  `reference`'s perturbation of it with its magnitudes shuffled and random
  signs, so its L2 and L∞ norms are the reference's after uint8 rounding."""
  b = protect.budget(config.protect.eps, config.protect.norm)
  x = data.to_model_range(clean)
  delta = data.to_model_range(reference) - x
  key = jax.random.fold_in(protection_key(config), 3)
  noise = protect.random_like(key, jnp.asarray(delta), jnp.asarray(x))
  return protect.quantize_protected(clean, np.asarray(noise), b)


def perturbation_table_row(clean, protected, config) -> dict:
  """Imperceptibility of a protection: L∞, L2 (in /255), PSNR, SSIM."""
  a, b = data.to_model_range(clean), data.to_model_range(protected)
  size = min(clean.shape[1:3])
  return {
    "linf_255": float(
      protect.perturbation_sizes(clean, protected, "linf").max()
    ),
    "l2_255": float(protect.perturbation_sizes(clean, protected, "l2").mean()),
    "psnr_db": float(jnp.mean(psnr(a, b))),
    "ssim": float(
      jnp.mean(ssim(a, b, filter_size=min(config.eval.ssim_filter, size)))
    ),
  }


def objective_ends(trace: np.ndarray) -> list[str]:
  """A method's objective (mean over chunks) before the first PGD step and
  before the last one, as report cells; "-" for a method without one."""
  if not trace.size:
    return ["-", "-"]
  return [f"{trace[:, 0, 0].mean():.4f}", f"{trace[:, -1, -1].mean():.4f}"]

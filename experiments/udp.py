"""Protects a dataset with UDP's readings, AdvDM or encoder attacks, then
measures what the protection does to a model trained on it.

  python experiments/udp.py --config=experiments/configs/udp.py[:variant] \
    --workdir=DIR

The default (`:concept`) and the other latent variants fine-tune a
text-to-image model (`experiments/udp_latent.py`). The from-scratch
variants (`:digits`, `:cifar10*`) train a digit classifier (the evaluator)
and a surrogate DDPM on clean data; protect the training set with each
method through the alternation engine (`protect.alternate`: finished chunks
are kept and skipped on resume); train a fresh DDPM with the same seed and
steps on every training set (clean, each protection, and the robustness
variants); sample; compare. The workdir receives each method's protected
images beside the clean ones (`protect/<method>/protected.npz`, lossless
uint8) and a grid of clean / protected / amplified noise, each DDPM's
samples, metrics.jsonl and report.md.
"""

import functools
import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from aigc_jax import (
  data,
  diffusion,
  launch,
  parallel,
  protect,
  record,
  train,
)
from aigc_jax.eval import classifiers, ddpm, features
from aigc_jax.metrics import (
  psnr,
  ssim,
)
from aigc_jax.purify import gaussian_blur, jpeg_compress
from aigc_jax.train import ddpm_eps_fn


def check_methods(config) -> None:
  """Fails now, not after minutes of protection, on a method name the
  library does not know, a reading this surrogate cannot run, or a
  robustness row of a method that is not run."""
  robust = config.eval.robust_method
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
    if reading.objective == "encoder" and "sd" not in config:
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

  With conditions (a text-to-image surrogate, `udp_latent`), a minibatch is
  `(images, conditions)`.
  """

  inner_min: Callable
  perturb: Callable
  schedule: diffusion.NoiseSchedule


def _protection_key(config) -> jax.Array:
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
    step_size=p.step_size / protect.LEVELS_PER_UNIT,
    ascent=protect.READINGS[reading].ascent,
    # XLA:CPU runs loop bodies slowly; accelerators keep the compact loop.
    unroll=True if jax.default_backend() == "cpu" else 1,
  )


def protection_steps(config, mesh) -> ProtectionSteps:
  model, schedule, optimizer = ddpm.build_ddpm(config.surrogate)
  rep, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  key = _protection_key(config)
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
  key = jax.random.fold_in(_protection_key(config), 2)
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
    else:
      protected = random_at_equal_l2(config, clean, sets[reference])
      traces[method] = np.zeros((0, 0, 0), np.float32)
    seconds[method] = accumulated_seconds(
      os.path.join(mdir, "seconds.json"), time.time() - start
    )
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
  key = jax.random.fold_in(_protection_key(config), 3)
  noise = protect.random_like(key, jnp.asarray(delta), jnp.asarray(x))
  return protect.quantize_protected(clean, np.asarray(noise), b)


def accumulated_seconds(path: str, elapsed: float) -> float:
  """`elapsed` plus what earlier invocations spent, kept in the JSON file at
  `path`: a resumed protection reports the time of every chunk, not only of
  the chunks this invocation computed."""
  spent = 0.0
  if os.path.exists(path):
    with open(path) as f:
      spent = json.load(f)["seconds"]
  total = round(spent + elapsed, 1)
  record.atomic_write(
    path, lambda f: f.write(json.dumps({"seconds": total}).encode())
  )
  return total


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if "sd" in config:  # the latent-diffusion setting (:sd)
    from experiments import udp_latent

    return udp_latent.train_and_evaluate(config, workdir)
  mesh = parallel.make_mesh(config.num_devices or None)
  for batch in (
    config.surrogate.train.batch_size,
    config.ddpm.train.batch_size,
    config.protect.batch_size,
  ):
    parallel.check_batch_size(batch, mesh)
  # Fail on bad settings now, not after minutes of protection.
  protect.budget(config.protect.eps, config.protect.norm)
  check_methods(config)
  robust = config.eval.robust_method
  train_set, test_set = classifiers.load_train_test(config)
  clean = train_set.images
  x_test = data.to_model_range(test_set.images)
  heldout = x_test[: config.eval.heldout_size or None]
  inception = None
  if config.eval.inception_weights:
    features_fn = features.inception_fid_features(
      config.eval.inception_weights, mesh
    )
    inception = (features_fn, features_fn(test_set.images))
  perceptual = None
  if config.eval.perceptual:
    features_fn = features.perceptual_features(config.eval.perceptual, mesh)
    perceptual = (features_fn, features_fn(test_set.images))
  writer = record.MetricWriter(workdir)
  start = time.time()

  # The evaluator: a classifier of real data, and its view of real test data.
  classifier = classifiers.trained_classifier(
    config.eval.classifier, os.path.join(workdir, "classifier")
  )
  real = classifiers.predict_logits(
    classifier, x_test, 1000, mesh, return_features=True
  )

  # The surrogate, warmed up on clean data.
  surrogate = ddpm.train_ddpm(
    config.surrogate,
    os.path.join(workdir, "surrogate"),
    clean,
    mesh,
    desc="surrogate",
  )

  steps = protection_steps(config, mesh)
  sets, perturbations, protect_seconds, traces = protect_methods(
    config, workdir, clean, train_set.labels, surrogate, mesh, steps, writer
  )

  if robust:
    sets[f"{robust} + JPEG {config.eval.jpeg_quality}"] = jpeg_compress(
      sets[robust], config.eval.jpeg_quality
    )
    sets[f"{robust} + blur {config.eval.blur_sigma}"] = gaussian_blur(
      sets[robust], config.eval.blur_sigma
    )
  if robust and config.eval.transform_controls:
    sets[f"clean + JPEG {config.eval.jpeg_quality}"] = jpeg_compress(
      clean, config.eval.jpeg_quality
    )
    sets[f"clean + blur {config.eval.blur_sigma}"] = gaussian_blur(
      clean, config.eval.blur_sigma
    )

  results = {}
  for name, images in sets.items():
    results[name] = ddpm.train_and_score(
      config,
      os.path.join(workdir, "eval", record.slug(name)),
      images,
      classifier,
      real,
      heldout,
      mesh,
      inception,
      perceptual,
    )
    writer.write(0, {f"eval/{name}/{k}": v for k, v in results[name].items()})

  total = round(time.time() - start, 1)
  record.write_report(
    workdir,
    udp_report(
      config,
      workdir,
      results,
      perturbations,
      protect_seconds,
      traces,
      classifier.test_accuracy,
      total,
    ),
  )
  return {"results": results, "perturbations": perturbations, "seconds": total}


def objective_ends(trace: np.ndarray) -> list[str]:
  """A method's objective (mean over chunks) before the first PGD step and
  before the last one, as report cells; "-" for a method without one."""
  if not trace.size:
    return ["-", "-"]
  return [f"{trace[:, 0, 0].mean():.4f}", f"{trace[:, -1, -1].mean():.4f}"]


def udp_report(
  config,
  workdir,
  results,
  perturbations,
  protect_seconds,
  traces,
  clf_accuracy,
  total,
):
  clean = results["clean"]
  rows = []
  for name, r in results.items():
    ratio = r["frechet_distance"] / max(clean["frechet_distance"], 1e-12)
    drop = 100 * (clean["confident_share"] - r["confident_share"])
    rows.append(
      [
        name,
        f"{r['data_frechet_distance']:.3f}",
        f"{r['frechet_distance']:.3f}",
        f"{ratio:.2f}x",
        f"{r['precision']:.3f}",
        f"{r['recall']:.3f}",
        f"{r['confident_share']:.3f}",
        f"{drop:+.1f}",
        f"{r['classes_covered']}",
        f"{r['heldout_loss']:.4f}",
      ]
      + ([f"{r['inception_fid']:.2f}"] if "inception_fid" in r else [])
      + (
        [
          f"{r['perceptual_fd']:.2f}",
          f"{r['perceptual_precision']:.3f}",
          f"{r['perceptual_recall']:.3f}",
        ]
        if "perceptual_fd" in r
        else []
      )
    )
  table = record.markdown_table(
    [
      "training data",
      "FD of the data",
      "FD of samples",
      "vs clean",
      "precision",
      "recall",
      f"p > {config.eval.confidence}",
      "drop (points)",
      "classes",
      "held-out loss",
    ]
    + (["Inception FID"] if "inception_fid" in clean else [])
    + (
      [
        f"FD ({config.eval.perceptual})",
        "precision",
        "recall",
      ]
      if "perceptual_fd" in clean
      else []
    ),
    rows,
  )
  ptable = record.markdown_table(
    [
      "method",
      "L∞ (/255)",
      "mean L2 (/255)",
      "PSNR (dB)",
      "SSIM",
      "objective at start",
      "at end",
      "time (s)",
    ],
    [
      [
        m,
        f"{v['linf_255']:.0f}",
        f"{v['l2_255']:.1f}",
        f"{v['psnr_db']:.2f}",
        f"{v['ssim']:.4f}",
        *objective_ends(traces[m]),
        protect_seconds[m],
      ]
      for m, v in perturbations.items()
    ],
  )
  methods = list(perturbations)
  strongest = max(methods, key=lambda m: results[m]["frechet_distance"])
  order = sorted(methods, key=lambda m: -results[m]["frechet_distance"])
  target_method = next((m for m in methods if m.startswith("eudp")), strongest)
  t = results[target_method]
  met_fd = t["frechet_distance"] >= 2 * clean["frechet_distance"]
  met_rec = clean["confident_share"] - t["confident_share"] >= 0.30
  p = config.protect
  title = f"UDP / EUDP / AdvDM on {config.data.train}"
  return f"""# {title} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Budget {p.eps:g}/255 ({p.norm}); {p.rounds} rounds of {p.inner_steps} surrogate
steps and {p.pgd_steps} PGD steps (step {p.step_size:g}/255, {p.num_draws}
draws) per chunk of {p.chunk_size}; surrogate warmed up for
{config.surrogate.train.num_steps} steps on clean data. Each row's DDPM is
trained from scratch with the same seed for {config.ddpm.train.num_steps} steps,
then {config.ddpm.sample.num_samples} samples are drawn. Features and
confidence come from a classifier of real data (test accuracy
{clf_accuracy:.4f}); Fréchet distances (FD) are to the real test set, for the
training images themselves ("of the data": what a DDPM that fitted them
perfectly would reach) and for the DDPM's samples. Total time {total} s.

## What a DDPM trained on each set generates

{table}
## The perturbations

{ptable}
## Verdict (computed from the tables above)

Strongest protection by Fréchet distance: **{strongest}**; order:
{", ".join(order)}. For {target_method}: Fréchet distance
{t["frechet_distance"] / max(clean["frechet_distance"], 1e-12):.2f}x clean
(target >= 2x: {"met" if met_fd else "missed"}); recognisability
{100 * (clean["confident_share"] - t["confident_share"]):.1f} points below clean
(target >= 30: {"met" if met_rec else "missed"}).

Grids: `protect/<method>/grid.png` (clean / protected / noise amplified to the
full range), `eval/<set>/samples.png`.
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

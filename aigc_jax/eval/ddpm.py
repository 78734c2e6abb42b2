"""The DDPM evaluator: train a pixel DDPM on a set, sample it, and score
the samples.

This is how protections against diffusion-model training are measured
from scratch (UDP, Zhao et al., arXiv 2306.01902; AdvDM, Liang et al. 2023)
and what LE's purifier is built from (Ho et al. 2020's DDPM, arXiv
2006.11239): `train_and_score` trains a fresh DDPM of one config on each
training set with the same seed and steps, so that the sets are the only
difference, and scores its samples in a classifier's feature space. A
config's `model` (`DDPMUNet`'s fields), `diffusion`, `train` and `sample`
blocks describe the DDPM (`experiments/configs/train_ddpm.py`).
"""

import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from aigc_jax import checkpoint, data, diffusion, parallel, record, train
from aigc_jax.eval.classifiers import predict_logits
from aigc_jax.metrics import (
  class_histogram,
  confident_share,
  frechet_distance,
  precision_recall,
)
from aigc_jax.models import DDPMUNet


def build_ddpm(config):
  """The model, schedule and optimiser a config describes."""
  model = DDPMUNet(**config.model)
  schedule = diffusion.make_schedule(
    config.diffusion.schedule, config.diffusion.num_timesteps
  )
  optimizer = train.ddpm_optimizer(
    config.train.learning_rate,
    config.train.warmup_steps,
    config.train.grad_clip,
  )
  return model, schedule, optimizer


def training_policy(config, schedule) -> diffusion.TimestepPolicy:
  """The timesteps DDPM training draws: all of them, or t < max_timestep
  when the model is only ever queried there (a purifier that diffuses to
  t* needs the denoiser at t <= t* only)."""
  max_t = config.train.get("max_timestep", 0)
  if not max_t:
    return diffusion.uniform_policy(schedule.num_timesteps)
  return diffusion.window_policy(schedule.num_timesteps, 0, max_t)


def start_from_pretrained(state, path: str, mesh):
  """`state` with the EMA weights of the DDPM run in `path` as its weights
  and EMA (fine-tuning, the LE paper's FT ablation); step and optimiser
  start afresh, so warm-up and the step count are the fine-tuning run's."""
  checkpointer = checkpoint.Checkpointer(os.path.join(path, "ckpt"))
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(
      f"{path}/ckpt holds no checkpoint: train.init_from must be the workdir "
      "of a DDPM run (experiments/train_ddpm.py's, or <workdir>/ddpm of "
      "experiments/le.py)."
    )
  rep = parallel.replicated(mesh)
  try:
    pretrained = checkpointer.restore(checkpoint.abstract_state(state, rep))
  except (ValueError, KeyError) as e:
    raise ValueError(
      f"The DDPM in {path} does not fit this config's model ({e}); set "
      "ddpm.model to the architecture it was trained with."
    ) from e
  finally:
    checkpointer.close()
  # Two copies: params and EMA must not share buffers (steps donate both).
  return state._replace(
    params=parallel.replicated_copy(mesh, pretrained.ema_params),
    ema_params=pretrained.ema_params,
  )


class DDPMProgram(NamedTuple):
  """A DDPM config's model and its jittable functions, built once per config
  so that every training set of a run shares their traces and compilations
  (udp.py trains one DDPM per set; a fresh closure per set was traced,
  lowered and compiled again)."""

  model: DDPMUNet
  init: Callable[[tuple[int, ...]], Callable[[], train.DDPMState]]
  step: Callable
  sample: Callable  # jitted (params, key, indices, image_shape) -> images
  denoising_losses: Callable  # jitted (params, x, keys) -> per-image loss


@train.built_once_per_config
def ddpm_program(config) -> DDPMProgram:
  """The `DDPMProgram` of `config` (the same object for an equal config)."""
  model, schedule, optimizer = build_ddpm(config)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  policy = training_policy(config, schedule)

  @functools.cache
  def init(image_shape):
    return functools.partial(
      train.init_ddpm_state, model, optimizer, init_key, image_shape
    )

  def step(state, batch):
    return train.ddpm_train_step(
      state,
      batch,
      train_key,
      model=model,
      optimizer=optimizer,
      schedule=schedule,
      ema_decay=config.train.ema_decay,
      policy=policy,
    )

  s = config.sample
  if s.sampler not in ("ddim", "ddpm"):
    raise ValueError(f"Unknown sampler {s.sampler!r}; use 'ddim' or 'ddpm'.")

  @functools.partial(jax.jit, static_argnums=3)
  def sample(params, key, indices, image_shape):
    eps_fn = train.ddpm_eps_fn(model, params)
    noise = jax.vmap(
      lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape)
    )(indices)
    chunk_key = jax.random.fold_in(key, indices[0] + s.num_samples)
    if s.sampler == "ddim":
      out = diffusion.ddim_sample(
        eps_fn, noise, chunk_key, schedule, num_steps=s.num_steps, eta=s.eta
      )
    else:
      out = diffusion.ddpm_sample(eps_fn, noise, chunk_key, schedule)
    return out.clip(-1.0, 1.0)

  @jax.jit
  def denoising_losses(params, x, keys):
    eps_fn = train.ddpm_eps_fn(model, params)
    per_draw = jax.vmap(
      lambda k: diffusion.denoising_loss(eps_fn, x, k, schedule)
    )(keys)
    return per_draw.mean(axis=0)

  return DDPMProgram(model, init, step, sample, denoising_losses)


def train_ddpm(config, workdir: str, images: np.ndarray, mesh, desc="ddpm"):
  """Trains (or resumes) a DDPM on uint8 `images`; returns its final state."""
  x = data.to_model_range(images)
  program = ddpm_program(config)
  batch_fn = data.batch_fn(x, config.seed, config.train.batch_size, mesh)
  init_from = config.train.get("init_from", "")
  return train.train_stage(
    os.path.join(workdir, "ckpt"),
    program.init(x.shape[1:]),
    ((program.step, config.train.num_steps),),
    batch_fn,
    mesh=mesh,
    checkpoint_every=config.train.checkpoint_every,
    log_every=config.train.log_every,
    log_fn=record.MetricWriter(workdir, prefix="train/").write,
    desc=desc,
    warm_start=(
      (lambda state: start_from_pretrained(state, init_from, mesh))
      if init_from
      else None
    ),
  )


def sample_ddpm(config, params, image_shape, mesh, key) -> np.ndarray:
  """config.sample.num_samples samples from the EMA parameters, as uint8.

  Sample i starts from noise drawn with fold_in(key, i), so with the
  deterministic DDIM sampler (eta = 0) each sample is independent of the
  batch it is drawn in.
  """
  program = ddpm_program(config)
  out = parallel.batched_apply(
    lambda indices: program.sample(params, key, indices, tuple(image_shape)),
    np.arange(config.sample.num_samples, dtype=np.int32),
    batch_size=config.sample.batch_size,
    mesh=mesh,
  )
  return data.to_uint8(out)


def recognisability(config, samples, classifier, mesh) -> dict:
  """How a classifier of real data sees the samples."""
  logits = predict_logits(classifier, data.to_model_range(samples), 1000, mesh)
  num_classes = logits.shape[-1]
  threshold = config.eval.confidence
  hist = class_histogram(logits, num_classes, threshold)
  return {
    "confident_share": float(confident_share(logits, threshold)),
    "classes_covered": int((np.asarray(hist) > 0).sum()),
    "num_classes": num_classes,
    "confident_per_class": [int(v) for v in hist],
  }


def heldout_loss(config, params, x_test, mesh) -> float:
  """Mean denoising loss of a DDPM on clean held-out images (fixed draws)."""
  losses = ddpm_program(config.ddpm).denoising_losses
  keys = jax.random.split(
    jax.random.key(config.seed + 2), config.eval.heldout_draws
  )
  values = parallel.batched_apply(
    lambda x: losses(params, x, keys), x_test, batch_size=512, mesh=mesh
  )
  return float(values.mean())


def train_and_score(
  config,
  workdir,
  images,
  classifier,
  real,
  heldout,
  mesh,
  inception=None,
  perceptual=None,
):
  """Trains a fresh DDPM (`config.ddpm`) on uint8 `images` in `workdir` and
  scores its samples, read back if that cell finished: Fréchet distance,
  precision and recall (Kynkäänniemi et al. 2019) to the `real` test images
  in the `classifier`'s feature space, the confident share and classes
  covered (`config.eval.confidence`), the same distance of the training
  images themselves, and the denoising loss on the clean `heldout` images.

  `inception`, when given, is `(features_fn, real_features)` for a real
  Inception FID next to the classifier-space distances; `perceptual` the
  same for the offline ImageNet features (`perceptual_features`): Fréchet
  distance, precision and recall there.
  """

  def compute():
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    state = train_ddpm(
      config.ddpm, workdir, images, mesh, desc=os.path.basename(workdir)
    )
    samples = sample_ddpm(
      config.ddpm,
      state.ema_params,
      images.shape[1:],
      mesh,
      jax.random.key(config.seed + 1),
    )
    data.save_image_grid(
      os.path.join(workdir, "samples.png"), samples[:100], ncol=10
    )

    def classify(u8):
      return predict_logits(
        classifier, data.to_model_range(u8), 1000, mesh, return_features=True
      )

    logits, features = classify(samples)
    _, real_features = real
    threshold = config.eval.confidence
    precision, recall = precision_recall(real_features, features)
    # The training images themselves: what a DDPM that fitted them perfectly
    # would score, so a protection's effect on the data is told apart from its
    # effect on training.
    _, data_features = classify(images)
    result = {
      "data_frechet_distance": frechet_distance(real_features, data_features),
      "frechet_distance": frechet_distance(real_features, features),
      "precision": precision,
      "recall": recall,
      "confident_share": float(confident_share(logits, threshold)),
      "classes_covered": int(
        (
          np.asarray(class_histogram(logits, logits.shape[-1], threshold)) > 0
        ).sum()
      ),
      "heldout_loss": heldout_loss(config, state.ema_params, heldout, mesh),
    }
    if inception is not None:
      features_fn, real_inception = inception
      result["inception_fid"] = frechet_distance(
        real_inception, features_fn(samples)
      )
    if perceptual is not None:
      features_fn, real_perceptual = perceptual
      fake = features_fn(samples)
      result["perceptual_fd"] = frechet_distance(real_perceptual, fake)
      result["perceptual_precision"], result["perceptual_recall"] = (
        precision_recall(real_perceptual, fake)
      )
    result["seconds"] = round(time.time() - start, 1)
    return result

  return record.cached_result(
    workdir, compute, inputs=record.array_digest(images)
  )

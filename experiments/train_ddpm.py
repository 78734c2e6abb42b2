"""Trains a DDPM, samples from it, and checks that the samples are
recognisable to a classifier of real data.

  python experiments/train_ddpm.py \
    --config=experiments/configs/train_ddpm.py[:variant] --workdir=DIR

Re-running the same command in the same workdir resumes from the last
checkpoint. The workdir receives config.json, metrics.jsonl, report.md,
samples.png (the first 100 samples), samples.npz (all, uint8) and real.png.
"""

import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from aigc_jax import (
  checkpoint,
  data,
  diffusion,
  launch,
  parallel,
  record,
  train,
)
from aigc_jax.eval import classifiers
from aigc_jax.metrics import class_histogram, confident_share
from aigc_jax.models import DDPMUNet, count_params


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


@launch.built_once_per_config
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
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"))
  fresh = checkpointer.latest_step() is None
  state = train.init_or_restore(program.init(x.shape[1:]), mesh, checkpointer)
  if fresh and config.train.get("init_from", ""):
    state = start_from_pretrained(state, config.train.init_from, mesh)
  batch_fn = lambda step: x[
    data.batch_indices(config.seed, step, len(x), config.train.batch_size)
  ]
  state = train.train_loop(
    state,
    program.step,
    batch_fn,
    num_steps=config.train.num_steps,
    mesh=mesh,
    checkpointer=checkpointer,
    checkpoint_every=config.train.checkpoint_every,
    log_every=config.train.log_every,
    log_fn=record.MetricWriter(workdir, prefix="train/").write,
    desc=desc,
  )
  checkpointer.close()
  return state


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


def evaluation_classifier(config, workdir: str):
  """The classifier named by config.eval, trained into workdir if needed,
  and its folder."""
  clf_dir = config.eval.classifier_workdir
  if clf_dir:
    return classifiers.load_classifier(clf_dir), clf_dir
  clf_dir = os.path.join(workdir, "classifier")
  return classifiers.trained_classifier(
    config.eval.classifier, clf_dir
  ), clf_dir


def recognisability(config, samples, classifier, mesh) -> dict:
  """How a classifier of real data sees the samples."""
  logits = classifiers.predict_logits(
    classifier, data.to_model_range(samples), 1000, mesh
  )
  num_classes = logits.shape[-1]
  threshold = config.eval.confidence
  hist = class_histogram(logits, num_classes, threshold)
  return {
    "confident_share": float(confident_share(logits, threshold)),
    "classes_covered": int((np.asarray(hist) > 0).sum()),
    "num_classes": num_classes,
    "confident_per_class": [int(v) for v in hist],
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.train.batch_size, mesh)
  if config.train.get("max_timestep", 0):
    raise ValueError(
      f"train.max_timestep={config.train.max_timestep}: a model trained on "
      "early timesteps only cannot sample from noise; set it to 0 here."
    )
  name, split = data.parse_source(config.data.train)
  train_set = data.load_dataset(
    name, split, data_dir=config.data.data_dir or None
  )
  data.save_image_grid(
    os.path.join(workdir, "real.png"), train_set.images[:100], ncol=10
  )

  start = time.time()
  state = train_ddpm(config, workdir, train_set.images, mesh)
  train_seconds = time.time() - start

  start = time.time()
  samples = sample_ddpm(
    config,
    state.ema_params,
    train_set.images.shape[1:],
    mesh,
    jax.random.key(config.seed + 1),
  )
  sample_seconds = time.time() - start
  if jax.process_index() == 0:
    np.savez_compressed(os.path.join(workdir, "samples.npz"), images=samples)
  data.save_image_grid(
    os.path.join(workdir, "samples.png"), samples[:100], ncol=10
  )

  classifier, clf_dir = evaluation_classifier(config, workdir)
  scores = recognisability(config, samples, classifier, mesh)
  result = {
    "train_seconds": round(train_seconds, 1),
    "sample_seconds": round(sample_seconds, 1),
    "unet_params": count_params(state.params),
    "classifier_test_accuracy": classifier.test_accuracy,
    **scores,
  }
  record.MetricWriter(workdir, prefix="eval/").write(
    config.train.num_steps, result
  )
  record.write_report(workdir, ddpm_report(config, workdir, result, clf_dir))
  return result


def ddpm_report(config, workdir, r, clf_dir) -> str:
  c = config
  table = record.markdown_table(
    ["quantity", "value"],
    [
      ["UNet parameters", f"{r['unet_params']:,}"],
      [f"training steps (batch {c.train.batch_size})", c.train.num_steps],
      ["training time (s)", r["train_seconds"]],
      [
        f"samples ({c.sample.sampler}, {c.sample.num_steps} steps)",
        c.sample.num_samples,
      ],
      ["sampling time (s)", r["sample_seconds"]],
      [
        "classifier test accuracy on real data",
        f"{r['classifier_test_accuracy']:.4f}",
      ],
      [
        f"samples classified with p > {c.eval.confidence}",
        f"{r['confident_share']:.3f}",
      ],
      [
        "classes among confident samples",
        f"{r['classes_covered']} / {r['num_classes']}",
      ],
    ],
  )
  return f"""# DDPM on {c.data.train} (variant `{c.variant}`)

Command:

{launch.command_line(__file__, c, workdir)}

{table}
Confident samples per class: {r["confident_per_class"]}

The classifier is the run in `{clf_dir}`. Samples: `samples.png` (first 100),
`samples.npz` (all); real training images: `real.png`.
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

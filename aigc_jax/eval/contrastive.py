"""The contrastive evaluator: a self-supervised learner (SimCLR, MoCo v2,
BYOL) trained on a (poisoned) set, scored by a linear probe of its frozen
features on the clean test set.

This is how contrastive poisoning is measured (He et al. 2023, arXiv
2202.11202, Table 1): the encoder trains on the poisoned images, a linear
classifier is fitted on its features of the clean training set, and its
clean test accuracy says how much the poison kept the encoder from learning
useful features. A config's `model` (the backbone), `contrastive` (heads,
temperatures, augmentation), `train` and `probe` blocks describe it
(`experiments/configs/cp.py`).
"""

import functools
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from aigc_jax import data, models, parallel, record, train

LEARNER_LABELS = {"simclr": "SimCLR", "moco": "MoCo v2", "byol": "BYOL"}


def build_learner(config, method: str, learning_rate, num_steps=None):
  """The `ContrastiveNet`, optimiser and bound train-step settings of a
  contrastive learner (`method` in train.CONTRASTIVE_METHODS)."""
  c, t = config.contrastive, config.train
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  backbone = models.make_classifier(config.model.name, 1, **kwargs)
  model = models.ContrastiveNet(
    backbone, c.proj_dim, c.hidden, predictor=method == "byol"
  )
  optimizer = train.classifier_optimizer(
    learning_rate,
    num_steps,
    momentum=t.momentum,
    weight_decay=t.weight_decay,
    grad_clip=t.grad_clip or None,
  )
  settings = {
    "method": method,
    "temperature": c.moco_temperature if method == "moco" else c.temperature,
  }
  return model, optimizer, settings


def learner_step(config, model, optimizer, settings, key):
  """`(state, images) -> (state, metrics)`: one step of the learner on two
  fresh `simclr_augment` views of `images`."""
  return lambda s, images: train.contrastive_train_step(
    s,
    images,
    key,
    model=model,
    optimizer=optimizer,
    augment=augmenter(config),
    target_momentum=config.contrastive.target_momentum,
    **settings,
  )


def augmenter(config):
  return functools.partial(
    train.simclr_augment,
    crop_scale=tuple(config.contrastive.crop_scale),
    flip=config.contrastive.flip,
  )


def learner_init(config, model, optimizer, method, key, image_shape):
  """`() -> state`: the learner's initial state for `image_shape` images."""
  return functools.partial(
    train.init_contrastive_state,
    model,
    optimizer,
    key,
    image_shape,
    method=method,
    queue_size=config.contrastive.queue_size,
  )


class LearnerProgram(NamedTuple):
  """A learner's model and jittable functions for one config, method and
  run length, built once so that every training set shares their traces
  and compilations (a closure per set was traced, lowered and compiled
  again; its feature extractor baked the parameters in as constants)."""

  init: Callable[[tuple[int, ...]], Callable[[], Any]]  # image shape -> init
  step: Callable  # (state, images) -> (state, metrics)
  features: Callable  # jitted (params, batch_stats, images) -> h


@train.built_once_per_config
def learner_program(config, method: str, num_steps: int) -> LearnerProgram:
  """The `LearnerProgram` of (config, method, num_steps), the same object
  for equal arguments."""
  model, optimizer, settings = build_learner(
    config, method, config.train.learning_rate, num_steps
  )
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  init = functools.cache(
    lambda shape: learner_init(
      config, model, optimizer, method, init_key, shape
    )
  )
  features = jax.jit(
    lambda params, batch_stats, images: train.contrastive_features(
      model, params, batch_stats, images
    )
  )
  return LearnerProgram(
    init,
    learner_step(config, model, optimizer, settings, train_key),
    features,
  )


# A full-batch probe fitted by a scan: one compilation for every encoder.
_linear_probe_accuracy = jax.jit(
  train.linear_probe_accuracy,
  static_argnames=("num_classes", "steps", "learning_rate", "weight_decay"),
)


def train_encoder(config, workdir, images, method, train_set, test_set, mesh):
  """Trains `method` on uint8 `images` and returns the linear-probe
  accuracy of its features (probe fitted on the clean training set) on the
  clean test set; read back if this cell finished."""
  return record.cached_result(
    workdir,
    functools.partial(
      _train_encoder, config, workdir, images, method, train_set, test_set, mesh
    ),
    inputs=record.array_digest(images),
  )


def _train_encoder(config, workdir, images, method, train_set, test_set, mesh):
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  x = data.to_model_range(images)
  n, bs = len(x), config.train.batch_size
  num_steps = config.train.num_epochs * data.steps_per_epoch(n, bs)
  program = learner_program(config, method, num_steps)
  state = train.train_stage(
    os.path.join(workdir, "ckpt"),
    program.init(x.shape[1:]),
    ((program.step, num_steps),),
    data.batch_fn(x, config.seed, bs, mesh),
    mesh=mesh,
    checkpoint_every=config.train.checkpoint_every,
    log_every=config.train.log_every,
    log_fn=record.MetricWriter(workdir, prefix="train/").write,
    desc=os.path.relpath(workdir, os.path.dirname(os.path.dirname(workdir))),
  )

  def featurise(u8):
    return parallel.batched_apply(
      functools.partial(program.features, state.params, state.batch_stats),
      data.to_model_range(u8),
      batch_size=1000,
      mesh=mesh,
    )

  accuracy = _linear_probe_accuracy(
    featurise(train_set.images),
    train_set.labels,
    featurise(test_set.images),
    test_set.labels,
    num_classes=train_set.num_classes,
    steps=config.probe.steps,
    learning_rate=config.probe.learning_rate,
    weight_decay=config.probe.weight_decay,
  )
  return {
    "probe_accuracy": float(accuracy),
    "steps": num_steps,
    "seconds": round(time.time() - start, 1),
  }

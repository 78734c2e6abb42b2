"""The classifier evaluator: build, train (resumably), restore and apply the
classifiers that score protections and generated samples.

Every experiment scores with a classifier of real data: the victim's clean
test accuracy (unlearnable examples, LE), the recognisability and feature
space of generated samples (UDP, feature unlearning), the digit a
text-to-image model draws (erasure). A config's `model`, `train`, `data`
and `seed` fields describe it (`experiments/configs/train_classifier.py`).
"""

import functools
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from aigc_jax import checkpoint, data, parallel, record, train
from aigc_jax.metrics import accuracy
from aigc_jax.models import make_classifier


class Classifier(NamedTuple):
  """A trained classifier and what is known of it.

  Attributes:
    model: the Flax module.
    params: its parameters.
    batch_stats: its BatchNorm statistics ({} without BatchNorm).
    test_accuracy: its clean test accuracy, or None when not measured.
    input_shape: (H, W, C) of the images it was trained on, or None.
  """

  model: nn.Module
  params: Any
  batch_stats: Any
  test_accuracy: float | None = None
  input_shape: tuple[int, ...] | None = None


def load_train_test(config) -> tuple[data.Dataset, data.Dataset]:
  """config.data's training set (a class-balanced subset of
  `config.data.limit` examples when that is > 0) and test set, checked."""
  train_set = data.load_split(
    config.data.train,
    config.data.data_dir,
    config.data.get("limit", 0),
    config.seed,
  )
  if train_set.num_examples == 0:
    raise ValueError(f"The training set {config.data.train!r} is empty.")
  return train_set, data.load_split(config.data.test, config.data.data_dir)


def build_classifier(config, num_classes: int, num_steps: int | None = None):
  """The model and optimiser a config describes."""
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  model = make_classifier(config.model.name, num_classes, **kwargs)
  optimizer = train.classifier_optimizer(
    config.train.learning_rate,
    num_steps,
    momentum=config.train.momentum,
    weight_decay=config.train.weight_decay,
    grad_clip=config.train.grad_clip or None,
    # Configs (and finished runs' records) from before these fields train
    # as they did then.
    schedule=config.train.get("schedule", "cosine"),
  )
  return model, optimizer


def predict_logits(
  classifier: Classifier,
  images,
  batch_size: int,
  mesh,
  *,
  return_features: bool = False,
):
  """Evaluation-mode logits (and features) of NHWC [-1, 1] host images, in
  sharded chunks. The variables are replicated over `mesh` first: a
  classifier trained or restored on other devices works as it is."""
  params, batch_stats = parallel.replicate(
    mesh, (classifier.params, classifier.batch_stats)
  )
  fn = functools.partial(
    _jitted_logits,
    params,
    batch_stats,
    model=classifier.model,
    return_features=return_features,
  )
  return parallel.batched_apply(fn, images, batch_size=batch_size, mesh=mesh)


# The parameters are arguments, not constants folded into the program, so
# every classifier of one architecture shares a compilation.
@functools.partial(jax.jit, static_argnames=("model", "return_features"))
def _jitted_logits(params, batch_stats, images, *, model, return_features):
  return train.classifier_logits(
    model, params, batch_stats, images, return_features=return_features
  )


class Recipe(NamedTuple):
  """How a classifier trains: the same for every training set of one size,
  so its jitted functions compile once."""

  model: Any
  init: Callable[[], train.ClassifierState]
  phases: tuple[tuple[Callable, int], ...]  # (step function, until step)
  seed: int  # of the initialisation, the augmentation and the batch order


def classifier_recipe(
  config,
  num_examples: int,
  num_classes: int,
  image_shape,
  *,
  seed_offset: int = 0,
  epochs: int | None = None,
  attack=None,
  views=None,
  view_phases: tuple[tuple[int, int | None], ...] = ((1, None),),
) -> Recipe:
  """SGD on `config`'s model for `epochs` (default `train.num_epochs`)
  epochs with crop/flip augmentation, seeded by `config.seed +
  seed_offset`; `attack` (adversarial training) and `views` (the max over
  augmented views) go to `train.classifier_train_step`. `view_phases`:
  `(num_views, until_epoch)` per phase, None: to the end (UEraser's K views
  then one)."""
  per_epoch = data.steps_per_epoch(num_examples, config.train.batch_size)
  num_steps = (epochs or config.train.num_epochs) * per_epoch
  model, optimizer = build_classifier(config, num_classes, num_steps)
  seed = config.seed + seed_offset
  init_key, train_key = jax.random.split(jax.random.key(seed))
  init = functools.partial(
    train.init_classifier_state, model, optimizer, init_key, image_shape
  )

  def step_fn(num_views):
    return lambda s, b: train.classifier_train_step(
      s,
      b["images"],
      b["labels"],
      train_key,
      model=model,
      optimizer=optimizer,
      crop_pad=config.train.crop_pad,
      flip=config.train.flip,
      attack=attack,
      views=views,
      num_views=num_views,
      label_smoothing=config.train.get("label_smoothing", 0.0),
    )

  phases = tuple(
    (
      step_fn(k),
      num_steps if until is None else min(until * per_epoch, num_steps),
    )
    for k, until in view_phases
  )
  return Recipe(model, init, phases, seed)


def fit(config, workdir, recipe, images, labels, test_set, mesh, desc=None):
  """Trains `recipe` on uint8 `images` in `workdir` (resuming from its last
  checkpoint) and scores it on `test_set`: the classifier and
  {"test_accuracy", "steps", "seconds"}."""
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  batch_fn = data.batch_fn(
    {"images": data.to_model_range(images), "labels": labels},
    recipe.seed,
    config.train.batch_size,
    mesh,
  )
  state = train.train_stage(
    os.path.join(workdir, "ckpt"),
    recipe.init,
    recipe.phases,
    batch_fn,
    mesh=mesh,
    checkpoint_every=config.train.checkpoint_every,
    log_every=config.train.log_every,
    log_fn=record.MetricWriter(workdir, prefix="train/").write,
    desc=desc or os.path.basename(workdir),
  )
  classifier = Classifier(recipe.model, state.params, state.batch_stats)
  logits = predict_logits(
    classifier,
    data.to_model_range(test_set.images),
    config.eval_batch_size,
    mesh,
  )
  return classifier, {
    "test_accuracy": float(accuracy(logits, test_set.labels)),
    "steps": recipe.phases[-1][1],
    "seconds": round(time.time() - start, 1),
  }


def train_classifier(config, workdir: str) -> dict:
  """Trains on config.data.train and evaluates on config.data.test, resuming
  from `workdir`'s last checkpoint; writes `report.md`.

  Returns:
    {"test_accuracy", "train_seconds", "num_classes"}.
  """
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.train.batch_size, mesh)
  train_set, test_set = load_train_test(config)
  num_classes = train_set.num_classes
  recipe = classifier_recipe(
    config, train_set.num_examples, num_classes, train_set.images.shape[1:]
  )
  _, fitted = fit(
    config,
    workdir,
    recipe,
    train_set.images,
    train_set.labels,
    test_set,
    mesh,
    desc="classifier",
  )
  test_acc, train_seconds = fitted["test_accuracy"], fitted["seconds"]
  num_steps = fitted["steps"]
  result = {
    "test_accuracy": test_acc,
    "train_seconds": train_seconds,
    "num_classes": num_classes,
  }
  record.MetricWriter(workdir, prefix="eval/").write(num_steps, result)
  table = record.markdown_table(
    ["train data", "test data", "steps", "test accuracy", "train time (s)"],
    [
      [
        f"{config.data.train} ({train_set.num_examples})",
        f"{config.data.test} ({test_set.num_examples})",
        num_steps,
        f"{test_acc:.4f}",
        f"{train_seconds:.1f}",
      ]
    ],
  )
  record.write_report(
    workdir,
    f"# Classifier ({config.model.name}, variant `{config.variant}`)\n\n"
    + table,
  )
  return result


def trained_classifier(config, workdir: str) -> Classifier:
  """The classifier of the run in `workdir`, training it first unless that
  run has finished."""
  record.prepare_workdir(workdir, config.to_json())
  try:
    record.last_metric(workdir, "eval/test_accuracy")
  except (FileNotFoundError, KeyError):
    train_classifier(config, workdir)
  return load_classifier(workdir)


def load_classifier(workdir: str) -> Classifier:
  """Rebuilds a finished run's classifier from its config and checkpoint
  (its test accuracy None if the run did not evaluate)."""
  config = ml_collections.ConfigDict(record.load_config_json(workdir))
  train_set = data.load_split(config.data.train, config.data.data_dir)
  # A scheduled optimiser, as in training: only the state's structure matters.
  model, optimizer = build_classifier(config, train_set.num_classes, 1)
  image_shape = train_set.images.shape[1:]
  abstract = jax.eval_shape(
    lambda: train.init_classifier_state(
      model, optimizer, jax.random.key(0), image_shape
    )
  )
  # Replicated on every device of every process: a multi-process job's
  # processes each hold a copy (one process's device would leave the
  # others nothing to restore onto).
  mesh = parallel.make_mesh()
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"))
  state = checkpointer.restore(
    checkpoint.abstract_state(abstract, parallel.replicated(mesh))
  )
  checkpointer.close()
  try:
    test_accuracy = record.last_metric(workdir, "eval/test_accuracy")
  except (FileNotFoundError, KeyError):
    test_accuracy = None
  return Classifier(
    model, state.params, state.batch_stats, test_accuracy, tuple(image_shape)
  )


def predicted_labels(classifier: Classifier, images, mesh, batch_size=500):
  """The classifier's label for each NHWC [-1, 1] image, center-cropped to
  its input size first (e.g. the padding added for a larger model)."""
  images = data.center_crop(np.asarray(images), classifier.input_shape[0])
  logits = predict_logits(classifier, images, batch_size, mesh)
  return np.asarray(logits).argmax(-1)


__all__ = [
  "Classifier",
  "build_classifier",
  "load_classifier",
  "load_train_test",
  "predict_logits",
  "predicted_labels",
  "train_classifier",
  "trained_classifier",
]

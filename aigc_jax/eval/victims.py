"""The victim evaluator: a classifier trained on (protected) data under a
countermeasure, scored by its clean test accuracy.

This is how unlearnable examples are measured (Huang et al. 2021, Table 1;
the seed's table of countermeasures): the victim trains on the protected
set, with or without a countermeasure, and its accuracy on the clean test
set says how much the protection kept it from learning. Countermeasures
(`COUNTERMEASURES`):

- `none`: standard training.
- `iss_grayscale`, `iss_jpeg`, `iss_bdr`: ISS (Liu et al. 2023, arXiv
  2301.13838) squeezes the training images first (`purify.squeeze`).
- `at`: Madry et al.'s PGD adversarial training (arXiv 1706.06083).
- `aa`: UEraser's adversarial augmentation (Qin et al. 2023, arXiv
  2303.15127): the max over K augmented views, then one view.

A config's `model`, `train` (`batch_size`, `num_epochs`, ...), `counter`
(the countermeasures' settings), `eval_batch_size` and `seed` describe the
victim (`experiments/configs/unlearnable.py`).
"""

import functools
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from aigc_jax import data, protect, record, train
from aigc_jax.eval.classifiers import (
  Classifier,
  build_classifier,
  predict_logits,
)
from aigc_jax.metrics import accuracy
from aigc_jax.purify import squeeze

COUNTERMEASURES = (
  "none",
  "iss_grayscale",
  "iss_jpeg",
  "iss_bdr",
  "at",
  "aa",
)


def check_countermeasure(name: str) -> None:
  if name not in COUNTERMEASURES:
    raise ValueError(
      f"Unknown countermeasure {name!r}; choose from {COUNTERMEASURES}."
    )


def countermeasure_label(config, name: str) -> str:
  """How a report names countermeasure `name` under `config.counter`."""
  check_countermeasure(name)
  cm = config.counter
  return {
    "none": "vanilla (no countermeasure)",
    "iss_grayscale": "ISS grayscale",
    "iss_jpeg": f"ISS JPEG-{cm.jpeg_quality}",
    "iss_bdr": f"ISS {cm.bdr_bits}-bit depth",
    "at": f"AT (PGD-{cm.at_steps}, {cm.at_eps:g}/255)",
    "aa": f"AA (UEraser, K={cm.aa_views})",
  }[name]


def apply_countermeasure_to_data(config, name: str, images):
  """What countermeasure `name` does to the uint8 training images before
  training (ISS squeezes them; the others train on them as they are)."""
  if name.startswith("iss_"):
    return squeeze(
      images,
      name.removeprefix("iss_"),
      quality=config.counter.jpeg_quality,
      bits=config.counter.bdr_bits,
    )
  return images


class VictimRecipe(NamedTuple):
  """How the victim trains under one countermeasure: the same for every
  training set of that size, so its jitted functions compile once."""

  model: Any
  init: Callable[[], train.ClassifierState]
  phases: tuple[tuple[Callable, int], ...]  # (step function, until step)
  seed: int  # of the initialisation, the augmentation and the batch order


def victim_recipe(
  config, name, num_examples, num_classes, image_shape, seed_offset=0
) -> VictimRecipe:
  """The victim's model, initialiser and training phases under countermeasure
  `name` (standard, AT or UEraser's K-view then one-view phases), with the
  seed `config.seed + seed_offset`."""
  check_countermeasure(name)
  cm = config.counter
  per_epoch = data.steps_per_epoch(num_examples, config.train.batch_size)
  epochs = cm.aa_epochs if name == "aa" else config.train.num_epochs
  num_steps = epochs * per_epoch
  model, optimizer = build_classifier(config, num_classes, num_steps)
  seed = config.seed + seed_offset
  init_key, train_key = jax.random.split(jax.random.key(seed))
  init = functools.partial(
    train.init_classifier_state, model, optimizer, init_key, image_shape
  )
  attack = None
  if name == "at":
    attack = train.pgd_attack(
      protect.budget(cm.at_eps),
      steps=cm.at_steps,
      step_size=protect.step_size(cm.at_step_size),
      unroll=protect.default_unroll(),
    )

  def step_fn(num_views):
    views = train.ueraser_augment if name == "aa" else None
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
    )

  # UEraser: K views while epochs < aa_max_epochs, then one (UEraser-Lite).
  phases = ((step_fn(1), num_steps),)
  if name == "aa":
    phases = (
      (step_fn(cm.aa_views), min(cm.aa_max_epochs * per_epoch, num_steps)),
      (step_fn(1), num_steps),
    )
  return VictimRecipe(model, init, phases, seed)


def victim_trainer(config, test_set, mesh):
  """`train(workdir, images, labels, countermeasure, seed_offset=0) ->
  result`: trains the victim on uint8 `images` and returns its clean test
  accuracy, read back if that cell finished. Recipes are shared between
  calls, so each countermeasure compiles once per run and seed (on a CPU,
  fifteen digits victims spent three of their four minutes compiling
  identical steps). A victim with `seed_offset` k > 0 (another draw of the
  initialisation and batch order) lives in the sibling folder
  `<workdir>_seed<k>`.

  Grayscale is the identity on single-channel images, so there the
  `iss_grayscale` cell is the vanilla victim of the same images, trained
  (or read back) in the sibling folder `none`."""
  config = config.copy_and_resolve_references()  # later edits stay out
  recipe = functools.cache(functools.partial(victim_recipe, config))

  def train_one(workdir, images, labels, name, seed_offset=0):
    if name == "iss_grayscale" and images.shape[-1] == 1:
      vanilla = os.path.join(os.path.dirname(workdir), "none")
      return train_one(vanilla, images, labels, "none", seed_offset)
    if seed_offset:
      workdir = f"{workdir}_seed{seed_offset}"
    num_classes = int(max(labels.max(), test_set.labels.max())) + 1
    return record.cached_result(
      workdir,
      lambda: _train_victim(
        config,
        workdir,
        recipe(name, len(images), num_classes, images.shape[1:], seed_offset),
        apply_countermeasure_to_data(config, name, images),
        labels,
        test_set,
        mesh,
      ),
      inputs=record.array_digest(images, labels),
    )

  return train_one


def _train_victim(config, workdir, recipe, images, labels, test_set, mesh):
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  x = data.to_model_range(images)
  n, bs = len(x), config.train.batch_size

  def batch_fn(step):
    idx = data.batch_indices(recipe.seed, step, n, bs)
    return {"images": x[idx], "labels": labels[idx]}

  state = train.train_stage(
    os.path.join(workdir, "ckpt"),
    recipe.init,
    recipe.phases,
    batch_fn,
    mesh=mesh,
    checkpoint_every=config.train.checkpoint_every,
    log_every=config.train.log_every,
    log_fn=record.MetricWriter(workdir, prefix="train/").write,
    desc=os.path.relpath(workdir, os.path.dirname(os.path.dirname(workdir))),
  )
  logits = predict_logits(
    Classifier(recipe.model, state.params, state.batch_stats),
    data.to_model_range(test_set.images),
    config.eval_batch_size,
    mesh,
  )
  return {
    "test_accuracy": float(accuracy(logits, test_set.labels)),
    "steps": recipe.phases[-1][1],
    "seconds": round(time.time() - start, 1),
  }


__all__ = [
  "COUNTERMEASURES",
  "VictimRecipe",
  "apply_countermeasure_to_data",
  "check_countermeasure",
  "countermeasure_label",
  "victim_recipe",
  "victim_trainer",
]

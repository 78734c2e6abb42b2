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

from aigc_jax import protect, record, train
from aigc_jax.eval.classifiers import Recipe, classifier_recipe, fit
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


def victim_recipe(
  config, name, num_examples, num_classes, image_shape, seed_offset=0
) -> Recipe:
  """The victim's model, initialiser and training phases under countermeasure
  `name` (standard, AT or UEraser's K-view then one-view phases), with the
  seed `config.seed + seed_offset`."""
  check_countermeasure(name)
  cm = config.counter
  attack = views = None
  view_phases = ((1, None),)
  if name == "at":
    attack = train.pgd_attack(
      protect.budget(cm.at_eps),
      steps=cm.at_steps,
      step_size=protect.step_size(cm.at_step_size),
      unroll=protect.default_unroll(),
    )
  if name == "aa":
    # UEraser: K views while epochs < aa_max_epochs, then one (UEraser-Lite).
    views = train.ueraser_augment
    view_phases = ((cm.aa_views, cm.aa_max_epochs), (1, None))
  return classifier_recipe(
    config,
    num_examples,
    num_classes,
    image_shape,
    seed_offset=seed_offset,
    epochs=cm.aa_epochs if name == "aa" else None,
    attack=attack,
    views=views,
    view_phases=view_phases,
  )


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
      lambda: fit(
        config,
        workdir,
        recipe(name, len(images), num_classes, images.shape[1:], seed_offset),
        apply_countermeasure_to_data(config, name, images),
        labels,
        test_set,
        mesh,
        desc=os.path.relpath(
          workdir, os.path.dirname(os.path.dirname(workdir))
        ),
      )[1],
      inputs=record.array_digest(images, labels),
    )

  return train_one


__all__ = [
  "COUNTERMEASURES",
  "apply_countermeasure_to_data",
  "check_countermeasure",
  "countermeasure_label",
  "victim_recipe",
  "victim_trainer",
]

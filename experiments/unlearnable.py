"""Unlearnable examples (EMN, EMN class-wise, REMN, LSP) and the
countermeasures against them (ISS, adversarial training, adversarial
augmentation), measured as the clean test accuracy of a classifier trained on
the protected data.

  python experiments/unlearnable.py \
    --config=experiments/configs/unlearnable.py[:variant] --workdir=DIR

Writes `protections/<name>.npz` (uint8 `images`, `labels`, `delta` in [0,
255] units; the format experiments/le.py reads) with a grid of clean /
protected / noise, `victims/<set>/<countermeasure>/` per trained classifier,
`report.md` in the layout of the seed's table, and metrics.jsonl. Re-running
the command resumes: finished protections and classifiers are read back.
"""

import functools
import os
import time

import ml_collections

from aigc_jax import launch, parallel, record
from aigc_jax.eval import classifiers, victims
from aigc_jax.protect import recipes


def check_config(config, mesh) -> None:
  """Fails on bad settings before any work."""
  recipes.check_config(config, mesh)
  for name in config.countermeasures:
    victims.check_countermeasure(name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  check_config(config, mesh)
  train_set, test_set = classifiers.load_train_test(config)
  writer = record.MetricWriter(workdir)
  start = time.time()
  sets, infos = {"clean": train_set.images}, {}
  for name in config.protections:
    recipe = recipes.PROTECTIONS[name]
    sets[name], infos[name] = recipes.protected_set(
      workdir,
      name,
      train_set,
      recipe.budget(config, train_set.images.shape[1:]),
      functools.partial(recipe.generate, config, train_set, mesh),
    )
    writer.write(0, {f"protect/{name}/{k}": v for k, v in infos[name].items()})
  results = {}
  train_victim = victims.victim_trainer(config, test_set, mesh)
  for set_name, images in sets.items():
    for cm in config.countermeasures:
      results[set_name, cm] = train_victim(
        os.path.join(workdir, "victims", set_name, cm),
        images,
        train_set.labels,
        cm,
      )
      writer.write(
        0,
        {
          f"eval/{set_name}/{cm}/{k}": v
          for k, v in results[set_name, cm].items()
        },
      )
  total = round(time.time() - start, 1)
  record.write_report(
    workdir,
    unlearnable_report(
      config, workdir, results, infos, total, train_set.images.shape[-1]
    ),
  )
  return {
    "accuracy": {
      f"{s}/{c}": r["test_accuracy"] for (s, c), r in results.items()
    },
    "protections": infos,
    "seconds": total,
  }


def unlearnable_report(config, workdir, results, infos, total, channels) -> str:
  sets = ["clean", *infos]
  header = ["countermeasure"] + [recipes.label(s) for s in sets]
  rows = [
    [victims.countermeasure_label(config, cm)]
    + [f"{100 * results[s, cm]['test_accuracy']:.1f}" for s in sets]
    for cm in config.countermeasures
  ]
  table = record.markdown_table(header, rows)
  lines = []
  if "none" in config.countermeasures:
    clean = results["clean", "none"]["test_accuracy"]
    for s in infos:
      drop = 100 * (clean - results[s, "none"]["test_accuracy"])
      verdict = "met" if drop >= 40 else "missed"
      if s.startswith("random_"):
        verdict = "a control"
      lines.append(f"- {recipes.label(s)}: {drop:.1f} points ({verdict})")
  ptable = record.markdown_table(
    [
      "protection",
      "budget",
      "largest size (/255)",
      "L∞ (/255)",
      "rounds / steps",
      "generator's accuracy on it",
      "time (s)",
    ],
    [
      [
        recipes.label(s),
        f"{i['norm']} {i['eps_255']:.3g}/255",
        f"{i['max_size_255']:.3g}",
        f"{i['linf_255']:.0f}",
        i["rounds"],
        f"{i['train_accuracy']:.3f}" if "train_accuracy" in i else "–",
        i["seconds"],
      ]
      for s, i in infos.items()
    ],
  )
  grayscale_note = ""
  if channels == 1 and "iss_grayscale" in config.countermeasures:
    grayscale_note = (
      "\nGrayscale is the identity on single-channel images, so its row "
      "is the vanilla victims' (not trained twice).\n"
    )
  title = f"Unlearnable examples on {config.data.train}"
  return f"""# {title} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Clean test accuracy (%) of a {config.model.name} trained for
{config.train.num_epochs} epochs ({config.counter.aa_epochs} with AA) on each
training set, as in the seed's table (columns: the data the classifier was
trained on; rows: what the trainer did against the protection). Total time
{total} s.

{table}{grayscale_note}
Accuracy drop of each protection without a countermeasure, against clean data
(target: at least 40 points):

{chr(10).join(lines)}

## The protections

{ptable}
Protected sets: `protections/<name>.npz` (uint8 `images`, `labels`, `delta`),
with `protections/<name>_grid.png` (clean / protected / noise amplified).
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

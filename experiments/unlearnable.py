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

import os

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
  protected, infos = recipes.protected_sets(
    config,
    workdir,
    train_set,
    mesh,
    lambda name, info: writer.write(
      0, {f"protect/{name}/{k}": v for k, v in info.items()}
    ),
  )
  sets = {"clean": train_set.images, **protected}
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
  total = record.run_seconds(workdir)
  record.write_report(
    workdir,
    unlearnable_report(config, workdir, results, infos, total, test_set),
  )
  return {
    "accuracy": {
      f"{s}/{c}": r["test_accuracy"] for (s, c), r in results.items()
    },
    "protections": infos,
    "seconds": total,
  }


def protections_table(infos) -> str:
  """Each protection's budget, measured size, work and time."""
  header = ["protection", "budget", "largest size (/255)", "L∞ (/255)"]
  header += ["rounds / steps", "generator's accuracy on it", "time (s)"]
  return record.markdown_table(
    header,
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


def drops(config, results, infos) -> list[str]:
  """Each protection's accuracy drop without a countermeasure against
  clean data, held to `expected` (the random controls are not)."""
  if "none" not in config.countermeasures:
    return ["- (needs the `none` countermeasure)"]
  clean, lines = results["clean", "none"]["test_accuracy"], []
  for s in infos:
    drop = 100 * (clean - results[s, "none"]["test_accuracy"])
    verdict = record.expectation(config.expected, "drop_points", drop)
    if s.startswith("random_"):
      verdict = "a control"
    lines.append(f"- {recipes.label(s)}: {drop:.1f} points ({verdict})")
  return lines


def unlearnable_report(config, workdir, results, infos, total, test_set) -> str:
  sets, n = ["clean", *infos], test_set.num_examples
  header = ["countermeasure"] + [recipes.label(s) for s in sets]
  rows = [
    [victims.countermeasure_label(config, cm)]
    + [record.percent_text(results[s, cm]["test_accuracy"], n) for s in sets]
    for cm in config.countermeasures
  ]
  grayscale_note = ""
  if (
    test_set.images.shape[-1] == 1 and "iss_grayscale" in config.countermeasures
  ):
    grayscale_note = (
      "\nGrayscale is the identity on single-channel images, so its row "
      "is the vanilla victims' (not trained twice).\n"
    )
  title = f"Unlearnable examples on {config.data.train}"
  return f"""# {title} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Clean test accuracy (%, with its 95% interval over the {n} test images) of
a {config.model.name} trained for {config.train.num_epochs} epochs
({config.counter.aa_epochs} with AA) on each training set, as in the seed's
table (columns: the data the classifier was trained on; rows: what the
trainer did against the protection). Total time {total} s.

{record.markdown_table(header, rows)}{grayscale_note}
Accuracy drop of each protection without a countermeasure, against clean data:

{chr(10).join(drops(config, results, infos))}

## The protections

{protections_table(infos)}
Protected sets: `protections/<name>.npz` (uint8 `images`, `labels`, `delta`),
with `protections/<name>_grid.png` (clean / protected / noise amplified).
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

"""Contrastive poisoning (CP-C class-wise, CP-S sample-wise; He et al.,
ICLR 2023) and the contrastive learners it targets (SimCLR, MoCo v2,
BYOL), measured as the linear-probe accuracy on the clean test set of an
encoder trained on the poisoned data.

  python experiments/cp.py --config=experiments/configs/cp.py[:variant] \
    --workdir=DIR

Writes `protections/cp_class.npz` and `protections/cp_sample.npz` (the
format of experiments/unlearnable.py, which experiments/le.py reads),
`encoders/<set>/<method>/` per trained encoder, `report.md` and
metrics.jsonl. Re-running the command resumes.
"""

import functools
import os

import ml_collections

from aigc_jax import (
  data,
  launch,
  parallel,
  protect,
  record,
  train,
)
from aigc_jax.eval import classifiers, contrastive
from aigc_jax.protect import recipes

# The random controls last: CP-S starts from CP-C's noise, not theirs.
PROTECTIONS = ("cp_class", "cp_sample", "random_sample", "random_class")


def check_config(config, mesh) -> None:
  """Fails on bad settings before any work."""
  for name in config.protections:
    if name not in PROTECTIONS:
      raise ValueError(
        f"Unknown protection {name!r}; choose from {PROTECTIONS}."
      )
  for method in (*config.methods, config.attacker):
    if method not in train.CONTRASTIVE_METHODS:
      raise ValueError(
        f"Unknown contrastive method {method!r}; choose from "
        f"{train.CONTRASTIVE_METHODS}."
      )
  protect.budget(config.protect.eps)
  parallel.check_batch_size(config.train.batch_size, mesh)


def protected_sets(config, workdir, train_set, mesh, writer):
  """The clean set and each protection of `config.protections`, each
  generated once into `protections/`; CP-S starts from CP-C's noise."""
  b = protect.budget(config.protect.eps)
  sets, infos = {"clean": train_set.images}, {}
  for name in PROTECTIONS:  # CP-C first: CP-S starts from it
    if name not in config.protections:
      continue
    classwise = name.endswith("_class")
    if name.startswith("random_"):
      generate = functools.partial(
        recipes.generate_random, config, train_set, classwise=classwise
      )
    else:
      init = None
      if name == "cp_sample" and "cp_class" in sets:
        init = data.to_model_range(sets["cp_class"]) - data.to_model_range(
          train_set.images
        )
      generate = functools.partial(
        recipes.generate_cp,
        config,
        train_set,
        mesh,
        classwise=classwise,
        init=init,
      )
    sets[name], infos[name] = recipes.protected_set(
      workdir, name, train_set, b, generate
    )
    if not name.startswith("random_"):
      writer.write(
        0, {f"protect/{name}/{k}": v for k, v in infos[name].items()}
      )
  return sets, infos


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  check_config(config, mesh)
  train_set, test_set = classifiers.load_train_test(config)
  writer = record.MetricWriter(workdir)
  sets, infos = protected_sets(config, workdir, train_set, mesh, writer)
  results = {}
  for set_name, images in sets.items():
    for method in config.methods:
      results[set_name, method] = r = contrastive.train_encoder(
        config,
        os.path.join(workdir, "encoders", set_name, method),
        images,
        method,
        train_set,
        test_set,
        mesh,
      )
      writer.write(
        0, {f"eval/{set_name}/{method}/{k}": v for k, v in r.items()}
      )
  total = record.run_seconds(workdir)
  record.write_report(
    workdir,
    cp_report(config, workdir, results, infos, total, test_set.num_examples),
  )
  return {
    "probe_accuracy": {
      f"{s}/{m}": r["probe_accuracy"] for (s, m), r in results.items()
    },
    "protections": infos,
    "seconds": total,
  }


def cp_report(config, workdir, results, infos, total, n) -> str:
  """`n`: the test images each probe accuracy is measured on."""
  sets = ["clean", *infos]
  table = record.markdown_table(
    ["learner"] + [recipes.label(s, clean="clean") for s in sets],
    [
      [contrastive.LEARNER_LABELS[m]]
      + [record.percent_text(results[s, m]["probe_accuracy"], n) for s in sets]
      for m in config.methods
    ],
  )
  acc = {k: 100 * r["probe_accuracy"] for k, r in results.items()}
  drops = []
  for m in config.methods:
    for s in infos:
      drop = acc["clean", m] - acc[s, m]
      line = f"- {contrastive.LEARNER_LABELS[m]}, {recipes.label(s)}: "
      line += f"{drop:.1f} points"
      key = f"{s}_drop_points"
      if m == config.attacker and key in config.expected:
        line += ": " + record.expectation(config.expected, key, drop)
      drops.append(line)
  ptable = record.markdown_table(
    ["protection", "budget", "L∞ (/255)", "rounds", "final loss", "time (s)"],
    [
      [
        recipes.label(s, clean="clean"),
        f"{i['norm']} {i['eps_255']:.3g}/255",
        f"{i['linf_255']:.0f}",
        i["rounds"],
        f"{i['final_loss']:.3f}" if "final_loss" in i else "–",
        i["seconds"],
      ]
      for s, i in infos.items()
    ],
  )
  title = f"Contrastive poisoning on {config.data.train}"
  return f"""# {title} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Linear-probe accuracy (%, with its 95% interval over the {n} test images)
on the clean test set of a {config.model.name}
encoder trained for {config.train.num_epochs} epochs on each set (columns)
with each learner (rows); the probe is fitted on frozen features of the
clean training set. The poison is generated against
{contrastive.LEARNER_LABELS[config.attacker]}. Total time {total} s.

{table}
Drop of the probe accuracy against clean training (for the learner the
poison was made against, against the config's `expected` block):

{chr(10).join(drops)}

## The protections

{ptable}
Protected sets: `protections/<name>.npz` (uint8 `images`, `labels`, `delta`).
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

"""LE: purify unlearnable examples with Joint-Conditional Diffusion
Purification and measure what a classifier trained on them learns, beside the
other countermeasures (the seed's table; Jiang et al., ACM MM 2023).

  python experiments/le.py --config=experiments/configs/le.py[:variant] \
    --workdir=DIR

Steps, each cached in the workdir so that a re-run resumes:
  1. the protections of experiments/unlearnable.py (read from
     `protections_from`, or generated into `protections/`);
  2. a DDPM trained on the learnable manifold: other, clean, unlabelled
     images (`ddpm/`);
  3. each training set purified by each purifier
     (`purified/<purifier>/<set>.npz`, with a grid of protected / purified);
  4. a victim per (set, countermeasure or purifier) (`victims/`);
  5. with `contrastive_from` (an experiments/cp.py workdir): its CP sets
     purified, and a contrastive encoder per (set, purifier, learner)
     (`encoders/`), beside that run's clean and vanilla encoders;
  6. with `udp_from` (an experiments/udp.py workdir): its clean and
     protected sets purified, and a DDPM trained and scored on each
     (`udp_eval/`) with that run's evaluation, beside its own results;
  7. `report.md` and metrics.jsonl.
"""

import os
import time

import jax
import ml_collections
import numpy as np

from aigc_jax import data, launch, models, parallel, record, train
from aigc_jax.eval import (
  classifiers,
  contrastive,
  ddpm,
  purifiers,
  runs,
  victims,
)
from aigc_jax.protect import recipes

# Countermeasures whose victims train with one seed whatever victim_seeds
# says: each seed would compile their costlier steps anew (2-4x a plain
# victim's time on digits).
ONE_SEED_ROWS = ("at", "aa")
SHORT_LABELS = {
  "none": "",
  "avatar": " + AVATAR-style",
  "le": " + LE",
  "le_paper": " + LE (paper's form)",
  "le_mse": " + LE (MSE only)",
  "le_lpips": " + LE (LPIPS only)",
}


def load_protections(config, workdir, train_set, mesh) -> tuple[dict, dict]:
  """The protected training sets, from `protections_from` or generated."""
  source = config.protections_from or workdir
  for name in config.protections:
    path = os.path.join(source, "protections", f"{name}.npz")
    if config.protections_from and not os.path.exists(path):
      raise FileNotFoundError(
        f"{path} does not exist: run experiments/unlearnable.py with "
        f"protections including {name!r} into {source}, or leave "
        "protections_from empty to generate them here."
      )
  return recipes.protected_sets(config, source, train_set, mesh)


def victim_cells(config) -> list[tuple[str, str]]:
  """The (training set, row) pairs to train a victim for: on clean data the
  rows in `clean_rows`; on each protection every countermeasure and
  purifier, and the ablation purifiers on `ablation_sets` only."""
  cells = [("clean", row) for row in config.clean_rows]
  for name in config.protections:
    rows = [*config.countermeasures, *config.purifiers]
    if name in config.ablation_sets:
      rows += config.ablations
    cells += [(name, row) for row in rows]
  return cells


def seeded_victim(train_victim, workdir, images, labels, row, num_seeds):
  """One cell's victim trained with `num_seeds` seeds (initialisation and
  batch order): the mean test accuracy, and each seed's in
  `seed_accuracies`. On digits LE and unguided purification differ by a
  test digit or two, which one victim's seed can move as well."""
  runs = [
    train_victim(workdir, images, labels, row, k) for k in range(num_seeds)
  ]
  accuracies = [r["test_accuracy"] for r in runs]
  return {
    **runs[0],
    "test_accuracy": float(np.mean(accuracies)),
    "seed_accuracies": accuracies,
    "seconds": round(sum(r["seconds"] for r in runs), 1),
  }


def check_config(config, mesh) -> None:
  recipes.check_config(config, mesh)
  for name in config.countermeasures:
    victims.check_countermeasure(name)
  if config.victim_seeds < 1:
    raise ValueError(
      f"victim_seeds is {config.victim_seeds}; set it to 1 or more (the "
      "number of victims trained on each set and countermeasure)."
    )
  for name in (*config.purifiers, *config.ablations):
    purifiers.guidance(config.purify, name)
  rows = (*config.countermeasures, *config.purifiers, *config.ablations)
  for row in config.clean_rows:
    if row not in rows:
      raise ValueError(
        f"clean_rows names {row!r}, which is not among the countermeasures "
        f"and purifiers {rows}."
      )
  for method in config.contrastive_methods:
    if method not in train.CONTRASTIVE_METHODS:
      raise ValueError(
        f"Unknown contrastive method {method!r}; choose from "
        f"{train.CONTRASTIVE_METHODS}."
      )
  parallel.check_batch_size(config.ddpm.train.batch_size, mesh)
  if not 0 <= config.purify.split < config.purify.t_star:
    raise ValueError(
      f"purify.split={config.purify.split} must lie in [0, t_star="
      f"{config.purify.t_star}) so that both guidance terms act."
    )


def make_purifier(config, workdir, params, mesh, writer):
  """`purify(row, set_name, images, clean) -> purified uint8` and the dict
  it fills with each result's quality (PSNR to the `clean` originals and to
  the input, seconds); each purified set is computed once into
  `purified/<row>/<set>.npz`."""
  fns, quality = {}, {}
  lpips_variables = models.load_lpips(config.purify.lpips)

  def purify_set(row, set_name, images, clean):
    if row not in fns:
      fns[row] = purifiers.purifier(
        config.ddpm,
        config.purify,
        row,
        jax.random.key(config.seed),
        params,
        lpips_variables,
      )
    path = os.path.join(workdir, "purified", row, f"{set_name}.npz")
    out, seconds = purifiers.purified_set(
      path, images, fns[row], config.purify.batch_size, mesh
    )
    quality[row, set_name] = q = {
      "input_psnr_to_clean_db": purifiers.mean_psnr(images, clean),
      "psnr_to_clean_db": purifiers.mean_psnr(out, clean),
      "psnr_to_input_db": purifiers.mean_psnr(out, images),
      "seconds": seconds,
    }
    writer.write(0, {f"purify/{row}/{set_name}/{k}": v for k, v in q.items()})
    return out

  return purify_set, quality


def contrastive_results(config, workdir, run: runs.Run, purify_set, mesh):
  """Linear-probe accuracy of each learner in `contrastive_methods` on the
  CP run's sets as they are (that run's own encoders, read back) and after
  each purifier: {(set, row, learner): result}."""
  results = {}
  for set_name, images in run.sets.items():
    rows = ["none"] if set_name == "clean" else ["none", *config.purifiers]
    for row in rows:
      if row == "none":
        root, x = os.path.join(run.path, "encoders", set_name), images
      else:
        root = os.path.join(workdir, "encoders", row, set_name)
        x = purify_set(row, f"cp/{set_name}", images, run.sets["clean"])
      for method in config.contrastive_methods:
        results[set_name, row, method] = contrastive.train_encoder(
          run.config,
          os.path.join(root, method),
          x,
          method,
          run.train_set,
          run.test_set,
          mesh,
        )
  return results


def udp_results(config, workdir, run: runs.Run, purify_set, mesh):
  """The UDP run's evaluation (a fresh DDPM trained on the set, its samples
  scored by that run's classifier) of its clean and protected sets as they
  are (that run's results, read back) and after each purifier:
  {(set, row): result}."""
  c = run.config
  classifier = classifiers.trained_classifier(
    c.eval.classifier, os.path.join(run.path, "classifier")
  )
  x_test = data.to_model_range(run.test_set.images)
  real = classifiers.predict_logits(
    classifier, x_test, 1000, mesh, return_features=True
  )
  results = {}
  for set_name, images in run.sets.items():
    slug = record.slug(set_name)
    for row in ("none", *config.purifiers):
      if row == "none":
        root, x = os.path.join(run.path, "eval", slug), images
      else:
        root = os.path.join(workdir, "udp_eval", row, slug)
        x = purify_set(row, f"udp/{slug}", images, run.sets["clean"])
      results[set_name, row] = ddpm.train_and_score(
        c, root, x, classifier, real, x_test, mesh
      )
  return results


def upstream_runs(config, like) -> tuple[runs.Run | None, runs.Run | None]:
  """The CP run of `contrastive_from` and the UDP run of `udp_from`."""
  cp_run = udp_run = None
  if config.contrastive_from:
    cp_run = runs.load_run(
      config.contrastive_from, "cp.py", runs.cp_set_paths, like
    )
    missing = set(config.contrastive_methods) - set(cp_run.config.methods)
    if missing:
      raise ValueError(
        f"contrastive_methods {sorted(missing)} were not trained by the run "
        f"in {config.contrastive_from} (methods {cp_run.config.methods}); "
        "choose among those, so that the unpurified rows are that run's."
      )
  if config.udp_from:
    udp_run = runs.load_run(config.udp_from, "udp.py", runs.udp_set_paths, like)
  return cp_run, udp_run


def victim_results(config, workdir, sets, labels, purify_set, victim, writer):
  """A victim per cell of `victim_cells`: {(set, row): result}."""
  results = {}
  for set_name, row in victim_cells(config):
    images = sets[set_name]
    purified = row in purifiers.PURIFIERS
    if purified:
      images = purify_set(row, set_name, images, sets["clean"])
    results[set_name, row] = r = seeded_victim(
      victim,
      os.path.join(workdir, "victims", set_name, row),
      images,
      labels,
      "none" if purified else row,
      1 if row in ONE_SEED_ROWS else config.victim_seeds,
    )
    writer.write(0, {f"eval/{set_name}/{row}/{k}": v for k, v in r.items()})
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  check_config(config, mesh)
  train_set, test_set = classifiers.load_train_test(config)
  cp_run, udp_run = upstream_runs(config, train_set.images)
  writer = record.MetricWriter(workdir)
  protected, infos = load_protections(config, workdir, train_set, mesh)
  sets = {"clean": train_set.images, **protected}
  originals = [r.train_set.images for r in (cp_run, udp_run) if r]
  manifold = purifiers.manifold_images(
    config.manifold,
    config.data.data_dir,
    np.concatenate([train_set.images, *originals]),
    config.seed,
  )
  ddpm_start = time.time()
  state = ddpm.train_ddpm(
    config.ddpm, os.path.join(workdir, "ddpm"), manifold, mesh, desc="ddpm"
  )
  ddpm_seconds = round(time.time() - ddpm_start, 1)
  purify_set, quality = make_purifier(
    config, workdir, state.ema_params, mesh, writer
  )
  victim = victims.victim_trainer(config, test_set, mesh)
  results = victim_results(
    config, workdir, sets, train_set.labels, purify_set, victim, writer
  )
  cp_results = udp_eval = None
  if cp_run:
    cp_results = contrastive_results(config, workdir, cp_run, purify_set, mesh)
  if udp_run:
    udp_eval = udp_results(config, workdir, udp_run, purify_set, mesh)
  out = summary(results, quality, cp_results, udp_eval)
  out["seconds"] = total = record.run_seconds(workdir)
  if cp_results:
    probe = out["probe_accuracy"]
    writer.write(
      0, {f"contrastive/{k}/probe_accuracy": v for k, v in probe.items()}
    )
  if udp_eval:
    writer.write(0, record.flat(out["udp"], "udp/"))
  facts = dict(
    manifold_size=len(manifold),
    ddpm_seconds=ddpm_seconds,
    total=total,
    test_images=test_set.num_examples,
  )
  report = le_report(config, workdir, results, quality, infos, facts)
  if cp_results:
    report += contrastive_report(config, cp_results)
  if udp_eval:
    report += udp_survival_report(config, udp_eval)
  record.write_report(workdir, report)
  return out


def summary(results, quality, cp_results, udp_eval) -> dict:
  """The run's numbers by "<set>/<row>[/<learner>]"."""
  out = {
    "accuracy": {
      f"{s}/{r}": v["test_accuracy"] for (s, r), v in results.items()
    },
    "purification": {f"{n}/{s}": q for (n, s), q in quality.items()},
  }
  if cp_results:
    out["probe_accuracy"] = {
      f"{s}/{r}/{m}": v["probe_accuracy"] for (s, r, m), v in cp_results.items()
    }
  if udp_eval:
    out["udp"] = {f"{s}/{r}": v for (s, r), v in udp_eval.items()}
  return out


def row_label(config, row: str) -> str:
  if row in purifiers.PURIFIER_LABELS:
    return purifiers.PURIFIER_LABELS[row]
  return victims.countermeasure_label(config, row)


def set_label(name: str) -> str:
  """A purified set's name in the report: "cp/cp_class" is a set of the
  cp.py run, "udp/eudp_snr" one of the udp.py run."""
  kind, _, rest = name.rpartition("/")
  if kind == "cp":
    return f"{recipes.label(rest)} (cp.py run)"
  if kind == "udp":
    return f"{rest} (udp.py run)"
  return recipes.label(name)


def le_verdicts(config, results, infos) -> list[str]:
  """LE against `expected`: each protection's LE row against clean training,
  and LE against AVATAR-style purification on average (per victim seed)."""
  rows = (*config.purifiers, *config.ablations)
  if "le" not in rows or not infos or ("clean", "none") not in results:
    return ["- (needs the `le` row, a protection and clean training)"]
  acc = lambda s, r: 100 * np.asarray(results[s, r]["seed_accuracies"])
  clean, out = acc("clean", "none").mean(), []
  for s in infos:
    gap = clean - acc(s, "le").mean()
    out.append(
      f"- {recipes.label(s)}: LE {acc(s, 'le').mean():.1f} vs clean "
      f"{clean:.1f}, {gap:.1f} points below: "
      + record.expectation(config.expected, "le_gap_points", gap)
    )
  if "avatar" in rows:
    diff = np.mean([acc(s, "le") - acc(s, "avatar") for s in infos], axis=0)
    out.append(
      f"- LE minus AVATAR-style, mean over the protections: "
      f"{diff.mean():+.2f} points (per victim seed "
      f"{', '.join(f'{d:+.2f}' for d in diff)}): "
      + record.expectation(
        config.expected, "le_minus_avatar_points", diff.mean()
      )
    )
  return out


def quality_table(config, quality) -> str:
  header = ["purifier", "set", "input's PSNR to clean (dB)"]
  header += ["output's PSNR to clean (dB)", "output's PSNR to input (dB)"]
  keys = ("input_psnr_to_clean_db", "psnr_to_clean_db", "psnr_to_input_db")
  return record.markdown_table(
    [*header, "time (s)"],
    [
      [row_label(config, n), set_label(s)]
      + [f"{q[k]:.2f}" for k in keys]
      + [q["seconds"]]
      for (n, s), q in quality.items()
    ],
  )


def le_report(config, workdir, results, quality, infos, facts) -> str:
  """`facts`: manifold_size, ddpm_seconds, total, test_images."""
  sets, n = ["clean", *infos], facts["test_images"]
  rows = [*config.countermeasures, *config.purifiers, *config.ablations]
  cell = lambda s, r: (
    record.percent_text(results[s, r]["test_accuracy"], n)
    if (s, r) in results
    else "–"
  )
  table = record.markdown_table(
    ["countermeasure"] + [recipes.label(s) for s in sets],
    [[row_label(config, r)] + [cell(s, r) for s in sets] for r in rows],
  )
  if not results:
    table = "(No classifier victims: no `protections`, no `clean_rows`.)\n"
  p, seeds_line = config.purify, ""
  if config.victim_seeds > 1:
    seeds_line = (
      f"\nEvery row but {' and '.join(r.upper() for r in ONE_SEED_ROWS)}: "
      f"the mean of {config.victim_seeds} victims with different seeds "
      "(initialisation and batch order); `seed_accuracies` in metrics.jsonl "
      "has each.\n"
    )
  return f"""# LE on {config.data.train} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Clean test accuracy (%, with its 95% interval over the {n} test images) of
a {config.model.name} trained for {config.train.num_epochs} epochs
({config.counter.aa_epochs} with AA) on each training set after each
countermeasure (columns: the data; rows: what the trainer did).
Purification: diffuse to t* = {p.t_star} and denoise, {p.rounds} rounds,
with a DDPM trained for {config.ddpm.train.num_steps} steps
({facts["ddpm_seconds"]} s) on {facts["manifold_size"]} other, clean images
from `{config.manifold.source}`. Total time {facts["total"]} s.

{table}{seeds_line}
LE against its targets (the config's `expected` block):

{chr(10).join(le_verdicts(config, results, infos))}

## What purification does to the images

PSNR of the purified training images to the clean originals (before
protection) and to the purifier's own input. Grids:
`purified/<purifier>/<set>_grid.png` (input above, purified below).

{quality_table(config, quality)}"""


def contrastive_report(config, results) -> str:
  """The seed's CP table: linear-probe accuracy per learner and set."""
  sets = list(dict.fromkeys(s for s, _, _ in results))
  columns = [("clean", "none")] + [
    (s, r) for s in sets[1:] for r in ("none", *config.purifiers)
  ]
  acc = lambda s, r, m: 100 * results[s, r, m]["probe_accuracy"]
  table = record.markdown_table(
    ["learner"]
    + [recipes.label(s, clean="clean") + SHORT_LABELS[r] for s, r in columns],
    [
      [contrastive.LEARNER_LABELS[m]]
      + [f"{acc(s, r, m):.1f}" for s, r in columns]
      for m in config.contrastive_methods
    ],
  )
  recovered = []
  for m in config.contrastive_methods:
    clean = acc("clean", "none", m)
    for s in sets[1:]:
      for r in config.purifiers:
        lost = clean - acc(s, "none", m)
        back = acc(s, r, m) - acc(s, "none", m)
        learner = contrastive.LEARNER_LABELS[m]
        recovered.append(
          f"- {learner}, {recipes.label(s, clean='clean')}{SHORT_LABELS[r]}: "
          f"{back:+.1f} points of the {lost:.1f} that CP took"
        )
  return f"""
## CP (unsupervised unlearnable examples) and LE

Linear-probe accuracy (%) on the clean test set of a contrastive encoder
trained with the recipe of the cp.py run in `{config.contrastive_from}` on
each of its sets, as they are (that run's own encoders) and purified here.
The seed's CIFAR-10 SimCLR: clean 90.4, CP 44.9, CP + LE 86.6.

{table}
{chr(10).join(recovered)}
"""


def udp_survival_report(config, results) -> str:
  """How much of each UDP protection's effect on a DDPM trained on the data
  survives purification: the protected set's Fréchet distance above the
  clean set's, after purification over before."""
  sets = list(dict.fromkeys(s for s, _ in results))
  rows = ("none", *config.purifiers)
  fd = lambda s, r: results[s, r]["frechet_distance"]
  table = record.markdown_table(
    ["training set"]
    + [f"FD{SHORT_LABELS[r]}" for r in rows]
    + [f"confident share{SHORT_LABELS[r]}" for r in rows],
    [
      [s]
      + [f"{fd(s, r):.3f}" for r in rows]
      + [f"{results[s, r]['confident_share']:.3f}" for r in rows]
      for s in sets
    ],
  )
  survival = []
  for s in sets[1:]:
    before = fd(s, "none") - fd("clean", "none")
    for r in config.purifiers:
      after = fd(s, r) - fd("clean", r)
      if before > 0:
        verdict = f"{after / before:.0%} of it survives"
      else:
        verdict = "the protection did not raise FD, nothing to survive"
      survival.append(
        f"- {s}{SHORT_LABELS[r]}: FD above clean {before:+.3f} before, "
        f"{after:+.3f} after: {verdict}"
      )
  return f"""
## LE against UDP: how much protection survives purification

Each set of the udp.py run in `{config.udp_from}` (its clean set and its
protections) trained a fresh DDPM with that run's recipe, as it is (that
run's own results) and after purification here; the samples are scored by
that run's classifier (Fréchet distance to the clean test set in its
feature space, lower is closer to real data; share of samples classified
with confidence). The clean set is purified too, so that the degradation
purification causes by itself is told apart from the protection's.

{table}
{chr(10).join(survival)}
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

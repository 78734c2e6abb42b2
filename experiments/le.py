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

import functools
import hashlib
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aigc_jax import data, launch, models, parallel, purify, record, train
from aigc_jax.eval import classifiers, contrastive, ddpm, victims
from aigc_jax.metrics import psnr
from aigc_jax.protect import recipes

PURIFIERS = ("avatar", "le", "le_paper", "le_mse", "le_lpips")
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
PURIFIER_LABELS = {
  "avatar": "AVATAR-style (unguided diffusion purification)",
  "le": "LE (JCDP)",
  "le_paper": "LE, constant λ at every step (the paper's form)",
  "le_mse": "LE, MSE term only",
  "le_lpips": "LE, LPIPS term only",
}


def manifold_images(config, exclude: np.ndarray) -> np.ndarray:
  """The learnable manifold's images: config.manifold's source, cut and
  resized to the shape of the uint8 `exclude` images (the clean originals
  of every set to be purified), without any image among them (that would
  leak), then a class-balanced subset of `limit` (all when 0)."""
  m = config.manifold
  name, split = data.parse_source(m.source)
  ds = data.load_dataset(name, split, data_dir=config.data.data_dir or None)
  h, w, c = exclude.shape[1:]
  images = ds.images
  if images.shape[1:3] != (h, w) or m.crop:
    images = data.resize_images(images, h, crop=m.crop)
  if images.shape[-1] != c:
    if images.shape[-1] != 1:
      raise ValueError(
        f"The manifold {m.source!r} has {images.shape[-1]} channels and the "
        f"protected images {c}; choose a source with {c} channels."
      )
    images = np.repeat(images, c, axis=-1)
  protected = {hashlib.sha1(x.tobytes()).digest() for x in exclude}
  fresh = np.array(
    [hashlib.sha1(x.tobytes()).digest() not in protected for x in images]
  )
  ds = ds._replace(images=images).take(np.flatnonzero(fresh))
  if m.limit:
    ds = data.balanced_subset(ds, m.limit, config.seed + 1)
  if ds.num_examples == 0:
    raise ValueError(f"The manifold {m.source!r} has no images left.")
  return ds.images


def load_protections(config, workdir, train_set, mesh) -> tuple[dict, dict]:
  """The protected training sets, from `protections_from` or generated."""
  sets, infos = {}, {}
  source = config.protections_from or workdir
  for name in config.protections:
    path = os.path.join(source, "protections", f"{name}.npz")
    if config.protections_from and not os.path.exists(path):
      raise FileNotFoundError(
        f"{path} does not exist: run experiments/unlearnable.py with "
        f"protections including {name!r} into {source}, or leave "
        "protections_from empty to generate them here."
      )
    recipe = recipes.PROTECTIONS[name]
    sets[name], infos[name] = recipes.protected_set(
      source,
      name,
      train_set,
      recipe.budget(config, train_set.images.shape[1:]),
      functools.partial(recipe.generate, config, train_set, mesh),
    )
    if sets[name].shape != train_set.images.shape:
      raise ValueError(
        f"{path} holds images of shape {sets[name].shape}, but the training "
        f"set {config.data.train!r} has {train_set.images.shape}: it was made "
        "from other data."
      )
  return sets, infos


class UpstreamRun(NamedTuple):
  """Another experiment's finished run whose sets LE purifies.

  Attributes:
    path: its workdir.
    config: the config it ran with (its training and evaluation recipe,
      reused so that purified and unpurified sets are treated alike).
    train_set: its clean training set.
    test_set: its clean test set.
    sets: its training sets (uint8) by name, "clean" first.
  """

  path: str
  config: ml_collections.ConfigDict
  train_set: data.Dataset
  test_set: data.Dataset
  sets: dict[str, np.ndarray]


def load_upstream_run(path, script, set_paths, like) -> UpstreamRun:
  """The run of experiments/<script> in `path` and its sets.

  Args:
    path: the run's workdir.
    script: the experiment that made it ("cp.py", "udp.py"), for errors.
    set_paths: `config -> {set name: .npz path relative to path}`.
    like: uint8 images of the shape the DDPM purifies.
  """
  try:
    config = ml_collections.ConfigDict(record.load_config_json(path))
  except FileNotFoundError:
    raise FileNotFoundError(
      f"{path} holds no run of experiments/{script}: run it with "
      f"--workdir={path} first, or leave this setting empty."
    ) from None
  train_set, test_set = classifiers.load_train_test(config)
  if train_set.images.shape[1:] != like.shape[1:]:
    raise ValueError(
      f"The run in {path} has images of shape {train_set.images.shape[1:]}, "
      f"the purifying DDPM's are {like.shape[1:]}: run it on data of the "
      "same shape."
    )
  sets = {"clean": train_set.images}
  for name, rel in set_paths(config).items():
    npz = os.path.join(path, rel)
    if not os.path.exists(npz):
      raise FileNotFoundError(
        f"{npz} does not exist: run experiments/{script} to the end with "
        f"--workdir={path}."
      )
    with np.load(npz) as f:
      # udp.py saves the clean images beside the protected ones; cp.py
      # the protected images alone.
      sets[name] = f["protected" if "protected" in f.files else "images"]
  return UpstreamRun(path, config, train_set, test_set, sets)


def cp_set_paths(cp_config) -> dict[str, str]:
  return {
    name: os.path.join("protections", f"{name}.npz")
    for name in cp_config.protections
  }


def udp_set_paths(udp_config) -> dict[str, str]:
  return {
    method: os.path.join("protect", record.slug(method), "protected.npz")
    for method in udp_config.protect.methods
  }


def purifier_settings(config, name: str) -> dict | None:
  """`jcdp_purify` keywords of a purifier; None for unguided purification."""
  p = config.purify
  if name == "avatar":
    return None
  scale = p.scale or purify.OFFICIAL_SCALE
  settings = {
    "le": dict(form="original", mse_scale=scale, lpips_scale=scale),
    "le_mse": dict(form="original", mse_scale=scale, lpips_scale=0.0),
    "le_lpips": dict(form="original", mse_scale=0.0, lpips_scale=scale),
    "le_paper": dict(
      form="paper", mse_scale=p.paper_mse, lpips_scale=p.paper_lpips
    ),
  }
  if name not in settings:
    raise ValueError(f"Unknown purifier {name!r}; choose from {PURIFIERS}.")
  return settings[name]


def make_purify_fn(config, params, lpips_variables, name: str):
  """`fn((images, indices)) -> purified` for a batch in [-1, 1]
  (`purify.per_image_purifier`: image i with its own key)."""
  model, schedule, _ = ddpm.build_ddpm(config.ddpm)
  p = config.purify
  guidance = purifier_settings(config, name)
  if guidance is not None:
    guidance.update(split=p.split, lpips_size=p.lpips_size or None)
  fn = purify.per_image_purifier(
    lambda params: train.ddpm_eps_fn(model, params),
    schedule,
    jax.random.key(config.seed),
    guidance,
    t_star=p.t_star,
    rounds=p.rounds,
    variance=p.variance,
  )
  return lambda batch: fn(params, lpips_variables, *batch)


def purified_set(config, workdir, name, set_name, images, purify_fn, mesh):
  """uint8 purified images, computed once into purified/<name>/<set>.npz."""
  path = os.path.join(workdir, "purified", name, f"{set_name}.npz")

  def compute():
    start = time.time()
    out = parallel.batched_apply(
      purify_fn,
      (data.to_model_range(images), np.arange(len(images), dtype=np.int32)),
      batch_size=config.purify.batch_size,
      mesh=mesh,
    )
    purified = data.to_uint8(out)
    if jax.process_index() == 0:
      n = min(10, len(images))
      data.save_image_grid(
        path.replace(".npz", "_grid.png"),
        np.concatenate([images[:n], purified[:n]]),
        ncol=n,
      )
    return {"images": purified, "seconds": round(time.time() - start, 1)}

  cell = record.cached_arrays(path, compute)
  return cell["images"], float(cell["seconds"])


def mean_psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Mean PSNR (dB) between two uint8 sets."""
  return float(jnp.mean(psnr(data.to_model_range(a), data.to_model_range(b))))


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
    purifier_settings(config, name)
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


def make_purifier(config, workdir, params, lpips_variables, mesh, writer):
  """`purify(row, set_name, images, clean) -> purified uint8` and the dict
  it fills with each result's quality (PSNR to the `clean` originals and to
  the input, seconds); each purified set is computed once into the workdir.
  """
  fns, quality = {}, {}

  def purify_set(row, set_name, images, clean):
    if row not in fns:
      fns[row] = make_purify_fn(config, params, lpips_variables, row)
    out, seconds = purified_set(
      config, workdir, row, set_name, images, fns[row], mesh
    )
    quality[row, set_name] = {
      "input_psnr_to_clean_db": mean_psnr(images, clean),
      "psnr_to_clean_db": mean_psnr(out, clean),
      "psnr_to_input_db": mean_psnr(out, images),
      "seconds": seconds,
    }
    writer.write(
      0,
      {
        f"purify/{row}/{set_name}/{k}": v
        for k, v in quality[row, set_name].items()
      },
    )
    return out

  return purify_set, quality


def contrastive_results(config, workdir, run: UpstreamRun, purify_set, mesh):
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


def udp_results(config, workdir, run: UpstreamRun, purify_set, mesh):
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  check_config(config, mesh)
  train_set, test_set = classifiers.load_train_test(config)
  like = train_set.images
  cp_run = udp_run = None
  if config.contrastive_from:
    cp_run = load_upstream_run(
      config.contrastive_from, "cp.py", cp_set_paths, like
    )
    missing = set(config.contrastive_methods) - set(cp_run.config.methods)
    if missing:
      raise ValueError(
        f"contrastive_methods {sorted(missing)} were not trained by the run "
        f"in {config.contrastive_from} (methods {cp_run.config.methods}); "
        "choose among those, so that the unpurified rows are that run's."
      )
  if config.udp_from:
    udp_run = load_upstream_run(config.udp_from, "udp.py", udp_set_paths, like)
  writer = record.MetricWriter(workdir)
  start = time.time()
  protected, infos = load_protections(config, workdir, train_set, mesh)
  sets = {"clean": train_set.images, **protected}

  originals = [r.train_set.images for r in (cp_run, udp_run) if r]
  manifold = manifold_images(config, np.concatenate([like, *originals]))
  ddpm_start = time.time()
  state = ddpm.train_ddpm(
    config.ddpm, os.path.join(workdir, "ddpm"), manifold, mesh, desc="ddpm"
  )
  ddpm_seconds = round(time.time() - ddpm_start, 1)
  purify_set, quality = make_purifier(
    config,
    workdir,
    state.ema_params,
    models.load_lpips(config.purify.lpips),
    mesh,
    writer,
  )
  results = {}
  train_victim = victims.victim_trainer(config, test_set, mesh)
  for set_name, row in victim_cells(config):
    images = sets[set_name]
    if row in PURIFIERS:
      images = purify_set(row, set_name, images, train_set.images)
    results[set_name, row] = seeded_victim(
      train_victim,
      os.path.join(workdir, "victims", set_name, row),
      images,
      train_set.labels,
      "none" if row in PURIFIERS else row,
      1 if row in ONE_SEED_ROWS else config.victim_seeds,
    )
    writer.write(
      0,
      {
        f"eval/{set_name}/{row}/{k}": v
        for k, v in results[set_name, row].items()
      },
    )
  cp_results = udp_eval = None
  if cp_run:
    cp_results = contrastive_results(config, workdir, cp_run, purify_set, mesh)
    writer.write(
      0,
      {
        f"contrastive/{s}/{r}/{m}/probe_accuracy": v["probe_accuracy"]
        for (s, r, m), v in cp_results.items()
      },
    )
  if udp_run:
    udp_eval = udp_results(config, workdir, udp_run, purify_set, mesh)
    writer.write(
      0,
      {
        f"udp/{s}/{r}/{k}": v
        for (s, r), result in udp_eval.items()
        for k, v in result.items()
      },
    )
  total = round(time.time() - start, 1)
  rows = [*config.countermeasures, *config.purifiers, *config.ablations]
  report = le_report(
    config,
    workdir,
    results,
    rows,
    quality,
    infos,
    len(manifold),
    ddpm_seconds,
    total,
  )
  if cp_results:
    report += contrastive_report(config, cp_results)
  if udp_eval:
    report += udp_survival_report(config, udp_eval)
  record.write_report(workdir, report)
  out = {
    "accuracy": {
      f"{s}/{r}": v["test_accuracy"] for (s, r), v in results.items()
    },
    "purification": {f"{n}/{s}": q for (n, s), q in quality.items()},
    "seconds": total,
  }
  if cp_results:
    out["probe_accuracy"] = {
      f"{s}/{r}/{m}": v["probe_accuracy"] for (s, r, m), v in cp_results.items()
    }
  if udp_eval:
    out["udp"] = {f"{s}/{r}": v for (s, r), v in udp_eval.items()}
  return out


def row_label(config, row: str) -> str:
  if row in PURIFIER_LABELS:
    return PURIFIER_LABELS[row]
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


def le_report(
  config, workdir, results, rows, quality, infos, manifold_size, ddpm_s, total
) -> str:
  sets = ["clean", *infos]
  labels = {s: recipes.label(s) for s in sets}
  acc = lambda s, r: 100 * results[s, r]["test_accuracy"]
  cell = lambda s, r: f"{acc(s, r):.1f}" if (s, r) in results else "–"
  table = record.markdown_table(
    ["countermeasure"] + [labels[s] for s in sets],
    [[row_label(config, r)] + [cell(s, r) for s in sets] for r in rows],
  )
  if not results:
    table = "(No classifier victims: no `protections`, no `clean_rows`.)\n"
  verdicts = []
  if "le" in rows and infos and ("clean", "none") in results:
    clean = acc("clean", "none")
    for s in infos:
      gap = clean - acc(s, "le")
      verdicts.append(
        f"- {labels[s]}: LE {acc(s, 'le'):.1f} vs clean {clean:.1f}, "
        f"{gap:.1f} points below ({'met' if gap <= 10 else 'missed'})"
      )
    if "avatar" in rows:
      le_mean = np.mean([acc(s, "le") for s in infos])
      avatar_mean = np.mean([acc(s, "avatar") for s in infos])
      verdicts.append(
        f"- mean over the protections: LE {le_mean:.2f}, AVATAR-style "
        f"{avatar_mean:.2f} "
        f"({'met' if le_mean >= avatar_mean else 'missed'}: LE at least as "
        "good)"
      )
      if config.victim_seeds > 1:
        per_seed = 100 * np.mean(
          [
            np.subtract(
              results[s, "le"]["seed_accuracies"],
              results[s, "avatar"]["seed_accuracies"],
            )
            for s in infos
          ],
          axis=0,
        )
        verdicts.append(
          "- LE minus AVATAR-style, mean over the protections, per victim "
          f"seed: {', '.join(f'{d:+.2f}' for d in per_seed)} points"
        )
  qtable = record.markdown_table(
    [
      "purifier",
      "set",
      "input's PSNR to clean (dB)",
      "output's PSNR to clean (dB)",
      "output's PSNR to input (dB)",
      "time (s)",
    ],
    [
      [
        row_label(config, n),
        set_label(s),
        f"{quality[n, s]['input_psnr_to_clean_db']:.2f}",
        f"{quality[n, s]['psnr_to_clean_db']:.2f}",
        f"{quality[n, s]['psnr_to_input_db']:.2f}",
        quality[n, s]["seconds"],
      ]
      for n, s in quality
    ],
  )
  p = config.purify
  seeds_line = ""
  if config.victim_seeds > 1:
    seeds_line = (
      f"\nEvery row but {' and '.join(r.upper() for r in ONE_SEED_ROWS)}: "
      f"the mean of {config.victim_seeds} "
      "victims with different seeds (initialisation and batch order); "
      "`seed_accuracies` in metrics.jsonl has each.\n"
    )
  return f"""# LE on {config.data.train} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Clean test accuracy (%) of a {config.model.name} trained for
{config.train.num_epochs} epochs ({config.counter.aa_epochs} with AA) on each
training set after each countermeasure (columns: the data; rows: what the
trainer did). Purification: diffuse to t* = {p.t_star} and denoise, {p.rounds}
rounds, with a DDPM trained for {config.ddpm.train.num_steps} steps
({ddpm_s} s) on {manifold_size} other, clean images from
`{config.manifold.source}`. Total time {total} s.

{table}{seeds_line}
LE against its targets (within 10 points of clean training; at least as good
as unguided diffusion purification on average):

{chr(10).join(verdicts) or "- (needs the `le` row and a protection)"}

## What purification does to the images

PSNR of the purified training images to the clean originals (before
protection) and to the purifier's own input. Grids:
`purified/<purifier>/<set>_grid.png` (input above, purified below).

{qtable}"""


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

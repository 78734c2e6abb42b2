"""LE: purify unlearnable examples with Joint-Conditional Diffusion
Purification and measure what a classifier trained on them learns, beside the
other countermeasures (the seed's table, seed-results.md §1).

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
  5. `report.md` and metrics.jsonl.
"""

import functools
import hashlib
import os
import time

if __package__ in (None, ""):
  import launch
  import train_ddpm
  import unlearnable
else:
  from experiments import launch, train_ddpm, unlearnable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aigc_jax import data, models, parallel, purify, record, train
from aigc_jax.metrics import psnr
from experiments import train_classifier

PURIFIERS = ("avatar", "le", "le_paper", "le_mse", "le_lpips")
PURIFIER_LABELS = {
  "avatar": "AVATAR-style (unguided diffusion purification)",
  "le": "LE (JCDP)",
  "le_paper": "LE, constant λ at every step (the paper's form)",
  "le_mse": "LE, MSE term only",
  "le_lpips": "LE, LPIPS term only",
}


def manifold_images(config, train_set: data.Dataset) -> np.ndarray:
  """The learnable manifold's images: config.manifold's source, cut and
  resized to the protected images' shape, without any image that is also in
  the protected training set (that would leak), then a class-balanced
  subset of `limit` (all when 0)."""
  m = config.manifold
  name, split = data.parse_source(m.source)
  ds = data.load_dataset(name, split, data_dir=config.data.data_dir or None)
  h, w, c = train_set.images.shape[1:]
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
  protected = {hashlib.sha1(x.tobytes()).digest() for x in train_set.images}
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
    sets[name], infos[name] = unlearnable.make_protection(
      source,
      name,
      train_set,
      unlearnable.protection_budget(config, name, train_set.images.shape[1:]),
      functools.partial(
        unlearnable.generate_protection, config, name, train_set, mesh
      ),
    )
    if sets[name].shape != train_set.images.shape:
      raise ValueError(
        f"{path} holds images of shape {sets[name].shape}, but the training "
        f"set {config.data.train!r} has {train_set.images.shape}: it was made "
        "from other data."
      )
  return sets, infos


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
  """`fn((images, indices)) -> purified` for a batch in [-1, 1].

  Image i is purified with its own key, fold_in(key, i), by vmapping the
  single-image purification, so the result does not depend on the batch
  or the number of devices. The weights are arguments of the jitted
  function, not constants baked into it.
  """
  model, schedule, _ = train_ddpm.build_ddpm(config.ddpm)
  p = config.purify
  settings = purifier_settings(config, name)
  key = jax.random.key(config.seed)

  def purify_one(params, lpips_variables, x, index):
    eps_fn = train.ddpm_eps_fn(model, params)
    k = jax.random.fold_in(key, index)
    common = dict(t_star=p.t_star, rounds=p.rounds, variance=p.variance)
    if settings is None:
      out = purify.diffusion_purify(eps_fn, x[None], k, schedule, **common)
    else:
      out = purify.jcdp_purify(
        eps_fn,
        x[None],
        k,
        schedule,
        split=p.split,
        lpips_variables=lpips_variables,
        lpips_size=p.lpips_size or None,
        **settings,
        **common,
      )
    return jnp.clip(out[0], -1.0, 1.0)

  batched = jax.jit(jax.vmap(purify_one, in_axes=(None, None, 0, 0)))
  return lambda batch: batched(params, lpips_variables, *batch)


def purified_set(config, workdir, name, set_name, images, purify_fn, mesh):
  """uint8 purified images, computed once into purified/<name>/<set>.npz."""
  path = os.path.join(workdir, "purified", name, f"{set_name}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["images"], float(f["seconds"])
  start = time.time()
  out = parallel.batched_apply(
    purify_fn,
    (data.to_model_range(images), np.arange(len(images), dtype=np.int32)),
    batch_size=config.purify.batch_size,
    mesh=mesh,
  )
  purified = data.to_uint8(out)
  seconds = round(time.time() - start, 1)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = min(10, len(images))
    data.save_image_grid(
      path.replace(".npz", "_grid.png"),
      np.concatenate([images[:n], purified[:n]]),
      ncol=n,
    )
    np.savez_compressed(path + ".tmp.npz", images=purified, seconds=seconds)
    os.replace(path + ".tmp.npz", path)
  return purified, seconds


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


def check_config(config, mesh) -> None:
  unlearnable.check_config(config, mesh)
  for name in (*config.purifiers, *config.ablations):
    purifier_settings(config, name)
  rows = (*config.countermeasures, *config.purifiers, *config.ablations)
  for row in config.clean_rows:
    if row not in rows:
      raise ValueError(
        f"clean_rows names {row!r}, which is not among the countermeasures "
        f"and purifiers {rows}."
      )
  parallel.check_batch_size(config.ddpm.train.batch_size, mesh)
  if not 0 <= config.purify.split < config.purify.t_star:
    raise ValueError(
      f"purify.split={config.purify.split} must lie in [0, t_star="
      f"{config.purify.t_star}) so that both guidance terms act."
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  check_config(config, mesh)
  train_set, test_set = train_classifier.load_train_test(config)
  writer = record.MetricWriter(workdir)
  start = time.time()
  protected, infos = load_protections(config, workdir, train_set, mesh)
  sets = {"clean": train_set.images, **protected}

  manifold = manifold_images(config, train_set)
  ddpm_start = time.time()
  state = train_ddpm.train_ddpm(
    config.ddpm, os.path.join(workdir, "ddpm"), manifold, mesh, desc="ddpm"
  )
  ddpm_seconds = round(time.time() - ddpm_start, 1)
  lpips_variables = models.load_lpips(config.purify.lpips)
  purified, quality, results, purify_fns = {}, {}, {}, {}
  for set_name, row in victim_cells(config):
    images = sets[set_name]
    if row in PURIFIERS:
      if (row, set_name) not in purified:
        if row not in purify_fns:
          purify_fns[row] = make_purify_fn(
            config, state.ema_params, lpips_variables, row
          )
        purified[row, set_name], seconds = purified_set(
          config, workdir, row, set_name, images, purify_fns[row], mesh
        )
        quality[row, set_name] = {
          "input_psnr_to_clean_db": mean_psnr(images, train_set.images),
          "psnr_to_clean_db": mean_psnr(
            purified[row, set_name], train_set.images
          ),
          "psnr_to_input_db": mean_psnr(purified[row, set_name], images),
          "seconds": seconds,
        }
        writer.write(
          0,
          {
            f"purify/{row}/{set_name}/{k}": v
            for k, v in quality[row, set_name].items()
          },
        )
      images = purified[row, set_name]
    results[set_name, row] = unlearnable.train_victim(
      config,
      os.path.join(workdir, "victims", set_name, row),
      images,
      train_set.labels,
      test_set,
      "none" if row in PURIFIERS else row,
      mesh,
    )
    writer.write(
      0,
      {
        f"eval/{set_name}/{row}/{k}": v
        for k, v in results[set_name, row].items()
      },
    )
  total = round(time.time() - start, 1)
  rows = [*config.countermeasures, *config.purifiers, *config.ablations]
  record.write_report(
    workdir,
    le_report(
      config,
      workdir,
      results,
      rows,
      quality,
      infos,
      len(manifold),
      ddpm_seconds,
      total,
    ),
  )
  return {
    "accuracy": {
      f"{s}/{r}": v["test_accuracy"] for (s, r), v in results.items()
    },
    "purification": {f"{n}/{s}": q for (n, s), q in quality.items()},
    "seconds": total,
  }


def row_label(config, row: str) -> str:
  if row in PURIFIER_LABELS:
    return PURIFIER_LABELS[row]
  return unlearnable.countermeasure_label(config, row)


def le_report(
  config, workdir, results, rows, quality, infos, manifold_size, ddpm_s, total
) -> str:
  sets = ["clean", *infos]
  labels = unlearnable.LABELS
  acc = lambda s, r: 100 * results[s, r]["test_accuracy"]
  cell = lambda s, r: f"{acc(s, r):.1f}" if (s, r) in results else "–"
  table = record.markdown_table(
    ["countermeasure"] + [labels[s] for s in sets],
    [[row_label(config, r)] + [cell(s, r) for s in sets] for r in rows],
  )
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
        f"- mean over the protections: LE {le_mean:.1f}, AVATAR-style "
        f"{avatar_mean:.1f} "
        f"({'met' if le_mean >= avatar_mean else 'missed'}: LE at least as "
        "good)"
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
        labels[s],
        f"{quality[n, s]['input_psnr_to_clean_db']:.2f}",
        f"{quality[n, s]['psnr_to_clean_db']:.2f}",
        f"{quality[n, s]['psnr_to_input_db']:.2f}",
        quality[n, s]["seconds"],
      ]
      for n, s in quality
    ],
  )
  p = config.purify
  return f"""# LE on {config.data.train} (variant `{config.variant}`)

Command:

    python experiments/le.py \\
      --config=experiments/configs/le.py:{config.variant} \\
      --workdir={workdir}

Clean test accuracy (%) of a {config.model.name} trained for
{config.train.num_epochs} epochs ({config.counter.aa_epochs} with AA) on each
training set after each countermeasure (columns: the data; rows: what the
trainer did). Purification: diffuse to t* = {p.t_star} and denoise, {p.rounds}
rounds, with a DDPM trained for {config.ddpm.train.num_steps} steps
({ddpm_s} s) on {manifold_size} other, clean images from
`{config.manifold.source}`. Total time {total} s.

{table}
LE against its targets (within 10 points of clean training; at least as good
as unguided diffusion purification on average):

{chr(10).join(verdicts) or "- (needs the `le` row and a protection)"}

## What purification does to the images

PSNR of the purified training images to the clean originals (before
protection) and to the purifier's own input. Grids:
`purified/<purifier>/<set>_grid.png` (input above, purified below).

{qtable}"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

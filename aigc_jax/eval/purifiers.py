"""Diffusion purification as the attacker's countermeasure: a DDPM trained
on clean images disjoint from the protected ones (the learnable manifold)
diffuses each protected image to t* and denoises it, unguided (AVATAR-style)
or guided toward the image (LE's Joint-Conditional Diffusion Purification,
Jiang et al., ACM MM 2023, arXiv 2305.09241; `purify.jcdp_purify`).

A purifier reads a `purify` block (`t_star`, `rounds`, `variance`, `split`,
`lpips_size`, `scale`, `paper_mse`, `paper_lpips`) and the DDPM's config;
`purified_set` computes a purified set once into a workdir cell.
"""

import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import data, parallel, purify, record, train
from aigc_jax.eval import ddpm
from aigc_jax.metrics import psnr

PURIFIER_LABELS = {
  "avatar": "AVATAR-style (unguided diffusion purification)",
  "le": "LE (JCDP)",
  "le_paper": "LE, constant λ at every step (the paper's form)",
  "le_mse": "LE, MSE term only",
  "le_lpips": "LE, LPIPS term only",
}
PURIFIERS = tuple(PURIFIER_LABELS)


def guidance(purify_config, name: str) -> dict | None:
  """`jcdp_purify` keywords of purifier `name` (one of `PURIFIERS`); None
  for unguided purification. "le" is the released code's λ schedule at
  `scale` (0: the released strength, `purify.OFFICIAL_SCALE`)."""
  p = purify_config
  if name == "avatar":
    return None
  scale = p.get("scale", 0.0) or purify.OFFICIAL_SCALE
  settings = {
    "le": dict(form="original", mse_scale=scale, lpips_scale=scale),
    "le_mse": dict(form="original", mse_scale=scale, lpips_scale=0.0),
    "le_lpips": dict(form="original", mse_scale=0.0, lpips_scale=scale),
  }
  if "paper_mse" in p:
    settings["le_paper"] = dict(
      form="paper", mse_scale=p.paper_mse, lpips_scale=p.paper_lpips
    )
  if name not in settings:
    raise ValueError(
      f"Unknown purifier {name!r}; choose from {tuple(settings)} or 'avatar'."
    )
  return {
    **settings[name],
    "split": p.split,
    "lpips_size": p.lpips_size or None,
  }


def purifier(ddpm_config, purify_config, name, key, params, lpips_variables):
  """`fn((images, indices)) -> purified` for a batch in [-1, 1]: purifier
  `name` with the DDPM of `ddpm_config` and `params`
  (`purify.per_image_purifier`: image i with its own key)."""
  model, schedule, _ = ddpm.build_ddpm(ddpm_config)
  p = purify_config
  fn = purify.per_image_purifier(
    lambda params: train.ddpm_eps_fn(model, params),
    schedule,
    key,
    guidance(p, name),
    t_star=p.t_star,
    rounds=p.rounds,
    variance=p.variance,
  )
  return lambda batch: fn(params, lpips_variables, *batch)


def purified_set(path, images, purify_fn, batch_size, mesh, grid_above=()):
  """uint8 `images` purified by `purify_fn` (from `purifier`), computed
  once into the `.npz` at `path` (`record.cached_arrays`), with a grid
  beside it: `grid_above` (e.g. the clean originals), the input, the
  output. Returns the images and the seconds they took."""

  def compute():
    start = time.time()
    out = parallel.batched_apply(
      purify_fn,
      (data.to_model_range(images), np.arange(len(images), dtype=np.int32)),
      batch_size=batch_size,
      mesh=mesh,
    )
    purified = data.to_uint8(out)
    if jax.process_index() == 0:
      n = min(10, len(images))
      rows = [a[:n] for a in (*grid_above, images, purified)]
      data.save_image_grid(
        path.replace(".npz", "_grid.png"), np.concatenate(rows), ncol=n
      )
    return {"images": purified, "seconds": round(time.time() - start, 1)}

  cell = record.cached_arrays(path, compute)
  return cell["images"], float(cell.get("seconds", 0.0))


def mean_psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Mean PSNR (dB) between two uint8 sets."""
  return float(jnp.mean(psnr(data.to_model_range(a), data.to_model_range(b))))


def without(images: np.ndarray, exclude: np.ndarray) -> np.ndarray:
  """A mask of the rows of `images` that are none of `exclude`'s (the
  purifier must not have seen the protected images' originals)."""
  digest = lambda x: hashlib.sha1(x.tobytes()).digest()
  seen = {digest(x) for x in exclude}
  return np.array([digest(x) not in seen for x in images], bool)


def manifold_images(manifold, data_dir, exclude, seed) -> np.ndarray:
  """The learnable manifold's images: `manifold.source` (with `crop` and
  `limit`), cut and resized to the shape of the uint8 `exclude` images
  (the clean originals of every set to be purified), without any of them,
  then a class-balanced subset of `limit` (all when 0)."""
  name, split = data.parse_source(manifold.source)
  ds = data.load_dataset(name, split, data_dir=data_dir or None)
  h, w, c = exclude.shape[1:]
  images = ds.images
  if images.shape[1:3] != (h, w) or manifold.crop:
    images = data.resize_images(images, h, crop=manifold.crop)
  if images.shape[-1] != c:
    if images.shape[-1] != 1:
      raise ValueError(
        f"The manifold {manifold.source!r} has {images.shape[-1]} channels "
        f"and the protected images {c}; choose a source with {c} channels."
      )
    images = np.repeat(images, c, axis=-1)
  ds = ds._replace(images=images).take(np.flatnonzero(without(images, exclude)))
  if manifold.limit:
    ds = data.balanced_subset(ds, manifold.limit, seed + 1)
  if ds.num_examples == 0:
    raise ValueError(f"The manifold {manifold.source!r} has no images left.")
  return ds.images


def padded_manifold(source, data_dir, exclude) -> np.ndarray:
  """The images of `source` zero-padded to the side of `exclude` (as the
  text-to-image model's inputs are), without any of `exclude`."""
  images = data.load_split(source, data_dir).images
  half = (exclude.shape[1] - images.shape[1]) // 2
  images = np.pad(images, [(0, 0), (half, half), (half, half), (0, 0)])
  return images[without(images, exclude)]

"""Image value ranges at the library's edges, and PNG grids.

Inside the library images are float32 NHWC in [-1, 1]; on disk and in
datasets they are uint8 in [0, 255]. These are the only conversions, and they
refuse input of the wrong kind rather than guess.
"""

import jax
import numpy as np
from PIL import Image

from aigc_jax import record

_RANGE_TOLERANCE = 1e-4


def check_uint8_images(images, name: str = "images") -> None:
  """Raises unless `images` is a uint8 array of shape (N, H, W, C)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(
      f"{name} must be uint8 in [0, 255], got dtype {images.dtype}. Convert "
      "float images in [0, 1] with (x * 255).round().astype(np.uint8)."
    )
  if images.ndim != 4:
    raise ValueError(
      f"{name} must be NHWC (N, H, W, C), got shape {images.shape}; add a "
      "channel axis to grayscale images with images[..., None]."
    )


def check_model_images(images, name: str = "images") -> None:
  """Raises unless `images` is a float (N, H, W, C) array in [-1, 1].

  Traced arrays are checked for dtype and shape only; the value range is
  checked wherever the values are concrete.
  """
  if images.ndim != 4:
    raise ValueError(
      f"{name} must be NHWC (N, H, W, C), got shape {images.shape}."
    )
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(
      f"{name} must be float in [-1, 1], got dtype {images.dtype}; convert "
      "uint8 images with aigc_jax.data.to_model_range."
    )
  if isinstance(images, jax.core.Tracer):
    return
  # np.asarray first: a concrete array closed over by a traced function
  # would otherwise be reduced by a staged (traced) operation.
  values = np.asarray(images)
  lo, hi = float(values.min()), float(values.max())
  if not (np.isfinite(lo) and np.isfinite(hi)):
    bad = int(np.size(values) - np.isfinite(values).sum())
    raise ValueError(
      f"{name} hold {bad} NaN or infinite values: the model that made them "
      "diverged or its weights are corrupt; retrain it or delete its "
      "checkpoint folder."
    )
  if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
    hint = (
      " They look like [0, 255] values: use to_model_range on the uint8 array."
      if hi > 2
      else ""
    )
    raise ValueError(
      f"{name} must lie in [-1, 1], found [{lo:.3g}, {hi:.3g}].{hint}"
    )


def to_model_range(images) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  check_uint8_images(images)
  return np.asarray(images, np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255], rounding to the nearest level."""
  images = np.asarray(images)
  check_model_images(images)
  return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_images(images, size: int, *, crop: int = 0) -> np.ndarray:
  """uint8 NHWC images cut by `crop` pixels on every side, then resized to
  size x size with Pillow's box (area-average) filter, which is what
  downsampling a digit to a coarse grid needs."""
  check_uint8_images(images)
  images = np.asarray(images)
  h, w = images.shape[1:3]
  if not 0 <= 2 * crop < min(h, w):
    raise ValueError(f"Cannot crop {crop} pixels a side from {h}x{w} images.")
  images = images[:, crop : h - crop, crop : w - crop]
  out = []
  for img in images:
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    out.append(np.asarray(pil.resize((size, size), Image.BOX)))
  out = np.stack(out)
  return out[..., None] if out.ndim == 3 else out


def center_crop(images, size: int) -> np.ndarray:
  """The central size x size window of NHWC images (e.g. without the
  padding added for a model of a larger resolution)."""
  images = np.asarray(images)
  h, w = images.shape[1:3]
  if not (size <= h and size <= w):
    raise ValueError(f"Cannot crop {h}x{w} images to {size}x{size}.")
  top, left = (h - size) // 2, (w - size) // 2
  return images[:, top : top + size, left : left + size]


def noise_grid(path: str, clean, protected, eps_255: float) -> None:
  """Saves a PNG of up to ten uint8 images in three rows: clean, protected,
  and their difference amplified so that ±eps_255 fills the range."""
  n = min(10, len(clean))
  diff = protected[:n].astype(np.float64) - clean[:n]
  amplified = np.clip(127.5 + diff * (127.5 / max(eps_255, 1e-9)), 0, 255)
  rows = np.concatenate([clean[:n], protected[:n], amplified.astype(np.uint8)])
  save_image_grid(path, rows, ncol=n)


def image_grid(
  images, ncol: int | None = None, min_size: int = 32
) -> np.ndarray:
  """Tiles uint8 NHWC images into one (rows*H, ncol*W, C) uint8 image.

  Small images are enlarged by an integer nearest-neighbour factor so that
  each tile is at least `min_size` pixels wide.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  check_uint8_images(images)
  n, h, w, c = images.shape
  scale = max(1, -(-min_size // w))
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = -(-n // ncol)
  pad = 1
  th, tw = h * scale + pad, w * scale + pad
  grid = np.full((nrow * th + pad, ncol * tw + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    grid[pad + r * th : (r + 1) * th, pad + col * tw : (col + 1) * tw] = img
  return grid


def save_image_grid(
  path: str, images, ncol: int | None = None, min_size: int = 32
) -> str:
  """Writes `image_grid(images)` as a PNG and returns the path: on process
  0 of a multi-process job only, atomically (`record.atomic_write`)."""
  grid = image_grid(images, ncol, min_size)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  return record.atomic_write(path, lambda f: image.save(f, format="PNG"))

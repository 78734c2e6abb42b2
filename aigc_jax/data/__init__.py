"""Datasets, value-range conversions, deterministic batching, image grids."""

from aigc_jax.data.batching import batch_fn, batch_indices, steps_per_epoch
from aigc_jax.data.images import (
  center_crop,
  check_model_images,
  check_uint8_images,
  image_grid,
  noise_grid,
  resize_images,
  save_image_grid,
  to_model_range,
  to_uint8,
)
from aigc_jax.data.sources import (
  EMBEDDED,
  TFDS_NAMES,
  Dataset,
  balanced_subset,
  load_dataset,
  load_split,
  parse_source,
)

__all__ = [
  "EMBEDDED",
  "TFDS_NAMES",
  "Dataset",
  "balanced_subset",
  "batch_fn",
  "batch_indices",
  "center_crop",
  "check_model_images",
  "check_uint8_images",
  "image_grid",
  "load_dataset",
  "load_split",
  "noise_grid",
  "parse_source",
  "resize_images",
  "save_image_grid",
  "steps_per_epoch",
  "to_model_range",
  "to_uint8",
]

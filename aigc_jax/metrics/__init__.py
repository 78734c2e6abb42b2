"""Evaluation metrics."""

from aigc_jax.metrics.classification import (
  accuracy,
  class_histogram,
  confident_share,
  share_interval,
)
from aigc_jax.metrics.distribution import frechet_distance, precision_recall
from aigc_jax.metrics.image_quality import (
  MS_SSIM_WEIGHTS,
  ms_ssim,
  psnr,
  ssim,
  ssim_components,
)

__all__ = [
  "MS_SSIM_WEIGHTS",
  "accuracy",
  "class_histogram",
  "confident_share",
  "frechet_distance",
  "ms_ssim",
  "precision_recall",
  "psnr",
  "share_interval",
  "ssim",
  "ssim_components",
]

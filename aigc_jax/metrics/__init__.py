"""Evaluation metrics."""

from aigc_jax.metrics.classification import (
  accuracy,
  class_histogram,
  confident_share,
)

__all__ = ["accuracy", "class_histogram", "confident_share"]

"""Deterministic batch order: the batch at step s is a function of (seed, s).

That makes a resumed run see exactly the batches the uninterrupted run would
have seen, with no iterator state to checkpoint.
"""

import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if batch_size > num_examples:
    raise ValueError(
      f"batch_size {batch_size} exceeds the {num_examples} examples "
      "available; lower the batch size."
    )
  return num_examples // batch_size


def batch_indices(
  seed: int, step: int, num_examples: int, batch_size: int
) -> np.ndarray:
  """The example indices of the global batch at `step`.

  Each epoch visits a fresh permutation of the examples drawn from
  (seed, epoch).
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[i * batch_size : (i + 1) * batch_size]

"""What a classifier says about a set of images."""

import jax
import jax.numpy as jnp


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The share of argmax predictions equal to the labels."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def confident_share(logits: jax.Array, threshold: float = 0.5) -> jax.Array:
  """The share of images whose most likely class has probability > threshold:
  how recognisable generated samples are to a classifier of real data."""
  return jnp.mean(jax.nn.softmax(logits, axis=-1).max(axis=-1) > threshold)


def class_histogram(
  logits: jax.Array, num_classes: int, threshold: float = 0.0
) -> jax.Array:
  """How many images are assigned to each class (confidently, if a threshold
  above 0 is given)."""
  probs = jax.nn.softmax(logits, axis=-1)
  keep = probs.max(axis=-1) > threshold
  return jnp.zeros((num_classes,), jnp.int32).at[probs.argmax(-1)].add(keep)


def share_interval(
  successes: int, total: int, z: float = 1.96
) -> tuple[float, float]:
  """The Wilson score interval of a share `successes / total` (95% for the
  default z): how far a share measured on `total` samples can be from the
  true one (Wilson 1927). Unlike share ± z·SE it stays inside [0, 1] and is
  not empty at 0 or 1."""
  if total < 1 or not 0 <= successes <= total:
    raise ValueError(
      f"A share needs 0 <= successes <= total and total >= 1, got "
      f"{successes} of {total}."
    )
  p = successes / total
  denom = 1 + z**2 / total
  centre = (p + z**2 / (2 * total)) / denom
  half = z * ((p * (1 - p) / total + z**2 / (4 * total**2)) ** 0.5) / denom
  return max(0.0, centre - half), min(1.0, centre + half)

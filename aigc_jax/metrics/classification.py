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

"""LSP: linearly separable synthetic perturbations (Yu et al., KDD 2022,
"Availability attacks create shortcuts").

No optimisation: each class gets a Gaussian cluster in a small feature space
(scikit-learn's `make_classification` with one cluster per class,
`class_sep=10`, all features informative), each sample is blown up to image
size by repeating every feature over a `patch` x `patch` block, and scaled to
a fixed L2 norm (Yu et al. 2022, arXiv 2111.00898, Alg. 1). The
perturbations are trivially separable by class, so a classifier learns them
instead of the images.

Differences from the original script, on purpose: the randomness is JAX's (the
clusters are the same construction, not the same numbers), and the norm is
stated as an L2 budget in [0, 255] units (`budget(255, "l2")` is the L2 = 1.0 in
[0, 1] units at which ISS evaluates LSP; the original used √(HWC)·6/255).
"""

import jax
import jax.numpy as jnp

from aigc_jax.protect.pgd import Budget


def _hypercube_vertices(key: jax.Array, count: int, dims: int) -> jax.Array:
  """`count` distinct random vertices of {-1, 1}^dims."""
  low = min(dims, 20)
  if count > 2**low:
    raise ValueError(
      f"{count} classes need more than {dims} LSP features; use a smaller "
      "patch."
    )
  # Distinct by construction: the binary digits of distinct random integers
  # fill the first `low` coordinates; the rest are coin flips.
  codes = jax.random.choice(key, 2**low, (count,), replace=False)
  bits = (codes[:, None] >> jnp.arange(low)) & 1
  rest = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (count, dims))
  bits = jnp.concatenate([bits, rest[:, low:].astype(bits.dtype)], axis=1)
  return 2.0 * bits - 1.0


def lsp_perturbations(
  key: jax.Array,
  labels: jax.Array,
  num_classes: int,
  image_shape: tuple[int, int, int],
  budget: Budget,
  *,
  patch: int = 8,
  class_sep: float = 10.0,
) -> jax.Array:
  """One synthetic perturbation per example, drawn from its class's cluster.

  Args:
    key: randomness (clusters, their covariances, and the samples).
    labels: (N,) integer classes.
    num_classes: number of classes (clusters).
    image_shape: (H, W, C); H and W must be multiples of `patch`.
    budget: an L2 budget; every perturbation has exactly its radius.
    patch: side of the block each feature fills.
    class_sep: half the side of the hypercube the class centres sit on.

  Returns:
    Perturbations in model units, (N, H, W, C), to add with
    `apply_perturbation` and round with `quantize_protected`.
  """
  h, w, c = image_shape
  if budget.norm != "l2":
    raise ValueError(
      f"LSP scales each perturbation to a fixed L2 norm; pass an L2 budget, "
      f"got {budget.norm!r}."
    )
  if h % patch or w % patch:
    raise ValueError(f"Image size {h}x{w} is not a multiple of patch {patch}.")
  dims = (h // patch) * (w // patch) * c
  centre_key, mix_key, sample_key = jax.random.split(key, 3)
  centres = class_sep * _hypercube_vertices(centre_key, num_classes, dims)
  # make_classification: per cluster, N(0, I) samples times a random matrix
  # with entries in U(-1, 1), around the cluster's centre.
  mixing = jax.random.uniform(mix_key, (num_classes, dims, dims), minval=-1.0)
  z = jax.random.normal(sample_key, (labels.shape[0], dims))
  features = jnp.einsum("nd,nde->ne", z, mixing[labels]) + centres[labels]
  blocks = features.reshape(-1, h // patch, w // patch, c)
  delta = jnp.repeat(jnp.repeat(blocks, patch, axis=1), patch, axis=2)
  norms = jnp.linalg.norm(delta.reshape(delta.shape[0], -1), axis=-1)
  return delta * (budget.eps / jnp.maximum(norms, 1e-12))[:, None, None, None]

"""RECE: closed-form adversarial embeddings and re-erasure (Gong et al. 2024).

After a closed-form erasure, an embedding c' can still make the edited model
produce what the original model produced for the erased concept c. RECE
finds it in closed form, over all cross-attention kernels at once
(row-vector form, K = Wᵀ):

  c' = argmin Σ_l ‖c' K_new,l − c K_old,l‖² + λ ‖c'‖²
     = c (Σ_l K_old,l K_new,lᵀ) (λ I + Σ_l K_new,l K_new,lᵀ)⁻¹

(`close_regzero` of the released code), then erases c' as well, with the
current weights as the anchor, and repeats.
"""

import jax
import jax.numpy as jnp

from aigc_jax.unlearn.closed_form import _mm, ridge_edit


def adversarial_embedding(
  edited: dict[str, jax.Array],
  original: dict[str, jax.Array],
  embeddings: jax.Array,
  *,
  lam: float | jax.Array = 0.1,
) -> jax.Array:
  """The embedding c' that regenerates `embeddings` through `edited`.

  Args:
    edited: the edited projections {name: K_new (d, out)}.
    original: the original projections, same names.
    embeddings: c (..., d): every token row of the concept's prompt(s).
    lam: λ, the regulariser toward zero (0.1 nudity, 1e-3 styles and hard
      objects in the released scripts).

  Returns:
    c' with the shape of `embeddings`.
  """
  names = list(edited)
  d = edited[names[0]].shape[0]
  # Σ K_new K_newᵀ (d, d) and Σ K_old K_newᵀ (d, d), one pass over layers.
  new_gram = sum(_mm(edited[n], edited[n].T) for n in names)
  cross = sum(_mm(original[n], edited[n].T) for n in names)
  lhs = lam * jnp.eye(d, dtype=jnp.float32) + new_gram
  rows = embeddings.reshape(-1, d)
  # c' = c cross lhs⁻¹, with lhs symmetric: c'ᵀ = lhs⁻¹ crossᵀ cᵀ.
  solved = jnp.linalg.solve(lhs, _mm(cross.T, rows.T)).T
  return solved.reshape(embeddings.shape)


def output_gap(
  kernels: dict[str, jax.Array],
  embeddings: jax.Array,
  reference: dict[str, jax.Array],
  reference_embeddings: jax.Array,
) -> jax.Array:
  """Σ_l ‖e K_l − e_ref K_ref,l‖² / Σ_l ‖e_ref K_ref,l‖²: how far `kernels`
  applied to `embeddings` are from the reference outputs (0 = regenerated).
  """
  d = next(iter(kernels.values())).shape[0]
  rows = embeddings.reshape(-1, d)
  ref_rows = reference_embeddings.reshape(-1, d)
  targets = {n: _mm(ref_rows, reference[n]) for n in kernels}
  gap = sum(jnp.sum((_mm(rows, kernels[n]) - targets[n]) ** 2) for n in kernels)
  norm = sum(jnp.sum(y**2) for y in targets.values())
  return gap / norm


def rece_edit(
  edited: dict[str, jax.Array],
  original: dict[str, jax.Array],
  concept_embeddings: jax.Array,
  guide_embedding: jax.Array,
  preserve_keys: jax.Array | None = None,
  *,
  epochs: int = 1,
  derive_lam: float | jax.Array = 0.1,
  edit_lam: float | jax.Array = 0.1,
  erase_scale: float | jax.Array = 1.0,
  preserve_scale: float | jax.Array = 0.1,
) -> list[dict[str, jax.Array]]:
  """RECE's derive-and-erase loop, from a UCE-edited model.

  Each epoch derives c' for every concept prompt (all 77 token rows) and
  erases it: c' is sent where the *current* kernel sends the guide prompt's
  embedding, row by row (position i of c' ↔ position i of the guide), with
  the preserved rows kept at their current outputs and λ anchoring to the
  current kernels (`edit_model_adversarial`, technique "replace").

  Args:
    edited: the UCE-edited projections (RECE's starting checkpoint).
    original: the original model's projections.
    concept_embeddings: (c, 77, d) embeddings of the erased prompts.
    guide_embedding: (77, d), e.g. the embedding of " ".
    preserve_keys: rows (m, d) to keep, or None.
    epochs: how many derive-erase rounds (static).
    derive_lam: λ of `adversarial_embedding`.
    edit_lam, erase_scale, preserve_scale: λ2, s_e and λ1 of the edit
      (0.1, 1, 0.1 in the released scripts).

  Returns:
    The projections after each epoch; RECE keeps the epoch that does best on
    a validation set, which is the caller's to measure.
  """
  current = edited
  history = []
  d = guide_embedding.shape[-1]
  guide = jnp.broadcast_to(guide_embedding, concept_embeddings.shape)
  guide_rows = guide.reshape(-1, d)
  for _ in range(epochs):
    derived = adversarial_embedding(
      current, original, concept_embeddings, lam=derive_lam
    ).reshape(-1, d)
    values = {n: _mm(guide_rows, k) for n, k in current.items()}
    current = ridge_edit(
      current,
      derived,
      values,
      lam=edit_lam,
      erase_scale=erase_scale,
      preserve_keys=preserve_keys,
      preserve_scale=preserve_scale,
    )
    history.append(current)
  return history

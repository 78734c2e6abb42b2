"""Closed-form edits of cross-attention projections: the ridge solve and UCE.

Every closed-form concept editor (UCE, RECE's re-erasure, MACE's refinement
and fusion) solves the same TIME/MEMIT-style ridge regression for each
key/value kernel K (Flax orientation, (d, out); a token embedding row c maps
to c K):

  min_K' s_e Σ_i ‖c_i K' − v_i‖² + s_p Σ_j ‖p_j K' − p_j K_p‖² + λ‖K' − K_a‖²_F

  K' = (λ I + s_e Cᵀ C + s_p Pᵀ P)⁻¹ (λ K_a + s_e Cᵀ V + s_p Pᵀ P K_p)

which is UCE's W' = (λW + Σ v cᵀ + …)(λI + Σ c cᵀ + …)⁻¹ (Gandikota et al.
2024, Eq. 7) transposed.

The normal equations above are how the originals solve it, and at Stable
Diffusion's shapes they are badly conditioned: 768-wide CLIP rows share a
large common direction, so λI + s_e CᵀC + s_p PᵀP has a condition number
near 1e6, and in float32 both the original and a direct solve land about
1e-2 (relative) from the exact edit. `ridge_edit` instead solves the
equivalent least-squares problem on the stacked, weighted rows
[√s_e C; √s_p P; √λ I] by a QR factorisation (`least_squares`), whose error
grows with the rows' condition number (its square root), and for the change
K' − K_a rather than K' itself; in float32 it stays within 1e-5 of the
float64 edit at SD v1.4's shapes (tests/test_unlearn.py). The stacked rows
depend on the embeddings only, so one factorisation serves every kernel of
the UNet. Matrix products run at HIGHEST precision, since TF32 or bf16
products visibly change the edit.
"""

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def gram(keys: jax.Array) -> jax.Array:
  """Cᵀ C of embedding rows C (n, d)."""
  return _mm(keys.T, keys)


def least_squares(rows: jax.Array, targets: jax.Array) -> jax.Array:
  """argmin_X ‖rows X − targets‖_F for full-column-rank `rows` (n, d), n ≥ d,
  by a reduced QR factorisation: X = R⁻¹ Qᵀ targets.

  The stable way to solve a ridge regression: the normal equations square
  the rows' condition number, QR does not."""
  q, r = jnp.linalg.qr(rows)
  return jax.scipy.linalg.solve_triangular(r, _mm(q.T, targets), lower=False)


def ridge_edit(
  kernels: dict[str, jax.Array],
  keys: jax.Array,
  values: dict[str, jax.Array],
  *,
  lam: float | jax.Array,
  erase_scale: float | jax.Array = 1.0,
  preserve_keys: jax.Array | None = None,
  preserve_scale: float | jax.Array = 1.0,
  anchor: dict[str, jax.Array] | None = None,
  preserve_from: dict[str, jax.Array] | None = None,
  preserve_gram: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """The closed-form ridge edit above, for every kernel at once (pure).

  Args:
    kernels: {name: K (d, out)}; only their names and shapes are used when
      `anchor` and `preserve_from` are both given.
    keys: C (n, d), the embeddings whose outputs are rewritten.
    values: {name: V (n, out)}, the new outputs of `keys` per kernel.
    lam: λ, the pull toward `anchor` (must be > 0 unless the other terms
      make the system non-singular).
    erase_scale: s_e.
    preserve_keys: P (m, d), embeddings whose outputs must not move.
    preserve_scale: s_p.
    anchor: K_a of the λ term; default `kernels`.
    preserve_from: K_p whose outputs P K_p are kept; default `anchor`.
    preserve_gram: PᵀP (d, d) given directly instead of `preserve_keys`,
      for preserved sets too large to hold as rows (MACE's cached sums over
      MS-COCO captions). The rows are then gone, and the edit is solved
      from the normal equations (Cholesky), about 5e-3 (relative) from the
      exact edit in float32 at SD's shapes; give rows where they fit.

  Returns:
    {name: K'} with the shapes of `kernels`.
  """
  if preserve_keys is not None and preserve_gram is not None:
    raise ValueError("Give preserve_keys or preserve_gram, not both.")
  anchor = kernels if anchor is None else anchor
  preserve_from = anchor if preserve_from is None else preserve_from
  names = list(kernels)
  d = kernels[names[0]].shape[0]
  widths = np.cumsum([kernels[n].shape[1] for n in names])[:-1]
  stacked = lambda tree: jnp.concatenate([tree[n] for n in names], axis=1)
  k_a = stacked(anchor)
  # Solved for the change Δ = K' − K_a: its rounding error is relative to
  # the (small) change, not to the whole kernel.
  erase_target = stacked(values) - _mm(keys, k_a)
  if preserve_gram is not None:
    lhs = (
      lam * jnp.eye(d, dtype=keys.dtype)
      + erase_scale * gram(keys)
      + preserve_scale * preserve_gram
    )
    rhs = erase_scale * _mm(keys.T, erase_target) + preserve_scale * _mm(
      preserve_gram, stacked(preserve_from) - k_a
    )
    change = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(lhs), True), rhs)
  else:
    e, p, a = (
      jnp.sqrt(jnp.asarray(v, keys.dtype))
      for v in (erase_scale, preserve_scale, lam)
    )
    rows = [e * keys, a * jnp.eye(d, dtype=keys.dtype)]
    targets = [e * erase_target, jnp.zeros_like(k_a)]
    if preserve_keys is not None:
      rows.append(p * preserve_keys)
      targets.append(p * _mm(preserve_keys, stacked(preserve_from) - k_a))
    change = least_squares(jnp.concatenate(rows), jnp.concatenate(targets))
  solved = k_a + change
  return dict(zip(names, jnp.split(solved, widths, axis=1), strict=True))


def uce_edit(
  kernels: dict[str, jax.Array],
  erase_keys: jax.Array,
  target_keys: jax.Array,
  preserve_keys: jax.Array | None = None,
  *,
  lam: float | jax.Array = 0.5,
  erase_scale: float | jax.Array = 1.0,
  preserve_scale: float | jax.Array = 1.0,
  preserve_gram: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Unified Concept Editing (Gandikota et al. 2024, Eq. 7), "replace".

  Each erased embedding c_i is sent where the original kernel sends its
  target c*_i (v*_i = c*_i K_old); preserved embeddings keep their original
  outputs; λ anchors every kernel to its original. Erase, moderate and
  debias are this function with different (erase, target) pairs.

  Args:
    kernels: the original projections {name: K (d, out)}.
    erase_keys: rows c_i (n, d) to erase (n may be 0: no edit).
    target_keys: rows c*_i (n, d), paired with `erase_keys`.
    preserve_keys: rows (m, d) to keep, or None.
    lam, erase_scale, preserve_scale: λ, s_e, s_p (may be traced: the
      function composes with `jax.vmap` over them).
    preserve_gram: Σ p pᵀ instead of `preserve_keys` (see `ridge_edit`).
  """
  if erase_keys.shape != target_keys.shape:
    raise ValueError(
      f"erase_keys {erase_keys.shape} and target_keys {target_keys.shape} "
      "must pair row by row (see `uce_token_blocks`)."
    )
  values = {n: _mm(target_keys, k) for n, k in kernels.items()}
  return ridge_edit(
    kernels,
    erase_keys,
    values,
    lam=lam,
    erase_scale=erase_scale,
    preserve_keys=preserve_keys,
    preserve_scale=preserve_scale,
    preserve_gram=preserve_gram,
  )


def uce_token_blocks(
  erase_embedding: jax.Array,
  erase_last: int,
  target_embedding: jax.Array,
  target_last: int,
) -> tuple[jax.Array, jax.Array]:
  """The token rows UCE's original code pairs for one (concept, target).

  The last word token and every EOS/pad position after it, aligned at the
  last word (old last word ↔ new last word, EOS ↔ EOS, pad ↔ pad) and cut
  to equal length 77 − max(i_old, i_new). Earlier words of the prompt are
  not used. An empty target's "last word" is BOS (index 0).

  Args:
    erase_embedding, target_embedding: (77, d) text embeddings.
    erase_last, target_last: last-word indices (`sd.last_word_index`).
  """
  length = erase_embedding.shape[0]
  far = max(int(erase_last), int(target_last))
  rows = length - far
  return (
    erase_embedding[erase_last : erase_last + rows],
    target_embedding[target_last : target_last + rows],
  )


def uce_keys(
  model,
  params: dict,
  erase: list[str],
  targets: list[str],
  preserve: list[str] = (),
):
  """Erase, target and preserve rows from prompts, as UCE's original code.

  Args:
    model, params: a loaded `StableDiffusion` and its parameters.
    erase: concept prompts to erase.
    targets: one target prompt per erased prompt (" " erases toward the
      unconditional, "art" for styles).
    preserve: prompts whose outputs are kept; the empty prompt is always
      preserved, all 77 tokens of each.

  Returns:
    `(erase_keys, target_keys, preserve_keys, preserve_scale)`, the last
    being UCE's default max(0.1, 1 / #preserved prompts).
  """
  from aigc_jax import sd

  if len(erase) != len(targets):
    raise ValueError(
      f"{len(erase)} erase prompts but {len(targets)} targets: give one "
      "target per erased prompt."
    )
  d = model.text_encoder.config.hidden_size
  empty = np.zeros((0, d), np.float32)  # keeps concatenate defined
  erase_rows, target_rows = [empty], [empty]
  if erase:
    old = sd.encode_prompts(model, params, erase)
    new = sd.encode_prompts(model, params, targets)
    old_last = sd.last_word_index(model.tokenizer, erase)
    new_last = sd.last_word_index(model.tokenizer, targets)
    for i in range(len(erase)):
      a, b = uce_token_blocks(old[i], old_last[i], new[i], new_last[i])
      erase_rows.append(np.asarray(a))
      target_rows.append(np.asarray(b))
  retain = ["", *preserve]
  preserve_keys = sd.encode_prompts(model, params, retain).reshape(-1, d)
  return (
    jnp.asarray(np.concatenate(erase_rows)),
    jnp.asarray(np.concatenate(target_rows)),
    preserve_keys,
    max(0.1, 1.0 / len(retain)),
  )

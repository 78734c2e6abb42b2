"""MACE's closed forms: cross-attention refinement and multi-LoRA fusion.

Lu et al. (CVPR 2024). Stage 1 (closed-form refinement, Eq. 1-2) removes a
concept's residue from the words around it: every token of a concept prompt
other than the concept's own (the shared prefix and suffix, and the padding)
is sent where the original kernel sends the same token of the prompt with
the concept replaced by its mapping concept. Stage 3 (Eq. 7) fuses the
per-concept LoRAs of stage 2 in one solve: every token of each concept's
prompts is sent where that concept's LoRA-tuned kernel sends it, with
general knowledge preserved. Both are `ridge_edit` with their own keys and
values.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.unlearn.closed_form import _mm, ridge_edit, uce_edit


def matching_token_positions(
  old_ids: list[int], new_ids: list[int], length: int = 77
) -> tuple[np.ndarray, np.ndarray]:
  """Paired positions of two prompts' co-existing tokens (MACE's
  `find_matching_indices`, extended with the padding).

  The common prefix and common suffix of the unpadded token lists (BOS and
  EOS included; the differing middle, the concept and its mapping, left
  out), then the padding positions of both, cut to equal length.

  Args:
    old_ids, new_ids: unpadded token ids (with BOS and EOS).
    length: the padded length.
  """
  prefix = 0
  while (
    prefix < min(len(old_ids), len(new_ids))
    and old_ids[prefix] == new_ids[prefix]
  ):
    prefix += 1
  suffix = 0
  while (
    suffix < min(len(old_ids), len(new_ids)) - prefix
    and old_ids[-1 - suffix] == new_ids[-1 - suffix]
  ):
    suffix += 1
  old = list(range(prefix)) + list(range(len(old_ids) - suffix, len(old_ids)))
  new = list(range(prefix)) + list(range(len(new_ids) - suffix, len(new_ids)))
  pad = min(length - len(old_ids), length - len(new_ids))
  old += list(range(len(old_ids), len(old_ids) + pad))
  new += list(range(len(new_ids), len(new_ids) + pad))
  return np.asarray(old, np.int32), np.asarray(new, np.int32)


def refinement_keys(model, params: dict, prompts, mapped_prompts):
  """Stage-1 rows: co-existing tokens of each concept prompt and the same
  tokens of its mapped prompt (e.g. "a photo of the eiffel tower" and "a
  photo of the tower").

  Returns:
    `(keys, mapped)`, both (n, d), paired row by row.
  """
  from aigc_jax import sd

  if len(prompts) != len(mapped_prompts):
    raise ValueError(
      f"{len(prompts)} prompts but {len(mapped_prompts)} mapped prompts: "
      "give one mapped prompt per concept prompt."
    )
  old = sd.encode_prompts(model, params, prompts)
  new = sd.encode_prompts(model, params, mapped_prompts)
  keys, mapped = [], []
  for i, (p, q) in enumerate(zip(prompts, mapped_prompts, strict=True)):
    a, b = matching_token_positions(
      model.tokenizer(p).input_ids,
      model.tokenizer(q).input_ids,
      old.shape[1],
    )
    keys.append(np.asarray(old[i])[a])
    mapped.append(np.asarray(new[i])[b])
  return np.concatenate(keys), np.concatenate(mapped)


def refine(
  kernels: dict[str, jax.Array],
  keys: jax.Array,
  mapped: jax.Array,
  *,
  lam: float | jax.Array = 0.0,
  preserve_keys: jax.Array | None = None,
  preserve_gram: jax.Array | None = None,
  preserve_scale: float | jax.Array = 1.0,
) -> dict[str, jax.Array]:
  """Closed-form cross-attention refinement (MACE Eq. 2).

  K' = (λI + Σ e_f e_fᵀ + s PᵀP)⁻¹ (λK + Σ e_f (e_g K) + s PᵀP K): the
  co-existing tokens e_f of the concept prompts take the outputs the
  original kernels give the same tokens e_g of the mapped prompts.

  Args:
    kernels: the original projections.
    keys, mapped: rows e_f and e_g from `refinement_keys`.
    lam: λ (0 for celebrities, art and explicit content; 10-1000 for
      objects in the released configs).
    preserve_keys: rows p of preserved text (general and domain
      knowledge) whose outputs are kept; with λ = 0 something must keep
      the system non-singular.
    preserve_gram: Σ p pᵀ instead of `preserve_keys`, for cached sums
      over more text than fits as rows (see `ridge_edit` for its accuracy).
    preserve_scale: their weight s. MACE's code gives stage 1 the weight
      s² of its `train_preserve_scale` s (`refine_preserve_weight`).
  """
  # UCE's "replace" edit with MACE's keys: e_f goes where e_g went.
  return uce_edit(
    kernels,
    keys,
    mapped,
    lam=lam,
    preserve_keys=preserve_keys,
    preserve_gram=preserve_gram,
    preserve_scale=preserve_scale,
  )


def refine_preserve_weight(
  train_preserve_scale: float,
  num_concepts: int,
  *,
  convention: str = "original",
  max_memory: int = 1000,
) -> float:
  """The weight stage 1 gives the preserved text, from MACE's
  `train_preserve_scale` s.

  MACE's `cfr_lora_training.py` multiplies the cached preservation sums by
  s when it builds them and again inside `closed_form_refinement`, whenever
  fewer than `max_memory` (1000) concepts are erased, which is every
  released config: the weight the original runs is s² (1e-8 for the
  celebrity, art and explicit-content configs' s = 1e-4 or 7e-7). From
  `max_memory` concepts on, and in the paper's Eq. 1, s is applied once.

  Args:
    train_preserve_scale: s, as in MACE's configs.
    num_concepts: how many concepts are erased at once.
    convention: "original" (what the released code runs; the default, so
      that its configs reproduce) or "paper" (s once).
    max_memory: MACE's `max_memory`.
  """
  if convention not in ("original", "paper"):
    raise ValueError(
      f"Unknown refinement weight convention {convention!r}; choose "
      "original (MACE's code: s² below max_memory concepts) or paper (s)."
    )
  if convention == "original" and num_concepts <= max_memory:
    return train_preserve_scale**2
  return train_preserve_scale


def fuse(
  refined: dict[str, jax.Array],
  tuned: list[dict[str, jax.Array]],
  concept_keys: list[jax.Array],
  *,
  lam: float | jax.Array = 0.0,
  original: dict[str, jax.Array] | None = None,
  preserve_keys: jax.Array | None = None,
  preserve_gram: jax.Array | None = None,
  preserve_scale: float | jax.Array = 1.0,
) -> dict[str, jax.Array]:
  """Closed-form fusion of per-concept LoRAs (MACE Eq. 7).

  K* = argmin Σ_i Σ_j ‖c_ij K* − c_ij K_i‖² + s Σ ‖p K* − p K_orig‖² +
  λ‖K* − K'‖², with K_i = K' + ΔK_i the kernels tuned for concept i and
  c_ij every token of concept i's prompts. Unlike a sum of the LoRAs, each
  concept's tuned outputs are kept on its own prompts only.

  Args:
    refined: the stage-1 kernels K' (the λ anchor).
    tuned: per concept, the kernels K' + ΔK_i after its stage-2 LoRA.
    concept_keys: per concept, its token rows (n_i, d).
    lam: λ.
    original: the original kernels, whose outputs on the preserved text are
      kept (MACE's cached sums come from the original model); default
      `refined`.
    preserve_keys, preserve_gram: preserved rows p, or Σ p pᵀ (as in
      `refine`).
    preserve_scale: their weight (MACE's `fuse_preserve_scale`, applied
      once).
  """
  if len(tuned) != len(concept_keys):
    raise ValueError(
      f"{len(tuned)} tuned kernel sets but {len(concept_keys)} key sets: "
      "one of each per concept."
    )
  keys = jnp.concatenate(concept_keys)
  values = {
    n: jnp.concatenate(
      [_mm(k, t[n]) for k, t in zip(concept_keys, tuned, strict=True)]
    )
    for n in refined
  }
  return ridge_edit(
    refined,
    keys,
    values,
    lam=lam,
    preserve_keys=preserve_keys,
    preserve_gram=preserve_gram,
    preserve_scale=preserve_scale,
    preserve_from=refined if original is None else original,
  )


# Stage 2: a rank-r LoRA per concept that suppresses its attention maps.


def init_lora(
  key: jax.Array, kernels: dict[str, jax.Array], rank: int = 1
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{name: (A (d, r), B (r, out))} with ΔK = A B, as diffusers'
  `LoRALinearLayer` starts: the down matrix ~ N(0, 1/r²), the up matrix 0,
  so the LoRA starts as the identity edit."""
  keys = jax.random.split(key, len(kernels))
  return {
    n: (
      jax.random.normal(k, (kernel.shape[0], rank), kernel.dtype) / rank,
      jnp.zeros((rank, kernel.shape[1]), kernel.dtype),
    )
    for k, (n, kernel) in zip(keys, kernels.items(), strict=True)
  }


def merge_lora(
  kernels: dict[str, jax.Array],
  lora: dict[str, tuple[jax.Array, jax.Array]],
  scale: float | jax.Array = 1.0,
) -> dict[str, jax.Array]:
  """K + scale · A B for every kernel the LoRA adapts."""
  return {
    n: k + scale * _mm(*lora[n]) if n in lora else k for n, k in kernels.items()
  }


def concept_token_mask(
  tokenizer, prompt: str, concept: str, *, use_pooler: bool = True
) -> np.ndarray:
  """(77,) float mask of the positions whose attention MACE suppresses.

  Every occurrence of the concept's tokens in the prompt and, with
  `use_pooler` (the released configs), every `<|endoftext|>` position: the
  EOS and, for SD v1.x, all padding.
  """
  from aigc_jax import sd

  ids = sd.tokenize(tokenizer, [prompt])[0]
  concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
  if not concept_ids:
    raise ValueError(f"The concept {concept!r} has no tokens.")
  mask = np.isin(ids, concept_ids)
  if not mask[1:].any():
    raise ValueError(
      f"The prompt {prompt!r} does not contain the concept {concept!r}."
    )
  mask[0] = False  # BOS
  if use_pooler:
    mask |= ids == tokenizer.eos_token_id
  return mask.astype(np.float32)


def attention_suppression_loss(
  maps: dict[str, jax.Array], pixel_mask: jax.Array, token_mask: jax.Array
) -> jax.Array:
  """Σ_l ‖A_l[mask pixels, concept tokens]‖_F (MACE Eq. 3, as its code has
  it: a plain, not squared, Frobenius norm per layer).

  Args:
    maps: `sd.attention.cross_attention_maps` output, each (B, h, H·W, T).
    pixel_mask: (B, H, W) segmentation of the concept in latent or image
      resolution; resized (nearest) to each layer and thresholded at 0.5.
      All ones when no mask is known.
    token_mask: (B, T) positions to suppress (`concept_token_mask`).
  """
  total = 0.0
  for a in maps.values():
    side = math.isqrt(a.shape[2])
    if side * side != a.shape[2]:
      raise ValueError(
        f"Attention over {a.shape[2]} pixels is not a square map; MACE's "
        "masks assume square latents."
      )
    m = jax.image.resize(
      pixel_mask, (pixel_mask.shape[0], side, side), "nearest"
    )
    m = (m > 0.5).astype(a.dtype).reshape(a.shape[0], 1, -1, 1)
    selected = a * m * token_mask[:, None, None, :]
    total = total + jnp.sqrt(jnp.sum(selected**2))
  return total


def train_concept_lora(
  model,
  unet_params: dict,
  latents: jax.Array,
  pixel_masks: jax.Array | None,
  contexts: jax.Array,
  token_masks: jax.Array,
  key: jax.Array,
  *,
  steps: int = 50,
  learning_rate: float = 1e-4,
  rank: int = 1,
  policy=None,
):
  """Stage 2 for one concept: a LoRA on every attn2 to_k/to_v, trained to
  suppress the concept's attention inside its masks (batch 1 per step, as
  the released code).

  Args:
    model: a `StableDiffusion`.
    unet_params: the stage-1 (refined) UNet parameters, frozen.
    latents: (n, C, h, w) scaled VAE latents of the concept's images.
    pixel_masks: (n, H, W) their concept masks; None: all ones, MACE's
      fallback when the segmenter finds nothing (and its setting for art).
    contexts: (m, 77, d) embeddings of the concept's prompts.
    token_masks: (m, 77) the positions to suppress in each prompt.
    key: randomness (image, prompt, timestep, noise per step).
    steps: optimiser steps (50 for objects, celebrities and art; 120 for
      explicit content in the released configs).
    learning_rate: AdamW's (1e-4 celebrities/art, 1e-5 objects/explicit).
    rank: the LoRA rank (1).
    policy: a `diffusion.TimestepPolicy`; default MACE's concept-focal one.

  Returns:
    `(lora, losses)`: the trained LoRA and the loss at every step.
  """
  import optax

  from aigc_jax import diffusion, sd

  policy = policy or diffusion.concept_focal_policy(
    model.schedule.num_timesteps
  )
  if pixel_masks is None:
    pixel_masks = jnp.ones((latents.shape[0], *latents.shape[2:]))
  base = sd.read_projections(unet_params)
  init_key, key = jax.random.split(key)
  lora = init_lora(init_key, base, rank)
  optimizer = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01),
  )

  def loss_fn(lora, x_t, t, context, pixel_mask, token_mask):
    params = sd.write_projections(unet_params, merge_lora(base, lora))
    maps = sd.attention.cross_attention_maps(model, params, x_t, t, context)
    return attention_suppression_loss(maps, pixel_mask, token_mask)

  def step(carry, step_key):
    lora, opt_state = carry
    k_img, k_prompt, k_t, k_noise = jax.random.split(step_key, 4)
    i = jax.random.randint(k_img, (1,), 0, latents.shape[0])
    j = jax.random.randint(k_prompt, (1,), 0, contexts.shape[0])
    t = diffusion.sample_timesteps(k_t, policy, (1,))
    noise = jax.random.normal(k_noise, latents[i].shape, latents.dtype)
    x_t = diffusion.q_sample(model.schedule, latents[i], t, noise)
    loss, grads = jax.value_and_grad(loss_fn)(
      lora, x_t, t, contexts[j], pixel_masks[i], token_masks[j]
    )
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return (optax.apply_updates(lora, updates), opt_state), loss

  (lora, _), losses = jax.lax.scan(
    step, (lora, optimizer.init(lora)), jax.random.split(key, steps)
  )
  return lora, losses

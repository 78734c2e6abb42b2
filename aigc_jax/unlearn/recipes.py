"""Config-driven recipes of the concept-erasure edits (UCE, RECE, MACE) on
a Stable Diffusion model: the prompts they erase and preserve, each edit of
the cross-attention projections, and all of them with their times
(`edited_projections`).

They read a config's `concepts`, `erase`, `target`, `templates`,
`preserve_kept`, `methods`, `sample` and the `uce`, `rece` and `mace` blocks
(see `experiments/configs/erase.py`). UCE: Gandikota et al. 2024, arXiv
2308.14761; RECE: Gong et al. 2024, arXiv 2407.12383; MACE: Lu et al. 2024,
arXiv 2403.06135.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import sd
from aigc_jax.unlearn import closed_form, mace, rece

# The edits a config's `methods` may name, in the order they run.
METHODS = ("uce", "rece", "mace")


def check_config(config) -> None:
  """Fails on unknown methods, RECE without UCE, or an erased concept that
  is not among the concepts, before any work."""
  unknown = set(config.methods) - set(METHODS)
  if unknown:
    raise ValueError(
      f"Unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}."
    )
  if "rece" in config.methods and "uce" not in config.methods:
    raise ValueError("RECE starts from the UCE edit: add 'uce' to methods.")
  missing = set(config.erase) - set(config.concepts)
  if missing:
    raise ValueError(f"Erased concepts {sorted(missing)} are not in concepts.")
  if "mace" in config.methods:
    mace.refine_preserve_weight(1.0, 1, convention=config.mace.refine_weight)


def concept_prompts(config, concept: str) -> list[str]:
  """The training captions' templates filled with `concept`."""
  return [t.format(concept) for t in config.templates]


def kept_prompts(config) -> list[str]:
  """The prompts of every concept that is not erased."""
  return [
    p
    for c in config.concepts
    if c not in config.erase
    for p in concept_prompts(config, c)
  ]


def uce(config, model, params, original):
  """UCE's edit of the erased concepts' prompts toward `target`, keeping
  the kept prompts when `preserve_kept`."""
  preserve = kept_prompts(config) if config.preserve_kept else []
  prompts = [p for c in config.erase for p in concept_prompts(config, c)]
  erase_keys, target_keys, preserve_keys, scale = closed_form.uce_keys(
    model, params, prompts, [config.target] * len(prompts), preserve
  )
  if config.uce.preserve_scale >= 0:
    scale = config.uce.preserve_scale
  return closed_form.uce_edit(
    original,
    erase_keys,
    target_keys,
    preserve_keys,
    lam=config.uce.lam,
    erase_scale=config.uce.erase_scale,
    preserve_scale=scale,
  )


def preserve_rows(config, model, params) -> jax.Array:
  """All 77 rows of the empty prompt, and of the kept prompts if asked."""
  prompts = ["", *(kept_prompts(config) if config.preserve_kept else [])]
  d = model.text_encoder.config.hidden_size
  return sd.encode_prompts(model, params, prompts).reshape(-1, d)


def erased_embeddings(config, model, params) -> jax.Array:
  """The text embeddings of the erased concepts' prompts."""
  prompts = [p for c in config.erase for p in concept_prompts(config, c)]
  return sd.encode_prompts(model, params, prompts)


def rece_epochs(config, model, params, original, uce_kernels):
  """RECE's epochs from the UCE edit: the projections after each."""
  guide = sd.encode_prompts(model, params, [config.target])[0]
  return rece.rece_edit(
    uce_kernels,
    original,
    erased_embeddings(config, model, params),
    guide,
    preserve_rows(config, model, params),
    epochs=config.rece.epochs,
    derive_lam=config.rece.derive_lam,
    edit_lam=config.rece.edit_lam,
    erase_scale=config.rece.erase_scale,
    preserve_scale=config.rece.preserve_scale,
  )


def concept_training_set(config, model, params, concept, key):
  """MACE's stage-2 data: images the original model draws for the concept
  (its latents) and masks of the concept at latent resolution."""
  n = config.mace.images_per_concept
  cond = sd.encode_prompts(
    model, params, [config.templates[0].format(concept)] * n
  )
  uncond = sd.encode_prompts(model, params, [""])
  latents = jax.jit(
    lambda unet, cond, uncond, key: sd.sample_latents(
      model,
      unet,
      cond,
      uncond,
      key,
      num_steps=config.sample.num_steps,
      guidance_scale=config.sample.guidance_scale,
    )
  )(params["unet"], cond, uncond, key)
  if config.mace.masks == "none":
    return latents, None
  if config.mace.masks != "strokes":
    raise ValueError(
      f"Unknown mask source {config.mace.masks!r}; choose strokes or none."
    )
  # A digit is its bright strokes on black: the mask is every latent cell
  # that holds a stroke pixel (a segmenter's job for real photographs).
  images = sd.decode_latents(model, params["vae"], latents)
  strokes = jnp.mean(images, axis=-1) > 0.0
  h = latents.shape[-1]
  f = strokes.shape[1] // h
  masks = strokes.reshape(n, h, f, h, f).any(axis=(2, 4))
  return latents, masks.astype(jnp.float32)


def mace_edit(config, model, params, original, key):
  """Refinement, a LoRA per concept, fusion. Returns (refined, fused,
  per-concept final LoRA losses)."""
  c = config.mace
  prompts = [p for w in config.erase for p in concept_prompts(config, w)]
  mapped = [
    t.format(c.mapping).strip() for w in config.erase for t in config.templates
  ]
  keys, mapped_keys = mace.refinement_keys(model, params, prompts, mapped)
  preserve = preserve_rows(config, model, params)
  refined = mace.refine(
    original,
    jnp.asarray(keys),
    jnp.asarray(mapped_keys),
    lam=c.refine_lam,
    preserve_keys=preserve,
    preserve_scale=mace.refine_preserve_weight(
      c.train_preserve_scale, len(config.erase), convention=c.refine_weight
    ),
  )
  refined_unet = sd.write_projections(params["unet"], refined)
  d = model.text_encoder.config.hidden_size
  tuned, concept_keys, losses = [], [], {}
  for i, word in enumerate(config.erase):
    data_key, train_key = jax.random.split(jax.random.fold_in(key, i))
    latents, masks = concept_training_set(config, model, params, word, data_key)
    word_prompts = concept_prompts(config, word)
    contexts = sd.encode_prompts(model, params, word_prompts)
    token_masks = np.stack(
      [mace.concept_token_mask(model.tokenizer, p, word) for p in word_prompts]
    )
    lora, trace = mace.train_concept_lora(
      model,
      refined_unet,
      latents,
      masks,
      contexts,
      jnp.asarray(token_masks),
      train_key,
      steps=c.lora_steps,
      learning_rate=c.lora_learning_rate,
      rank=c.lora_rank,
    )
    tuned.append(mace.merge_lora(refined, lora))
    concept_keys.append(contexts.reshape(-1, d))
    losses[word] = (float(trace[0]), float(trace[-1]))
  fused = mace.fuse(
    refined,
    tuned,
    concept_keys,
    lam=c.fuse_lam,
    original=original,
    preserve_keys=preserve,
    preserve_scale=c.fuse_preserve_scale,
  )
  return refined, fused, losses


def timed(fn, *args):
  """fn(*args) and the seconds it took, outputs ready."""
  start = time.time()
  out = jax.block_until_ready(fn(*args))
  return out, time.time() - start


# Scoring.


def edited_projections(config, model, params) -> tuple[dict, dict, dict]:
  """The original projections and each method's edit (RECE's per epoch,
  MACE's refinement alone and fused), the seconds of each method, and
  MACE's LoRA losses at the first and last step."""
  original = sd.read_projections(params["unet"])
  edits, seconds, lora_losses = {"original": original}, {}, {}
  if "uce" in config.methods:
    edits["uce"], seconds["uce"] = timed(uce, config, model, params, original)
  if "rece" in config.methods:
    history, seconds["rece"] = timed(
      rece_epochs, config, model, params, original, edits["uce"]
    )
    for i, kernels in enumerate(history):
      edits[f"rece epoch {i + 1}"] = kernels
  if "mace" in config.methods:
    (refined, fused, lora_losses), seconds["mace"] = timed(
      mace_edit, config, model, params, original, jax.random.key(config.seed)
    )
    edits["mace refinement only"] = refined
    edits["mace"] = fused
  return edits, seconds, lora_losses

"""Config-driven recipes of UDP's readings, AdvDM and the encoder attacks
through a latent (text-to-image) diffusion model.

The perturbation lives on the pixels; each reading's objective reaches them
through the VAE encoder (and the UNet, for the denoising readings), with the
images' captions as the text condition. The surrogate is the pretrained
text-to-image model: AdvDM and the encoder attacks use it as it is; `max`,
`min` and `bilevel` fine-tune its UNet on the protected images between PGD
rounds (`latent_steps`, the alternation engine's two halves). A budget sweep
(`protect.budgets`) runs every method at each budget (`config_at_budget`).
They read the same config blocks as `udp_recipes`, and `sd` (`model`,
`caption`, `class_words`), `finetune` and `data.classes`; see
`experiments/configs/udp.py`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import data, parallel, protect, purify, sd
from aigc_jax.eval import text_to_image as t2i_eval
from aigc_jax.protect import udp_recipes


def latent_steps(
  config, model, params, step, mesh, anchors
) -> udp_recipes.ProtectionSteps:
  """The two halves of the alternation for a latent diffusion model; a
  minibatch is (images, text embeddings). The inner min fine-tunes the UNet
  (`step`, from `finetune_step`) on the latents of the protected images;
  the perturbation step differentiates the reading's objective through the
  VAE encoder to the pixels; `anchors` from `anchor_images`."""
  encode = t2i_eval.vae_encoder(model, params["vae"], mesh)
  rep, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  anchors = jax.device_put(anchors, rep)
  finetune_step = jax.jit(step, out_shardings=(rep, rep), donate_argnums=0)
  surrogate_key = jax.random.fold_in(udp_recipes.protection_key(config), 1)
  surrogate_key = jax.device_put(surrogate_key, rep)

  def inner_min(state, batch):
    x, context = batch
    # Placed as the trainer's batches are, so both share one compilation.
    latents = parallel.shard_batch(mesh, encode(x))
    return finetune_step(state, (latents, context), surrogate_key)

  def perturb(
    unet_params, vae_params, anchors, chunk, delta, key, policy, reading
  ):
    encode_fn = lambda x: sd.encode_images(model, vae_params, x)
    reference = None
    if reading == "encoder_away":
      reference = encode_fn(chunk.x)
    elif reading == "encoder_target":
      reference = encode_fn(encoder_target(config, chunk.x, anchors))
    elif reading == "decoded_target":
      reference = encoder_target(config, chunk.x, anchors)
      encode_fn = lambda x: sd.decode_latents(
        model, vae_params, sd.encode_images(model, vae_params, x)
      )
    return udp_recipes.reading_step(
      config,
      reading,
      chunk,
      delta,
      key,
      eps_fn_of=lambda unet: (
        lambda z, t: (
          model.unet.apply({"params": unet}, z, t, chunk.conditions).sample
        )
      ),
      params=unet_params,
      schedule=model.schedule,
      policy=policy,
      encode=encode_fn,
      reference=reference,
    )

  perturb = jax.jit(
    perturb, static_argnames="reading", out_shardings=(shard, rep)
  )
  return udp_recipes.ProtectionSteps(
    inner_min,
    lambda state, chunk, delta, key, policy, reading: perturb(
      state.params, params["vae"], anchors, chunk, delta, key, policy, reading
    ),
    model.schedule,
  )


def encoder_target(config, x: jax.Array, anchors: jax.Array) -> jax.Array:
  """The images whose latents `encoder_target` (or whose reconstructions
  `decoded_target`) moves toward, per `protect.encoder_target`:

  * "gray": a mid-gray image (PhotoGuard's target, Salman et al. 2023);
  * "blur": `x` blurred, the same content without the fine detail that
    makes a style (Glaze's style target, Shan et al. 2023, arXiv 2302.04222,
    a Gaussian blur standing in for the style-transfer model);
  * "class:<k>": for each image, the nearest of `anchors`, images of
    another class k (`protect.nearest_anchors`: Nightshade's anchor
    concept), so that a model fine-tuned on the protected images learns
    class k's look for the concept's prompt.
  """
  target = config.protect.encoder_target
  if target == "gray":
    return jnp.zeros_like(x)
  if target == "blur":
    return purify.blur_model_images(x, config.protect.target_blur_sigma)
  if anchor_class(target) is not None:
    return protect.nearest_anchors(x, anchors)
  raise ValueError(
    f"Unknown protect.encoder_target {target!r}; choose 'gray', 'blur' or "
    "'class:<k>' (k an integer label of data.train)."
  )


def anchor_class(target: str) -> int | None:
  """k of an encoder target "class:<k>", else None."""
  found = re.fullmatch(r"class:(\d+)", target)
  return int(found.group(1)) if found else None


def anchor_images(config, model) -> np.ndarray:
  """The anchor images of an encoder target "class:<k>" (at most
  `protect.num_anchors` images of class k from `data.train`, in [-1, 1],
  padded to the model's side); one blank image for the other targets or
  when no method takes a target."""
  k = anchor_class(config.protect.encoder_target)
  targeted = any(
    m.partition(":")[0] in ("encoder_target", "decoded_target")
    for m in config.protect.methods
  )
  if k is None or not targeted:
    return np.zeros((1, *[sd.pixel_size(model)] * 2, model.vae.in_channels))
  train_set = data.load_split(config.data.train, config.data.data_dir)
  found = np.flatnonzero(train_set.labels == k)[: config.protect.num_anchors]
  if k in tuple(config.data.classes) or not len(found):
    raise ValueError(
      f"protect.encoder_target={config.protect.encoder_target!r}: the "
      f"anchor class must have images in {config.data.train!r} and differ "
      "from the protected data.classes; pick another class."
    )
  images = sd.pad_to_model(train_set.images[found], model)
  return data.to_model_range(images)


def budgets(config) -> tuple[float, ...]:
  """The budgets (in /255) the methods are run at: `protect.budgets` (a
  sweep), or `protect.eps` alone."""
  return tuple(config.protect.budgets) or (config.protect.eps,)


def sweeps(config) -> bool:
  """Whether the config sweeps budgets (sets are then named "<m>@<eps>")."""
  return bool(config.protect.budgets)


def config_at_budget(config, eps: float):
  """`config` with the budget `eps`, the PGD step scaled with it (the same
  number of steps crosses the same share of every budget)."""
  at = config.copy_and_resolve_references()
  with at.unlocked():
    at.protect.step_size = config.protect.step_size * eps / config.protect.eps
    at.protect.eps = eps
  return at

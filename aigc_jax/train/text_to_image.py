"""Training a small latent text-to-image model: the VAE, then the UNet and
the text encoder together, with captions dropped for classifier-free
guidance. Pure steps over diffusers' Flax modules, for the embedded model
the concept-erasure experiments edit."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aigc_jax.diffusion import NoiseSchedule, TimestepPolicy, denoising_loss
from aigc_jax.train.ddpm import DDPMState, apply_gradients

DIGIT_WORDS = (
  "zero",
  "one",
  "two",
  "three",
  "four",
  "five",
  "six",
  "seven",
  "eight",
  "nine",
)
# Training captions; the paraphrases are held out to test whether an
# erasure generalises beyond the words it was given.
CAPTION_TEMPLATES = (
  "a handwritten digit {}",
  "a photo of the number {}",
  "the digit {}",
  "{}",
)
PARAPHRASE_TEMPLATES = (
  "an image of a handwritten {}",
  "the numeral {} written by hand",
)


def digit_captions(
  labels: np.ndarray, rng: np.random.Generator, templates=CAPTION_TEMPLATES
) -> list[str]:
  """A caption per digit label, each from a random template."""
  picks = rng.integers(0, len(templates), len(labels))
  return [
    templates[p].format(DIGIT_WORDS[int(y)])
    for p, y in zip(picks, labels, strict=True)
  ]


def init_text_to_image_state(
  unet, text_encoder, optimizer, key: jax.Array
) -> DDPMState:
  """Fresh UNet and text-encoder parameters in one state (EMA equal)."""
  unet_key, text_key = jax.random.split(key)
  params = {
    "unet": unet.init_weights(unet_key),
    "text_encoder": text_encoder.init_weights(
      text_key, text_encoder.input_shape
    ),
  }
  ema = jax.tree.map(jnp.copy, params)
  return DDPMState(
    jnp.zeros((), jnp.int32), params, ema, optimizer.init(params)
  )


def text_to_image_train_step(
  state: DDPMState,
  batch: tuple[jax.Array, jax.Array],
  key: jax.Array,
  *,
  unet,
  text_encoder,
  optimizer: optax.GradientTransformation,
  schedule: NoiseSchedule,
  uncond_ids: jax.Array,
  drop_prob: float = 0.1,
  ema_decay: float = 0.999,
  policy: TimestepPolicy | None = None,
) -> tuple[DDPMState, dict[str, jax.Array]]:
  """One step of the latent denoising loss, text encoder trained too.

  Each caption is replaced by the empty one with probability `drop_prob`,
  so one network learns ε(x, c) and ε(x, ∅) (Ho & Salimans 2022, Alg. 1).

  Args:
    state: params {"unet", "text_encoder"} and their EMA.
    batch: (latents (B, C, h, w) NCHW, token ids (B, 77)).
    key: the run's key; the step uses `fold_in(key, state.step)`.
    unet, text_encoder: the Flax modules.
    optimizer: for both parameter sets.
    schedule: the noise schedule.
    uncond_ids: (77,) ids of the empty prompt.
    drop_prob: the caption-dropout probability.
    ema_decay: decay of the EMA kept for sampling.
    policy: p(t), w(t) (uniform when None).
  """
  latents, ids = batch
  drop_key, loss_key = jax.random.split(jax.random.fold_in(key, state.step))
  drop = jax.random.bernoulli(drop_key, drop_prob, (ids.shape[0], 1))
  ids = jnp.where(drop, uncond_ids[None], ids)

  def loss_fn(params):
    context = text_encoder(ids, params=params["text_encoder"]).last_hidden_state
    return latent_denoising_loss(
      unet, params["unet"], latents, context, loss_key, schedule, policy
    )

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return apply_gradients(state, loss, grads, optimizer, ema_decay)


def latent_denoising_loss(
  unet, unet_params, latents, context, key, schedule, policy=None
) -> jax.Array:
  """E_{t,ε} ‖ε − ε_θ(z_t, t, c)‖² over a batch of latents (NCHW) and their
  text embeddings `context` (B, 77, d) (Rombach et al. 2022, Eq. 2)."""
  eps_fn = lambda z, t: (
    unet.apply({"params": unet_params}, z, t, context).sample
  )
  return denoising_loss(
    eps_fn, latents, key, schedule, policy=policy, latents=True
  ).mean()


def finetune_unet_step(
  state: DDPMState,
  batch: tuple[jax.Array, jax.Array],
  key: jax.Array,
  *,
  unet,
  optimizer: optax.GradientTransformation,
  schedule: NoiseSchedule,
  ema_decay: float = 0.999,
) -> tuple[DDPMState, dict[str, jax.Array]]:
  """One fine-tuning step of a text-to-image UNet, text encoder frozen (the
  usual Stable Diffusion fine-tuning recipe).

  Args:
    state: the UNet's params and EMA.
    batch: (latents (B, C, h, w), text embeddings (B, 77, d)).
    key: the run's key; the step uses `fold_in(key, state.step)`.
    unet, optimizer, schedule, ema_decay: as `text_to_image_train_step`.
  """
  latents, context = batch
  loss, grads = jax.value_and_grad(
    lambda p: latent_denoising_loss(
      unet, p, latents, context, jax.random.fold_in(key, state.step), schedule
    )
  )(state.params)
  return apply_gradients(state, loss, grads, optimizer, ema_decay)


def init_vae_state(vae, optimizer, key: jax.Array) -> DDPMState:
  """Fresh VAE parameters; the EMA field is an (unused) copy, not an alias,
  so the state can be donated to a jitted step."""
  params = vae.init_weights(key)
  return DDPMState(
    jnp.zeros((), jnp.int32),
    params,
    jax.tree.map(jnp.copy, params),
    optimizer.init(params),
  )


def vae_loss(vae, params: Any, images: jax.Array, key: jax.Array, kl_weight):
  """‖x − D(z)‖² + β KL(q(z|x) ‖ N(0, I)), z ~ q(z|x) (Kingma & Welling
  2014, with a small β as latent diffusion uses); images NHWC in [-1, 1]."""
  nchw = jnp.transpose(images, (0, 3, 1, 2))
  posterior = vae.apply({"params": params}, nchw, method="encode").latent_dist
  z = posterior.sample(key)
  recon = vae.apply({"params": params}, z, method="decode").sample
  recon = jnp.transpose(recon, (0, 2, 3, 1))
  mse = jnp.mean(jnp.square(recon - images))
  return mse + kl_weight * jnp.mean(posterior.kl()), mse


def vae_train_step(
  state: DDPMState,
  images: jax.Array,
  key: jax.Array,
  *,
  vae,
  optimizer: optax.GradientTransformation,
  kl_weight: float = 1e-4,
) -> tuple[DDPMState, dict[str, jax.Array]]:
  """One step on `vae_loss`; the state's EMA field just mirrors params."""
  step_key = jax.random.fold_in(key, state.step)
  (loss, mse), grads = jax.value_and_grad(
    lambda p: vae_loss(vae, p, images, step_key, kl_weight), has_aux=True
  )(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "mse": mse, "grad_norm": optax.global_norm(grads)}
  return DDPMState(state.step + 1, params, params, opt_state), metrics

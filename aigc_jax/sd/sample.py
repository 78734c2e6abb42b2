"""Text-to-image sampling and the VAE's two directions, as pure functions.

Latents are NCHW, as diffusers' Flax UNet takes them; images are NHWC in
[-1, 1], as everywhere else in aigc_jax. Everything here is jittable and
runs sharded when its batch inputs (embeddings, noise) are sharded.
"""

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.diffusion.sample import ddim_sample


def guided_eps_fn(
  model, unet_params, cond: jax.Array, uncond: jax.Array, scale
):
  """ε̂(x, t) with classifier-free guidance (Ho & Salimans 2022, Eq. 6).

  ε̂ = ε(x, t, ∅) + s (ε(x, t, c) - ε(x, t, ∅)), both halves in one UNet call.

  Args:
    model: a `StableDiffusion` (its `unet` is used).
    unet_params: the UNet's parameters (e.g. after a concept edit).
    cond: prompt embeddings (n, 77, d).
    uncond: the empty prompt's embeddings, (1, 77, d) or (n, 77, d).
    scale: the guidance scale s (1 = no guidance); may be traced.
  """
  uncond = jnp.broadcast_to(uncond, cond.shape)
  context = jnp.concatenate([uncond, cond])

  def eps_fn(x, t):
    out = model.unet.apply(
      {"params": unet_params},
      jnp.concatenate([x, x]),
      jnp.concatenate([t, t]),
      context,
    ).sample
    eps_u, eps_c = jnp.split(out, 2)
    return eps_u + scale * (eps_c - eps_u)

  return eps_fn


def latent_shape(model, batch: int, latent_size: int | None = None):
  """(batch, C, h, w) of the UNet's latents; h = w = its `sample_size`."""
  size = latent_size or model.unet.sample_size
  return (batch, model.unet.in_channels, size, size)


def sample_latents(
  model,
  unet_params,
  cond: jax.Array,
  uncond: jax.Array,
  key: jax.Array,
  *,
  num_steps: int = 50,
  guidance_scale: float | jax.Array = 7.5,
  eta: float | jax.Array = 0.0,
  latent_size: int | None = None,
) -> jax.Array:
  """DDIM (Song et al. 2021, Eq. 12) with classifier-free guidance.

  The timesteps are the scheduler's ("leading" spacing plus `steps_offset`),
  x̂_0 is not clipped (latents are unbounded). `num_steps` and `latent_size`
  are static.
  """
  noise_key, step_key = jax.random.split(key)
  shape = latent_shape(model, cond.shape[0], latent_size)
  x_T = jax.random.normal(noise_key, shape, jnp.float32)
  return ddim_sample(
    guided_eps_fn(model, unet_params, cond, uncond, guidance_scale),
    x_T,
    step_key,
    model.schedule,
    num_steps=num_steps,
    eta=eta,
    clip_x0=False,
    offset=model.steps_offset,
  )


def decode_latents(model, vae_params, latents: jax.Array) -> jax.Array:
  """VAE decoder: NCHW latents -> NHWC images in [-1, 1] (clipped)."""
  nhwc = jnp.transpose(latents, (0, 2, 3, 1)) / model.scaling_factor
  images = model.vae.apply({"params": vae_params}, nhwc, method="decode")
  return jnp.clip(jnp.transpose(images.sample, (0, 2, 3, 1)), -1.0, 1.0)


def encode_images(model, vae_params, images: jax.Array) -> jax.Array:
  """VAE encoder mean: NHWC images in [-1, 1] -> scaled NCHW latents.

  The mean of the posterior (no sampling), so the map is deterministic and
  differentiable, as protections through the encoder need.
  """
  nchw = jnp.transpose(images, (0, 3, 1, 2))
  dist = model.vae.apply({"params": vae_params}, nchw, method="encode")
  mean = dist.latent_dist.mean  # NHWC
  return jnp.transpose(mean, (0, 3, 1, 2)) * model.scaling_factor


def text_to_image(
  model,
  params: dict,
  cond: jax.Array,
  uncond: jax.Array,
  key: jax.Array,
  *,
  num_steps: int = 50,
  guidance_scale: float | jax.Array = 7.5,
  eta: float | jax.Array = 0.0,
  latent_size: int | None = None,
) -> jax.Array:
  """Images (n, H, W, 3) in [-1, 1] for prompt embeddings `cond`.

  Args:
    model: a `StableDiffusion`.
    params: {"unet", "vae", ...}; pass edited UNet params to sample from an
      edited model.
    cond: (n, 77, d) prompt embeddings (`text.encode_prompts`).
    uncond: the empty prompt's embeddings, (1, 77, d).
    key: one key for the whole batch.
    num_steps, guidance_scale, eta, latent_size: see `sample_latents`.
  """
  latents = sample_latents(
    model,
    params["unet"],
    cond,
    uncond,
    key,
    num_steps=num_steps,
    guidance_scale=guidance_scale,
    eta=eta,
    latent_size=latent_size,
  )
  return decode_latents(model, params["vae"], latents)


def make_sampler(model, num_steps: int, guidance_scale: float):
  """A jitted `sample(params, cond, uncond, key)` -> NHWC images in [-1, 1]:
  one compilation serves every edit of the same model."""
  return jax.jit(
    lambda params, cond, uncond, key: text_to_image(
      model,
      params,
      cond,
      uncond,
      key,
      num_steps=num_steps,
      guidance_scale=guidance_scale,
    )
  )


def pixel_size(model) -> int:
  """The image side the model's VAE maps to its UNet's latent side."""
  return model.unet.sample_size * 2 ** (len(model.vae.block_out_channels) - 1)


def pad_to_model(images: np.ndarray, model) -> np.ndarray:
  """uint8 NHWC images zero-padded to the side the model's VAE takes."""
  size = pixel_size(model)
  pad = size - images.shape[1]
  if pad < 0 or pad % 2 or images.shape[1] != images.shape[2]:
    raise ValueError(
      f"Images of {images.shape[1:3]} do not fit the model's {size}x{size} "
      "(square images up to that size are zero-padded): resize the data."
    )
  if images.shape[-1] != model.vae.in_channels:
    raise ValueError(
      f"Images have {images.shape[-1]} channels, the VAE takes "
      f"{model.vae.in_channels}."
    )
  half = pad // 2
  return np.pad(images, ((0, 0), (half, half), (half, half), (0, 0)))

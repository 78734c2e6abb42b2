"""Stable Diffusion in JAX: diffusers' Flax classes from PyTorch folders.

`load_stable_diffusion` reads a diffusers-layout folder; `text` encodes
prompts; `sample` draws images with classifier-free guidance; and
`cross_attention` reads and writes the key/value projections that concept
editors (aigc_jax.unlearn) rewrite; `attention` recomputes their maps.
"""

from aigc_jax.sd import attention
from aigc_jax.sd.attention import cross_attention_maps
from aigc_jax.sd.cross_attention import (
  SD14_TEXT_WIDTH,
  projection_names,
  read_projections,
  sd14_random_projections,
  write_projections,
)
from aigc_jax.sd.load import (
  StableDiffusion,
  check_unet_config,
  load_model,
  load_stable_diffusion,
  read_state_dict,
)
from aigc_jax.sd.sample import (
  decode_latents,
  encode_images,
  guided_eps_fn,
  make_sampler,
  pad_to_model,
  pixel_size,
  sample_latents,
  text_to_image,
)
from aigc_jax.sd.text import (
  encode_ids,
  encode_prompts,
  last_word_index,
  tokenize,
)

__all__ = [
  "SD14_TEXT_WIDTH",
  "StableDiffusion",
  "attention",
  "check_unet_config",
  "cross_attention_maps",
  "decode_latents",
  "encode_ids",
  "encode_images",
  "encode_prompts",
  "guided_eps_fn",
  "last_word_index",
  "load_model",
  "load_stable_diffusion",
  "make_sampler",
  "pad_to_model",
  "pixel_size",
  "projection_names",
  "read_projections",
  "read_state_dict",
  "sample_latents",
  "sd14_random_projections",
  "text_to_image",
  "tokenize",
  "write_projections",
]

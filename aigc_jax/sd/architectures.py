"""Stable Diffusion architectures as diffusers and transformers configs.

`SD14` is CompVis/stable-diffusion-v1-4 as its folder's `config.json` files
give it: an 860M-parameter UNet on 4x64x64 latents (channels 320-1280, 16
cross-attention blocks over 77x768 text), the 84M-parameter VAE
(512x512 images), CLIP ViT-L/14's 123M-parameter text encoder, and the
scaled-linear noise schedule with `steps_offset` 1. `TINY` is the same
layout at a size that runs in seconds on a CPU. With
`export.save_random_stable_diffusion` either becomes a folder of random
weights that loads as a downloaded checkpoint does.

Each architecture is {"unet", "vae": keyword arguments of diffusers'
`UNet2DConditionModel` / `AutoencoderKL`; "text_encoder": of transformers'
`CLIPTextConfig` (without `vocab_size`, the table is as large as the
tokenizer's vocabulary, unless given); "scheduler": of `DDIMScheduler`}.
"""

SD14 = {
  "unet": {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # the head count, despite its name
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
  },
  "vae": {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
  },
  "text_encoder": {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
  },
  "scheduler": {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
  },
}

TINY = {
  "unet": {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
  },
  "vae": {
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
    "norm_num_groups": 32,
    "sample_size": 16,
  },
  "text_encoder": {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
  },
  "scheduler": {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
  },
}

ARCHITECTURES = {"sd14": SD14, "tiny": TINY}


def architecture(name: str) -> dict:
  """The architecture called `name` ("sd14" or "tiny")."""
  if name not in ARCHITECTURES:
    raise ValueError(
      f"Unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}."
    )
  return ARCHITECTURES[name]

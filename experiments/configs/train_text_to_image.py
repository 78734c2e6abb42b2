"""The embedded text-to-image model that concept erasure edits.

Default (`digits`): a small latent diffusion model on captioned real MNIST
digits (mnist5k, padded to 32x32): a KL autoencoder to 8x8x4 latents, then a
`FlaxUNet2DConditionModel` and a CLIP text encoder trained together on
captions such as "a handwritten digit three", with 10% caption dropout for
classifier-free guidance. The result is saved in diffusers' PyTorch folder
layout (`<workdir>/model`), so it loads exactly as a real Stable Diffusion
checkpoint does, and scored by a digit classifier trained on real MNIST:

  python experiments/train_text_to_image.py \
    --config=experiments/configs/train_text_to_image.py --workdir=runs/t2i

`:without_nine` trains the same UNet and text encoder on the digits 0-8
only, over the default model's VAE (`vae_from`): the model that has never
seen a nine, whose fine-tuning on a few nines is the concept-learning
setting of `experiments/udp.py` (`checkpoints/t2i_digits_without_nine`).
`:smoke` is a few steps for tests.

On 2 CPU cores: VAE 607 s, UNet + text encoder 1,834 s; the result is
`checkpoints/t2i_digits/model` (98.0% of samples of "a handwritten digit
{d}" classified as d; see checkpoints/MANIFEST.md).
"""

import ml_collections

from experiments.configs import train_classifier
from experiments.configs.base import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "digits"
  c = base_config(variant)
  c.data.train, c.data.test = "mnist5k:train", "mnist5k:test"
  c.data.pad_to = 32
  # diffusers AutoencoderKL config (1 channel; 2 downsamplings: 32 -> 8).
  c.vae = ml_collections.ConfigDict(
    {
      "in_channels": 1,
      "out_channels": 1,
      "down_block_types": ("DownEncoderBlock2D",) * 3,
      "up_block_types": ("UpDecoderBlock2D",) * 3,
      "block_out_channels": (16, 32, 32),
      "layers_per_block": 1,
      "latent_channels": 4,
      "norm_num_groups": 8,
      "sample_size": 32,
    }
  )
  c.vae_train = ml_collections.ConfigDict(
    {
      "batch_size": 32,
      "num_steps": 2000,
      "learning_rate": 1e-3,
      "kl_weight": 1e-4,
    }
  )
  # diffusers UNet2DConditionModel config on the 8x8x4 latents.
  c.unet = ml_collections.ConfigDict(
    {
      "sample_size": 8,
      "in_channels": 4,
      "out_channels": 4,
      "block_out_channels": (64, 128),
      "layers_per_block": 1,
      "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
      "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
      "cross_attention_dim": 64,
      "attention_head_dim": 4,
    }
  )
  c.text_encoder = ml_collections.ConfigDict(
    {
      "hidden_size": 64,
      "intermediate_size": 128,
      "num_attention_heads": 4,
      "num_hidden_layers": 2,
    }
  )
  c.train = ml_collections.ConfigDict(
    {
      "batch_size": 32,
      "num_steps": 5000,
      "learning_rate": 5e-4,
      "drop_prob": 0.1,
      "ema_decay": 0.999,
      "checkpoint_every": 1000,
      "log_every": 100,
    }
  )
  c.export_dtype = "float16"  # of the saved folder: 7 MB instead of 14
  c.sample = ml_collections.ConfigDict(
    {"per_digit": 20, "num_steps": 25, "guidance_scale": 4.0}
  )
  c.eval = ml_collections.ConfigDict(
    {"classifier": train_classifier.get_config("mnist5k")}
  )
  c.data.limit = 0  # > 0: a class-balanced subset
  # Digits left out of training (their words stay in the vocabulary).
  c.data.exclude_classes = ()
  # A diffusers folder whose VAE (and latent scale) to reuse instead of
  # training one ('' trains it).
  c.vae_from = ""
  if variant == "digits":
    pass
  elif variant == "without_nine":
    c.data.exclude_classes = (9,)
    c.vae_from = "checkpoints/t2i_digits/model"
    # 3,000 steps left the prompts weak (48.5% of samples of their digit);
    # 6,000 is a little more than the default's 5,000.
    c.train.num_steps = 6000
  elif variant == "smoke":
    c.data.limit = 64
    c.vae.update(
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2,
      block_out_channels=(32, 32),
    )
    c.vae_train.update(batch_size=16, num_steps=4)
    c.unet.update(sample_size=16, block_out_channels=(32, 32))
    c.text_encoder.update(hidden_size=32, intermediate_size=32)
    c.unet.cross_attention_dim = 32
    c.train.update(batch_size=16, num_steps=4, checkpoint_every=2)
    c.sample.update(per_digit=2, num_steps=2)
    c.eval.classifier = train_classifier.get_config("mnist5k_smoke")
  else:
    raise ValueError(
      f"Unknown variant {variant!r}; choose digits, without_nine or smoke."
    )
  return c

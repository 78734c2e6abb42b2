"""The embedded text-to-image model's training steps on tiny modules."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aigc_jax import sd
from aigc_jax.diffusion import scaled_linear_schedule
from aigc_jax.sd.vocabulary import write_clip_tokenizer
from aigc_jax.train import text_to_image as t2i


def test_captions_use_the_templates():
  captions = t2i.digit_captions(np.array([3, 8]), np.random.default_rng(0))
  assert "three" in captions[0] and "eight" in captions[1]
  held_out = t2i.digit_captions(
    np.array([3]), np.random.default_rng(0), t2i.PARAPHRASE_TEMPLATES
  )
  assert held_out[0] not in {t.format("three") for t in t2i.CAPTION_TEMPLATES}


WRITE_TOKENIZER = """
import sys
from aigc_jax.sd.vocabulary import write_clip_tokenizer
from aigc_jax.train import text_to_image as t2i
corpus = [
  t.format(w)
  for t in t2i.CAPTION_TEMPLATES + t2i.PARAPHRASE_TEMPLATES
  for w in t2i.DIGIT_WORDS
]
write_clip_tokenizer(corpus, sys.argv[1])
"""


def test_the_tokenizer_is_the_same_in_every_process_and_kept_on_resume(
  tmp_path,
):
  # The BPE trainer breaks ties by a per-process hash seed: two processes
  # (a fresh run and its resume, or two hosts of a job) must still agree.
  vocab = []
  for seed in ("1", "2"):
    subprocess.run(
      [sys.executable, "-c", WRITE_TOKENIZER, str(tmp_path / seed)],
      check=True,
      capture_output=True,
      env={**os.environ, "PYTHONHASHSEED": seed},
    )
    vocab.append(json.loads((tmp_path / seed / "vocab.json").read_text()))
  assert vocab[0] == vocab[1]
  # A folder written before is read back as it is, whatever the corpus.
  again = write_clip_tokenizer(["another corpus"], str(tmp_path / "1"))
  assert again.get_vocab() == vocab[0]


@pytest.mark.long
def test_vae_and_text_to_image_losses_fall(tmp_path):
  from transformers import CLIPTextConfig

  captions = [
    t.format(w) for t in t2i.CAPTION_TEMPLATES for w in t2i.DIGIT_WORDS
  ]
  tokenizer = write_clip_tokenizer(captions, str(tmp_path / "tokenizer"))
  vae = sd.load.build_vae(
    {
      "in_channels": 1,
      "out_channels": 1,
      "down_block_types": ["DownEncoderBlock2D"] * 2,
      "up_block_types": ["UpDecoderBlock2D"] * 2,
      "block_out_channels": [32, 32],
      "latent_channels": 4,
      "norm_num_groups": 32,
      "sample_size": 16,
    }
  )
  rng = np.random.default_rng(0)
  images = jnp.asarray(
    np.clip(rng.normal(size=(8, 16, 16, 1)) * 0.5, -1, 1), jnp.float32
  )
  optimizer = optax.adam(3e-3)
  # Jitted: initialisers run op by op compile each draw on its own.
  state = jax.jit(lambda k: t2i.init_vae_state(vae, optimizer, k))(
    jax.random.key(0)
  )
  step = jax.jit(
    functools.partial(t2i.vae_train_step, vae=vae, optimizer=optimizer)
  )
  losses = []
  for _ in range(15):
    state, metrics = step(state, images, jax.random.key(1))
    losses.append(float(metrics["mse"]))
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])

  unet = sd.load.build_unet(
    {
      "sample_size": 8,
      "in_channels": 4,
      "out_channels": 4,
      "block_out_channels": [32, 64],
      "layers_per_block": 1,
      "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
      "cross_attention_dim": 32,
      "attention_head_dim": 4,
    }
  )
  from transformers import FlaxCLIPTextModel

  text_encoder = FlaxCLIPTextModel(
    CLIPTextConfig(
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=4,
      num_hidden_layers=1,
      vocab_size=len(tokenizer),
    ),
    _do_init=False,
  )
  optimizer = optax.adam(1e-3)
  state = jax.jit(
    lambda k: t2i.init_text_to_image_state(unet, text_encoder, optimizer, k)
  )(jax.random.key(2))
  labels = np.arange(8) % 10
  ids = jnp.asarray(sd.tokenize(tokenizer, t2i.digit_captions(labels, rng)))
  latents = jnp.asarray(rng.normal(size=(8, 4, 8, 8)), jnp.float32) * 0.5
  step = jax.jit(
    functools.partial(
      t2i.text_to_image_train_step,
      unet=unet,
      text_encoder=text_encoder,
      optimizer=optimizer,
      schedule=scaled_linear_schedule(),
      uncond_ids=jnp.asarray(sd.tokenize(tokenizer, [""])[0]),
    )
  )
  losses = []
  for _ in range(20):
    state, metrics = step(state, (latents, ids), jax.random.key(3))
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
  assert set(state.params) == {"unet", "text_encoder"}

  # Fine-tuning the UNet alone, on fixed caption embeddings (text encoder
  # frozen): the loss falls and the state holds the UNet only.
  context = text_encoder(ids, params=state.params["text_encoder"])
  context = context.last_hidden_state
  tune_opt = optax.adam(3e-3)
  unet_params = state.params["unet"]
  tuned = t2i.DDPMState(
    jnp.zeros((), jnp.int32),
    unet_params,
    unet_params,
    tune_opt.init(unet_params),
  )
  tune = jax.jit(
    functools.partial(
      t2i.finetune_unet_step,
      unet=unet,
      optimizer=tune_opt,
      schedule=scaled_linear_schedule(),
    )
  )
  losses = []
  for _ in range(20):
    tuned, metrics = tune(tuned, (latents, context), jax.random.key(4))
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
  assert jax.tree.structure(tuned.params) == jax.tree.structure(unet_params)

"""Trains the embedded text-to-image model and saves it as an SD folder.

Stages, each resumable: a CLIP tokenizer for the captions, the KL
autoencoder, the latents of the training images, then the UNet and the text
encoder together. The EMA weights are saved in diffusers' PyTorch layout
(`<workdir>/model`), read back through `aigc_jax.sd.load_stable_diffusion`
(the path a real checkpoint takes) and scored: images sampled per digit
prompt, classified by a CNN trained on real MNIST. See
experiments/configs/train_text_to_image.py.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aigc_jax import data, launch, parallel, record, sd, train
from aigc_jax.diffusion import make_schedule
from aigc_jax.eval import classifiers
from aigc_jax.sd import architectures
from aigc_jax.sd.export import save_stable_diffusion
from aigc_jax.sd.vocabulary import write_clip_tokenizer
from aigc_jax.train import text_to_image as t2i

# Stable Diffusion v1's noise schedule and DDIM settings.
SCHEDULER = architectures.SD14["scheduler"]


def padded_images(config) -> tuple[np.ndarray, np.ndarray]:
  """Training images in [-1, 1], zero-padded (black) to `data.pad_to`."""
  train_set, _ = classifiers.load_train_test(config)
  excluded = config.data.get("exclude_classes", ())
  if excluded:
    train_set = train_set.take(
      np.flatnonzero(~np.isin(train_set.labels, excluded))
    )
  x = data.to_model_range(train_set.images)
  pad = (config.data.pad_to - x.shape[1]) // 2
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1)
  return x, np.asarray(train_set.labels)


def run_stage(init_fn, step_fn, batch_fn, config_train, workdir, name, mesh):
  """Trains one stage in `<workdir>/<name>`, resuming from its checkpoint
  (`init_fn` runs only when there is none)."""
  return train.train_stage(
    os.path.join(workdir, name),
    init_fn,
    ((step_fn, config_train.num_steps),),
    batch_fn,
    mesh=mesh,
    checkpoint_every=config_train.get("checkpoint_every", 1000),
    log_every=config_train.get("log_every", 100),
    log_fn=record.MetricWriter(workdir, prefix=f"{name}/").write,
    desc=name,
  )


def train_vae(config, workdir, images, mesh):
  vae = sd.load.build_vae(config.vae.to_dict())
  optimizer = optax.adam(config.vae_train.learning_rate)
  init_fn = functools.partial(
    t2i.init_vae_state, vae, optimizer, jax.random.key(config.seed)
  )
  step_fn = functools.partial(
    t2i.vae_train_step,
    key=jax.random.key(config.seed + 1),
    vae=vae,
    optimizer=optimizer,
    kl_weight=config.vae_train.kl_weight,
  )
  batch_fn = data.batch_fn(
    images, config.seed, config.vae_train.batch_size, mesh
  )
  state = run_stage(
    init_fn, step_fn, batch_fn, config.vae_train, workdir, "vae", mesh
  )
  return vae, state.params


def scaling_factor(latents: np.ndarray) -> float:
  """1 / std of the latents, so they have unit variance (Rombach et al.
  2022, §4.3.2: SD's 0.18215 was chosen the same way)."""
  return float(1.0 / np.std(latents))


def autoencoder(config, workdir, images, mesh):
  """The VAE (`vae_from`'s, or trained here), its parameters, the images'
  latents (NCHW, scaled to unit variance) and the scaling factor."""
  if config.get("vae_from", ""):
    given, given_params = sd.load_stable_diffusion(config.vae_from)
    vae, vae_params = given.vae, given_params["vae"]
  else:
    vae, vae_params = train_vae(config, workdir, images, mesh)
  encode = jax.jit(
    lambda p, x: (
      vae.apply(
        {"params": p}, jnp.transpose(x, (0, 3, 1, 2)), method="encode"
      ).latent_dist.mean
    )
  )
  latents = np.concatenate(
    [
      encode(vae_params, images[i : i + 256])
      for i in range(0, len(images), 256)
    ]
  )
  if config.get("vae_from", ""):
    scale = given.scaling_factor
  else:
    scale = scaling_factor(latents)
  return vae_params, np.transpose(latents, (0, 3, 1, 2)) * scale, scale


def train_unet(config, workdir, latents, ids, tokenizer, mesh):
  """The UNet and text encoder trained on (latent, caption ids) pairs with
  caption dropout (for classifier-free guidance); their state and the text
  encoder's config."""
  from transformers import CLIPTextConfig, FlaxCLIPTextModel

  unet = sd.load.build_unet(config.unet.to_dict())
  text_config = CLIPTextConfig(
    **config.text_encoder.to_dict(),
    vocab_size=len(tokenizer),
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
  )
  text_encoder = FlaxCLIPTextModel(text_config, _do_init=False)
  optimizer = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(config.train.learning_rate)
  )
  init_fn = functools.partial(
    t2i.init_text_to_image_state,
    unet,
    text_encoder,
    optimizer,
    jax.random.key(config.seed + 2),
  )
  step_fn = functools.partial(
    t2i.text_to_image_train_step,
    key=jax.random.key(config.seed + 3),
    unet=unet,
    text_encoder=text_encoder,
    optimizer=optimizer,
    schedule=make_schedule("scaled_linear"),
    uncond_ids=jnp.asarray(sd.tokenize(tokenizer, [""])[0]),
    drop_prob=config.train.drop_prob,
    ema_decay=config.train.ema_decay,
  )

  batch_fn = data.batch_fn(
    (latents, ids), config.seed, config.train.batch_size, mesh
  )
  state = run_stage(
    init_fn, step_fn, batch_fn, config.train, workdir, "unet", mesh
  )
  return state, text_config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.train.batch_size, mesh)
  images, labels = padded_images(config)
  captions = t2i.digit_captions(labels, np.random.default_rng(config.seed))
  corpus = [
    t.format(w)
    for t in t2i.CAPTION_TEMPLATES + t2i.PARAPHRASE_TEMPLATES
    for w in t2i.DIGIT_WORDS
  ]
  tokenizer = write_clip_tokenizer(corpus, os.path.join(workdir, "tokenizer"))
  start = time.time()
  vae_params, latents, scale = autoencoder(config, workdir, images, mesh)
  vae_seconds = time.time() - start
  start = time.time()
  ids = sd.tokenize(tokenizer, captions)
  state, text_config = train_unet(
    config, workdir, latents, ids, tokenizer, mesh
  )
  unet_seconds = time.time() - start
  folder = os.path.join(workdir, "model")
  if jax.process_index() == 0:
    save_stable_diffusion(
      folder,
      {**state.ema_params, "vae": vae_params},
      unet_config=config.unet.to_dict(),
      vae_config={**config.vae.to_dict(), "scaling_factor": scale},
      text_encoder_config=text_config,
      tokenizer=tokenizer,
      scheduler_config=SCHEDULER,
      dtype=config.export_dtype,
    )
  parallel.sync_processes(f"saved {folder}")
  result = {
    "vae_seconds": round(vae_seconds, 1),
    "unet_seconds": round(unet_seconds, 1),
    "scaling_factor": scale,
    **evaluate_model(config, folder, workdir, mesh),
  }
  record.MetricWriter(workdir, prefix="eval/").write(
    config.train.num_steps, result
  )
  record.write_report(workdir, report(config, workdir, result))
  return result


def evaluate_model(config, folder, workdir, mesh) -> dict:
  """Loads the saved folder as any SD checkpoint and scores its digits."""
  model, params = sd.load_stable_diffusion(folder)
  classifier = classifiers.trained_classifier(
    config.eval.classifier, os.path.join(workdir, "classifier")
  )
  sample = sd.make_sampler(
    model, config.sample.num_steps, config.sample.guidance_scale
  )
  uncond = sd.encode_prompts(model, params, [""])
  n = config.sample.per_digit
  scores = {}
  for name, template in (
    ("train_captions", t2i.CAPTION_TEMPLATES[0]),
    ("paraphrases", t2i.PARAPHRASE_TEMPLATES[0]),
  ):
    prompts = [template.format(w) for w in t2i.DIGIT_WORDS for _ in range(n)]
    cond = sd.encode_prompts(model, params, prompts)
    images = np.asarray(
      sample(params, cond, uncond, jax.random.key(config.seed + 4))
    )
    wanted = np.repeat(np.arange(10), n)
    scores[f"accuracy/{name}"] = float(
      (classifiers.predicted_labels(classifier, images, mesh) == wanted).mean()
    )
    data.save_image_grid(
      os.path.join(workdir, f"samples_{name}.png"),
      data.to_uint8(images),
      ncol=n,
    )
  scores["classifier_test_accuracy"] = classifier.test_accuracy
  return scores


def report(config, workdir, r) -> str:
  n = 10 * config.sample.per_digit  # samples behind each accuracy

  def cell(key, value):
    if key.startswith("accuracy/"):
      return f"{record.percent_text(value, n)} % of {n}"
    return f"{value:.4g}" if isinstance(value, float) else value

  rows = [[k, cell(k, v)] for k, v in r.items()]
  table = record.markdown_table(["quantity", "value"], rows)
  return f"""# Embedded text-to-image model (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

The model is in `{workdir}/model` (diffusers layout). Accuracy: share of
{config.sample.per_digit} samples per digit prompt ("a handwritten digit …";
held-out paraphrase "an image of a handwritten …") that a CNN trained on real
MNIST assigns to the prompted digit (chance: 0.1).

{table}
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

"""The text-to-image evaluator: fine-tune a latent text-to-image model's UNet
on a captioned set, sample the prompted classes, and score the samples.

This is how protections against learning a concept are measured (the
setting of Anti-DreamBooth, Van Le et al. 2023, arXiv 2303.15433, and of
Mist and PhotoGuard): the unauthorised trainer fine-tunes the pretrained
UNet on the (protected) images with their caption embeddings, with the
same trainer seeds and steps for every training set, and a classifier of
real data scores samples of the prompted classes: concept success (the
share of samples of the prompted class, with its 95% interval), the
confident share, and the Fréchet distance, precision and recall to real
images of those classes. A config's `data` (`classes`, `limit`), `sd`
(`caption`, `class_words`), `finetune`, `sample` and `eval` blocks describe
it (`experiments/configs/udp.py`'s latent settings).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aigc_jax import data, parallel, record, sd, train
from aigc_jax.eval import classifiers
from aigc_jax.metrics import (
  confident_share,
  frechet_distance,
  precision_recall,
  share_interval,
)
from aigc_jax.train import text_to_image as t2i


def captioned_images(config, model):
  """uint8 training images at the model's resolution (zero-padded), their
  labels and captions, and the test images (unpadded). With
  `data.classes`, both keep only those classes (the concept) before the
  training set is cut to `data.limit` images."""
  train_set = data.load_split(config.data.train, config.data.data_dir)
  test_set = data.load_split(config.data.test, config.data.data_dir)
  if config.data.classes:
    keep = lambda ds: ds.take(
      np.flatnonzero(np.isin(ds.labels, config.data.classes))
    )
    train_set, test_set = keep(train_set), keep(test_set)
  if config.data.limit:
    train_set = data.balanced_subset(train_set, config.data.limit, config.seed)
  if train_set.num_examples == 0:
    raise ValueError(
      f"No training images of classes {tuple(config.data.classes)} in "
      f"{config.data.train!r}."
    )
  words = config.sd.class_words
  captions = [config.sd.caption.format(words[int(y)]) for y in train_set.labels]
  images = sd.pad_to_model(train_set.images, model)
  return images, np.asarray(train_set.labels), captions, test_set


def vae_encoder(model, vae_params, mesh):
  """`images ([-1, 1] NHWC) -> latents` (posterior mean, scaled), the VAE's
  parameters an argument of the jitted function rather than constants
  baked into it (they are 330 MB for SD v1.4)."""
  encode = jax.jit(lambda vae, x: sd.encode_images(model, vae, x))
  return lambda x: parallel.batched_apply(
    functools.partial(encode, vae_params), x, batch_size=256, mesh=mesh
  )


def finetune_optimizer(config) -> optax.GradientTransformation:
  """AdamW of `config.finetune`: the unauthorised trainer's, and the
  surrogate's in UDP's inner min."""
  f = config.finetune
  return optax.adamw(f.learning_rate, weight_decay=f.weight_decay)


def finetune_step(config, model, optimizer):
  """`(state, (latents, contexts), key) -> (state, metrics)`: the UNet
  fine-tuning step of both the surrogate (inner min) and the unauthorised
  trainer. One function with the key an argument, so that both compile
  once between them (30 s for the smoke test's tiny UNet on 2 cores)."""
  return functools.partial(
    t2i.finetune_unet_step,
    unet=model.unet,
    optimizer=optimizer,
    schedule=model.schedule,
    ema_decay=config.finetune.ema_decay,
  )


def unet_state(unet_params, optimizer):
  """A fine-tuning state that starts at the pretrained UNet (built directly,
  not through a jitted init: SD's weights would become program constants).
  Params and EMA are copies: the training steps donate their state."""
  copy = lambda: jax.tree.map(jnp.copy, unet_params)
  return train.DDPMState(
    jnp.zeros((), jnp.int32), copy(), copy(), optimizer.init(unet_params)
  )


def fine_tuner(config, model, params, optimizer, step_fn, mesh):
  """`finetune(workdir, images, contexts, seed) -> EMA UNet params`: the
  unauthorised trainer, the pretrained UNet fine-tuned on `images` (uint8)
  with their caption embeddings by `step_fn` (from `finetune_step`, with
  `optimizer`); resumable. `seed` (an offset of `config.seed`) fixes its
  noise draws and batch order: every training set gets the same ones. Its
  encoder and step are built once, so every training set and seed reuses
  one compilation."""
  f = config.finetune
  encode = vae_encoder(model, params["vae"], mesh)

  def finetune(workdir, images, contexts, seed):
    # The encoder is deterministic (posterior mean): encode every image once.
    latents = np.asarray(encode(data.to_model_range(images)))

    state = train.train_stage(
      os.path.join(workdir, "ckpt"),
      unet_state(params["unet"], optimizer),
      ((step_fn, f.num_steps),),
      data.batch_fn(
        (latents, contexts), config.seed + seed, f.batch_size, mesh
      ),
      key=jax.random.fold_in(jax.random.key(config.seed + 5), seed),
      mesh=mesh,
      checkpoint_every=f.num_steps,
      log_every=max(f.num_steps // 5, 1),
      desc=f"finetune {os.path.basename(os.path.dirname(workdir))}",
    )
    return state.ema_params

  return finetune


def prompted_classes(config) -> tuple[int, ...]:
  """The classes whose prompts are sampled and scored: `data.classes`, or
  every class word."""
  return tuple(config.data.classes) or tuple(range(len(config.sd.class_words)))


def class_prompt_sampler(config, model, params):
  """`sample(unet_params, seed) -> images`: `per_class` samples of every
  prompted class (class-major), the same noise for every UNet of one seed;
  the prompts are encoded and the sampler compiled once."""
  s = config.sample
  words = [config.sd.class_words[c] for c in prompted_classes(config)]
  prompts = [config.sd.caption.format(w) for w in words]
  cond = sd.encode_prompts(
    model, params, [p for p in prompts for _ in range(s.per_class)]
  )
  uncond = sd.encode_prompts(model, params, [""])
  sample = sd.make_sampler(model, s.num_steps, s.guidance_scale)
  key = jax.random.key(config.seed + 6)
  return lambda unet, seed: np.asarray(
    sample(
      {**params, "unet": unet}, cond, uncond, jax.random.fold_in(key, seed)
    )
  )


def score_samples(config, samples, classifier, real, mesh) -> dict:
  """How well samples of the prompted classes show them: the share the
  classifier assigns to the prompted class (concept success, with its 95%
  interval), the confident share, and the Fréchet distance, precision and
  recall against `real` features of real images of those classes."""
  logits, features = classify(classifier, samples, mesh)
  wanted = np.repeat(
    np.asarray(prompted_classes(config)), config.sample.per_class
  )
  hits = int((logits.argmax(-1) == wanted).sum())
  precision, recall = precision_recall(real, features)
  return {
    "success": hits / len(wanted),
    "success_interval": share_interval(hits, len(wanted)),
    "num_samples": len(wanted),
    "confident_share": float(confident_share(logits, config.eval.confidence)),
    "frechet_distance": frechet_distance(real, features),
    "precision": precision,
    "recall": recall,
  }


def finetune_and_score(
  config,
  workdir,
  finetune,
  sample,
  images,
  contexts,
  classifier,
  real,
  mesh,
  seed,
) -> dict:
  """Fine-tunes on `images` with trainer seed `seed` (`fine_tuner`'s
  `finetune`), samples the prompted classes (`class_prompt_sampler`'s
  `sample`) and scores them (`score_samples`); cached in
  `workdir/result.json`."""

  def compute():
    start = time.time()
    samples = sample(finetune(workdir, images, contexts, seed), seed)
    data.save_image_grid(
      os.path.join(workdir, "samples.png"),
      data.to_uint8(samples),
      ncol=min(config.sample.per_class, 20),
    )
    result = score_samples(config, samples, classifier, real, mesh)
    result["seconds"] = round(time.time() - start, 1)
    return result

  return record.cached_result(
    workdir, compute, inputs=record.array_digest(images, contexts)
  )


def classify(classifier, images, mesh):
  """Logits and features of NHWC [-1, 1] images, center-cropped to the
  classifier's input size (the padding added for the model removed)."""
  images = data.center_crop(images, classifier.input_shape[0])
  logits, features = classifiers.predict_logits(
    classifier, images, 500, mesh, return_features=True
  )
  return np.asarray(logits), features

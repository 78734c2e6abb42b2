"""udp.py's `:sd` variant: UDP, EUDP and AdvDM through a latent diffusion
model, and what each does to fine-tuning it.

The perturbation lives on the pixels; the loss it maximises is the latent
denoising loss of the images' VAE latents, with their captions as the text
condition (the latent-diffusion setting of UDP). The surrogate is the
pretrained text-to-image model itself: AdvDM attacks it as it is, UDP and
EUDP fine-tune its UNet on the protected images between PGD rounds (the
inner min). The unauthorised trainer then fine-tunes the pretrained UNet,
with the same seed and steps, on the clean and on each protected set;
samples of every class prompt are scored by a classifier of real data:
accuracy on the prompted class, confident share, and the Fréchet distance
to real test images in the classifier's feature space.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aigc_jax import checkpoint, data, parallel, protect, record, sd, train
from aigc_jax.metrics import confident_share, frechet_distance
from aigc_jax.train import text_to_image as t2i

if __package__ in (None, ""):
  import erase
  import launch
  import train_classifier
  import train_text_to_image
  import udp
else:
  from experiments import (
    erase,
    launch,
    train_classifier,
    train_text_to_image,
    udp,
  )


def pixel_size(model) -> int:
  """The image side the model's VAE maps to its UNet's latent side."""
  return model.unet.sample_size * 2 ** (len(model.vae.block_out_channels) - 1)


def captioned_images(config, model):
  """uint8 training images at the model's resolution (zero-padded), their
  labels and captions, and the test images (unpadded)."""
  train_set, test_set = train_classifier.load_train_test(config)
  images = train_set.images
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
  images = np.pad(images, ((0, 0), (half, half), (half, half), (0, 0)))
  words = config.sd.class_words
  captions = [config.sd.caption.format(words[int(y)]) for y in train_set.labels]
  return images, np.asarray(train_set.labels), captions, test_set


def vae_encoder(model, vae_params, mesh):
  """`images ([-1, 1] NHWC) -> latents` (posterior mean, scaled), the VAE's
  parameters an argument of the jitted function rather than constants
  baked into it (they are 330 MB for SD v1.4)."""
  encode = jax.jit(lambda vae, x: sd.encode_images(model, vae, x))
  return lambda x: parallel.batched_apply(
    functools.partial(encode, vae_params), x, batch_size=256, mesh=mesh
  )


def latent_steps(config, model, params, step, mesh) -> udp.ProtectionSteps:
  """The two halves of the max-min problem for a latent diffusion model;
  the batch is (images, text embeddings). The inner min fine-tunes the UNet
  (`step`, from `finetune_step`) on the latents of the protected images;
  the outer max differentiates the latent denoising loss through the VAE
  encoder to the pixels."""
  p = config.protect
  encode = vae_encoder(model, params["vae"], mesh)
  rep, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  finetune_step = jax.jit(step, out_shardings=(rep, rep), donate_argnums=0)
  surrogate_key = jax.random.fold_in(udp._protection_key(config), 1)
  surrogate_key = jax.device_put(surrogate_key, rep)

  def inner_min(state, batch):
    x, context = batch
    # Placed as the trainer's batches are, so both share one compilation.
    latents = parallel.shard_batch(mesh, encode(x))
    return finetune_step(state, (latents, context), surrogate_key)

  def perturb(unet_params, vae_params, batch, delta, key, policy):
    x, context = batch
    eps_fn = lambda z, t: (
      model.unet.apply({"params": unet_params}, z, t, context).sample
    )
    return protect.udp_perturbation(
      eps_fn,
      x,
      delta,
      key,
      model.schedule,
      budget=protect.budget(p.eps, p.norm),
      steps=p.pgd_steps,
      step_size=p.step_size / protect.LEVELS_PER_UNIT,
      policy=policy,
      num_draws=p.num_draws,
      unroll=True if jax.default_backend() == "cpu" else 1,
      encode=lambda x: sd.encode_images(model, vae_params, x),
    )

  perturb = jax.jit(perturb, out_shardings=shard)
  outer_max = lambda unet_params, batch, delta, key, policy: perturb(
    unet_params, params["vae"], batch, delta, key, policy
  )
  return udp.ProtectionSteps(inner_min, outer_max, model.schedule)


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
  """`finetune(workdir, images, contexts) -> EMA UNet params`: the
  unauthorised trainer, the pretrained UNet fine-tuned on `images` (uint8)
  with their caption embeddings by `step_fn` (from `finetune_step`, with
  `optimizer`); resumable. Its encoder and step are built once, so every
  training set reuses one compilation."""
  f = config.finetune
  encode = vae_encoder(model, params["vae"], mesh)
  key = jax.random.key(config.seed + 5)

  def finetune(workdir, images, contexts):
    # The encoder is deterministic (posterior mean): encode every image once.
    latents = np.asarray(encode(data.to_model_range(images)))
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"))
    state = unet_state(params["unet"], optimizer)
    if checkpointer.latest_step() is not None:
      state = checkpointer.restore(
        checkpoint.abstract_state(state, parallel.replicated(mesh))
      )

    def batch_fn(step):
      idx = data.batch_indices(config.seed, step, len(latents), f.batch_size)
      return latents[idx], contexts[idx]

    state = train.train_loop(
      state,
      step_fn,
      batch_fn,
      key=key,
      num_steps=f.num_steps,
      mesh=mesh,
      checkpointer=checkpointer,
      checkpoint_every=f.num_steps,
      log_every=max(f.num_steps // 5, 1),
      desc=f"finetune {os.path.basename(workdir)}",
    )
    checkpointer.close()
    return state.ema_params

  return finetune


def class_prompt_sampler(config, model, params):
  """`sample(unet_params) -> images`: `per_class` samples of every class
  prompt (class-major), the same noise for every UNet; the prompts are
  encoded and the sampler compiled once."""
  s = config.sample
  prompts = [config.sd.caption.format(w) for w in config.sd.class_words]
  cond = sd.encode_prompts(
    model, params, [p for p in prompts for _ in range(s.per_class)]
  )
  uncond = sd.encode_prompts(model, params, [""])
  sample = train_text_to_image.make_sampler(
    model, s.num_steps, s.guidance_scale
  )
  key = jax.random.key(config.seed + 6)
  return lambda unet: np.asarray(
    sample({**params, "unet": unet}, cond, uncond, key)
  )


def evaluate_finetuning(
  config, workdir, finetune, sample, images, contexts, classifier, real, mesh
) -> dict:
  """Fine-tunes on `images` (`fine_tuner`'s `finetune`), samples every class
  prompt (`class_prompt_sampler`'s `sample`) and scores the samples; cached
  in `workdir/result.json`."""

  def compute():
    start = time.time()
    samples = sample(finetune(workdir, images, contexts))
    per_class = config.sample.per_class
    data.save_image_grid(
      os.path.join(workdir, "samples.png"),
      data.to_uint8(samples),
      ncol=per_class,
    )
    logits, features = classify(classifier, samples, mesh)
    wanted = np.repeat(np.arange(len(config.sd.class_words)), per_class)
    return {
      "prompt_accuracy": float((logits.argmax(-1) == wanted).mean()),
      "confident_share": float(confident_share(logits, config.eval.confidence)),
      "frechet_distance": frechet_distance(real, features),
      "seconds": round(time.time() - start, 1),
    }

  return record.cached_result(
    workdir, compute, inputs=record.array_digest(images, contexts)
  )


def classify(classifier, images, mesh):
  """Logits and features of NHWC [-1, 1] images, center-cropped to the
  classifier's input size (the padding added for the model removed)."""
  size = classifier[3]
  crop = (images.shape[1] - size) // 2
  images = np.asarray(images)[:, crop : crop + size, crop : crop + size]
  logits, features = train_classifier.predict_logits(
    *classifier[:3], images, 500, mesh, return_features=True
  )
  return np.asarray(logits), features


def train_and_evaluate(config, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.finetune.batch_size, mesh)
  protect.budget(config.protect.eps, config.protect.norm)
  model, params = erase.load_model(config.sd.model)
  for method in config.protect.methods:
    udp.method_settings(method, model.schedule)
  clean, labels, captions, test_set = captioned_images(config, model)
  contexts = np.asarray(sd.encode_prompts(model, params, captions))
  writer = record.MetricWriter(workdir)
  start = time.time()

  *clf, clf_accuracy = train_classifier.trained_classifier(
    config.eval.classifier, os.path.join(workdir, "classifier")
  )
  classifier = (*clf, test_set.images.shape[1])
  _, real = train_classifier.predict_logits(
    *clf,
    data.to_model_range(test_set.images),
    1000,
    mesh,
    return_features=True,
  )

  optimizer = finetune_optimizer(config)
  step = finetune_step(config, model, optimizer)
  steps = latent_steps(config, model, params, step, mesh)
  sets, perturbations, protect_seconds = udp.protect_methods(
    config,
    workdir,
    clean,
    labels,
    unet_state(params["unet"], optimizer),
    mesh,
    steps,
    writer,
    conditions=contexts,
  )

  finetune = fine_tuner(config, model, params, optimizer, step, mesh)
  sample = class_prompt_sampler(config, model, params)
  results = {}
  for name, images in sets.items():
    results[name] = evaluate_finetuning(
      config,
      os.path.join(workdir, "eval", udp.set_slug(name)),
      finetune,
      sample,
      images,
      contexts,
      classifier,
      real,
      mesh,
    )
    writer.write(0, {f"eval/{name}/{k}": v for k, v in results[name].items()})
  total = round(time.time() - start, 1)
  record.write_report(
    workdir,
    report(
      config,
      workdir,
      results,
      perturbations,
      protect_seconds,
      clf_accuracy,
      total,
      len(clean),
    ),
  )
  return {"results": results, "perturbations": perturbations, "seconds": total}


def report(
  config, workdir, results, perturbations, seconds, clf_acc, total, num_images
):
  clean = results["clean"]
  rows = [
    [
      name,
      f"{100 * r['prompt_accuracy']:.1f}",
      f"{r['confident_share']:.3f}",
      f"{r['frechet_distance']:.2f}",
      f"{r['frechet_distance'] / clean['frechet_distance']:.2f}x",
    ]
    for name, r in results.items()
  ]
  table = record.markdown_table(
    [
      "fine-tuning data",
      "prompt accuracy %",
      "confident share",
      "FD",
      "FD vs clean",
    ],
    rows,
  )
  prow = [
    [
      m,
      f"{v['linf_255']:.1f}",
      f"{v['l2_255']:.1f}",
      f"{v['psnr_db']:.2f}",
      f"{v['ssim']:.3f}",
      f"{seconds[m]:.1f}",
    ]
    for m, v in perturbations.items()
  ]
  ptable = record.markdown_table(
    ["method", "L∞ (/255)", "L2 (/255)", "PSNR dB", "SSIM", "seconds"], prow
  )
  f = config.finetune
  return f"""# UDP through latent diffusion (variant `{config.variant}`)

Command:

{launch.command_line("udp", config, workdir)}

Model: `{config.sd.model}`; {num_images} training images captioned
"{config.sd.caption}". The perturbation ({config.protect.eps}/255,
{config.protect.norm}) is optimised through the VAE encoder and the UNet.
Each set fine-tunes the pretrained UNet {f.num_steps} steps (batch
{f.batch_size}, AdamW {f.learning_rate}, text encoder frozen);
{config.sample.per_class} samples per class prompt, DDIM
{config.sample.num_steps} steps, guidance {config.sample.guidance_scale}.
Scores by a classifier of real data (test accuracy {100 * clf_acc:.1f}%):
prompt accuracy (the prompted class), confident share
(p > {config.eval.confidence}), Fréchet distance to real test images in its
feature space.

{table}
Perturbations:

{ptable}
Total {total:.0f} s.
"""

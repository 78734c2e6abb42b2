"""udp.py's latent settings (`:concept*`, `:sd`): UDP's readings, AdvDM and
encoder attacks through a latent diffusion model, and what each does to
fine-tuning it.

The perturbation lives on the pixels; each reading's objective reaches them
through the VAE encoder (and the UNet, for the denoising readings), with the
images' captions as the text condition. The surrogate is the pretrained
text-to-image model itself: AdvDM and the encoder attacks use it as it is,
`max`, `min` and `bilevel` fine-tune its UNet on the protected images
between PGD rounds (the alternation engine, `protect.alternate`). The
unauthorised trainer then fine-tunes the pretrained UNet, with the same
trainer seeds and steps, on the clean and on each protected set; samples of
the prompted classes are scored by a classifier of real data: concept
success (the share of samples of the prompted class, with 95% intervals),
the Fréchet distance, precision and recall to real images of those classes
in the classifier's features. In the concept setting the prompted class is
one the model has never drawn (`data.classes`).
"""

import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import (
  data,
  launch,
  models,
  parallel,
  protect,
  purify,
  record,
  sd,
  train,
)
from aigc_jax.eval import classifiers, ddpm
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


def train_and_evaluate(config, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.finetune.batch_size, mesh)
  parallel.check_batch_size(config.protect.batch_size, mesh)
  protect.budget(config.protect.eps, config.protect.norm)
  udp_recipes.check_methods(config)
  model, params = sd.load_model(config.sd.model)
  clean, labels, captions, test_set = t2i_eval.captioned_images(config, model)
  contexts = np.asarray(sd.encode_prompts(model, params, captions))
  writer = record.MetricWriter(workdir)
  start = time.time()

  classifier = classifiers.trained_classifier(
    config.eval.classifier, os.path.join(workdir, "classifier")
  )
  _, real = classifiers.predict_logits(
    classifier,
    data.to_model_range(test_set.images),
    1000,
    mesh,
    return_features=True,
  )

  optimizer = t2i_eval.finetune_optimizer(config)
  step = t2i_eval.finetune_step(config, model, optimizer)
  sets, perturbations, protect_seconds, traces = {"clean": clean}, {}, {}, {}
  anchors = anchor_images(config, model)
  for eps in budgets(config):
    at = config_at_budget(config, eps)
    steps = latent_steps(at, model, params, step, mesh, anchors)
    protected = udp_recipes.protect_methods(
      at,
      os.path.join(workdir, f"eps{eps:g}") if sweeps(config) else workdir,
      clean,
      labels,
      t2i_eval.unet_state(params["unet"], optimizer),
      mesh,
      steps,
      writer,
      conditions=contexts,
    )
    suffix = f"@{eps:g}" if sweeps(config) else ""
    for found, into in zip(
      protected, (sets, perturbations, protect_seconds, traces), strict=True
    ):
      into.update({m + suffix: v for m, v in found.items() if m != "clean"})
  sets.update(attacked_sets(config, workdir, sets, mesh))

  finetune = t2i_eval.fine_tuner(config, model, params, optimizer, step, mesh)
  sample = t2i_eval.class_prompt_sampler(config, model, params)
  pretrained = record.cached_result(
    os.path.join(workdir, "eval", "pretrained"),
    lambda: t2i_eval.score_samples(
      config, sample(params["unet"], 0), classifier, real, mesh
    ),
  )
  results = {}
  for name, images in sets.items():
    results[name] = [
      t2i_eval.finetune_and_score(
        config,
        os.path.join(workdir, "eval", record.slug(name), f"seed{k}"),
        finetune,
        sample,
        images,
        contexts,
        classifier,
        real,
        mesh,
        k,
      )
      for k in range(config.finetune.seeds)
    ]
    for k, r in enumerate(results[name]):
      writer.write(k, {f"eval/{name}/{m}": v for m, v in r.items()})
  total = round(time.time() - start, 1)
  record.write_report(
    workdir,
    report(
      config,
      workdir,
      pretrained,
      results,
      perturbations,
      protect_seconds,
      traces,
      classifier.test_accuracy,
      total,
      len(clean),
    ),
  )
  return {
    "pretrained": pretrained,
    "results": results,
    "perturbations": perturbations,
    "seconds": total,
  }


def budgets(config) -> tuple[float, ...]:
  """The budgets (in /255) the methods are run at: `protect.budgets` (a
  sweep), or `protect.eps` alone."""
  return tuple(config.protect.budgets) or (config.protect.eps,)


def sweeps(config) -> bool:
  return bool(config.protect.budgets)


def config_at_budget(config, eps: float):
  """`config` with the budget `eps`, the PGD step scaled with it (the same
  number of steps crosses the same share of every budget)."""
  at = config.copy_and_resolve_references()
  with at.unlocked():
    at.protect.step_size = config.protect.step_size * eps / config.protect.eps
    at.protect.eps = eps
  return at


def attacked_sets(config, workdir, sets, mesh) -> dict:
  """The attacker's side: `eval.robust_method`'s protected set (at
  `protect.eps`, in a sweep) after JPEG compression, an adaptive trainer's
  cheapest purification, and after LE's (`le_purified`) when
  `eval.le.t_star` > 0 (the method was checked by `udp.check_methods`)."""
  robust = config.eval.robust_method
  if not robust:
    return {}
  if sweeps(config):
    robust = f"{robust}@{config.protect.eps:g}"
  q = config.eval.jpeg_quality
  attacked = {f"{robust} + JPEG {q}": purify.jpeg_compress(sets[robust], q)}
  if config.eval.le.t_star:
    attacked[f"{robust} + LE"] = le_purified(
      config, os.path.join(workdir, "le"), sets[robust], sets["clean"], mesh
    )
  return attacked


def le_purified(config, workdir, images, clean, mesh) -> np.ndarray:
  """`images` (uint8) purified by LE's Joint-Conditional Diffusion
  Purification (Jiang et al., ACM MM 2023; `purify.jcdp_purify` with the
  released code's λ schedule and strength): a pixel DDPM trained on
  `eval.le.manifold` without the protected images' originals (`clean`),
  zero-padded as they are, diffuses each image to t* and denoises it
  guided toward it. The DDPM and the purified set are kept in `workdir`."""
  return record.cached_arrays(
    os.path.join(workdir, "purified.npz"),
    lambda: {"images": _le_purify(config, workdir, images, clean, mesh)},
  )["images"]


def _le_purify(config, workdir, images, clean, mesh) -> np.ndarray:
  le = config.eval.le
  manifold = data.load_split(le.manifold, config.data.data_dir)
  half = (clean.shape[1] - manifold.images.shape[1]) // 2
  pads = [(0, 0), (half, half), (half, half), (0, 0)]
  manifold = np.pad(manifold.images, pads)
  protected = {x.tobytes() for x in clean}
  manifold = manifold[[x.tobytes() not in protected for x in manifold]]
  state = ddpm.train_ddpm(
    le.ddpm, os.path.join(workdir, "ddpm"), manifold, mesh, desc="LE's DDPM"
  )
  model, schedule, _ = ddpm.build_ddpm(le.ddpm)
  fn = purify.per_image_purifier(
    lambda params: train.ddpm_eps_fn(model, params),
    schedule,
    jax.random.key(config.seed + 7),
    dict(
      form="original",
      mse_scale=purify.OFFICIAL_SCALE,
      lpips_scale=purify.OFFICIAL_SCALE,
      split=le.split,
      lpips_size=le.lpips_size or None,
    ),
    t_star=le.t_star,
    rounds=le.rounds,
    variance="fixed_large",
  )
  lpips_variables = models.load_lpips(le.lpips)
  purified = data.to_uint8(
    parallel.batched_apply(
      lambda batch: fn(state.ema_params, lpips_variables, *batch),
      (data.to_model_range(images), np.arange(len(images), dtype=np.int32)),
      batch_size=le.batch_size,
      mesh=mesh,
    )
  )
  if jax.process_index() == 0:
    n = min(10, len(images))
    data.save_image_grid(
      os.path.join(workdir, "grid.png"),
      np.concatenate([clean[:n], images[:n], purified[:n]]),
      ncol=n,
    )
  return purified


def control_of(name: str) -> str:
  """The random control a set is compared with: the one at the same budget
  ("encoder_target@16 + JPEG 75" -> "random@16")."""
  budget = re.search(r"@[0-9.]+", name)
  return "random" + (budget.group(0) if budget else "")


def summary(runs: list[dict]) -> dict:
  """Mean, min and max over trainer seeds of each score."""
  out = {}
  for key in ("success", "frechet_distance", "precision", "recall"):
    values = np.asarray([r[key] for r in runs], np.float64)
    out[key] = (values.mean(), values.min(), values.max())
  out["per_seed"] = [r["success"] for r in runs]
  return out


def verdict(config, results) -> tuple[list[list[str]], str]:
  """Rows of the protection table and the verdict against `config.expected`:
  per method the drop of concept success against the clean fine-tune and
  its margin over the random control, both per trainer seed."""
  e = config.expected
  clean = summary(results["clean"])["per_seed"]
  rows, met, elsewhere = [], [], []
  for name, runs in results.items():
    s = summary(runs)
    drops = [100 * (c - m) for c, m in zip(clean, s["per_seed"], strict=True)]
    control = results.get(control_of(name))
    margins = []
    if (
      control is not None and name != "clean" and not name.startswith("random")
    ):
      margins = [
        100 * (r - m)
        for r, m in zip(
          summary(control)["per_seed"], s["per_seed"], strict=True
        )
      ]
    lo, hi = runs[0]["success_interval"]
    rows.append(
      [
        name,
        f"{100 * s['success'][0]:.1f} ({100 * s['success'][1]:.0f}-"
        f"{100 * s['success'][2]:.0f})",
        " / ".join(f"{100 * v:.0f}" for v in s["per_seed"]),
        f"{100 * lo:.0f}-{100 * hi:.0f}",
        f"{np.mean(drops):+.1f}" if name != "clean" else "",
        f"{np.mean(margins):+.1f}" if margins else "",
        f"{s['frechet_distance'][0]:.2f}",
        f"{s['precision'][0]:.2f}",
        f"{s['recall'][0]:.2f}",
      ]
    )
    protects = min(drops, default=0) >= e.drop_points and (
      min(margins, default=0) >= e.margin_points
    )
    if margins and protects:
      (met if set_budget(config, name) == e.budget else elsewhere).append(name)
  if not any(set_budget(config, n) == e.budget for n in results):
    text = f"not measured (no set at {e.budget:g}/255)"
  elif met:
    text = f"**met** by {', '.join(met)}"
  else:
    text = "**missed** by every method"
  if elsewhere:
    text += f"; at other budgets the criterion holds for {', '.join(elsewhere)}"
  return rows, (
    f"Target (from `expected`, {e.source}): at {e.budget:g}/255 a method "
    f"lowers concept success by at least {e.drop_points:g} points against "
    f"the clean fine-tune and beats the random control by at least "
    f"{e.margin_points:g} points, on every trainer seed: {text}."
  )


def set_budget(config, name: str) -> float:
  """The budget (/255) of a set's name: its "@<eps>" in a sweep, else
  `protect.eps`."""
  found = re.search(r"@([0-9.]+)", name)
  return float(found.group(1)) if found else config.protect.eps


def budget_curves(config, results) -> dict[str, list[float]]:
  """Mean concept success per method at each budget of a sweep."""
  return {
    m: [
      float(np.mean([r["success"] for r in results[f"{m}@{eps:g}"]]))
      for eps in budgets(config)
    ]
    for m in config.protect.methods
  }


def budget_to_protect(config, clean: float, curve: list[float]) -> str:
  """The smallest budget of the sweep at which mean concept success falls by
  `expected.drop_points` against the clean fine-tune, or "none"."""
  for eps, success in zip(budgets(config), curve, strict=True):
    if 100 * (clean - success) >= config.expected.drop_points:
      return f"{eps:g}/255"
  return "none"


def budget_report(config, workdir, results) -> str:
  """The sweep's table (mean success per method and budget, the budget to
  protect) and its plot, `budget.png` in the workdir."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  clean = float(np.mean([r["success"] for r in results["clean"]]))
  curves = budget_curves(config, results)
  eps = budgets(config)
  rows = [
    [m, *(f"{100 * v:.1f}" for v in c), budget_to_protect(config, clean, c)]
    for m, c in curves.items()
  ]
  table = record.markdown_table(
    ["method", *(f"{e:g}/255" for e in eps), "budget to protect"], rows
  )
  if jax.process_index() == 0:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, c in curves.items():
      ax.plot(eps, [100 * v for v in c], marker="o", label=m)
    ax.axhline(100 * clean, color="k", linestyle="--", label="clean")
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set(
      xlabel="L∞ budget (/255)", ylabel="concept success (%)", ylim=(0, 100)
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "budget.png"), dpi=120)
    plt.close(fig)
  return (
    "Concept success (%, mean over trainer seeds) against the budget; the "
    f"budget to protect is the smallest at which it falls "
    f"{config.expected.drop_points:g} points below the clean fine-tune "
    f"({100 * clean:.1f}%). Plot: `budget.png`.\n\n" + table
  )


def report(
  config,
  workdir,
  pretrained,
  results,
  perturbations,
  seconds,
  traces,
  clf_acc,
  total,
  num_images,
):
  rows, target = verdict(config, results)
  table = record.markdown_table(
    [
      "fine-tuning data",
      "concept success % (mean, min-max)",
      "per seed",
      "95% interval, seed 0",
      "drop vs clean (points)",
      "margin over random (points)",
      "FD",
      "precision",
      "recall",
    ],
    rows,
  )
  prow = []
  for m, v in perturbations.items():
    prow.append(
      [
        m,
        f"{v['linf_255']:.1f}",
        f"{v['l2_255']:.1f}",
        f"{v['psnr_db']:.2f}",
        f"{v['ssim']:.3f}",
        *udp_recipes.objective_ends(traces[m]),
        f"{seconds[m]:.1f}",
      ]
    )
  ptable = record.markdown_table(
    [
      "method",
      "L∞ (/255)",
      "L2 (/255)",
      "PSNR dB",
      "SSIM",
      "objective at start",
      "at end",
      "seconds",
    ],
    prow,
  )
  f = config.finetune
  words = [config.sd.class_words[c] for c in t2i_eval.prompted_classes(config)]
  lo, hi = pretrained["success_interval"]
  title = "UDP's readings against fine-tuning a text-to-image model"
  return f"""# {title} (variant `{config.variant}`)

Command:

{
    launch.command_line(
      os.path.join(os.path.dirname(__file__), "udp.py"), config, workdir
    )
  }

Model: `{config.sd.model}`. The data owner protects {num_images} images of
{", ".join(words)} captioned "{config.sd.caption}" within
{config.protect.eps:g}/255 ({config.protect.norm}); the perturbation is
optimised through the VAE encoder (and the UNet, for the denoising readings).
The unauthorised trainer fine-tunes the pretrained UNet {f.num_steps} steps
(batch {f.batch_size}, AdamW {f.learning_rate}, EMA {f.ema_decay}, text
encoder frozen) on each set, with {f.seeds} trainer seeds (noise draws, batch
order and sampling noise; the same for every set), and samples
{config.sample.per_class} images per prompt (DDIM {config.sample.num_steps}
steps, guidance {config.sample.guidance_scale}). Concept success is the
share of samples a digit classifier of real data (test accuracy
{100 * clf_acc:.1f}%) assigns to the prompted digit; FD, precision and
recall are against real test images of it in that classifier's features.

The pretrained model, before any fine-tuning: concept success
{100 * pretrained["success"]:.1f}% (95% interval {100 * lo:.0f}-{100 * hi:.0f},
{pretrained["num_samples"]} samples), FD {pretrained["frechet_distance"]:.2f}.

{table}
{target}
{budget_report(config, workdir, results) if sweeps(config) else ""}

Perturbations (objective: the reading's own, mean over chunks, before the
first and the last PGD step):

{ptable}
Grids: `[eps<E>/]protect/<method>/grid.png` (clean / protected / noise
amplified),
`eval/<set>/seed<k>/samples.png`. Total {total:.0f} s.
"""

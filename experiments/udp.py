"""Protects a dataset with UDP's readings, AdvDM or encoder attacks, then
measures what the protection does to a model trained on it.

  python experiments/udp.py --config=experiments/configs/udp.py[:variant] \
    --workdir=DIR

`protect.surrogate` picks the setting. "text_to_image" (the default
`:concept`, `:sd`): the perturbation is optimised through a pretrained
text-to-image model (`protect.latent_recipes`), the unauthorised trainer
fine-tunes that model on each set with several trainer seeds, and samples
of the prompted classes are scored by a classifier of real data (concept
success with 95% intervals, Fréchet distance, precision, recall). "ddpm"
(`:digits`, `:cifar10*`): a surrogate DDPM warmed up on clean data is
attacked (and, for UDP's readings, trained on the protected images between
PGD rounds); a fresh DDPM with the same seed and steps is trained on every
set and its samples are scored (`eval.ddpm.train_and_score`).

Either way every method runs through the alternation engine
(`protect.alternate`, resumable chunk by chunk); the workdir receives each
method's protected images beside the clean ones (`protect/<method>/
protected.npz`, lossless uint8) with a grid of clean / protected / amplified
noise, the samples of every trained model, metrics.jsonl and report.md.
"""

import os
import re

import jax
import ml_collections
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
)
from aigc_jax.eval import classifiers, ddpm, features, purifiers
from aigc_jax.eval import text_to_image as t2i_eval
from aigc_jax.protect import latent_recipes, udp_recipes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.protect.batch_size, mesh)
  # Fail on bad settings now, not after minutes of protection.
  protect.budget(config.protect.eps, config.protect.norm)
  udp_recipes.check_methods(config)
  if config.protect.surrogate == "ddpm":
    return pixel_run(config, workdir, mesh)
  return latent_run(config, workdir, mesh)


def attacked_sets(config, workdir, sets, mesh) -> dict:
  """The attacker's side: `eval.robust_method`'s protected set (at
  `protect.eps`, in a budget sweep) after each of `eval.attacks` ("jpeg",
  "blur", "le": LE's purification, `le_purified`), and the clean set after
  JPEG and blur when `eval.transform_controls` (what the transforms alone
  cost)."""
  robust, e = config.eval.robust_method, config.eval
  if not robust:
    return {}
  if latent_recipes.sweeps(config):
    robust = f"{robust}@{config.protect.eps:g}"
  transforms = {
    f"JPEG {e.jpeg_quality}": lambda x: purify.jpeg_compress(x, e.jpeg_quality),
    f"blur {e.blur_sigma}": lambda x: purify.gaussian_blur(x, e.blur_sigma),
    "LE": lambda x: le_purified(config, workdir, x, sets["clean"], mesh),
  }
  chosen = [
    name
    for name, attack in zip(transforms, udp_recipes.ATTACKS, strict=True)
    if attack in e.attacks
  ]
  out = {
    f"{robust} + {name}": transforms[name](sets[robust]) for name in chosen
  }
  if e.transform_controls:
    for name in chosen:
      if name != "LE":
        out[f"clean + {name}"] = transforms[name](sets["clean"])
  return out


def le_purified(config, workdir, images, clean, mesh) -> np.ndarray:
  """`images` (uint8) purified by LE's Joint-Conditional Diffusion
  Purification (the released code's λ schedule and strength): a pixel DDPM
  trained on `eval.le.manifold` without the protected images' originals
  (`clean`), zero-padded as they are, diffuses each image to t* and
  denoises it guided toward it. Kept in `workdir/le/`."""
  le = config.eval.le
  manifold = purifiers.padded_manifold(le.manifold, config.data.data_dir, clean)
  state = ddpm.train_ddpm(
    le.ddpm, os.path.join(workdir, "le", "ddpm"), manifold, mesh, "LE's DDPM"
  )
  fn = purifiers.purifier(
    le.ddpm,
    le,
    "le",
    jax.random.key(config.seed + 7),
    state.ema_params,
    models.load_lpips(le.lpips),
  )
  path = os.path.join(workdir, "le", "purified.npz")
  return purifiers.purified_set(
    path, images, fn, le.batch_size, mesh, grid_above=(clean,)
  )[0]


def perturbation_table(perturbations, seconds, traces) -> str:
  """Each method's perturbation: size, image quality, objective, time."""
  header = ["method", "L∞ (/255)", "mean L2 (/255)", "PSNR (dB)", "SSIM"]
  header += ["objective at start", "at end", "time (s)"]
  return record.markdown_table(
    header,
    [
      [
        m,
        f"{v['linf_255']:.1f}",
        f"{v['l2_255']:.1f}",
        f"{v['psnr_db']:.2f}",
        f"{v['ssim']:.4f}",
        *udp_recipes.objective_ends(traces[m]),
        f"{seconds[m]:.1f}",
      ]
      for m, v in perturbations.items()
    ],
  )


# -- The pixel setting: DDPMs trained from scratch ---------------------------


def distribution_features(config, test_set, mesh) -> tuple:
  """`(features_fn, real features)` of the Inception FID and of the
  offline perceptual features, None where the config leaves them out."""
  found = []
  for make, arg in (
    (features.inception_fid_features, config.eval.inception_weights),
    (features.perceptual_features, config.eval.perceptual),
  ):
    fn = make(arg, mesh) if arg else None
    found.append(fn and (fn, fn(test_set.images)))
  return tuple(found)


def pixel_run(config, workdir, mesh) -> dict:
  for batch in (
    config.surrogate.train.batch_size,
    config.ddpm.train.batch_size,
  ):
    parallel.check_batch_size(batch, mesh)
  train_set, test_set = classifiers.load_train_test(config)
  clean = train_set.images
  x_test = data.to_model_range(test_set.images)
  heldout = x_test[: config.eval.heldout_size or None]
  inception, perceptual = distribution_features(config, test_set, mesh)
  writer = record.MetricWriter(workdir)
  classifier = classifiers.trained_classifier(
    config.eval.classifier, os.path.join(workdir, "classifier")
  )
  real = classifiers.predict_logits(
    classifier, x_test, 1000, mesh, return_features=True
  )
  surrogate = ddpm.train_ddpm(
    config.surrogate,
    os.path.join(workdir, "surrogate"),
    clean,
    mesh,
    desc="surrogate",
  )
  steps = udp_recipes.protection_steps(config, mesh)
  sets, perturbations, seconds, traces = udp_recipes.protect_methods(
    config, workdir, clean, train_set.labels, surrogate, mesh, steps, writer
  )
  sets.update(attacked_sets(config, workdir, sets, mesh))
  results = {}
  for name, images in sets.items():
    results[name] = r = ddpm.train_and_score(
      config,
      os.path.join(workdir, "eval", record.slug(name)),
      images,
      classifier,
      real,
      heldout,
      mesh,
      inception,
      perceptual,
    )
    writer.write(0, {f"eval/{name}/{k}": v for k, v in r.items()})
  total = record.run_seconds(workdir)
  text = pixel_report(config, workdir, results, classifier.test_accuracy, total)
  text += perturbation_table(perturbations, seconds, traces)
  text += "\nGrids: `protect/<method>/grid.png` (clean / protected / noise "
  text += "amplified to the full range), `eval/<set>/samples.png`.\n"
  record.write_report(workdir, text)
  return {"results": results, "perturbations": perturbations, "seconds": total}


def pixel_table(config, results) -> str:
  """What a DDPM trained on each set generates."""
  clean, n = results["clean"], config.ddpm.sample.num_samples
  header = ["training data", "FD of the data", "FD of samples", "vs clean"]
  header += ["precision", "recall", f"p > {config.eval.confidence} (%)"]
  header += ["drop (points)", "classes", "held-out loss"]
  if "inception_fid" in clean:
    header.append("Inception FID")
  if "perceptual_fd" in clean:
    header += [f"FD ({config.eval.perceptual})", "precision", "recall"]
  rows = []
  for name, r in results.items():
    ratio = r["frechet_distance"] / max(clean["frechet_distance"], 1e-12)
    drop = 100 * (clean["confident_share"] - r["confident_share"])
    row = [name, f"{r['data_frechet_distance']:.3f}"]
    row += [f"{r['frechet_distance']:.3f}", f"{ratio:.2f}x"]
    row += [f"{r['precision']:.3f}", f"{r['recall']:.3f}"]
    row += [record.percent_text(r["confident_share"], n), f"{drop:+.1f}"]
    row += [f"{r['classes_covered']}", f"{r['heldout_loss']:.4f}"]
    if "inception_fid" in r:
      row.append(f"{r['inception_fid']:.2f}")
    if "perceptual_fd" in r:
      row += [f"{r['perceptual_fd']:.2f}", f"{r['perceptual_precision']:.3f}"]
      row.append(f"{r['perceptual_recall']:.3f}")
    rows.append(row)
  return record.markdown_table(header, rows)


def pixel_report(config, workdir, results, clf_accuracy, total) -> str:
  methods = [m for m in config.protect.methods if m in results]
  clean, e = results["clean"], config.expected
  order = sorted(methods, key=lambda m: -results[m]["frechet_distance"])
  target = next((m for m in methods if m.startswith("eudp")), order[0])
  t = results[target]
  ratio = t["frechet_distance"] / max(clean["frechet_distance"], 1e-12)
  drop = 100 * (clean["confident_share"] - t["confident_share"])
  p, title = config.protect, f"UDP / EUDP / AdvDM on {config.data.train}"
  return f"""# {title} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Budget {p.eps:g}/255 ({p.norm}); {p.rounds} rounds of {p.inner_steps} surrogate
steps and {p.pgd_steps} PGD steps (step {p.step_size:g}/255, {p.num_draws}
draws) per chunk of {p.chunk_size}; surrogate warmed up for
{config.surrogate.train.num_steps} steps on clean data. Each row's DDPM is
trained from scratch with the same seed for {config.ddpm.train.num_steps} steps,
then {config.ddpm.sample.num_samples} samples are drawn (shares of them with
their 95% intervals). Features and confidence come from a classifier of
real data (test accuracy
{clf_accuracy:.4f}); Fréchet distances (FD) are to the real test set, for the
training images themselves ("of the data": what a DDPM that fitted them
perfectly would reach) and for the DDPM's samples. Total time {total} s.

## What a DDPM trained on each set generates

{pixel_table(config, results)}
## Verdict (computed from the tables above)

Strongest protection by Fréchet distance: **{order[0]}**; order:
{", ".join(order)}. For {target}: Fréchet distance {ratio:.2f}x clean:
{record.expectation(e, "fd_ratio", ratio)}; recognisability {drop:.1f} points
below clean: {record.expectation(e, "recognisability_drop_points", drop)}.

## The perturbations

"""


# -- The latent setting: fine-tuning a text-to-image model -------------------


def protect_at_budgets(config, workdir, model, params, images, mesh):
  """Every method at each budget of the sweep (or at `protect.eps`), through
  the text-to-image surrogate: the training sets (clean first), their
  perturbation rows, seconds and objective traces, by "<method>[@<eps>]";
  then the captions' text embeddings, the fine-tuning optimiser and step.
  `images`: `captioned_images`'s (clean, labels, captions)."""
  clean, labels, captions = images
  contexts = np.asarray(sd.encode_prompts(model, params, captions))
  optimizer = t2i_eval.finetune_optimizer(config)
  step = t2i_eval.finetune_step(config, model, optimizer)
  anchors = latent_recipes.anchor_images(config, model)
  found = ({"clean": clean}, {}, {}, {})
  sweeps = latent_recipes.sweeps(config)
  writer = record.MetricWriter(workdir)
  for eps in latent_recipes.budgets(config):
    at = latent_recipes.config_at_budget(config, eps)
    steps = latent_recipes.latent_steps(at, model, params, step, mesh, anchors)
    protected = udp_recipes.protect_methods(
      at,
      os.path.join(workdir, f"eps{eps:g}") if sweeps else workdir,
      clean,
      labels,
      t2i_eval.unet_state(params["unet"], optimizer),
      mesh,
      steps,
      writer,
      conditions=contexts,
    )
    suffix = f"@{eps:g}" if sweeps else ""
    for new, into in zip(protected, found, strict=True):
      into.update({m + suffix: v for m, v in new.items() if m != "clean"})
  return (*found, contexts, optimizer, step)


def latent_run(config, workdir, mesh) -> dict:
  parallel.check_batch_size(config.finetune.batch_size, mesh)
  model, params = sd.load_model(config.sd.model)
  *images, test_set = t2i_eval.captioned_images(config, model)
  classifier = classifiers.trained_classifier(
    config.eval.classifier, os.path.join(workdir, "classifier")
  )
  x_test = data.to_model_range(test_set.images)
  _, real = classifiers.predict_logits(
    classifier, x_test, 1000, mesh, return_features=True
  )
  sets, perturbations, seconds, traces, contexts, optimizer, step = (
    protect_at_budgets(config, workdir, model, params, images, mesh)
  )
  sets.update(attacked_sets(config, workdir, sets, mesh))
  finetune = t2i_eval.fine_tuner(config, model, params, optimizer, step, mesh)
  sample = t2i_eval.class_prompt_sampler(config, model, params)
  pretrained = record.cached_result(
    os.path.join(workdir, "eval", "pretrained"),
    lambda: t2i_eval.score_samples(
      config, sample(params["unet"], 0), classifier, real, mesh
    ),
  )
  writer, results = record.MetricWriter(workdir), {}
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
  total = record.run_seconds(workdir)
  text = latent_report(config, workdir, pretrained, results, len(images[0]))
  text += "\nAccuracy of the scoring classifier on real test digits: "
  text += f"{100 * classifier.test_accuracy:.1f}%. Total {total:.0f} s.\n\n"
  text += perturbation_table(perturbations, seconds, traces)
  text += "\nGrids: `[eps<E>/]protect/<method>/grid.png` (clean / protected "
  text += "/ noise amplified), `eval/<set>/seed<k>/samples.png`.\n"
  record.write_report(workdir, text)
  return {
    "pretrained": pretrained,
    "results": results,
    "perturbations": perturbations,
    "seconds": total,
  }


def control_of(name: str) -> str:
  """The random control a set is compared with: the one at the same budget
  ("encoder_target@16 + JPEG 75" -> "random@16")."""
  budget = re.search(r"@[0-9.]+", name)
  return "random" + (budget.group(0) if budget else "")


def set_budget(config, name: str) -> float:
  """The budget (/255) of a set's name: its "@<eps>" in a sweep, else
  `protect.eps`."""
  found = re.search(r"@([0-9.]+)", name)
  return float(found.group(1)) if found else config.protect.eps


def per_seed(runs: list[dict], key: str = "success") -> np.ndarray:
  return np.asarray([r[key] for r in runs], np.float64)


def concept_row(name, runs, drops, margins) -> list[str]:
  """A row of the concept table: success (mean, spread, per seed, seed 0's
  95% interval), its drop and margin, and the distribution scores."""
  s, lo, hi = 100 * per_seed(runs), *runs[0]["success_interval"]
  return [
    name,
    f"{s.mean():.1f} ({s.min():.0f}-{s.max():.0f})",
    " / ".join(f"{v:.0f}" for v in s),
    f"{100 * lo:.0f}-{100 * hi:.0f}",
    f"{np.mean(drops):+.1f}" if name != "clean" else "",
    f"{np.mean(margins):+.1f}" if len(margins) else "",
    *(f"{per_seed(runs, k).mean():.2f}" for k in ("frechet_distance",)),
    *(f"{per_seed(runs, k).mean():.2f}" for k in ("precision", "recall")),
  ]


def verdict(config, results) -> tuple[list[list[str]], str]:
  """Rows of the protection table and the verdict against `config.expected`:
  per method the drop of concept success against the clean fine-tune and
  its margin over the random control, both per trainer seed."""
  e = config.expected
  clean = per_seed(results["clean"])
  rows, met, elsewhere = [], [], []
  for name, runs in results.items():
    drops, margins = 100 * (clean - per_seed(runs)), np.zeros(0)
    control = results.get(control_of(name))
    if control and name != "clean" and not name.startswith("random"):
      margins = 100 * (per_seed(control) - per_seed(runs))
    rows.append(concept_row(name, runs, drops, margins))
    if (
      len(margins)
      and min(drops) >= e.drop_points
      and min(margins) >= e.margin_points
    ):
      on_target = set_budget(config, name) == e.budget
      (met if on_target else elsewhere).append(name)
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


def budget_report(config, workdir, results) -> str:
  """The sweep's table (mean success per method and budget, and the budget
  to protect: the smallest at which success falls `expected.drop_points`
  below the clean fine-tune) and its plot, `budget.png`."""
  clean = 100 * per_seed(results["clean"]).mean()
  eps = latent_recipes.budgets(config)
  curves = {
    m: [100 * per_seed(results[f"{m}@{b:g}"]).mean() for b in eps]
    for m in config.protect.methods
  }
  drop = config.expected.drop_points
  protects = lambda c: next(
    (f"{b:g}/255" for b, v in zip(eps, c, strict=True) if clean - v >= drop),
    "none",
  )
  table = record.markdown_table(
    ["method", *(f"{b:g}/255" for b in eps), "budget to protect"],
    [[m, *(f"{v:.1f}" for v in c), protects(c)] for m, c in curves.items()],
  )
  record.plot_curves(
    os.path.join(workdir, "budget.png"),
    eps,
    curves,
    xlabel="L∞ budget (/255)",
    ylabel="concept success (%)",
    reference=("clean", clean),
  )
  return (
    "Concept success (%, mean over trainer seeds) against the budget; the "
    f"budget to protect is the smallest at which it falls {drop:g} points "
    f"below the clean fine-tune ({clean:.1f}%). Plot: `budget.png`.\n\n" + table
  )


def latent_report(config, workdir, pretrained, results, num_images) -> str:
  rows, target = verdict(config, results)
  header = ["fine-tuning data", "concept success % (mean, min-max)"]
  header += ["per seed", "95% interval, seed 0", "drop vs clean (points)"]
  header += ["margin over random (points)", "FD", "precision", "recall"]
  f, s = config.finetune, config.sample
  words = [config.sd.class_words[c] for c in t2i_eval.prompted_classes(config)]
  lo, hi = pretrained["success_interval"]
  sweep = latent_recipes.sweeps(config)
  title = "UDP's readings against fine-tuning a text-to-image model"
  return f"""# {title} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Model: `{config.sd.model}`. The data owner protects {num_images} images of
{", ".join(words)} captioned "{config.sd.caption}" within
{config.protect.eps:g}/255 ({config.protect.norm}); the perturbation is
optimised through the VAE encoder (and the UNet, for the denoising readings).
The unauthorised trainer fine-tunes the pretrained UNet {f.num_steps} steps
(batch {f.batch_size}, AdamW {f.learning_rate}, EMA {f.ema_decay}, text
encoder frozen) on each set, with {f.seeds} trainer seeds (noise draws, batch
order and sampling noise; the same for every set), and samples
{s.per_class} images per prompt (DDIM {s.num_steps} steps, guidance
{s.guidance_scale}). Concept success is the share of samples a digit
classifier of real data assigns to the prompted digit; FD, precision and
recall are against real test images of it in that classifier's features.

The pretrained model, before any fine-tuning: concept success
{100 * pretrained["success"]:.1f}% (95% interval {100 * lo:.0f}-{100 * hi:.0f},
{pretrained["num_samples"]} samples), FD {pretrained["frechet_distance"]:.2f}.

{record.markdown_table(header, rows)}
{target}
{budget_report(config, workdir, results) if sweep else ""}
Perturbations (objective: the reading's own, mean over chunks, before the
first and the last PGD step):
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

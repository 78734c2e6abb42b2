"""Protects a dataset with UDP's readings, AdvDM or encoder attacks, then
measures what the protection does to a model trained on it.

  python experiments/udp.py --config=experiments/configs/udp.py[:variant] \
    --workdir=DIR

The default (`:concept`) and the other latent variants fine-tune a
text-to-image model (`experiments/udp_latent.py`). The from-scratch
variants (`:digits`, `:cifar10*`) train a digit classifier (the evaluator)
and a surrogate DDPM on clean data; protect the training set with each
method through the alternation engine (`protect.alternate`: finished chunks
are kept and skipped on resume); train a fresh DDPM with the same seed and
steps on every training set (clean, each protection, and the robustness
variants); sample; compare. The workdir receives each method's protected
images beside the clean ones (`protect/<method>/protected.npz`, lossless
uint8) and a grid of clean / protected / amplified noise, each DDPM's
samples, metrics.jsonl and report.md.
"""

import os
import time

import ml_collections

from aigc_jax import (
  data,
  launch,
  parallel,
  protect,
  record,
)
from aigc_jax.eval import classifiers, ddpm, features
from aigc_jax.protect import udp_recipes
from aigc_jax.purify import gaussian_blur, jpeg_compress


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if "sd" in config:  # the latent-diffusion setting (:sd)
    from experiments import udp_latent

    return udp_latent.train_and_evaluate(config, workdir)
  mesh = parallel.make_mesh(config.num_devices or None)
  for batch in (
    config.surrogate.train.batch_size,
    config.ddpm.train.batch_size,
    config.protect.batch_size,
  ):
    parallel.check_batch_size(batch, mesh)
  # Fail on bad settings now, not after minutes of protection.
  protect.budget(config.protect.eps, config.protect.norm)
  udp_recipes.check_methods(config)
  robust = config.eval.robust_method
  train_set, test_set = classifiers.load_train_test(config)
  clean = train_set.images
  x_test = data.to_model_range(test_set.images)
  heldout = x_test[: config.eval.heldout_size or None]
  inception = None
  if config.eval.inception_weights:
    features_fn = features.inception_fid_features(
      config.eval.inception_weights, mesh
    )
    inception = (features_fn, features_fn(test_set.images))
  perceptual = None
  if config.eval.perceptual:
    features_fn = features.perceptual_features(config.eval.perceptual, mesh)
    perceptual = (features_fn, features_fn(test_set.images))
  writer = record.MetricWriter(workdir)
  start = time.time()

  # The evaluator: a classifier of real data, and its view of real test data.
  classifier = classifiers.trained_classifier(
    config.eval.classifier, os.path.join(workdir, "classifier")
  )
  real = classifiers.predict_logits(
    classifier, x_test, 1000, mesh, return_features=True
  )

  # The surrogate, warmed up on clean data.
  surrogate = ddpm.train_ddpm(
    config.surrogate,
    os.path.join(workdir, "surrogate"),
    clean,
    mesh,
    desc="surrogate",
  )

  steps = udp_recipes.protection_steps(config, mesh)
  sets, perturbations, protect_seconds, traces = udp_recipes.protect_methods(
    config, workdir, clean, train_set.labels, surrogate, mesh, steps, writer
  )

  if robust:
    sets[f"{robust} + JPEG {config.eval.jpeg_quality}"] = jpeg_compress(
      sets[robust], config.eval.jpeg_quality
    )
    sets[f"{robust} + blur {config.eval.blur_sigma}"] = gaussian_blur(
      sets[robust], config.eval.blur_sigma
    )
  if robust and config.eval.transform_controls:
    sets[f"clean + JPEG {config.eval.jpeg_quality}"] = jpeg_compress(
      clean, config.eval.jpeg_quality
    )
    sets[f"clean + blur {config.eval.blur_sigma}"] = gaussian_blur(
      clean, config.eval.blur_sigma
    )

  results = {}
  for name, images in sets.items():
    results[name] = ddpm.train_and_score(
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
    writer.write(0, {f"eval/{name}/{k}": v for k, v in results[name].items()})

  total = round(time.time() - start, 1)
  record.write_report(
    workdir,
    udp_report(
      config,
      workdir,
      results,
      perturbations,
      protect_seconds,
      traces,
      classifier.test_accuracy,
      total,
    ),
  )
  return {"results": results, "perturbations": perturbations, "seconds": total}


def udp_report(
  config,
  workdir,
  results,
  perturbations,
  protect_seconds,
  traces,
  clf_accuracy,
  total,
):
  clean = results["clean"]
  rows = []
  for name, r in results.items():
    ratio = r["frechet_distance"] / max(clean["frechet_distance"], 1e-12)
    drop = 100 * (clean["confident_share"] - r["confident_share"])
    rows.append(
      [
        name,
        f"{r['data_frechet_distance']:.3f}",
        f"{r['frechet_distance']:.3f}",
        f"{ratio:.2f}x",
        f"{r['precision']:.3f}",
        f"{r['recall']:.3f}",
        f"{r['confident_share']:.3f}",
        f"{drop:+.1f}",
        f"{r['classes_covered']}",
        f"{r['heldout_loss']:.4f}",
      ]
      + ([f"{r['inception_fid']:.2f}"] if "inception_fid" in r else [])
      + (
        [
          f"{r['perceptual_fd']:.2f}",
          f"{r['perceptual_precision']:.3f}",
          f"{r['perceptual_recall']:.3f}",
        ]
        if "perceptual_fd" in r
        else []
      )
    )
  table = record.markdown_table(
    [
      "training data",
      "FD of the data",
      "FD of samples",
      "vs clean",
      "precision",
      "recall",
      f"p > {config.eval.confidence}",
      "drop (points)",
      "classes",
      "held-out loss",
    ]
    + (["Inception FID"] if "inception_fid" in clean else [])
    + (
      [
        f"FD ({config.eval.perceptual})",
        "precision",
        "recall",
      ]
      if "perceptual_fd" in clean
      else []
    ),
    rows,
  )
  ptable = record.markdown_table(
    [
      "method",
      "L∞ (/255)",
      "mean L2 (/255)",
      "PSNR (dB)",
      "SSIM",
      "objective at start",
      "at end",
      "time (s)",
    ],
    [
      [
        m,
        f"{v['linf_255']:.0f}",
        f"{v['l2_255']:.1f}",
        f"{v['psnr_db']:.2f}",
        f"{v['ssim']:.4f}",
        *udp_recipes.objective_ends(traces[m]),
        protect_seconds[m],
      ]
      for m, v in perturbations.items()
    ],
  )
  methods = list(perturbations)
  strongest = max(methods, key=lambda m: results[m]["frechet_distance"])
  order = sorted(methods, key=lambda m: -results[m]["frechet_distance"])
  target_method = next((m for m in methods if m.startswith("eudp")), strongest)
  t = results[target_method]
  met_fd = t["frechet_distance"] >= 2 * clean["frechet_distance"]
  met_rec = clean["confident_share"] - t["confident_share"] >= 0.30
  p = config.protect
  title = f"UDP / EUDP / AdvDM on {config.data.train}"
  return f"""# {title} (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Budget {p.eps:g}/255 ({p.norm}); {p.rounds} rounds of {p.inner_steps} surrogate
steps and {p.pgd_steps} PGD steps (step {p.step_size:g}/255, {p.num_draws}
draws) per chunk of {p.chunk_size}; surrogate warmed up for
{config.surrogate.train.num_steps} steps on clean data. Each row's DDPM is
trained from scratch with the same seed for {config.ddpm.train.num_steps} steps,
then {config.ddpm.sample.num_samples} samples are drawn. Features and
confidence come from a classifier of real data (test accuracy
{clf_accuracy:.4f}); Fréchet distances (FD) are to the real test set, for the
training images themselves ("of the data": what a DDPM that fitted them
perfectly would reach) and for the DDPM's samples. Total time {total} s.

## What a DDPM trained on each set generates

{table}
## The perturbations

{ptable}
## Verdict (computed from the tables above)

Strongest protection by Fréchet distance: **{strongest}**; order:
{", ".join(order)}. For {target_method}: Fréchet distance
{t["frechet_distance"] / max(clean["frechet_distance"], 1e-12):.2f}x clean
(target >= 2x: {"met" if met_fd else "missed"}); recognisability
{100 * (clean["confident_share"] - t["confident_share"]):.1f} points below clean
(target >= 30: {"met" if met_rec else "missed"}).

Grids: `protect/<method>/grid.png` (clean / protected / noise amplified to the
full range), `eval/<set>/samples.png`.
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

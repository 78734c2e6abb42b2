"""Trains a DDPM, samples from it, and checks that the samples are
recognisable to a classifier of real data.

  python experiments/train_ddpm.py \
    --config=experiments/configs/train_ddpm.py[:variant] --workdir=DIR

Re-running the same command in the same workdir resumes from the last
checkpoint. The workdir receives config.json, metrics.jsonl, report.md,
samples.png (the first 100 samples), samples.npz (all, uint8) and real.png.
"""

import os
import time

import jax
import ml_collections
import numpy as np

from aigc_jax import data, launch, parallel, record
from aigc_jax.eval import classifiers, ddpm
from aigc_jax.models import count_params


def evaluation_classifier(config, workdir: str):
  """The classifier named by config.eval, trained into workdir if needed,
  and its folder."""
  clf_dir = config.eval.classifier_workdir
  if clf_dir:
    return classifiers.load_classifier(clf_dir), clf_dir
  clf_dir = os.path.join(workdir, "classifier")
  return classifiers.trained_classifier(
    config.eval.classifier, clf_dir
  ), clf_dir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.train.batch_size, mesh)
  if config.train.get("max_timestep", 0):
    raise ValueError(
      f"train.max_timestep={config.train.max_timestep}: a model trained on "
      "early timesteps only cannot sample from noise; set it to 0 here."
    )
  name, split = data.parse_source(config.data.train)
  train_set = data.load_dataset(
    name, split, data_dir=config.data.data_dir or None
  )
  data.save_image_grid(
    os.path.join(workdir, "real.png"), train_set.images[:100], ncol=10
  )

  start = time.time()
  state = ddpm.train_ddpm(config, workdir, train_set.images, mesh)
  train_seconds = time.time() - start

  start = time.time()
  samples = ddpm.sample_ddpm(
    config,
    state.ema_params,
    train_set.images.shape[1:],
    mesh,
    jax.random.key(config.seed + 1),
  )
  sample_seconds = time.time() - start
  record.atomic_write(  # process 0 writes, whole or not at all
    os.path.join(workdir, "samples.npz"),
    lambda f: np.savez_compressed(f, images=samples),
  )
  data.save_image_grid(
    os.path.join(workdir, "samples.png"), samples[:100], ncol=10
  )

  classifier, clf_dir = evaluation_classifier(config, workdir)
  scores = ddpm.recognisability(config, samples, classifier, mesh)
  result = {
    "train_seconds": round(train_seconds, 1),
    "sample_seconds": round(sample_seconds, 1),
    "unet_params": count_params(state.params),
    "classifier_test_accuracy": classifier.test_accuracy,
    **scores,
  }
  record.MetricWriter(workdir, prefix="eval/").write(
    config.train.num_steps, result
  )
  record.write_report(workdir, ddpm_report(config, workdir, result, clf_dir))
  return result


def ddpm_report(config, workdir, r, clf_dir) -> str:
  c = config
  table = record.markdown_table(
    ["quantity", "value"],
    [
      ["UNet parameters", f"{r['unet_params']:,}"],
      [f"training steps (batch {c.train.batch_size})", c.train.num_steps],
      ["training time (s)", r["train_seconds"]],
      [
        f"samples ({c.sample.sampler}, {c.sample.num_steps} steps)",
        c.sample.num_samples,
      ],
      ["sampling time (s)", r["sample_seconds"]],
      [
        "classifier test accuracy on real data",
        f"{r['classifier_test_accuracy']:.4f}",
      ],
      [
        f"samples classified with p > {c.eval.confidence} (%)",
        record.percent_text(r["confident_share"], c.sample.num_samples),
      ],
      [
        "classes among confident samples",
        f"{r['classes_covered']} / {r['num_classes']}",
      ],
    ],
  )
  return f"""# DDPM on {c.data.train} (variant `{c.variant}`)

Command:

{launch.command_line(__file__, c, workdir)}

{table}
Confident samples per class: {r["confident_per_class"]}

The classifier is the run in `{clf_dir}`. Samples: `samples.png` (first 100),
`samples.npz` (all); real training images: `real.png`.
"""


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

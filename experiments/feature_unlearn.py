"""Unlearns a feature from a pre-trained GAN or VAE generator and measures
what changed (Moon, Cho and Kim, AAAI 2024; `aigc_jax.unlearn.feature`).

  python experiments/feature_unlearn.py \
    --config=experiments/configs/feature_unlearn.py[:variant] --workdir=DIR

Steps: train a digit classifier of real data (the labeller and evaluator);
train the generator on the digits or load pretrained weights; label
generated samples (the classifier, the stroke width, or the user's own
labels); derive the feature's direction and threshold; fine-tune the
generator; then compare the original and unlearned generators on the same
fresh latents. Every stage checkpoints, so re-running resumes.
"""

import functools
import os
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from aigc_jax import (
  checkpoint,
  data,
  launch,
  metrics,
  models,
  parallel,
  record,
  train,
)
from aigc_jax.eval import classifiers
from aigc_jax.unlearn import feature

FEATURE_KINDS = ("class", "thickness")


class Generator(NamedTuple):
  """The pre-trained generator and how to call it."""

  module: nn.Module
  method: str | None  # "decode" for the VAE
  params: dict  # the pre-trained (teacher) parameters
  latent_dim: int
  train_seconds: float | None  # None: restored, not trained in this run

  def apply(self, params, z):
    """`feature.GeneratorFn`: (params, z) -> images in [-1, 1]."""
    return _apply_generator(self.module, self.method, params, z)


def _apply_generator(module, method, params, z):
  return module.apply({"params": params}, z, method=method)


def check_config(config) -> None:
  """Refuses an unknown generator or feature kind, or labels that do not
  fit the labelling latents, before any work."""
  kinds = (*models.GENERATORS, "mlp_vae")
  if config.generator.kind not in kinds:
    raise ValueError(
      f"Unknown generator.kind {config.generator.kind!r}; choose one of "
      f"{kinds}."
    )
  if config.feature.kind not in FEATURE_KINDS:
    raise ValueError(
      f"Unknown feature.kind {config.feature.kind!r}; choose one of "
      f"{FEATURE_KINDS}."
    )
  if not config.generator.weights and config.generator.steps <= 0:
    raise ValueError(
      "generator.steps must be > 0 to train a generator, or set "
      "generator.weights to a pretrained .npz."
    )
  if config.generator.weights and config.generator.kind == "conv_gan":
    raise ValueError(
      "generator.weights loads the MLP GAN or VAE (generator.kind mlp_gan "
      "or mlp_vae), not conv_gan; clear generator.weights to train it."
    )
  if config.feature.labels:
    user_labels(config)


def user_labels(config) -> np.ndarray:
  """The boolean labels in `feature.labels`, checked against the number of
  labelling latents."""
  labels = np.load(config.feature.labels)
  n = config.feature.num_labelled
  if labels.shape != (n,) or labels.dtype != np.bool_:
    raise ValueError(
      f"feature.labels {config.feature.labels!r} holds {labels.dtype} "
      f"{labels.shape}; expected bool ({n},), one label per row of "
      "labelling/latents.npy."
    )
  return labels


def _modules(config):
  """(generator module, its method, discriminator module or None)."""
  kind = config.generator.kind
  if kind == "mlp_vae":
    return models.MLPVAE(latent_dim=config.generator.latent_dim), "decode", None
  gen_cls, disc_cls = models.GENERATORS[kind]
  if kind == "conv_gan":
    width = config.generator.width
    return gen_cls(width=width), None, disc_cls(width=width)
  return gen_cls(), None, disc_cls()


def _train_stage(init_fn, step_fn, batch_fn, stage, name, desc, workdir, mesh):
  """Trains (or resumes) one stage in workdir/<name> for `stage.steps`
  steps (`train.train_stage`), its metrics under `<name>/`; returns the
  state and the seconds it took (None when it was finished before)."""
  path = os.path.join(workdir, name)
  checkpointer = checkpoint.Checkpointer(path)
  finished = (checkpointer.latest_step() or 0) >= stage.steps
  checkpointer.close()
  start = time.time()
  state = train.train_stage(
    path,
    init_fn,
    ((step_fn, stage.steps),),
    batch_fn,
    mesh=mesh,
    checkpoint_every=stage.checkpoint_every,
    log_every=stage.log_every,
    log_fn=record.MetricWriter(workdir, prefix=f"{name}/").write,
    desc=desc,
  )
  return state, None if finished else time.time() - start


def pretrained_generator(config, x_train, workdir, mesh) -> Generator:
  """The generator to unlearn from: loaded from `generator.weights`, or
  trained on `x_train` (resuming from workdir/generator)."""
  g = config.generator
  module, method, disc = _modules(config)
  if g.weights:
    if g.kind == "mlp_vae":
      params = models.load_mnist_vae(g.weights)
    else:  # mlp_gan: check_config refused the rest
      params = models.load_mnist_gan_generator(g.weights, g.latent_dim)
    return Generator(module, method, params, g.latent_dim, None)

  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  init_key, train_key = jax.random.split(key)
  shape = x_train.shape[1:]
  if disc is None:
    optimizer = optax.adam(g.learning_rate)
    init_fn = functools.partial(
      train.init_vae_state, module, optimizer, init_key, shape
    )
    step_fn = lambda s, b: train.vae_train_step(
      s, b, train_key, vae=module, optimizer=optimizer
    )
  else:
    optimizer = train.gan_optimizer(g.learning_rate)
    init_fn = functools.partial(
      train.init_gan_state,
      module,
      disc,
      optimizer,
      init_key,
      g.latent_dim,
      shape,
    )
    step_fn = lambda s, b: train.gan_train_step(
      s,
      b,
      train_key,
      generator=module,
      discriminator=disc,
      optimizer=optimizer,
      latent_dim=g.latent_dim,
    )
  batch_fn = data.batch_fn(x_train, config.seed, g.batch_size, mesh)
  state, seconds = _train_stage(
    init_fn, step_fn, batch_fn, g, "generator", g.kind, workdir, mesh
  )
  return Generator(module, method, state.params, g.latent_dim, seconds)


def generate(gen: Generator, params, z, batch_size: int, mesh) -> np.ndarray:
  """Host images of host latents, in sharded chunks."""
  fn = functools.partial(_jitted_generate, gen.module, gen.method, params)
  return parallel.batched_apply(fn, z, batch_size=batch_size, mesh=mesh)


# Module and method are static, the parameters an argument: the original
# and the unlearned generator share one compilation.
_jitted_generate = jax.jit(_apply_generator, static_argnums=(0, 1))


def labeller(config, test_set, workdir, mesh) -> classifiers.Classifier:
  """The digit classifier that labels and evaluates: the pretrained LeNet-5
  in `eval.pretrained_classifier`, else one trained on `eval.classifier`."""
  if not config.eval.pretrained_classifier:
    return classifiers.trained_classifier(
      config.eval.classifier, os.path.join(workdir, "classifier")
    )
  lenet = classifiers.Classifier(
    models.LeNet5(),
    models.load_mnist_lenet5(config.eval.pretrained_classifier),
    {},
  )
  logits = classifiers.predict_logits(
    lenet, data.to_model_range(test_set.images), config.eval.batch_size, mesh
  )
  accuracy = float(metrics.accuracy(logits, test_set.labels))
  return lenet._replace(test_accuracy=accuracy)


class FeatureMeasure(NamedTuple):
  """How a run decides that an image shows the feature: score >= cutoff."""

  score: object  # host images -> (N,) scores
  cutoff: float
  name: str


def feature_measure(
  config, classifier, mesh, labelling_images
) -> FeatureMeasure:
  """The config's feature measure. For "class", the score is the
  classifier's probability of the target digit and the cutoff
  `min_probability`; for "thickness", the stroke width and the cutoff the
  width of the thinnest of the top `fraction` of the labelling samples."""
  f = config.feature
  if f.kind == "class":

    def score(images):
      logits = classifiers.predict_logits(
        classifier, images, config.eval.batch_size, mesh
      )
      return np.asarray(jax.nn.softmax(logits)[:, f.target_class])

    return FeatureMeasure(
      score, f.min_probability, f'the digit "{f.target_class}"'
    )
  score = lambda images: np.asarray(feature.stroke_thickness(images))
  widths = score(labelling_images)
  positive = np.asarray(feature.top_fraction_labels(widths, f.fraction))
  return FeatureMeasure(
    score,
    float(widths[positive].min()),
    f"stroke width in the top {f.fraction:.0%}",
  )


def labelled_latents(config, measure, images, z, workdir):
  """Positive and negative latents of the labelling samples: the user's
  labels from `feature.labels`, else the feature measure's."""
  record.atomic_write(
    os.path.join(workdir, "labelling", "latents.npy"), lambda f: np.save(f, z)
  )
  data.save_image_grid(
    os.path.join(workdir, "labelling", "grid.png"), images[:100], ncol=10
  )
  if config.feature.labels:
    labels = user_labels(config)
  else:
    labels = measure.score(images) >= measure.cutoff
  if labels.all() or not labels.any():
    raise ValueError(
      f"{labels.sum()} of {len(labels)} labelling samples show "
      f"{measure.name}: the direction needs both kinds. Label more samples "
      "(feature.num_labelled) or choose another feature."
    )
  return z[labels], z[~labels]


def unlearned_params(
  config, gen: Generator, direction, threshold, workdir, mesh
):
  """The generator fine-tuned by `feature.feature_unlearning_step`,
  resuming from workdir/unlearn, and the seconds it took (None when the
  finished run was restored)."""
  u = config.unlearn
  optimizer = optax.adam(u.learning_rate)
  step_fn = lambda state, z: feature.feature_unlearning_step(
    state,
    z,
    generator=gen.apply,
    teacher_params=gen.params,
    direction=direction,
    threshold=threshold,
    optimizer=optimizer,
    alpha=u.alpha,
    unit_shift=u.unit_shift,
  )
  key = jax.random.fold_in(jax.random.key(config.seed), 4)
  latents = lambda step: np.asarray(
    jax.random.normal(
      jax.random.fold_in(key, step), (u.batch_size, gen.latent_dim)
    )
  )
  init_fn = lambda: feature.init_feature_unlearning(gen.params, optimizer)
  state, seconds = _train_stage(
    init_fn, step_fn, latents, u, "unlearn", "unlearn", workdir, mesh
  )
  return state.params, seconds


def normal_latents(config, index: int, n: int, dim: int) -> np.ndarray:
  """`n` standard normal latents of the run's `index`-th draw."""
  key = jax.random.fold_in(jax.random.key(config.seed), index)
  return np.asarray(jax.random.normal(key, (n, dim)))


def compare_generators(config, gen, student, rule, measure, features, mesh):
  """The original and the unlearned generator on the same fresh latents:
  the share of samples with the feature, what moved (L1, per latent
  group) and the Fréchet distance to real images without the feature in
  the classifier's `features` (`(fn, real features)`). `rule`: the
  feature's (direction, threshold)."""
  direction, threshold = rule
  z = normal_latents(config, 3, config.eval.num_samples, gen.latent_dim)
  batch = config.eval.batch_size
  before = generate(gen, gen.params, z, batch, mesh)
  after = generate(gen, student, z, batch, mesh)
  moved = np.asarray(feature.has_feature(z, direction, threshold)) > 0
  # The unlearning targets f(ẑ), only where the rule moves the latent.
  shifted = feature.remove_feature(
    z[moved], direction, threshold, unit_shift=config.unlearn.unit_shift
  )
  targets = generate(gen, gen.params, np.asarray(shifted), batch, mesh)
  has_before = measure.score(before) >= measure.cutoff
  has_after = measure.score(after) >= measure.cutoff
  l1 = np.abs(after - before).mean((1, 2, 3)) / 2  # [0, 1] pixel units
  features_fn, real = features
  fd = lambda x: metrics.frechet_distance(features_fn(x), real)
  share_before, share_after = float(has_before.mean()), float(has_after.mean())
  return (
    before,
    after,
    has_before,
    {
      "moved_share": float(moved.mean()),
      "feature_free_target_share": float(
        (measure.score(targets) >= measure.cutoff).mean()
      ),
      "share_before": share_before,
      "share_after": share_after,
      "relative_drop": 1 - share_after / share_before if share_before else 0.0,
      # Samples with the feature whose latents the rule leaves alone: the
      # fine-tuning is told to keep these as they are.
      "unmoved_share_before": float((has_before & ~moved).mean()),
      "unmoved_share_after": float((has_after & ~moved).mean()),
      "l1_without_feature": float(l1[~has_before].mean()),
      "l1_unmoved": float(l1[~moved].mean()),
      "l1_with_feature": float(l1[has_before].mean())
      if has_before.any()
      else 0,
      "fd_original": fd(before),
      "fd_original_without_feature": fd(before[~has_before]),
      "fd_unlearned": fd(after),
    },
  )


def real_without_feature(config, classifier, measure, test_set, mesh):
  """`(features_fn, features of the real test images without the
  feature)` in the classifier's feature space."""
  x_test = data.to_model_range(test_set.images)
  if config.feature.kind == "class":
    real_free = x_test[test_set.labels != config.feature.target_class]
  else:
    real_free = x_test[measure.score(x_test) < measure.cutoff]
  features_fn = lambda images: classifiers.predict_logits(
    classifier, images, config.eval.batch_size, mesh, return_features=True
  )[1]
  return features_fn, features_fn(real_free)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the whole comparison; returns the report's numbers."""
  check_config(config)
  mesh = parallel.make_mesh(config.num_devices or None)
  for size in (config.generator.batch_size, config.unlearn.batch_size):
    parallel.check_batch_size(size, mesh)
  train_set, test_set = classifiers.load_train_test(config)
  classifier = labeller(config, test_set, workdir, mesh)
  gen = pretrained_generator(
    config, data.to_model_range(train_set.images), workdir, mesh
  )
  z_label = normal_latents(
    config, 2, config.feature.num_labelled, gen.latent_dim
  )
  label_images = generate(
    gen, gen.params, z_label, config.eval.batch_size, mesh
  )
  measure = feature_measure(config, classifier, mesh, label_images)
  z_pos, z_neg = labelled_latents(
    config, measure, label_images, z_label, workdir
  )
  direction = feature.target_direction(z_pos, z_neg)
  threshold = feature.projection_threshold(z_pos, z_neg, direction)
  student, unlearn_seconds = unlearned_params(
    config, gen, direction, threshold, workdir, mesh
  )
  features = real_without_feature(config, classifier, measure, test_set, mesh)
  before, after, has_before, compared = compare_generators(
    config, gen, student, (direction, threshold), measure, features, mesh
  )
  seconds = lambda s: s and round(s, 1)
  result = {
    "classifier_accuracy": classifier.test_accuracy,
    "generator_train_seconds": seconds(gen.train_seconds),
    "labelled_positive": len(z_pos),
    "labelled_negative": len(z_neg),
    "threshold": float(threshold),
    **compared,
    "unlearn_seconds": seconds(unlearn_seconds),
  }
  record.MetricWriter(workdir, prefix="eval/").write(
    config.unlearn.steps, result
  )
  _save_grids(workdir, before, after, has_before, config.eval.grid_size)
  record.write_report(workdir, report(config, workdir, result, measure))
  return result


def _save_grids(workdir, before, after, has_feature, n):
  """Same latents before and after: rows of samples with the feature
  (original, unlearned), then rows without it."""
  rows = []
  for mask in (has_feature, ~has_feature):
    idx = np.flatnonzero(mask)[:n]
    if len(idx):
      pad = lambda x, idx=idx: np.concatenate(
        [x[idx], -np.ones((n - len(idx), *x.shape[1:]), x.dtype)]
      )
      rows += [pad(before), pad(after)]
  data.save_image_grid(
    os.path.join(workdir, "before_after.png"), np.concatenate(rows), ncol=n
  )


def _seconds(seconds: float | None) -> str:
  """A stage's time, or that this run restored it finished."""
  return "restored" if seconds is None else f"{seconds} s"


def comparison_tables(r, n) -> tuple[str, str]:
  """The share of `n` samples with the feature (%, 95% interval) and FD
  per generator; what moved (L1)."""
  pct = lambda share: record.percent_text(share, n)
  table = record.markdown_table(
    ["generator", "with the feature (%)", "FD to real digits without it"],
    [
      ["original", pct(r["share_before"]), f"{r['fd_original']:.2f}"],
      [
        "original, samples without the feature",
        "0",
        f"{r['fd_original_without_feature']:.2f}",
      ],
      ["unlearned", pct(r["share_after"]), f"{r['fd_unlearned']:.2f}"],
    ],
  )
  l1 = record.markdown_table(
    ["latents", "mean L1 to the original's sample ([0, 1] pixels)"],
    [
      ["original sample without the feature", f"{r['l1_without_feature']:.4f}"],
      ["below the threshold (not moved)", f"{r['l1_unmoved']:.4f}"],
      ["original sample with the feature", f"{r['l1_with_feature']:.4f}"],
    ],
  )
  return table, l1


def report(config, workdir, r, measure) -> str:
  """The run's report.md."""
  g, u = config.generator, config.unlearn
  source = g.weights or (
    f"trained here, {g.steps} steps ({_seconds(r['generator_train_seconds'])})"
  )
  clf = (
    f"the pretrained LeNet-5 {config.eval.pretrained_classifier}"
    if config.eval.pretrained_classifier
    else f"a {config.eval.classifier.model.name} of real digits trained here"
  )
  met = record.expectation(
    config.expected, "relative_drop_percent", 100 * r["relative_drop"]
  )
  return "\n".join(
    [
      f"# Feature unlearning: {g.kind}, feature {measure.name} "
      f"(variant `{config.variant}`)",
      "",
      "Command:",
      "",
      launch.command_line(__file__, config, workdir),
      "",
      f"Generator: {g.kind}, {source}. Labeller/evaluator: {clf}, test "
      f"accuracy {r['classifier_accuracy']:.4f}.",
      f"Labelling: {r['labelled_positive']} positive and "
      f"{r['labelled_negative']} negative of {config.feature.num_labelled} "
      f"samples; threshold t = {r['threshold']:.3f}; the rule moves "
      f"{r['moved_share']:.1%} of latents, and the original generator draws "
      f"the feature in {r['feature_free_target_share']:.1%} of their "
      "shifted latents (the unlearning targets).",
      f"Unlearning: {u.steps} Adam steps, batch {u.batch_size}, lr "
      f"{u.learning_rate}, alpha {u.alpha}: "
      + _seconds(r["unlearn_seconds"])
      + ".",
      "",
      f"{config.eval.num_samples} samples of the same fresh latents:",
      "",
      *comparison_tables(r, config.eval.num_samples),
      f"Share with the feature: {r['share_before']:.1%} -> "
      f"{r['share_after']:.1%}, a relative drop of {r['relative_drop']:.1%} "
      f"({met}). Latents "
      "below the threshold, which the rule does not move: "
      f"{r['unmoved_share_before']:.2%} of all samples have the feature "
      f"before, {r['unmoved_share_after']:.2%} after. Grids of the "
      "same latents before and after: `before_after.png` (rows: with the "
      "feature, original then unlearned; without it, the same).",
      "",
    ]
  )


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

"""Trains a classifier and reports its clean test accuracy.

  python experiments/train_classifier.py \
    --config=experiments/configs/train_classifier.py[:variant] --workdir=DIR

Re-running the same command in the same workdir resumes from the last
checkpoint.
"""

import functools
import os
import time

if __package__ in (None, ""):
  import launch
else:
  from experiments import launch

import jax
import ml_collections

from aigc_jax import checkpoint, data, parallel, record, train
from aigc_jax.metrics import accuracy
from aigc_jax.models import make_classifier


def load_split(spec: str, data_dir: str, limit: int = 0, seed: int = 0):
  """A dataset by config string; `limit` > 0 keeps a class-balanced subset."""
  name, split = data.parse_source(spec)
  ds = data.load_dataset(name, split, data_dir=data_dir or None)
  return data.balanced_subset(ds, limit, seed) if limit else ds


def load_train_test(config) -> tuple[data.Dataset, data.Dataset]:
  """config.data's training set (a class-balanced subset of
  `config.data.limit` examples when that is > 0) and test set, checked."""
  train_set = load_split(
    config.data.train,
    config.data.data_dir,
    config.data.get("limit", 0),
    config.seed,
  )
  if train_set.num_examples == 0:
    raise ValueError(f"The training set {config.data.train!r} is empty.")
  return train_set, load_split(config.data.test, config.data.data_dir)


def build_classifier(config, num_classes: int, num_steps: int | None = None):
  """The model and optimiser a config describes."""
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  model = make_classifier(config.model.name, num_classes, **kwargs)
  optimizer = train.classifier_optimizer(
    config.train.learning_rate,
    num_steps,
    momentum=config.train.momentum,
    weight_decay=config.train.weight_decay,
    grad_clip=config.train.grad_clip or None,
  )
  return model, optimizer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains on config.data.train, evaluates on config.data.test.

  Returns:
    {"test_accuracy", "train_seconds", "num_classes"}.
  """
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.train.batch_size, mesh)
  train_set, test_set = load_train_test(config)
  x_train = data.to_model_range(train_set.images)
  x_test = data.to_model_range(test_set.images)
  num_classes = train_set.num_classes

  per_epoch = data.steps_per_epoch(
    train_set.num_examples, config.train.batch_size
  )
  num_steps = config.train.num_epochs * per_epoch
  model, optimizer = build_classifier(config, num_classes, num_steps)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  init_fn = functools.partial(
    train.init_classifier_state, model, optimizer, init_key, x_train.shape[1:]
  )
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"))
  state = train.init_or_restore(init_fn, mesh, checkpointer)

  step_fn = lambda s, b: train.classifier_train_step(
    s,
    b["images"],
    b["labels"],
    train_key,
    model=model,
    optimizer=optimizer,
    crop_pad=config.train.crop_pad,
    flip=config.train.flip,
  )

  def batch_fn(step):
    idx = data.batch_indices(
      config.seed, step, train_set.num_examples, config.train.batch_size
    )
    return {"images": x_train[idx], "labels": train_set.labels[idx]}

  writer = record.MetricWriter(workdir, prefix="train/")
  start = time.time()
  state = train.train_loop(
    state,
    step_fn,
    batch_fn,
    num_steps=num_steps,
    mesh=mesh,
    checkpointer=checkpointer,
    checkpoint_every=config.train.checkpoint_every,
    log_every=config.train.log_every,
    log_fn=writer.write,
    desc="classifier",
  )
  train_seconds = time.time() - start
  checkpointer.close()

  logits = predict_logits(
    model, state.params, state.batch_stats, x_test, config.eval_batch_size, mesh
  )
  test_acc = float(accuracy(logits, test_set.labels))
  result = {
    "test_accuracy": test_acc,
    "train_seconds": round(train_seconds, 1),
    "num_classes": num_classes,
  }
  record.MetricWriter(workdir, prefix="eval/").write(num_steps, result)
  table = record.markdown_table(
    ["train data", "test data", "steps", "test accuracy", "train time (s)"],
    [
      [
        f"{config.data.train} ({train_set.num_examples})",
        f"{config.data.test} ({test_set.num_examples})",
        num_steps,
        f"{test_acc:.4f}",
        f"{train_seconds:.1f}",
      ]
    ],
  )
  record.write_report(
    workdir,
    f"# Classifier ({config.model.name}, variant `{config.variant}`)\n\n"
    + table,
  )
  return result


def predict_logits(
  model,
  params,
  batch_stats,
  images,
  batch_size,
  mesh,
  *,
  return_features: bool = False,
):
  """Evaluation-mode logits (and features) for host images, in sharded
  chunks. The variables are replicated over `mesh` first: a restored
  classifier (`load_classifier`) lives on one device."""
  params, batch_stats = parallel.replicate(mesh, (params, batch_stats))
  fn = functools.partial(
    _jitted_logits,
    params,
    batch_stats,
    model=model,
    return_features=return_features,
  )
  return parallel.batched_apply(fn, images, batch_size=batch_size, mesh=mesh)


# The parameters are arguments, not constants folded into the program, so
# every classifier of one architecture shares a compilation.
@functools.partial(jax.jit, static_argnames=("model", "return_features"))
def _jitted_logits(params, batch_stats, images, *, model, return_features):
  return train.classifier_logits(
    model, params, batch_stats, images, return_features=return_features
  )


def trained_classifier(config, workdir: str):
  """(model, params, batch_stats, test accuracy) of the run in `workdir`,
  training it first unless that run has finished."""
  record.prepare_workdir(workdir, config.to_json())
  try:
    accuracy = record.last_metric(workdir, "eval/test_accuracy")
  except (FileNotFoundError, KeyError):
    accuracy = train_and_evaluate(config, workdir)["test_accuracy"]
  return (*load_classifier(workdir), accuracy)


def load_classifier(workdir: str):
  """Rebuilds a finished run's classifier: (model, params, batch_stats)."""
  config = ml_collections.ConfigDict(record.load_config_json(workdir))
  train_set = load_split(config.data.train, config.data.data_dir)
  # A scheduled optimiser, as in training: only the state's structure matters.
  model, optimizer = build_classifier(config, train_set.num_classes, 1)
  image_shape = train_set.images.shape[1:]
  abstract = jax.eval_shape(
    lambda: train.init_classifier_state(
      model, optimizer, jax.random.key(0), image_shape
    )
  )
  mesh = parallel.make_mesh(1)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"))
  state = checkpointer.restore(
    checkpoint.abstract_state(abstract, parallel.replicated(mesh))
  )
  checkpointer.close()
  return model, state.params, state.batch_stats


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

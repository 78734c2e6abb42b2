"""Time to accuracy: the wall-clock seconds a classifier recipe takes to
reach a clean test accuracy (DAWNBench's measure, Coleman et al. 2017), in
JAX (the library's victim training step, fed as `eval.classifiers.fit`
feeds it) and in a PyTorch twin of the same recipe on the same device.

Both sides train the CIFAR ResNet-18 on the same batches (`data.
batch_indices`), with the same crop, flip, loss, optimiser and learning
rate at every step, and stop after the first epoch whose test accuracy
reaches the target. The clock runs while training, the first step's
compilation included, and stops for the evaluation after each epoch.

  curve = time_to_accuracy.jax_run(config, train_set, test_set, mesh, 0.93)
"""

import time

import jax
import numpy as np

from aigc_jax import data, metrics, train
from aigc_jax.bench import torch_twins
from aigc_jax.eval import classifiers


def _check(config) -> None:
  if config.model.name != "resnet18":
    raise ValueError(
      f"Time to accuracy has a PyTorch twin of resnet18 only, not "
      f"{config.model.name!r}; set model.name=resnet18."
    )


def _train_until(target: float, epochs: int, train_epoch, evaluate) -> dict:
  """`train_epoch(epoch)` (returning once the device has finished) and
  `evaluate() -> accuracy` epoch by epoch, the clock running only while
  training, until the accuracy reaches `target`: the seconds and epochs to
  the target (None if it was not reached), the best accuracy and the curve."""
  clock, curve = 0.0, []
  for epoch in range(epochs):
    start = time.perf_counter()
    train_epoch(epoch)
    clock += time.perf_counter() - start
    curve.append({"epoch": epoch + 1, "seconds": clock, "accuracy": evaluate()})
    if curve[-1]["accuracy"] >= target:
      break
  hit = curve[-1] if curve[-1]["accuracy"] >= target else None
  return {
    "target": target,
    "seconds": None if hit is None else hit["seconds"],
    "epochs": None if hit is None else hit["epoch"],
    "best_accuracy": max(p["accuracy"] for p in curve),
    "curve": curve,
  }


def jax_run(config, train_set, test_set, mesh, target: float) -> dict:
  """`config`'s victim recipe (`eval.classifiers.classifier_recipe`) in JAX
  until the test accuracy reaches `target` or the epochs run out."""
  _check(config)
  images, labels = train_set.images, train_set.labels
  recipe = classifiers.classifier_recipe(
    config, len(images), train_set.num_classes, images.shape[1:]
  )
  ((step_fn, num_steps),) = recipe.phases
  test_x = data.to_model_range(test_set.images)
  per_epoch = num_steps // config.train.num_epochs
  holder = [recipe.init()]
  # The clock starts after this: the data on the devices, as fit holds it.
  batch_fn = data.batch_fn(
    {"images": data.to_model_range(images), "labels": labels},
    recipe.seed,
    config.train.batch_size,
    mesh,
  )

  def train_epoch(epoch):
    # The library's training loop, as `eval.classifiers.fit` runs it.
    holder[0] = train.train_loop(
      holder[0],
      step_fn,
      batch_fn,
      num_steps=(epoch + 1) * per_epoch,
      mesh=mesh,
      log_every=per_epoch,
      desc="time to accuracy",
    )
    jax.block_until_ready(holder[0])

  def evaluate():
    classifier = classifiers.Classifier(
      recipe.model, holder[0].params, holder[0].batch_stats
    )
    logits = classifiers.predict_logits(
      classifier, test_x, config.eval_batch_size, mesh
    )
    return float(metrics.accuracy(logits, test_set.labels))

  return _train_until(target, config.train.num_epochs, train_epoch, evaluate)


def torch_run(config, train_set, test_set, device: str, target: float) -> dict:
  """The same recipe in PyTorch (`torch_twins.cifar_resnet18`, SGD with
  momentum and weight decay, the optax schedule's rate at every step,
  label smoothing, bfloat16 autocast when `model.dtype` says so), the data
  held on `device`."""
  _check(config)
  torch = torch_twins.torch_module()
  n, bs = train_set.num_examples, config.train.batch_size
  rates = _learning_rates(config, n // bs)
  torch.manual_seed(config.seed)
  model = torch_twins.cifar_resnet18(
    train_set.num_classes,
    config.model.get("width", 64),
    train_set.images.shape[-1],
  ).to(device)
  sgd = torch.optim.SGD(
    model.parameters(),
    lr=0.0,
    momentum=config.train.momentum,
    weight_decay=config.train.weight_decay,
  )
  loss_fn = torch.nn.CrossEntropyLoss(
    label_smoothing=config.train.label_smoothing
  )
  autocast = torch.autocast(
    device.split(":")[0],
    dtype=torch.bfloat16,
    enabled=config.model.dtype == "bfloat16",
  )
  x = torch_twins.nchw_images(train_set.images, device)
  y = torch.from_numpy(train_set.labels.astype(np.int64)).to(device)
  test_x = torch_twins.nchw_images(test_set.images, device)
  test_y = torch.from_numpy(test_set.labels.astype(np.int64)).to(device)
  crop_flip = torch_twins.crop_flip(
    torch, config.train.crop_pad, config.train.flip, config.seed, device
  )
  sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
  per_epoch = n // bs

  def train_epoch(epoch):
    model.train()
    for s in range(epoch * per_epoch, (epoch + 1) * per_epoch):
      idx = data.batch_indices(config.seed, s, n, bs)
      idx = torch.from_numpy(idx).to(device)
      for group in sgd.param_groups:
        group["lr"] = rates[s]
      with autocast:
        loss = loss_fn(model(crop_flip(x[idx])), y[idx])
      sgd.zero_grad(set_to_none=True)
      loss.backward()
      if config.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(
          model.parameters(), config.train.grad_clip
        )
      sgd.step()
    sync()

  def evaluate():
    model.eval()
    correct, b = 0, config.eval_batch_size
    with torch.no_grad(), autocast:
      for lo in range(0, len(test_x), b):
        predicted = model(test_x[lo : lo + b]).argmax(-1)
        correct += int((predicted == test_y[lo : lo + b]).sum())
    return correct / len(test_x)

  return _train_until(target, config.train.num_epochs, train_epoch, evaluate)


def _learning_rates(config, per_epoch: int) -> np.ndarray:
  """The rate at every step of `config.train`'s schedule, as the optax
  optimiser applies it."""
  total = config.train.num_epochs * per_epoch
  schedule = train.learning_rate_schedule(
    config.train.learning_rate, total, config.train.schedule
  )
  return np.asarray(jax.vmap(schedule)(np.arange(total)), np.float64)

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

from aigc_jax import data, metrics, parallel, train
from aigc_jax.bench import torch_twins
from aigc_jax.eval import classifiers


def _check(config) -> None:
  if config.model.name != "resnet18":
    raise ValueError(
      f"Time to accuracy has a PyTorch twin of resnet18 only, not "
      f"{config.model.name!r}; set model.name=resnet18."
    )


def _reached(curve: list[dict], target: float) -> dict:
  """The run's summary: seconds and epochs to the first epoch at or above
  `target` (None if none got there), and the whole curve."""
  hit = next((p for p in curve if p["accuracy"] >= target), None)
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
  n, bs = train_set.num_examples, config.train.batch_size
  recipe = classifiers.classifier_recipe(
    config, n, train_set.num_classes, train_set.images.shape[1:]
  )
  ((step_fn, num_steps),) = recipe.phases
  rep = parallel.replicated(mesh)
  state = jax.jit(recipe.init, out_shardings=rep)()
  step = jax.jit(step_fn, out_shardings=(rep, rep), donate_argnums=0)
  x, y = data.to_model_range(train_set.images), train_set.labels
  test_x = data.to_model_range(test_set.images)
  per_epoch, clock, curve = num_steps // config.train.num_epochs, 0.0, []
  for epoch in range(config.train.num_epochs):
    start = time.perf_counter()
    for s in range(epoch * per_epoch, (epoch + 1) * per_epoch):
      idx = data.batch_indices(recipe.seed, s, n, bs)
      batch = parallel.shard_batch(mesh, {"images": x[idx], "labels": y[idx]})
      state, _ = parallel.settle(step(state, batch), mesh)
    jax.block_until_ready(state)
    clock += time.perf_counter() - start
    classifier = classifiers.Classifier(
      recipe.model, state.params, state.batch_stats
    )
    logits = classifiers.predict_logits(
      classifier, test_x, config.eval_batch_size, mesh
    )
    accuracy = float(metrics.accuracy(logits, test_set.labels))
    curve.append({"epoch": epoch + 1, "seconds": clock, "accuracy": accuracy})
    if accuracy >= target:
      break
  return _reached(curve, target)


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
  per_epoch, clock, curve = n // bs, 0.0, []
  seed = config.seed
  for epoch in range(config.train.num_epochs):
    model.train()
    start = time.perf_counter()
    for s in range(epoch * per_epoch, (epoch + 1) * per_epoch):
      idx = torch.from_numpy(data.batch_indices(seed, s, n, bs)).to(device)
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
    clock += time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad(), autocast:
      for lo in range(0, len(test_x), config.eval_batch_size):
        logits = model(test_x[lo : lo + config.eval_batch_size])
        correct += int(
          (logits.argmax(-1) == test_y[lo : lo + len(logits)]).sum()
        )
    accuracy = correct / len(test_x)
    curve.append({"epoch": epoch + 1, "seconds": clock, "accuracy": accuracy})
    if accuracy >= target:
      break
  return _reached(curve, target)


def _learning_rates(config, per_epoch: int) -> np.ndarray:
  """The rate at every step of `config.train`'s schedule, as the optax
  optimiser applies it."""
  total = config.train.num_epochs * per_epoch
  schedule = train.learning_rate_schedule(
    config.train.learning_rate, total, config.train.schedule
  )
  return np.asarray(jax.vmap(schedule)(np.arange(total)), np.float64)

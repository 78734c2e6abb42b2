"""Supervised classifier training: SGD with momentum and weight decay, a
cosine learning-rate schedule, random-crop and flip augmentation (the
standard CIFAR recipe of the unlearnable-examples literature: lr 0.1,
momentum 0.9, weight decay 5e-4, batch 128)."""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aigc_jax.protect.emn import cross_entropy_objective
from aigc_jax.protect.pgd import Budget, init_perturbation, pgd
from aigc_jax.train.augment import random_crop_flip

LogitsFn = Callable[[jax.Array], jax.Array]
# attack(logits_fn, images, labels, key) -> adversarial images
Attack = Callable[[LogitsFn, jax.Array, jax.Array, jax.Array], jax.Array]


class ClassifierState(NamedTuple):
  """Parameters, BatchNorm statistics (empty without BatchNorm), optimiser."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


SCHEDULES = ("cosine", "onecycle")


def learning_rate_schedule(
  learning_rate: float,
  total_steps: int | None,
  schedule: str = "cosine",
  warmup_fraction: float = 0.2,
) -> optax.ScalarOrSchedule:
  """The rate at every step: constant when `total_steps` is None, else
  "cosine", decay to 0 over `total_steps`; "onecycle", linear from 0 up to
  `learning_rate` over the first `warmup_fraction` of the steps and
  linearly back to 0 (Smith & Topin 2019, as the fast CIFAR-10 recipes use
  it: Page 2018)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown schedule {schedule!r}; choose {SCHEDULES}.")
  if total_steps is None:
    return learning_rate
  if schedule == "cosine":
    return optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
  peak = max(int(warmup_fraction * total_steps), 1)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, learning_rate, peak),
      optax.linear_schedule(learning_rate, 0.0, max(total_steps - peak, 1)),
    ],
    [peak],
  )


def classifier_optimizer(
  learning_rate: float = 0.1,
  total_steps: int | None = None,
  *,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  grad_clip: float | None = None,
  schedule: str = "cosine",
) -> optax.GradientTransformation:
  """SGD + momentum with L2 weight decay added to the gradient before
  momentum (as torch.optim.SGD does), at `learning_rate_schedule`'s rate
  over `total_steps` (a constant rate when None)."""
  lr = learning_rate_schedule(learning_rate, total_steps, schedule)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts += [optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum)]
  return optax.chain(*parts)


def init_classifier_state(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  image_shape: tuple[int, int, int],
) -> ClassifierState:
  """Fresh parameters for images of shape (H, W, C)."""
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))
  params = variables["params"]
  return ClassifierState(
    jnp.zeros((), jnp.int32),
    params,
    variables.get("batch_stats", {}),
    optimizer.init(params),
  )


def classifier_logits(
  model: nn.Module,
  params,
  batch_stats,
  images: jax.Array,
  *,
  return_features: bool = False,
):
  """Evaluation-mode logits (BatchNorm uses its running statistics), and
  the penultimate features when `return_features`."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return model.apply(
    variables, images, train=False, return_features=return_features
  )


def pgd_attack(
  budget: Budget,
  *,
  steps: int = 10,
  step_size: float | None = None,
  random_start: bool = True,
  unroll: int | bool = 1,
) -> Attack:
  """Madry et al.'s PGD attack on the cross-entropy, for adversarial
  training (`classifier_train_step(..., attack=pgd_attack(budget(8)))` is
  PGD-10 at 8/255, Madry et al. 2018, arXiv 1706.06083), on the shared PGD
  loop.

  Args:
    budget: the attack radius (`aigc_jax.protect.budget`).
    steps: PGD steps.
    step_size: in model units; default budget.eps / 4 (2/255 at 8/255).
    random_start: start from a uniform point of the ball (Madry).
    unroll: passed to `pgd` (see there).
  """
  size = budget.eps / 4 if step_size is None else step_size

  def attack(logits_fn, images, labels, key):
    start_key, pgd_key = jax.random.split(key)
    start = init_perturbation(
      start_key, images.shape, budget, random_start=random_start
    )
    delta, _ = pgd(
      cross_entropy_objective(logits_fn, labels),
      images,
      start,
      pgd_key,
      budget=budget,
      steps=steps,
      step_size=size,
      unroll=unroll,
    )
    return jnp.clip(images + jax.lax.stop_gradient(delta), -1.0, 1.0)

  return attack


def classifier_train_step(
  state: ClassifierState,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  crop_pad: int = 4,
  flip: bool = True,
  attack: Attack | None = None,
  views: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
  num_views: int = 1,
  label_smoothing: float = 0.0,
) -> tuple[ClassifierState, dict[str, jax.Array]]:
  """One SGD step on the cross-entropy of augmented images.

  Standard training by default; adversarial training with `attack` (the
  attack sees the model in evaluation mode, with this step's parameters);
  adversarial augmentation (UEraser) with `views` and `num_views` = K: the
  loss of each example is its largest over K augmented views,
  (1/B) Σ_i max_k CE(f(A_k(x_i)), y_i).

  Args:
    state: the current state.
    images: a batch in [-1, 1], (B, H, W, C).
    labels: integer labels, (B,).
    key: the run's key; this step uses `fold_in(key, state.step)`.
    model: the classifier module.
    optimizer: its optimiser.
    crop_pad: padding of the random crop (0 disables cropping).
    flip: random horizontal flips.
    attack: e.g. `pgd_attack(budget(8))`, applied after crop and flip.
    views: `augment(key, images) -> images`, e.g. `ueraser_augment`.
    num_views: K, the views per example when `views` is given.
    label_smoothing: the share of each target spread evenly over the
      classes (Szegedy et al. 2016); 0: the plain cross-entropy.

  Returns:
    The new state and {"loss", "accuracy"} on the (first view of the)
    training batch.
  """
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
  if crop_pad or flip:
    images = random_crop_flip(aug_key, images, pad=crop_pad, flip=flip)
  if attack is not None:
    logits_fn = lambda x: classifier_logits(
      model, state.params, state.batch_stats, x
    )
    images = attack(logits_fn, images, labels, jax.random.fold_in(aug_key, 1))
  k = 1
  if views is not None:
    k = num_views
    view_keys = jax.random.split(jax.random.fold_in(aug_key, 2), k)
    images = jax.vmap(views, in_axes=(0, None))(view_keys, images)
    images = images.reshape(-1, *images.shape[2:])
  mutable = ["batch_stats"] if state.batch_stats else []

  def loss_fn(params):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    logits, updates = model.apply(
      variables,
      images,
      train=True,
      mutable=mutable,
      rngs={"dropout": dropout_key},
    )
    logits = logits.reshape(k, -1, logits.shape[-1])
    labels_k = jnp.broadcast_to(labels, logits.shape[:-1])
    if label_smoothing:
      targets = jax.nn.one_hot(labels_k, logits.shape[-1])
      losses = optax.softmax_cross_entropy(
        logits, optax.smooth_labels(targets, label_smoothing)
      )
    else:
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels_k)
    return losses.max(axis=0).mean(), (logits[0], updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  opt_updates, opt_state = optimizer.update(
    grads, state.opt_state, state.params
  )
  params = optax.apply_updates(state.params, opt_updates)
  metrics = {
    "loss": loss,
    "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
  }
  new = ClassifierState(
    state.step + 1, params, updates.get("batch_stats", {}), opt_state
  )
  return new, metrics

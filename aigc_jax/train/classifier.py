"""Supervised classifier training: SGD with momentum and weight decay, a
cosine learning-rate schedule, random-crop and flip augmentation (the
standard CIFAR recipe of the unlearnable-examples literature: lr 0.1,
momentum 0.9, weight decay 5e-4, batch 128)."""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class ClassifierState(NamedTuple):
  """Parameters, BatchNorm statistics (empty without BatchNorm), optimiser."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def classifier_optimizer(
  learning_rate: float = 0.1,
  total_steps: int = 1,
  *,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  grad_clip: float | None = None,
) -> optax.GradientTransformation:
  """SGD + momentum, cosine decay to 0 over `total_steps`, L2 weight decay
  added to the gradient before momentum (as torch.optim.SGD does)."""
  lr = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
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


def random_crop_flip(
  key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True
) -> jax.Array:
  """Per-image random crop after padding with black (-1) and optional
  horizontal flip, like torchvision's RandomCrop(padding) on a PIL image and
  RandomHorizontalFlip."""
  b, h, w, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(
    images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0
  )
  offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(
      img, (off[0], off[1], 0), (h, w, img.shape[-1])
    )

  out = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
    out = jnp.where(mirror, out[:, :, ::-1], out)
  return out


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
) -> tuple[ClassifierState, dict[str, jax.Array]]:
  """One SGD step on the cross-entropy of augmented images.

  Args:
    state: the current state.
    images: a batch in [-1, 1], (B, H, W, C).
    labels: integer labels, (B,).
    key: the run's key; this step uses `fold_in(key, state.step)`.
    model: the classifier module.
    optimizer: its optimiser.
    crop_pad: padding of the random crop (0 disables cropping).
    flip: random horizontal flips.

  Returns:
    The new state and {"loss", "accuracy"} on the augmented batch.
  """
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
  if crop_pad or flip:
    images = random_crop_flip(aug_key, images, pad=crop_pad, flip=flip)
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
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), (logits, updates)

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

"""Self-supervised contrastive learning: SimCLR (Chen et al. 2020), MoCo v2
(Chen et al. 2020) and BYOL (Grill et al. 2020), with a linear probe on
frozen features; the victims of contrastive poisoning (He et al. 2023,
arXiv 2202.11202).

Each method is a per-example loss on two views of a batch,
`contrastive_losses(...) -> (B,)`, so the same function trains the encoder
(its mean, over parameters) and poisons the data (its sum, over the images,
in `aigc_jax.protect.contrastive_objective`). All three losses are
symmetrised over the two views:

  SimCLR:  NT-Xent, −log softmax_τ(z_i · z_j⁺) over the 2B − 1 other views.
  MoCo v2: −log softmax_τ(q · k⁺) against a queue of past keys; keys come
           from a momentum (EMA) copy of the encoder.
  BYOL:    2 − 2 cos(p, z'), p the online prediction, z' the EMA target's
           projection of the other view.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

METHODS = ("simclr", "moco", "byol")
Augment = Callable[[jax.Array, jax.Array], jax.Array]


class ContrastiveState(NamedTuple):
  """Online parameters, BatchNorm statistics, optimiser state, the EMA
  target's parameters (MoCo, BYOL; empty for SimCLR) and MoCo's queue of
  normalised keys (None otherwise)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  target_params: Any
  queue: jax.Array | None


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(
      f"Unknown contrastive method {method!r}; choose {METHODS}."
    )


def init_contrastive_state(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  image_shape: tuple[int, int, int],
  *,
  method: str,
  queue_size: int = 4096,
) -> ContrastiveState:
  """Fresh state; the target starts as a copy of the online network (a
  copy, not an alias, so that the state can be donated)."""
  check_method(method)
  init_key, queue_key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32))
  params = variables["params"]
  target = jax.tree.map(jnp.copy, params) if method != "simclr" else {}
  queue = None
  if method == "moco":
    queue = _normalize(
      jax.random.normal(queue_key, (queue_size, model.proj_dim))
    )
  return ContrastiveState(
    jnp.zeros((), jnp.int32),
    params,
    variables.get("batch_stats", {}),
    optimizer.init(params),
    target,
    queue,
  )


def _normalize(v):
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def nt_xent_losses(z1: jax.Array, z2: jax.Array, temperature: float):
  """SimCLR's NT-Xent for each pair (z1_i, z2_i), averaged over its two
  anchors: (B,)."""
  b = z1.shape[0]
  z = _normalize(jnp.concatenate([z1, z2]))
  sim = z @ z.T / temperature
  sim = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, sim)
  positive = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
  losses = optax.softmax_cross_entropy_with_integer_labels(sim, positive)
  return 0.5 * (losses[:b] + losses[b:])


def moco_losses(q: jax.Array, k: jax.Array, queue: jax.Array, temperature):
  """InfoNCE of queries q against their keys k and the queue: (B,)."""
  q, k = _normalize(q), _normalize(jax.lax.stop_gradient(k))
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  logits = jnp.concatenate([positive, q @ queue.T], axis=1) / temperature
  return optax.softmax_cross_entropy_with_integer_labels(
    logits, jnp.zeros(q.shape[0], jnp.int32)
  )


def byol_losses(p: jax.Array, z: jax.Array):
  """2 − 2 cos(p, z') with the target z' held fixed: (B,)."""
  z = jax.lax.stop_gradient(z)
  return 2.0 - 2.0 * jnp.sum(_normalize(p) * _normalize(z), axis=-1)


def _forward(model, params, batch_stats, x, train):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  if train and batch_stats:
    out, updates = model.apply(
      variables, x, train=True, mutable=["batch_stats"]
    )
    return out, updates["batch_stats"]
  return model.apply(variables, x, train=train), batch_stats


def contrastive_losses(
  model: nn.Module,
  state: ContrastiveState,
  params,
  view1: jax.Array,
  view2: jax.Array,
  *,
  method: str,
  temperature: float = 0.5,
  train: bool = False,
):
  """Per-example losses of `method` on the pairs (view1_i, view2_i).

  Args:
    model: a `ContrastiveNet` (with `predictor=True` for BYOL).
    state: supplies BatchNorm statistics, the target and the queue.
    params: the online parameters (differentiated by the trainer).
    view1, view2: two augmented views of the same batch, (B, H, W, C).
    method: "simclr", "moco" or "byol".
    temperature: τ of SimCLR and MoCo.
    train: BatchNorm in training mode (batch statistics) or evaluation.

  Returns:
    (B,) losses, and (the updated BatchNorm statistics, MoCo's new keys).
  """
  check_method(method)
  b = view1.shape[0]
  both = jnp.concatenate([view1, view2])
  (_, z, p), stats = _forward(model, params, state.batch_stats, both, train)
  if method == "simclr":
    return nt_xent_losses(z[:b], z[b:], temperature), (stats, z[:0])
  # The target sees the other view; its BatchNorm updates are discarded.
  (_, zt, _), _ = _forward(
    model, state.target_params, state.batch_stats, both, train
  )
  zt = jax.lax.stop_gradient(zt)
  if method == "moco":
    losses = 0.5 * (
      moco_losses(z[:b], zt[b:], state.queue, temperature)
      + moco_losses(z[b:], zt[:b], state.queue, temperature)
    )
    return losses, (stats, _normalize(zt))
  losses = byol_losses(p[:b], zt[b:]) + byol_losses(p[b:], zt[:b])
  return losses, (stats, zt[:0])


def contrastive_train_step(
  state: ContrastiveState,
  images: jax.Array,
  key: jax.Array,
  *,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  method: str,
  augment: Augment,
  temperature: float = 0.5,
  target_momentum: float = 0.99,
) -> tuple[ContrastiveState, dict[str, jax.Array]]:
  """One optimiser step of `method` on two fresh views of `images`, then
  the EMA target update θ' ← m θ' + (1 − m) θ (MoCo, BYOL) and MoCo's
  enqueue of this batch's keys (the oldest leave).

  Args:
    state: the current state.
    images: a batch in [-1, 1]; this step uses `fold_in(key, state.step)`.
    key: the run's key.
    model: a `ContrastiveNet`.
    optimizer: its optimiser.
    method: "simclr", "moco" or "byol".
    augment: `augment(key, images) -> views`, e.g. `simclr_augment`.
    temperature: τ of SimCLR and MoCo.
    target_momentum: m of the EMA target.

  Returns:
    The new state and {"loss"}.
  """
  k1, k2 = jax.random.split(jax.random.fold_in(key, state.step))
  v1, v2 = augment(k1, images), augment(k2, images)

  def loss_fn(params):
    losses, aux = contrastive_losses(
      model,
      state,
      params,
      v1,
      v2,
      method=method,
      temperature=temperature,
      train=True,
    )
    return losses.mean(), aux

  (loss, (stats, keys)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  target = jax.tree.map(
    lambda t, p: target_momentum * t + (1.0 - target_momentum) * p,
    state.target_params,
    params if method != "simclr" else state.target_params,
  )
  queue = state.queue
  if method == "moco":
    queue = jnp.concatenate([keys, queue])[: queue.shape[0]]
  new = ContrastiveState(
    state.step + 1, params, stats, opt_state, target, queue
  )
  return new, {"loss": loss}


def contrastive_features(model: nn.Module, params, batch_stats, images):
  """The backbone's features h (evaluation mode), what a linear probe reads."""
  (h, _, _), _ = _forward(model, params, batch_stats, images, False)
  return h


def linear_probe_accuracy(
  train_features: jax.Array,
  train_labels: jax.Array,
  test_features: jax.Array,
  test_labels: jax.Array,
  *,
  num_classes: int,
  steps: int = 500,
  learning_rate: float = 0.01,
  weight_decay: float = 1e-4,
) -> jax.Array:
  """Clean test accuracy of a linear classifier fitted on frozen features
  of the clean training set: full-batch Adam on the cross-entropy of
  standardised features (the original probe trains on augmented crops
  with SGD; frozen features are the cheaper standard)."""
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0) + 1e-6
  xs, xt = (train_features - mean) / std, (test_features - mean) / std
  params = {
    "w": jnp.zeros((xs.shape[1], num_classes)),
    "b": jnp.zeros((num_classes,)),
  }
  opt = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss_fn(p):
    logits = xs @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, train_labels
    ).mean()

  def body(carry, _):
    p, s = carry
    updates, s = opt.update(jax.grad(loss_fn)(p), s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, steps)
  predictions = jnp.argmax(xt @ params["w"] + params["b"], axis=-1)
  return jnp.mean(predictions == test_labels)

"""DDPM training: Adam with warm-up, gradient clipping and an EMA of the
weights, as in Ho et al. (2020) Appendix B."""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aigc_jax.diffusion import (
  EpsFn,
  NoiseSchedule,
  TimestepPolicy,
  denoising_loss,
)


class DDPMState(NamedTuple):
  """Everything a DDPM training run carries from step to step."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def ddpm_optimizer(
  learning_rate: float = 2e-4, warmup_steps: int = 5000, grad_clip: float = 1.0
) -> optax.GradientTransformation:
  """Adam with a linear warm-up and global-norm clipping (Ho et al.: 2e-4,
  5000 warm-up steps, clip 1.0)."""
  lr = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(lr))


def init_ddpm_state(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  image_shape: tuple[int, int, int],
) -> DDPMState:
  """Fresh parameters for images of shape (H, W, C); EMA starts equal."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(key, x, jnp.zeros((1,), jnp.int32))["params"]
  # A copy, not an alias: a state whose two fields share buffers cannot be
  # donated to a jitted step.
  ema = jax.tree.map(jnp.copy, params)
  return DDPMState(
    jnp.zeros((), jnp.int32), params, ema, optimizer.init(params)
  )


def ddpm_eps_fn(
  model: nn.Module, params, *, train: bool = False, key=None
) -> EpsFn:
  """The denoiser ε_θ(x_t, t) with parameters (and a dropout key) bound."""
  rngs = {"dropout": key} if train else None
  return lambda x, t: model.apply(
    {"params": params}, x, t, train=train, rngs=rngs
  )


def ddpm_train_step(
  state: DDPMState,
  images: jax.Array,
  key: jax.Array,
  *,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  schedule: NoiseSchedule,
  ema_decay: float = 0.9999,
  policy: TimestepPolicy | None = None,
) -> tuple[DDPMState, dict[str, jax.Array]]:
  """One step on the denoising loss, Ho et al. (2020) Algorithm 1.

  Args:
    state: the current state.
    images: a batch in [-1, 1], (B, H, W, C).
    key: the run's key; this step uses `fold_in(key, state.step)`, so a
      resumed run repeats the uninterrupted run exactly.
    model: the denoiser module.
    optimizer: its optimiser.
    schedule: the noise schedule.
    ema_decay: decay of the parameter EMA used for sampling.
    policy: p(t) and w(t) of the loss (uniform when None).

  Returns:
    The new state and {"loss", "grad_norm"}.
  """
  loss_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))

  def loss_fn(params):
    eps_fn = ddpm_eps_fn(model, params, train=True, key=dropout_key)
    return denoising_loss(
      eps_fn, images, loss_key, schedule, policy=policy
    ).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return apply_gradients(state, loss, grads, optimizer, ema_decay)


def apply_gradients(
  state: DDPMState,
  loss: jax.Array,
  grads: Any,
  optimizer: optax.GradientTransformation,
  ema_decay: float,
) -> tuple[DDPMState, dict[str, jax.Array]]:
  """The optimiser step, the EMA update and the metrics every diffusion
  trainer ends its step with."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
  return DDPMState(state.step + 1, params, ema, opt_state), metrics

"""Training the generators whose features are unlearned: a GAN with the
non-saturating loss (Goodfellow et al., 2014, Sec. 3) and a VAE on the
negative ELBO with a Bernoulli decoder (Kingma and Welling, 2014, Eq. 10).
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class GANState(NamedTuple):
  """Generator and discriminator parameters and their optimiser states."""

  step: jax.Array
  params: Any  # the generator's
  disc_params: Any
  opt_state: Any
  disc_opt_state: Any


class VAEState(NamedTuple):
  """VAE parameters and their optimiser state."""

  step: jax.Array
  params: Any
  opt_state: Any


def gan_optimizer(learning_rate: float = 2e-4) -> optax.GradientTransformation:
  """Adam with β1 = 0.5 (Radford et al., 2016), for both players."""
  return optax.adam(learning_rate, b1=0.5, b2=0.999)


def init_gan_state(
  generator: nn.Module,
  discriminator: nn.Module,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  latent_dim: int,
  image_shape: tuple[int, ...],
) -> GANState:
  g_key, d_key = jax.random.split(key)
  params = generator.init(g_key, jnp.zeros((1, latent_dim)))["params"]
  disc_params = discriminator.init(d_key, jnp.zeros((1, *image_shape)))[
    "params"
  ]
  return GANState(
    jnp.zeros((), jnp.int32),
    params,
    disc_params,
    optimizer.init(params),
    optimizer.init(disc_params),
  )


def gan_train_step(
  state: GANState,
  images: jax.Array,
  key: jax.Array,
  *,
  generator: nn.Module,
  discriminator: nn.Module,
  optimizer: optax.GradientTransformation,
  latent_dim: int,
) -> tuple[GANState, dict[str, jax.Array]]:
  """One discriminator step, then one generator step on the same latents.

  The discriminator minimises softplus(-D(x)) + softplus(D(G(z))), the
  generator the non-saturating softplus(-D(G(z))).

  Args:
    state: the current state.
    images: real images in [-1, 1], (B, H, W, C).
    key: the run's key; the step draws z with `fold_in(key, state.step)`.
    generator, discriminator: the two modules.
    optimizer: the optimiser of both players.
    latent_dim: the size of z ~ N(0, I).

  Returns:
    The new state and {"d_loss", "g_loss", "d_real"} (d_real: the mean
    probability the discriminator gives real images).
  """
  z = jax.random.normal(
    jax.random.fold_in(key, state.step), (images.shape[0], latent_dim)
  )
  fake = generator.apply({"params": state.params}, z)

  def disc_loss(disc_params):
    real_logits = discriminator.apply({"params": disc_params}, images)
    fake_logits = discriminator.apply(
      {"params": disc_params}, jax.lax.stop_gradient(fake)
    )
    loss = jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)
    return loss.mean(), jax.nn.sigmoid(real_logits).mean()

  (d_loss, d_real), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
    state.disc_params
  )
  updates, disc_opt_state = optimizer.update(d_grads, state.disc_opt_state)
  disc_params = optax.apply_updates(state.disc_params, updates)

  def gen_loss(params):
    logits = discriminator.apply(
      {"params": disc_params}, generator.apply({"params": params}, z)
    )
    return jax.nn.softplus(-logits).mean()

  g_loss, g_grads = jax.value_and_grad(gen_loss)(state.params)
  updates, opt_state = optimizer.update(g_grads, state.opt_state)
  new_state = GANState(
    state.step + 1,
    optax.apply_updates(state.params, updates),
    disc_params,
    opt_state,
    disc_opt_state,
  )
  return new_state, {"d_loss": d_loss, "g_loss": g_loss, "d_real": d_real}


def init_vae_state(
  vae: nn.Module,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  image_shape: tuple[int, ...],
) -> VAEState:
  init_key, noise_key = jax.random.split(key)
  params = vae.init(init_key, jnp.zeros((1, *image_shape)), noise_key)["params"]
  return VAEState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def vae_loss(
  vae: nn.Module, params: Any, images: jax.Array, key: jax.Array
) -> jax.Array:
  """Per-image negative ELBO in nats: the Bernoulli reconstruction
  cross-entropy summed over pixels (targets in [0, 1]) plus
  KL(q(z | x) || N(0, I)) (Kingma and Welling, 2014, Appendix B)."""
  logits, mu, logvar = vae.apply({"params": params}, images, key)
  targets = ((images + 1) / 2).reshape(images.shape[0], -1)
  recon = optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
  kl = -0.5 * jnp.sum(1 + logvar - mu**2 - jnp.exp(logvar), axis=-1)
  return recon + kl


def vae_train_step(
  state: VAEState,
  images: jax.Array,
  key: jax.Array,
  *,
  vae: nn.Module,
  optimizer: optax.GradientTransformation,
) -> tuple[VAEState, dict[str, jax.Array]]:
  """One step on the mean negative ELBO; z is drawn with
  `fold_in(key, state.step)`."""
  step_key = jax.random.fold_in(key, state.step)
  loss, grads = jax.value_and_grad(
    lambda p: vae_loss(vae, p, images, step_key).mean()
  )(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state)
  params = optax.apply_updates(state.params, updates)
  return VAEState(state.step + 1, params, opt_state), {"loss": loss}

"""Generators whose features are unlearned: an MLP GAN, a small convolutional
GAN and an MLP VAE, sized for 28x28 digits, and loaders for the pretrained
MNIST GAN and VAE (and the LeNet-5 classifier that comes with them) that
come as PyTorch state dicts saved as `.npz`.

Every generator maps latents (B, latent_dim) to NHWC images in [-1, 1]
through `apply({"params": p}, z)` (the VAE through `method="decode"`), which
is the `generator(params, z)` function `aigc_jax.unlearn.feature` takes.
"""

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class MLPGenerator(nn.Module):
  """z -> Dense-ReLU blocks -> tanh image: the pretrained MNIST GAN's
  generator (64-256-256-784) with the defaults."""

  hidden: Sequence[int] = (256, 256)
  image_shape: tuple[int, int, int] = (28, 28, 1)

  @nn.compact
  def __call__(self, z):
    h = z
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    h = nn.Dense(int(np.prod(self.image_shape)))(h)
    return jnp.tanh(h).reshape(z.shape[0], *self.image_shape)


class ConvGenerator(nn.Module):
  """z -> 7x7 feature map -> two stride-2 transposed convolutions -> tanh
  28x28 image (DCGAN's shape, without BatchNorm so that the generator stays
  a pure function of (params, z))."""

  width: int = 64
  channels: int = 1

  @nn.compact
  def __call__(self, z):
    h = nn.relu(nn.Dense(7 * 7 * 2 * self.width)(z))
    h = h.reshape(z.shape[0], 7, 7, 2 * self.width)
    h = nn.relu(nn.ConvTranspose(self.width, (4, 4), (2, 2))(h))
    h = nn.ConvTranspose(self.channels, (4, 4), (2, 2))(h)
    return jnp.tanh(h)


class MLPDiscriminator(nn.Module):
  """Image -> Dense-LeakyReLU(0.2) blocks -> one logit (784-256-256-1)."""

  hidden: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      h = nn.leaky_relu(nn.Dense(width)(h), 0.2)
    return nn.Dense(1)(h)[:, 0]


class ConvDiscriminator(nn.Module):
  """Image -> two stride-2 convolutions -> one logit."""

  width: int = 64

  @nn.compact
  def __call__(self, x):
    h = nn.leaky_relu(nn.Conv(self.width, (4, 4), (2, 2))(x), 0.2)
    h = nn.leaky_relu(nn.Conv(2 * self.width, (4, 4), (2, 2))(h), 0.2)
    return nn.Dense(1)(h.reshape(x.shape[0], -1))[:, 0]


class MLPVAE(nn.Module):
  """The MNIST VAE of PyTorch's examples (784-400-(20, 20)-400-784) with a
  Bernoulli decoder: `decode` returns the pixel means mapped to [-1, 1].

  Images enter in [-1, 1] and are mapped to [0, 1], the decoder's
  Bernoulli range, inside `encode`.
  """

  latent_dim: int = 20
  hidden: int = 400
  image_shape: tuple[int, int, int] = (28, 28, 1)

  def setup(self):
    self.fc1 = nn.Dense(self.hidden)
    self.fc21 = nn.Dense(self.latent_dim)
    self.fc22 = nn.Dense(self.latent_dim)
    self.fc3 = nn.Dense(self.hidden)
    self.fc4 = nn.Dense(int(np.prod(self.image_shape)))

  def encode(self, x):
    """(mu, logvar) of q(z | x)."""
    h = nn.relu(self.fc1((x.reshape(x.shape[0], -1) + 1) / 2))
    return self.fc21(h), self.fc22(h)

  def decode_logits(self, z):
    """Bernoulli logits of p(x | z), flat (B, H*W*C)."""
    return self.fc4(nn.relu(self.fc3(z)))

  def decode(self, z):
    """The decoder's mean image in [-1, 1]."""
    probs = jax.nn.sigmoid(self.decode_logits(z))
    return (2 * probs - 1).reshape(z.shape[0], *self.image_shape)

  def __call__(self, x, key):
    """(logits of the reconstruction, mu, logvar), z drawn with `key`."""
    mu, logvar = self.encode(x)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
    return self.decode_logits(z), mu, logvar


def _state_dict_layers(path: str, shapes: Sequence[tuple[int, ...]]) -> list:
  """The Linear and convolution layers of a PyTorch state dict saved as
  `.npz` (keys with `/` for `.`), in file order, checked against `shapes`
  (PyTorch's: (out, in) or (out, in, kh, kw)), as Flax {"kernel", "bias"}
  dicts (Linear weights transposed, OIHW convolution kernels as HWIO)."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"No weights at {path!r}: pass the path of the pretrained MNIST "
      "model's .npz, or let experiments/feature_unlearn.py train the "
      "generator (clear generator.weights and eval.pretrained_classifier)."
    )
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  weights = [
    k for k in arrays if k.endswith("weight") and arrays[k].ndim in (2, 4)
  ]
  found = [tuple(arrays[k].shape) for k in weights]
  if found != [tuple(s) for s in shapes]:
    held = dict(zip(weights, found, strict=True))
    raise ValueError(
      f"{path!r} holds weights {held}; expected the shapes {list(shapes)} "
      "(PyTorch's (out, in) or (out, in, kh, kw)) in this order."
    )
  layers = []
  for key in weights:
    bias_key = key[: -len("weight")] + "bias"
    if bias_key not in arrays:
      raise ValueError(f"{path!r} has {key!r} but no {bias_key!r}.")
    weight = arrays[key]
    kernel = weight.T if weight.ndim == 2 else weight.transpose(2, 3, 1, 0)
    layers.append(
      {
        "kernel": jnp.asarray(kernel, jnp.float32),
        "bias": jnp.asarray(arrays[bias_key], jnp.float32),
      }
    )
  return layers


def load_mnist_gan_generator(path: str, latent_dim: int = 64) -> dict:
  """`MLPGenerator()` parameters from `gan_mlp_generator.npz` (Linear
  64-256, 256-256, 256-784)."""
  shapes = [(256, latent_dim), (256, 256), (784, 256)]
  layers = _state_dict_layers(path, shapes)
  return {f"Dense_{i}": layer for i, layer in enumerate(layers)}


def load_mnist_vae(path: str) -> dict:
  """`MLPVAE()` parameters from `vae_mlp.npz` (fc1 784-400, fc21 and fc22
  400-20 for mu and logvar, in that order, fc3 20-400, fc4 400-784)."""
  shapes = [(400, 784), (20, 400), (20, 400), (400, 20), (784, 400)]
  layers = _state_dict_layers(path, shapes)
  return dict(zip(("fc1", "fc21", "fc22", "fc3", "fc4"), layers, strict=True))


def load_mnist_lenet5(path: str) -> dict:
  """`LeNet5()` parameters from `lenet5_classifier.npz` (conv c1 6@5x5, c3
  16@5x5, c5 120@5x5, Linear f6 120-84, f7 84-10)."""
  shapes = [
    (6, 1, 5, 5),
    (16, 6, 5, 5),
    (120, 16, 5, 5),
    (84, 120),
    (10, 84),
  ]
  layers = _state_dict_layers(path, shapes)
  return dict(zip(("c1", "c3", "c5", "f6", "f7"), layers, strict=True))


GENERATORS = {
  "mlp_gan": (MLPGenerator, MLPDiscriminator),
  "conv_gan": (ConvGenerator, ConvDiscriminator),
}

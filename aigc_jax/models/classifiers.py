"""Image classifiers: the CIFAR ResNet-18, a small CNN and LeNet-5.

All map NHWC images in [-1, 1] to logits; `return_features=True` also returns
the penultimate activations (used for Fréchet distances in feature space).
"""

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.models.conv import Conv


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm and an identity or 1x1 projection shortcut."""

  channels: int
  stride: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, train: bool):
    bn = partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      dtype=self.dtype,
    )
    conv = partial(Conv, use_bias=False, dtype=self.dtype)
    h = conv(self.channels, (3, 3), self.stride)(x)
    h = nn.relu(bn()(h))
    h = conv(self.channels, (3, 3))(h)
    h = bn()(h)
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = conv(self.channels, (1, 1), self.stride)(x)
      x = bn()(x)
    return nn.relu(h + x)


class ResNet18(nn.Module):
  """The CIFAR ResNet-18 of the unlearnable-examples literature.

  3x3 stem with no max-pool, [2, 2, 2, 2] BasicBlocks of 64-512 channels,
  global average pooling, linear head (kuangliu/pytorch-cifar). Torchvision's
  ImageNet ResNet-18 behaves differently on unlearnable data
  (HanxunH/Unlearnable-Examples#1), hence this variant.
  """

  num_classes: int = 10
  width: int = 64
  # The compute dtype ("bfloat16": mixed precision, parameters, BatchNorm
  # statistics and logits stay float32).
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    h = Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype, name="stem")(
      x
    )
    h = nn.BatchNorm(
      use_running_average=not train, momentum=0.9, dtype=self.dtype
    )(h)
    h = nn.relu(h)
    for i, mult in enumerate((1, 2, 4, 8)):
      for j in range(2):
        stride = 2 if i > 0 and j == 0 else 1
        h = BasicBlock(
          self.width * mult, stride, self.dtype, name=f"layer{i + 1}_{j}"
        )(h, train)
    features = h.astype(jnp.float32).mean(axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="head")(features)
    return (logits, features) if return_features else logits


class SmallCNN(nn.Module):
  """Two conv blocks and an MLP head: fast enough for digits on a CPU.

  `norm=True` adds BatchNorm after every conv and the hidden dense layer:
  without it, the net stays at chance under adversarial training or UEraser
  on CIFAR-10 (loss 2.303 for all of 20 epochs in
  `unlearnable.py:cifar10_small`; under UEraser every hidden unit's ReLU
  dies within 20 steps).
  """

  num_classes: int = 10
  width: int = 32
  dropout: float = 0.0
  norm: bool = False
  dtype: str = "float32"  # the convolutions' compute dtype, as ResNet18's

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    h = x
    for i, mult in enumerate((1, 2)):
      for part in "ab":
        h = Conv(
          self.width * mult, (3, 3), dtype=self.dtype, name=f"conv{i}{part}"
        )(h)
        if self.norm:
          h = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            dtype=self.dtype,
            name=f"bn{i}{part}",
          )(h)
        h = nn.relu(h)
      if min(h.shape[1:3]) >= 2:
        h = nn.avg_pool(h, (2, 2), (2, 2))
    h = h.reshape(h.shape[0], -1).astype(jnp.float32)
    h = nn.Dense(4 * self.width, name="fc")(h)
    if self.norm:
      # Without it every fc unit's ReLU dies within 20 steps of UEraser's
      # max-over-views loss on CIFAR-10, and the net never leaves chance.
      h = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, name="bn_fc"
      )(h)
    features = nn.relu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, name="head")(h)
    return (logits, features) if return_features else logits


class LeNet5(nn.Module):
  """LeNet-5 of the pretrained MNIST classifier (`load_mnist_lenet5`).

  Conv 6@5x5, ReLU, max-pool 2; conv 16@5x5, ReLU, max-pool 2; conv
  120@5x5, ReLU; dense 84, ReLU; dense `num_classes`. It was trained on
  1x32x32 digits in [0, 1]: 28x28 inputs are zero-padded by 2 (the
  background, -1 in this library's range) and rescaled here. The features
  are the 84 activations of the hidden dense layer.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    del train  # no dropout or normalisation
    if x.shape[1:3] == (28, 28):
      x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    if x.shape[1:] != (32, 32, 1):
      raise ValueError(
        f"LeNet5 takes 28x28 or 32x32 grey images, got {x.shape[1:]}; "
        "resize the digits first."
      )
    h = (x + 1) / 2
    for name, channels in (("c1", 6), ("c3", 16)):
      h = nn.relu(Conv(channels, (5, 5), padding="VALID", name=name)(h))
      h = nn.max_pool(h, (2, 2), (2, 2))
    h = nn.relu(Conv(120, (5, 5), padding="VALID", name="c5")(h))
    features = nn.relu(nn.Dense(84, name="f6")(h.reshape(h.shape[0], -1)))
    logits = nn.Dense(self.num_classes, name="f7")(features)
    return (logits, features) if return_features else logits


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
  "lenet5": LeNet5,
  "resnet18": ResNet18,
  "small_cnn": SmallCNN,
}


def make_classifier(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a classifier by name: one of `CLASSIFIERS`."""
  if name not in CLASSIFIERS:
    raise ValueError(
      f"Unknown classifier {name!r}; choose one of {sorted(CLASSIFIERS)}."
    )
  return CLASSIFIERS[name](num_classes=num_classes, **kwargs)


def count_params(params) -> int:
  """The number of scalars in a parameter pytree."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))


class ContrastiveNet(nn.Module):
  """A classifier's backbone with SimCLR's projection head, and BYOL's
  predictor when `predictor` is set.

  Returns (features h, projection z, prediction p); p is z without a
  predictor. The backbone's own classification head is not used.
  """

  backbone: nn.Module
  proj_dim: int = 128
  hidden: int = 512
  predictor: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, h = self.backbone(x, train=train, return_features=True)

    def mlp(v, name):
      v = nn.relu(nn.Dense(self.hidden, name=f"{name}_hidden")(v))
      return nn.Dense(self.proj_dim, name=f"{name}_out")(v)

    z = mlp(h, "projector")
    p = mlp(z, "predictor") if self.predictor else z
    return h, z, p

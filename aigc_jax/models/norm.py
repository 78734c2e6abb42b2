"""Group normalisation whose statistics XLA:CPU reduces at memory speed.

Flax's `nn.GroupNorm` reshapes NHWC activations to (B, H, W, G, C/G) and
reduces over axes (1, 2, 4). XLA:CPU runs that mixed strided reduction an
order of magnitude slower than PyTorch: 7.2 ms forward for 8 x 32x32x128
(the CIFAR-10 DDPM's width) against PyTorch's 0.5 ms (jax 0.10.2, 2
cores), and the DDPM UNet has two per ResNet block. Reducing over the
pixels first, a (B, P, C) -> (B, C) sum with channels contiguous, then
over the C/G channels of each group takes 0.6 ms, and the gradient 1.6 ms
against 6.4 ms (Wu & He, 2018, eq. 1-3; same statistics, same parameters).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(
  x: jax.Array,
  num_groups: int,
  scale: jax.Array,
  bias: jax.Array,
  epsilon: float = 1e-6,
  dtype=None,
) -> jax.Array:
  """GroupNorm of channels-last `x` (B, ..., C): each sample's channels in
  `num_groups` groups, normalised over the group's channels and all
  positions, then scaled and shifted per channel.

  Statistics in float32 with Flax's fast variance E[x²] - E[x]² (clipped at
  0), whatever the input's dtype; the result has `dtype`, by default the
  promoted dtype of `x` and `scale`, as in Flax.
  """
  b, c = x.shape[0], x.shape[-1]
  if c % num_groups:
    raise ValueError(
      f"{c} channels do not split into {num_groups} groups; choose a "
      "num_groups that divides the channel count."
    )
  pixels = x.reshape(b, -1, c).astype(jnp.float32)
  count = pixels.shape[1] * (c // num_groups)

  def group_mean(v):  # (B, P, C) -> (B, G, 1): pixels first, then channels
    per_channel = v.sum(axis=1).reshape(b, num_groups, -1)
    return per_channel.sum(axis=-1, keepdims=True) / count

  mean = group_mean(pixels)
  var = jnp.maximum(group_mean(jnp.square(pixels)) - jnp.square(mean), 0.0)
  inv = jax.lax.rsqrt(var + epsilon)
  # y = x * a + (bias - mean * a), a = scale / σ: one fused pass over x.
  per_channel = lambda v: jnp.broadcast_to(v, (b, num_groups, c // num_groups))
  a = per_channel(inv).reshape(b, c) * scale
  shift = bias - per_channel(mean).reshape(b, c) * a
  expand = (b,) + (1,) * (x.ndim - 2) + (c,)
  out = x * a.reshape(expand) + shift.reshape(expand)
  return out.astype(dtype or jnp.promote_types(x.dtype, scale.dtype))


class GroupNorm(nn.Module):
  """`nn.GroupNorm(num_groups, epsilon)` with the same parameters
  (`scale`, `bias`; checkpoints load either way), computed by
  `group_norm`."""

  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = None  # of the output; statistics are always float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(
      x, self.num_groups, scale, bias, self.epsilon, dtype=self.dtype
    )

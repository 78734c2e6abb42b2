"""The DDPM UNet of Ho et al. (2020), Appendix B, in Flax linen.

Layer for layer the network of the original TensorFlow code and its PyTorch
port (pesser/pytorch_diffusion `Model`): sinusoidal timestep embedding, wide
ResNet blocks with a timestep projection, single-head self-attention at the
chosen resolutions, GroupNorm and swish. The CIFAR-10 configuration
(`DDPM_CIFAR10`) has 35.7M parameters. Inputs and outputs are NHWC; the
output is ε̂ with the input's shape.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.models.conv import Conv
from aigc_jax.models.norm import GroupNorm


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Transformer sinusoids of the timestep, Ho et al. (2020) §4 (sin | cos)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / (half - 1))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv twice, with the timestep added in between."""

  out_channels: int
  dropout: float
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    norm = lambda name: GroupNorm(self.num_groups, dtype=self.dtype, name=name)
    conv = lambda k, name: Conv(
      self.out_channels, k, dtype=self.dtype, name=name
    )
    h = nn.swish(norm("norm1")(x))
    h = conv((3, 3), "conv1")(h)
    temb = nn.Dense(self.out_channels, dtype=self.dtype, name="temb_proj")(
      nn.swish(temb)
    )
    h = nn.swish(norm("norm2")(h + temb[:, None, None, :]))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv((3, 3), "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv((1, 1), "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all pixels, with a residual."""

  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    conv = lambda name: Conv(c, (1, 1), dtype=self.dtype, name=name)
    y = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
    q, k, v = (conv(n)(y).reshape(b, h * w, c) for n in "qkv")
    # Logits and softmax in float32 whatever the computation dtype.
    logits = jnp.einsum(
      "bic,bjc->bij", q, k, preferred_element_type=jnp.float32
    )
    weights = jax.nn.softmax(logits / math.sqrt(c), axis=-1).astype(v.dtype)
    y = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
    return x + conv("proj_out")(y)


class Downsample(nn.Module):
  """Stride-2 3x3 conv with TensorFlow's asymmetric (0, 1) padding."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv(
      x.shape[-1], (3, 3), (2, 2), padding="VALID", dtype=self.dtype,
      name="conv",
    )(x)  # fmt: skip


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
    return Conv(c, (3, 3), dtype=self.dtype, name="conv")(x)


class DDPMUNet(nn.Module):
  """ε_θ(x_t, t) of Ho et al. (2020).

  Attributes:
    ch: base channel count.
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: ResNet blocks per level on the way down.
    attn_resolutions: spatial sizes at which self-attention is applied.
    dropout: dropout rate inside ResNet blocks (active when train=True).
    num_groups: GroupNorm groups (32 in the paper).
    out_channels: output channels; the input's channels when None.
    dtype: the computation's dtype (`jnp.bfloat16` on accelerators);
      parameters, GroupNorm statistics, attention logits and the output
      stay float32.
    remat: recompute each ResNet and attention block's activations in the
      backward pass instead of keeping them (`nn.remat`): less memory for
      a training or PGD step, about one more forward pass of compute. The
      parameters and the function are the same.
  """

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  num_groups: int = 32
  out_channels: int | None = None
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    """Predicts ε̂ for x_t (B, H, W, C) at integer timesteps t (B,)."""
    if x.ndim != 4:
      raise ValueError(f"DDPMUNet expects NHWC images, got shape {x.shape}.")
    size = x.shape[1]
    if x.shape[1] != x.shape[2] or size % 2 ** (len(self.ch_mult) - 1):
      raise ValueError(
        f"Image size {x.shape[1:3]} must be square and divisible by "
        f"2^{len(self.ch_mult) - 1} for ch_mult={self.ch_mult}."
      )
    dtype = self.dtype
    # `train` (argument 3, counting self) is a Python bool: static.
    resnet_block = (
      nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock
    )
    attn_block = nn.remat(AttnBlock) if self.remat else AttnBlock
    block = lambda c, name: resnet_block(
      c, self.dropout, self.num_groups, dtype, name=name
    )
    attn = lambda name: attn_block(self.num_groups, dtype, name=name)

    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(4 * self.ch, dtype=dtype, name="temb_dense0")(temb)
    temb = nn.Dense(4 * self.ch, dtype=dtype, name="temb_dense1")(
      nn.swish(temb)
    )

    hs = [Conv(self.ch, (3, 3), dtype=dtype, name="conv_in")(x)]
    res = size
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = block(self.ch * mult, f"down_{level}_block_{i}")(
          hs[-1], temb, train
        )
        if res in self.attn_resolutions:
          h = attn(f"down_{level}_attn_{i}")(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        hs.append(Downsample(dtype, name=f"down_{level}_downsample")(hs[-1]))
        res //= 2

    h = hs[-1]
    h = block(h.shape[-1], "mid_block_1")(h, temb, train)
    h = attn("mid_attn_1")(h)
    h = block(h.shape[-1], "mid_block_2")(h, temb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = block(self.ch * mult, f"up_{level}_block_{i}")(h, temb, train)
        if res in self.attn_resolutions:
          h = attn(f"up_{level}_attn_{i}")(h)
      if level != 0:
        h = Upsample(dtype, name=f"up_{level}_upsample")(h)
        res *= 2

    h = nn.swish(GroupNorm(self.num_groups, dtype=dtype, name="norm_out")(h))
    out = self.out_channels or x.shape[-1]
    return Conv(out, (3, 3), dtype=dtype, name="conv_out")(h).astype(x.dtype)


# Ho et al. (2020) CIFAR-10: 35.7M parameters.
DDPM_CIFAR10: dict[str, Any] = dict(
  ch=128,
  ch_mult=(1, 2, 2, 2),
  num_res_blocks=2,
  attn_resolutions=(16,),
  dropout=0.1,
  num_groups=32,
)

"""`nn.Conv` whose kernel gradient is a sum of matrix products on a CPU.

XLA:CPU computes a convolution's kernel gradient (a convolution that
contracts over batch and space) several times slower than PyTorch's
oneDNN: a 3x3, 128-channel convolution on 128 16x16 images takes 0.71 s
for ∂L/∂W against 0.16 s for the forward pass (jax 0.10.2, 2 cores). The
same gradient written as one matrix product per kernel tap,

  ∂L/∂W[i, j] = Σ_{b,y,x} x_pad[b, s·y + i, s·x + j, :]ᵀ g[b, y, x, :],

runs in 0.21 s, at the speed of the matrix multiply. `Conv` is Flax's
`nn.Conv` with that gradient on the CPU; the input gradient and the
forward pass are XLA's own, and other backends (cuDNN, TPU) use the plain
convolution throughout.

Being a `jax.custom_vjp`, it supports `grad` (to any order) and `vmap` but
not forward mode (`jax.jvp`, `jax.jacfwd`) on the CPU; a model that needs
forward mode there can be built with `nn.Conv` (the parameters are the same).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(
    x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_kernel_grad(x, w, strides, pads, precision):
  return _plain_conv(x, w, strides, pads, precision)


def _forward(x, w, strides, pads, precision):
  return _plain_conv(x, w, strides, pads, precision), (x, w)


def _backward(strides, pads, precision, residuals, g):
  x, w = residuals
  # ∂L/∂x through XLA's own transpose (the forward it re-traces is dead
  # code and removed).
  _, vjp_x = jax.vjp(lambda v: _plain_conv(v, w, strides, pads, precision), x)
  (dx,) = vjp_x(g)
  kh, kw, c, o = w.shape
  b, ho, wo, _ = g.shape
  sh, sw = strides
  padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  g_rows = g.reshape(-1, o)
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(
        padded,
        (0, i, j, 0),
        (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
        (1, sh, sw, 1),
      )
      taps.append(jnp.dot(window.reshape(-1, c).T, g_rows, precision=precision))
  dw = jnp.stack(taps).reshape(kh, kw, c, o).astype(w.dtype)
  return dx, dw


_conv_matmul_kernel_grad.defvjp(_forward, _backward)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides: Sequence[int],
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  precision=None,
  **kwargs,
):
  """`lax.conv_general_dilated`, with the matmul kernel gradient for plain
  2-D NHWC convolutions on the CPU (anything else goes to XLA as is)."""
  plain = (
    jax.default_backend() == "cpu"
    and lhs.ndim == 4
    and feature_group_count == 1
    and all(d == 1 for d in lhs_dilation or ())
    and all(d == 1 for d in rhs_dilation or ())
    and not kwargs
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  )
  if plain:
    pads = padding
    if isinstance(padding, str):
      pads = lax.padtype_to_pads(
        lhs.shape[1:3], rhs.shape[:2], window_strides, padding
      )
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    plain = all(lo >= 0 and hi >= 0 for lo, hi in pads)
  if not plain:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kwargs,
    )
  return _conv_matmul_kernel_grad(
    lhs, rhs, tuple(window_strides), pads, precision
  )


# Flax's convolution with the CPU-friendly kernel gradient: same parameters,
# same forward pass.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)

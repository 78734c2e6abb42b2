"""The cross-attention key/value projections that concept editors rewrite.

In diffusers' Flax UNet every transformer block's cross-attention is
`.../transformer_blocks_<k>/attn2` with Dense layers named `to_k` and `to_v`
(no bias) whose kernels map the text embedding (width d) to the layer's
inner width. Flax kernels are the transposed PyTorch weights: K = Wᵀ, shape
(d, out), y = c K for a token embedding row c. SD v1.4 has 16 such blocks,
so 32 kernels.

Projections are a flat dict {"<block>/.../attn2/to_k": kernel}, ordered as
the UNet's parameters are (down blocks, mid block, up blocks), so a pytree
of them goes straight through `jax.tree.map`, `jax.vmap` and `jax.jit`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_SEP = "/"


def _is_projection(path: tuple[str, ...]) -> bool:
  return (
    len(path) >= 3
    and path[-3] == "attn2"
    and path[-2] in ("to_k", "to_v")
    and path[-1] == "kernel"
  )


def _block_order(path: tuple[str, ...]):
  """Down blocks, then the mid block, then up blocks; numbers numerically."""
  rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

  def part(p: str):
    head, _, number = p.rpartition("_")
    return (head, int(number)) if head and number.isdigit() else (p, -1)

  return (rank.get(part(path[0])[0], 3), *map(part, path))


def projection_names(unet_params: dict) -> list[str]:
  """The names of every cross-attention `to_k`/`to_v` kernel, in UNet order.

  Raises:
    ValueError: when the tree has none (not a UNet2DCondition param tree).
  """
  flat = traverse_util.flatten_dict(unet_params)
  paths = sorted((p for p in flat if _is_projection(p)), key=_block_order)
  if not paths or "unet" in unet_params:
    raise ValueError(
      "No cross-attention projections (…/attn2/to_k|to_v/kernel) in these "
      "parameters: pass the UNet's params (params['unet']), not the whole "
      "Stable Diffusion dict or another model's."
    )
  return [_SEP.join(p[:-1]) for p in paths]


def read_projections(unet_params: dict) -> dict[str, jax.Array]:
  """{name: kernel (d, out)} of every cross-attention key/value projection."""
  flat = traverse_util.flatten_dict(unet_params)
  return {
    name: flat[(*name.split(_SEP), "kernel")]
    for name in projection_names(unet_params)
  }


def write_projections(
  unet_params: dict, projections: dict[str, jax.Array]
) -> dict:
  """A copy of `unet_params` with the given kernels replaced (pure).

  Raises:
    KeyError: for a name that is not a projection of these parameters.
  """
  flat = dict(traverse_util.flatten_dict(unet_params))
  known = set(projection_names(unet_params))
  for name, kernel in projections.items():
    if name not in known:
      raise KeyError(
        f"{name!r} is not a cross-attention projection of this UNet; "
        "names come from `projection_names(unet_params)`."
      )
    path = (*name.split(_SEP), "kernel")
    if kernel.shape != flat[path].shape:
      raise ValueError(
        f"Kernel {name!r} has shape {kernel.shape}, the UNet's is "
        f"{flat[path].shape}: kernels are in Flax orientation (in, out)."
      )
    flat[path] = kernel
  return traverse_util.unflatten_dict(flat)


# (block, number of cross-attention blocks, inner width) of SD v1.4's UNet.
SD14_CROSS_ATTENTION = (
  ("down_blocks_0", 2, 320),
  ("down_blocks_1", 2, 640),
  ("down_blocks_2", 2, 1280),
  ("mid_block", 1, 1280),
  ("up_blocks_1", 3, 1280),
  ("up_blocks_2", 3, 640),
  ("up_blocks_3", 3, 320),
)
SD14_TEXT_WIDTH = 768


def sd14_random_projections(seed: int = 0) -> dict[str, jax.Array]:
  """Random kernels named and shaped as SD v1.4's 32 cross-attention ones."""
  rng = np.random.default_rng(seed)
  kernels = {}
  for block, count, width in SD14_CROSS_ATTENTION:
    for j in range(count):
      for kv in ("to_k", "to_v"):
        name = f"{block}/attentions_{j}/transformer_blocks_0/attn2/{kv}"
        kernels[name] = jnp.asarray(
          rng.normal(size=(SD14_TEXT_WIDTH, width)) / np.sqrt(SD14_TEXT_WIDTH),
          jnp.float32,
        )
  return kernels

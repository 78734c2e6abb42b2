"""Cross-attention maps of diffusers' Flax UNet, differentiable.

`FlaxAttention` does not return its probabilities, so the UNet is applied
with `capture_intermediates` on the `attn2` query and key projections and
the maps are recomputed: A = softmax(q_h k_hᵀ / √d_head) per head. Gradients
flow through them to every parameter, the projections included.
"""

import jax
import jax.numpy as jnp
from flax import traverse_util


def cross_attention_maps(
  model, unet_params, latents: jax.Array, t: jax.Array, context: jax.Array
) -> dict[str, jax.Array]:
  """{block path: A (B, heads, H·W, tokens)} of every cross-attention layer.

  Args:
    model: a `StableDiffusion`.
    unet_params: the UNet's parameters.
    latents: NCHW latents x_t.
    t: (B,) timesteps.
    context: (B, tokens, d) text embeddings.
  """
  heads = {}

  def capture(module, method_name):
    path = module.path
    if method_name == "__call__" and path[-2:] in (
      ("attn2", "to_q"),
      ("attn2", "to_k"),
    ):
      heads[path[:-1]] = module.parent.heads
      return True
    return False

  _, state = model.unet.apply(
    {"params": unet_params},
    latents,
    t,
    context,
    capture_intermediates=capture,
    mutable=["intermediates"],
  )
  flat = traverse_util.flatten_dict(state["intermediates"])
  maps = {}
  for layer, h in heads.items():
    q = flat[(*layer, "to_q", "__call__")][0]
    k = flat[(*layer, "to_k", "__call__")][0]
    q = q.reshape(*q.shape[:2], h, -1)
    k = k.reshape(*k.shape[:2], h, -1)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    maps["/".join(layer)] = jax.nn.softmax(logits, axis=-1)
  return maps

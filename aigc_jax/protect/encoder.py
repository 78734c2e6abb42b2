"""Encoder attacks on latent diffusion: perturb the pixels so that the VAE
encodes the protected image somewhere else.

A latent model is fine-tuned on E(x + δ), never on x + δ itself, so a δ that
moves the latent moves everything the trainer learns. Two forms, both
objectives for the one PGD loop (`aigc_jax.protect.pgd`):

* toward a target latent, descended: PhotoGuard's encoder attack (Salman et
  al. 2023, Eq. 4, ‖E(x + δ) − z_target‖²) and Mist's textural loss (Liang
  & Wu 2023, with a texture image as the target);
* away from the clean latent, ascended: the untargeted form, which moves
  latents furthest per unit of budget when no target is wanted.

With `encode` the VAE's reconstruction D(E(·)) and a target image as the
reference, the same objective moves what the decoder renders rather than
the latent itself (the `decoded_target` reading): PhotoGuard's encoder
attack measured where the trainer's samples are seen, in pixels.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aigc_jax.protect.pgd import Objective


def latent_distance_objective(
  encode: Callable[[jax.Array], jax.Array], reference: jax.Array
) -> Objective:
  """`objective(x_adv, key) -> (B,)`: the mean squared distance of each
  protected image's latent `encode(x_adv)` to its row of `reference`.

  Descend it with `reference` a target latent (toward: PhotoGuard, Mist);
  ascend it with `reference = encode(x)` (away from the clean latent).

  Args:
    encode: images ([-1, 1] NHWC) -> latents, differentiable (e.g.
      `aigc_jax.sd.encode_images` with the VAE's parameters bound); a
      deterministic encoder (posterior mean), so the key is not used.
    reference: (B, ...) latents, one per image, or one latent broadcast to
      every image.
  """

  def objective(x_adv, key):
    del key
    diff = encode(x_adv) - reference
    return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)

  return objective


def nearest_anchors(x: jax.Array, anchors: jax.Array) -> jax.Array:
  """For each image of `x`, the nearest (in pixel L2) of `anchors`, images of
  another concept: the targets of Nightshade's poison (Shan et al. 2024,
  arXiv 2310.13828, Sec. 5.2, there generated from the anchor concept's
  prompt), paired by proximity so that each image needs the least change.
  """
  x, a = x.reshape(x.shape[0], -1), anchors.reshape(anchors.shape[0], -1)
  # ‖x − a‖² up to the term in x alone, which does not change the argmin.
  distance = jnp.sum(a**2, -1)[None] - 2 * x @ a.T
  return anchors[jnp.argmin(distance, axis=-1)]

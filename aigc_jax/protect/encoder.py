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

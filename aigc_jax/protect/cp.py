"""Contrastive poisoning, CP (He, Zha and Katabi, ICLR 2023, arXiv
2202.11202, Alg. 1): error-minimising noise against a contrastive
learner,

  min_δ min_θ  L_CL(θ; {x_i + δ_i}),

sample-wise (CP-S) or one δ per class (CP-C, `groups=labels` in `pgd`). As
for EMN, the alternation with encoder steps is the experiment's; here is the
objective for `pgd(objective, ..., ascent=False)`: the contrastive loss of
two random views of the perturbed batch, with the augmentation inside the
gradient (the original's differentiable kornia pipeline).
"""

from collections.abc import Callable

import jax

# pair_losses(view1, view2) -> (B,), e.g. `aigc_jax.train.contrastive_losses`
# with the encoder's state bound.
PairLosses = Callable[[jax.Array, jax.Array], jax.Array]
Augment = Callable[[jax.Array, jax.Array], jax.Array]


def contrastive_objective(pair_losses: PairLosses, augment: Augment):
  """`objective(x_adv, key) -> (B,)`: each example's contrastive loss on
  two views `augment(k1, x_adv)`, `augment(k2, x_adv)`."""

  def objective(x_adv, key):
    k1, k2 = jax.random.split(key)
    return pair_losses(augment(k1, x_adv), augment(k2, x_adv))

  return objective

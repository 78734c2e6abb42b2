"""Error-minimising noise for classifiers: EMN (Huang et al., ICLR 2021,
arXiv 2101.04898, Eq. 2) and REMN, its robust variant (Fu et al., ICLR 2022,
arXiv 2203.14533, Eq. 4).

Both are objectives for the shared PGD loop, descended (`ascent=False`):

  EMN:   min_δ  CE(f_θ(x + δ), y)
  REMN:  min_δ  E_{T} max_{‖δ'‖ ≤ ρ_a} CE(f_θ(T(x + δ) + δ'), y)

alternated with model steps on the protected data (min-min, or min-min-max
for REMN, whose model trains adversarially). The alternation is the
experiment's; here are the objectives, for `pgd(objective, ..., ascent=False)`.
Sample-wise noise is per example; class-wise noise passes `groups=labels` to
`pgd` to share one δ per class.

REMN's inner max is the same PGD loop, ascending; its gradient with respect
to δ is taken at the attack's end point with the attack held fixed (Danskin's
theorem, as the original's straight-through `def_x ⊙ g`).
"""

from collections.abc import Callable

import jax
import optax

from aigc_jax.protect.pgd import Budget, init_perturbation, pgd

LogitsFn = Callable[[jax.Array], jax.Array]
Augment = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy_objective(logits_fn: LogitsFn, labels: jax.Array):
  """`objective(x_adv, key) -> (B,)`, the per-example cross-entropy of
  `logits_fn` (a classifier with its parameters bound, evaluation mode)."""

  def objective(x_adv, key):
    del key
    return optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(x_adv), labels
    )

  return objective


def robust_objective(
  logits_fn: LogitsFn,
  labels: jax.Array,
  *,
  augment: Augment,
  attack_budget: Budget,
  attack_steps: int,
  attack_step_size: float,
  num_augmentations: int = 5,
  unroll: int | bool = 1,
):
  """REMN's objective: the cross-entropy after a random augmentation and a
  worst-case attack of radius `attack_budget` (PGD ascent with a random
  start), averaged over `num_augmentations` draws of the augmentation."""
  ce = cross_entropy_objective(logits_fn, labels)

  def one_draw(x_adv, key):
    aug_key, start_key, attack_key = jax.random.split(key, 3)
    x_aug = augment(aug_key, x_adv)
    start = init_perturbation(
      start_key, x_aug.shape, attack_budget, random_start=True
    )
    attack, _ = pgd(
      ce,
      jax.lax.stop_gradient(x_aug),
      start,
      attack_key,
      budget=attack_budget,
      steps=attack_steps,
      step_size=attack_step_size,
      unroll=unroll,
    )
    attacked = x_aug + jax.lax.stop_gradient(attack)
    return ce(attacked.clip(-1.0, 1.0), key)

  def objective(x_adv, key):
    keys = jax.random.split(key, num_augmentations)
    return jax.vmap(one_draw, in_axes=(None, 0))(x_adv, keys).mean(axis=0)

  return objective

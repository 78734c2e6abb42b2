"""Perturbations a data owner adds so that models cannot learn the data."""

from aigc_jax.protect.cp import contrastive_objective
from aigc_jax.protect.emn import (
  cross_entropy_objective,
  robust_objective,
)
from aigc_jax.protect.lsp import lsp_perturbations
from aigc_jax.protect.pgd import (
  LEVELS_PER_UNIT,
  NORMS,
  Budget,
  apply_perturbation,
  budget,
  init_perturbation,
  perturbation_sizes,
  pgd,
  project,
  quantize_protected,
  random_perturbation,
)
from aigc_jax.protect.udp import (
  EUDP_POLICIES,
  denoising_objective,
  eudp_policy,
  udp_perturbation,
)

__all__ = [
  "EUDP_POLICIES",
  "LEVELS_PER_UNIT",
  "NORMS",
  "Budget",
  "apply_perturbation",
  "budget",
  "contrastive_objective",
  "cross_entropy_objective",
  "denoising_objective",
  "eudp_policy",
  "init_perturbation",
  "lsp_perturbations",
  "perturbation_sizes",
  "pgd",
  "project",
  "quantize_protected",
  "random_perturbation",
  "robust_objective",
  "udp_perturbation",
]

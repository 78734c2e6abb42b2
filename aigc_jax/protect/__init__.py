"""Perturbations a data owner adds so that models cannot learn the data."""

from aigc_jax.protect.alternation import (
  Chunk,
  Schedule,
  alternate,
  chunk_bounds,
  padded_slices,
)
from aigc_jax.protect.cp import contrastive_objective
from aigc_jax.protect.emn import (
  cross_entropy_objective,
  robust_objective,
)
from aigc_jax.protect.encoder import latent_distance_objective, nearest_anchors
from aigc_jax.protect.lsp import lsp_perturbations
from aigc_jax.protect.pgd import (
  LEVELS_PER_UNIT,
  NORMS,
  Budget,
  Objective,
  apply_perturbation,
  at_clipped_image,
  budget,
  default_unroll,
  init_perturbation,
  perturbation_sizes,
  pgd,
  project,
  quantize_protected,
  random_like,
  random_perturbation,
  step_size,
)
from aigc_jax.protect.udp import (
  EUDP_POLICIES,
  READINGS,
  Reading,
  bilevel_objective,
  denoising_objective,
  eudp_policy,
  parse_method,
  reading_objective,
  udp_perturbation,
)

__all__ = [
  "EUDP_POLICIES",
  "LEVELS_PER_UNIT",
  "NORMS",
  "READINGS",
  "Budget",
  "Chunk",
  "Objective",
  "Reading",
  "Schedule",
  "alternate",
  "apply_perturbation",
  "at_clipped_image",
  "bilevel_objective",
  "budget",
  "chunk_bounds",
  "contrastive_objective",
  "cross_entropy_objective",
  "default_unroll",
  "denoising_objective",
  "eudp_policy",
  "init_perturbation",
  "latent_distance_objective",
  "lsp_perturbations",
  "nearest_anchors",
  "padded_slices",
  "parse_method",
  "perturbation_sizes",
  "pgd",
  "project",
  "quantize_protected",
  "random_like",
  "random_perturbation",
  "reading_objective",
  "robust_objective",
  "step_size",
  "udp_perturbation",
]

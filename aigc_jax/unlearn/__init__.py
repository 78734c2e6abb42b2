"""Edits a model owner makes to unlearn: closed-form concept erasure.

`closed_form` holds the one ridge solve every editor shares and UCE; `rece`
derives adversarial embeddings and erases them too; `mace` refines the
co-existing words, trains a LoRA per concept against its attention maps and
fuses the LoRAs in closed form. `feature` unlearns a feature from a
pre-trained GAN or VAE generator by fine-tuning it toward its own
feature-free outputs.
"""

from aigc_jax.unlearn import feature, mace
from aigc_jax.unlearn.closed_form import (
  gram,
  least_squares,
  ridge_edit,
  uce_edit,
  uce_keys,
  uce_token_blocks,
)
from aigc_jax.unlearn.rece import adversarial_embedding, output_gap, rece_edit

__all__ = [
  "adversarial_embedding",
  "feature",
  "gram",
  "least_squares",
  "mace",
  "output_gap",
  "rece_edit",
  "ridge_edit",
  "uce_edit",
  "uce_keys",
  "uce_token_blocks",
]

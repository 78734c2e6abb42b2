"""Training: pure step functions for DDPMs and classifiers, and the one
resumable data-parallel loop that drives them."""

from aigc_jax.train.augment import (
  plasma,
  random_crop_flip,
  simclr_augment,
  ueraser_augment,
)
from aigc_jax.train.classifier import (
  ClassifierState,
  classifier_logits,
  classifier_optimizer,
  classifier_train_step,
  init_classifier_state,
  learning_rate_schedule,
  pgd_attack,
)
from aigc_jax.train.contrastive import (
  METHODS as CONTRASTIVE_METHODS,
)
from aigc_jax.train.contrastive import (
  ContrastiveState,
  contrastive_features,
  contrastive_losses,
  contrastive_train_step,
  init_contrastive_state,
  linear_probe_accuracy,
)
from aigc_jax.train.ddpm import (
  DDPMState,
  ddpm_eps_fn,
  ddpm_optimizer,
  ddpm_train_step,
  init_ddpm_state,
)
from aigc_jax.train.generative import (
  GANState,
  VAEState,
  gan_optimizer,
  gan_train_step,
  init_gan_state,
  init_vae_state,
  vae_loss,
  vae_train_step,
)
from aigc_jax.train.loop import (
  built_once_per_config,
  init_or_restore,
  train_loop,
  train_stage,
)

__all__ = [
  "CONTRASTIVE_METHODS",
  "ClassifierState",
  "ContrastiveState",
  "DDPMState",
  "GANState",
  "VAEState",
  "built_once_per_config",
  "classifier_logits",
  "classifier_optimizer",
  "classifier_train_step",
  "contrastive_features",
  "contrastive_losses",
  "contrastive_train_step",
  "ddpm_eps_fn",
  "ddpm_optimizer",
  "ddpm_train_step",
  "gan_optimizer",
  "gan_train_step",
  "init_classifier_state",
  "init_contrastive_state",
  "init_ddpm_state",
  "init_gan_state",
  "init_or_restore",
  "init_vae_state",
  "learning_rate_schedule",
  "linear_probe_accuracy",
  "pgd_attack",
  "plasma",
  "random_crop_flip",
  "simclr_augment",
  "train_loop",
  "train_stage",
  "ueraser_augment",
  "vae_loss",
  "vae_train_step",
]

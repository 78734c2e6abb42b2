"""The diffusion engine shared by every method: schedules, the forward process,
the denoising loss, samplers and the guided reverse step."""

from aigc_jax.diffusion.guidance import (
  EnergyFn,
  energy_gradient,
  guided_mean,
  sum_energies,
)
from aigc_jax.diffusion.loss import EpsFn, denoising_loss
from aigc_jax.diffusion.process import (
  posterior_mean,
  predict_eps,
  predict_x0,
  q_sample,
  reverse_variance,
)
from aigc_jax.diffusion.sample import (
  ddim_sample,
  ddim_timesteps,
  ddim_update,
  ddpm_mean_variance,
  ddpm_sample,
  ddpm_step,
  ddpm_update,
  diffuse_and_denoise,
)
from aigc_jax.diffusion.schedules import (
  SCHEDULES,
  NoiseSchedule,
  cosine_schedule,
  linear_schedule,
  make_schedule,
  scaled_linear_schedule,
  schedule_from_betas,
)
from aigc_jax.diffusion.timesteps import (
  TimestepPolicy,
  concept_focal_policy,
  sample_timesteps,
  signal_policy,
  snr_sampling_policy,
  snr_weight_policy,
  uniform_policy,
  window_policy,
)

__all__ = [
  "SCHEDULES",
  "EnergyFn",
  "EpsFn",
  "NoiseSchedule",
  "TimestepPolicy",
  "concept_focal_policy",
  "cosine_schedule",
  "ddim_sample",
  "ddim_timesteps",
  "ddim_update",
  "ddpm_mean_variance",
  "ddpm_sample",
  "ddpm_step",
  "ddpm_update",
  "denoising_loss",
  "diffuse_and_denoise",
  "energy_gradient",
  "guided_mean",
  "linear_schedule",
  "make_schedule",
  "posterior_mean",
  "predict_eps",
  "predict_x0",
  "q_sample",
  "reverse_variance",
  "sample_timesteps",
  "scaled_linear_schedule",
  "schedule_from_betas",
  "signal_policy",
  "snr_sampling_policy",
  "snr_weight_policy",
  "sum_energies",
  "uniform_policy",
  "window_policy",
]

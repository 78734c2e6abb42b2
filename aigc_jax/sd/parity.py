"""A loaded UNet against diffusers' PyTorch UNet of the same folder.

`load.load_stable_diffusion` converts PyTorch weights with diffusers' own
renaming rules, and the tests check the result on a tiny model; at a real
model's size the check is one forward pass of each side on the same inputs.
"""

import time

import jax
import numpy as np

from aigc_jax.sd.torchvision_fallback import import_torchvision


def unet_gap_to_pytorch(model, params, folder: str, *, batch: int = 1, seed=0):
  """One UNet forward of the Flax model and of PyTorch's, compared.

  Both run in float32 at full precision: JAX's matrix work at "highest"
  (TF32 on a GPU would add its own 1e-3 error), PyTorch on the CPU.

  Args:
    model, params: a `StableDiffusion` and its parameters, loaded from
      `folder`.
    folder: the diffusers-layout folder (its `unet/` is read by PyTorch).
    batch: latents per forward.
    seed: of the random latents, timesteps and text context.

  Returns:
    {"max_abs_error", "relative_error" (the maximum absolute error over
    the largest PyTorch output), "output_rms", "jax_seconds" (compilation
    included), "torch_seconds", "batch"}.
  """
  import torch

  import_torchvision()  # before diffusers' PyTorch classes
  from diffusers import UNet2DConditionModel

  unet = model.unet
  rng = np.random.default_rng(seed)
  size = unet.sample_size
  x = rng.normal(size=(batch, unet.in_channels, size, size)).astype(np.float32)
  t = rng.integers(0, model.schedule.num_timesteps, size=batch)
  context = rng.normal(size=(batch, 77, unet.cross_attention_dim))
  context = context.astype(np.float32)
  start = time.perf_counter()
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(
      jax.jit(unet.apply)({"params": params["unet"]}, x, t, context).sample
    )
  jax_seconds = time.perf_counter() - start
  twin = UNet2DConditionModel.from_pretrained(f"{folder}/unet").eval()
  start = time.perf_counter()
  with torch.no_grad():
    theirs = twin(
      torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)
    ).sample.numpy()
  torch_seconds = time.perf_counter() - start
  error = float(np.max(np.abs(ours - theirs)))
  return {
    "max_abs_error": error,
    "relative_error": error / float(np.max(np.abs(theirs))),
    "output_rms": float(np.sqrt(np.mean(theirs**2))),
    "jax_seconds": jax_seconds,
    "torch_seconds": torch_seconds,
    "batch": batch,
  }

"""Stable Diffusion v1.4 at its real size, from random weights.

No SD weights can be downloaded offline, but the architecture can be built:
diffusers' PyTorch UNet, VAE and CLIP text encoder with v1.4's configs
(`aigc_jax.sd.architectures.SD14`) are saved as a diffusers folder
(safetensors), loaded through the Flax loaders, one UNet forward is compared
with PyTorch's, and UCE, RECE and a guided DDIM batch at 512x512 are timed.

  python experiments/sd14.py --workdir=runs/sd14                  # v14
  python experiments/sd14.py --config=experiments/configs/sd14.py:smoke

`--config.model=PATH` runs the same on a downloaded diffusers-layout folder
(e.g. CompVis/stable-diffusion-v1-4) instead of random weights.

Variants:
  v14    SD v1.4's sizes (UNet 859.5M parameters, VAE 83.7M, text encoder
         123.1M); 8 images of 25 guided DDIM steps, float32 and bfloat16.
         On 2 CPU cores (batch 2, float32 only, one call:
         `--config.sample.batch_size=2 "--config.sample.dtypes=('float32',)"
         --config.later_calls=0`, docs/results/sd14.md): 12.6 minutes;
         UNet parity 3.9e-5 of the largest output, UCE 2.6 s and RECE 2.0 s
         (compilation included), 690 s for the 2 images. On one H100/H200
         (estimated, not yet measured): 3 to 4 minutes, most of it writing
         and reading the 4.0 GB folder and compiling.
  smoke  the same steps on `architectures.TINY` (16x16 images), for tests.

Expected: the UNet forward agrees with PyTorch's to `parity.tolerance`
(relative to the largest output) in float32; the run fails otherwise.
"""

import ml_collections

from experiments.configs.base import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "v14"
  c = base_config(variant)
  del c["data"]
  # A diffusers-layout folder; "": random weights of `architecture`,
  # written to <workdir>/model.
  c.model = ""
  c.architecture = "sd14"  # aigc_jax.sd.architectures: sd14 or tiny
  c.parity = ml_collections.ConfigDict({"batch": 1, "tolerance": 1e-4})
  # The edits: the prompts of experiments/configs/erase.py's sd14 variant,
  # in UCE's object setting (only "" preserved, erase weight 1).
  c.methods = ("uce", "rece")
  c.concepts = ("cassette player", "church", "golf ball", "parachute")
  c.erase = ("cassette player",)
  c.templates = ("an image of a {}",)
  c.target = " "
  c.preserve_kept = False
  c.uce = ml_collections.ConfigDict(
    {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": -1.0}
  )
  c.rece = ml_collections.ConfigDict(
    {
      "epochs": 1,
      "derive_lam": 0.1,
      "edit_lam": 0.1,
      "erase_scale": 1.0,
      "preserve_scale": 0.1,
    }
  )
  c.sample = ml_collections.ConfigDict(
    {
      "batch_size": 8,  # prompts, each drawn with guidance (2 UNet rows)
      "num_steps": 25,
      "guidance_scale": 7.5,
      "dtypes": ("float32", "bfloat16"),  # the modules' compute dtype
    }
  )
  c.later_calls = 2  # timed calls after the first (compiling) one
  if variant == "v14":
    pass
  elif variant == "smoke":
    c.architecture = "tiny"
    c.sample.update(batch_size=4, num_steps=2)
    c.later_calls = 1
  else:
    raise ValueError(f"Unknown variant {variant!r}; choose v14 or smoke.")
  return c

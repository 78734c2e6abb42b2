"""Flax parameters -> a diffusers-layout PyTorch folder (needs torch).

The inverse of `load.py`, for models this project trains itself: they are
saved exactly as a downloaded Stable Diffusion is, so that they load through
the same path (`load_stable_diffusion`) and open in diffusers' PyTorch
pipelines too. The UNet's and VAE's renaming is inverted from the forward
rules rather than with diffusers' `load_flax_weights_in_pytorch_model`,
whose `_1` -> `.1` rewriting also renames `time_embedding.linear_1`.

`save_random_stable_diffusion` writes the same layout with random weights
for an architecture (`architectures.SD14`): a real model's shapes when its
weights cannot be downloaded.
"""

import json
import os

import jax
import numpy as np
from flax import traverse_util

from aigc_jax import parallel, record
from aigc_jax.sd.load import abstract_params, build_unet, build_vae
from aigc_jax.sd.torchvision_fallback import import_torchvision
from aigc_jax.sd.vocabulary import write_clip_tokenizer


def _flax_to_torch_state_dict(pt_model, flax_params: dict, target: dict):
  """{PyTorch key: tensor} for `pt_model` from Flax params (forward rules
  applied to each PyTorch key, then the tensor transposed back)."""
  import torch

  import_torchvision()
  from diffusers.models.modeling_flax_pytorch_utils import (
    rename_key,
    rename_key_and_reshape_tensor,
  )

  flat_target = traverse_util.flatten_dict(target)
  flat_params = traverse_util.flatten_dict(flax_params)
  state = {}
  for pt_key, pt_tensor in pt_model.state_dict().items():
    shape_only = np.zeros(pt_tensor.shape, np.float32)
    key, _ = rename_key_and_reshape_tensor(
      tuple(rename_key(pt_key).split(".")), shape_only, flat_target
    )
    value = np.asarray(flat_params[key], np.float32)
    if key[-1] == "kernel" and value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif key[-1] == "kernel" and value.ndim == 2:
      value = value.T
    if tuple(value.shape) != tuple(pt_tensor.shape):
      raise ValueError(
        f"{pt_key}: the Flax parameter {'.'.join(key)} has shape "
        f"{value.shape} after transposition, PyTorch wants "
        f"{tuple(pt_tensor.shape)}."
      )
    state[pt_key] = torch.from_numpy(value.copy())  # writable, C order
  return state


def save_stable_diffusion(
  path: str,
  params: dict,
  *,
  unet_config: dict,
  vae_config: dict,
  text_encoder_config,
  tokenizer,
  scheduler_config: dict,
  dtype: str = "float32",
) -> None:
  """Writes unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (safetensors).

  Args:
    path: the folder to write.
    params: {"unet", "vae", "text_encoder"} Flax parameters.
    unet_config, vae_config: diffusers config dicts of the two models.
    text_encoder_config: a transformers `CLIPTextConfig`.
    tokenizer: the `CLIPTokenizer`.
    scheduler_config: the DDPM/DDIM scheduler config (betas, steps_offset).
    dtype: the stored weights' dtype ("float16" halves the folder, as SD's
      fp16 variants do; the loader computes in float32 either way).
  """
  import torch

  import_torchvision()
  from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
  from transformers import CLIPTextModel
  from transformers.modeling_flax_pytorch_utils import (
    load_flax_weights_in_pytorch_model,
  )

  for cls, config, name, build in (
    (UNet2DConditionModel, unet_config, "unet", build_unet),
    (AutoencoderKL, vae_config, "vae", build_vae),
  ):
    pt_model = cls.from_config(config)
    state = _flax_to_torch_state_dict(
      pt_model, params[name], abstract_params(build(dict(config)))
    )
    pt_model.load_state_dict(state, strict=True)
    pt_model.to(getattr(torch, dtype)).save_pretrained(os.path.join(path, name))
  encoder = CLIPTextModel(text_encoder_config)
  # Writable numpy copies: torch warns on the read-only views of jax arrays.
  load_flax_weights_in_pytorch_model(
    encoder, jax.tree.map(np.array, params["text_encoder"])
  )
  encoder.to(getattr(torch, dtype)).save_pretrained(
    os.path.join(path, "text_encoder")
  )
  tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
  DDIMScheduler.from_config(scheduler_config).save_pretrained(
    os.path.join(path, "scheduler")
  )
  write_model_index(path)


def write_model_index(path: str) -> None:
  """`model_index.json`, the file diffusers' pipelines open a folder by;
  written last and atomically, so it marks a complete folder."""
  index = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
  }
  record.atomic_write(
    os.path.join(path, "model_index.json"),
    lambda f: f.write(json.dumps(index, indent=1).encode()),
  )


def save_random_stable_diffusion(
  path: str, architecture: dict, corpus: list[str], *, seed: int = 0
) -> None:
  """A Stable Diffusion folder of random weights, as diffusers saves one.

  The UNet, VAE and text encoder are diffusers' and transformers' PyTorch
  classes at their own initialisation (seeded), saved as safetensors; the
  tokenizer is learned on `corpus` (`vocabulary.write_clip_tokenizer`). The
  folder loads through `load.load_stable_diffusion` as a downloaded one
  does: what a test or a benchmark at a real model's size needs when its
  weights cannot be downloaded. A folder with `model_index.json` (written
  last) is complete and left as it is; process 0 writes the models.

  Args:
    path: the folder to write.
    architecture: {"unet", "vae", "text_encoder", "scheduler"} keyword
      arguments (`architectures.SD14`, `architectures.TINY`).
    corpus: prompts whose words the tokenizer keeps whole.
    seed: torch's seed for the weights.
  """
  if os.path.exists(os.path.join(path, "model_index.json")):
    return
  tokenizer = write_clip_tokenizer(corpus, os.path.join(path, "tokenizer"))
  if jax.process_index() == 0:
    import torch

    import_torchvision()  # before diffusers' PyTorch classes
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**architecture["unet"]).save_pretrained(
      os.path.join(path, "unet")
    )
    AutoencoderKL(**architecture["vae"]).save_pretrained(
      os.path.join(path, "vae")
    )
    text = {"vocab_size": len(tokenizer), **architecture["text_encoder"]}
    CLIPTextModel(
      CLIPTextConfig(
        **text,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
      )
    ).save_pretrained(os.path.join(path, "text_encoder"))
    DDIMScheduler(**architecture["scheduler"]).save_pretrained(
      os.path.join(path, "scheduler")
    )
    write_model_index(path)
  parallel.sync_processes(f"random stable diffusion {path}")

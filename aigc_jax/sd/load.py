"""Stable Diffusion folders (diffusers layout) -> Flax modules and parameters.

A Stable Diffusion checkpoint in diffusers' folder layout holds `unet/`,
`vae/`, `text_encoder/`, `tokenizer/` and `scheduler/`, each with its
`config.json` and PyTorch weights (`*.safetensors`, or `*.bin` pickles).
`load_stable_diffusion` builds diffusers' `FlaxUNet2DConditionModel` and
`FlaxAutoencoderKL` and transformers' `FlaxCLIPTextModel` from the configs and
converts the weights with diffusers' and transformers' PyTorch-to-Flax rules
(kernels transposed, `down_blocks.0` -> `down_blocks_0`).

Two departures from `diffusers.convert_pytorch_state_dict_to_flax`, both
because a pod job must not pay for them: the target tree comes from
`jax.eval_shape` of the initialiser instead of a real random initialisation
(which for SD v1.4 allocates 3.4 GB and takes minutes on a CPU), and a missing
or unexpected weight is an error instead of a warning.

The converted parameters can be cached as an Orbax checkpoint
(`cache_dir`), which later restores onto any sharding without torch.
"""

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aigc_jax import checkpoint, record
from aigc_jax.diffusion.schedules import NoiseSchedule, make_schedule
from aigc_jax.sd.torchvision_fallback import import_torchvision

_DIFFUSERS_WEIGHTS = (
  "diffusion_pytorch_model.safetensors",
  "diffusion_pytorch_model.bin",
)
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# UNet options of diffusers' PyTorch class that its Flax port does not
# implement: with anything but these values the Flax UNet loads without a
# complaint and computes something else.
_UNET_FIXED_OPTIONS = {
  "norm_num_groups": 32,
  "norm_eps": 1e-5,
  "act_fn": "silu",
  "resnet_time_scale_shift": "default",
  "class_embed_type": None,
  "time_embedding_type": "positional",
  "center_input_sample": False,
}


class StableDiffusion(NamedTuple):
  """The modules of a Stable Diffusion checkpoint; parameters live apart.

  Attributes:
    unet: a `FlaxUNet2DConditionModel` (NCHW in and out).
    vae: a `FlaxAutoencoderKL`.
    text_encoder: a `FlaxCLIPTextModel`; call it with `params=`.
    tokenizer: the CLIP tokenizer.
    schedule: the training noise schedule of `scheduler/`.
    scaling_factor: latents are the VAE's mean or sample times this.
    steps_offset: the scheduler's `steps_offset` (1 for SD v1.x), added to
      the "leading" DDIM timesteps.
  """

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  schedule: NoiseSchedule
  scaling_factor: float
  steps_offset: int


def read_config(directory: str) -> dict:
  """The `config.json` of one component folder, as a dict."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist: {directory!r} is not a component folder of a "
      "diffusers-layout Stable Diffusion checkpoint (unet/, vae/, "
      "text_encoder/, tokenizer/, scheduler/)."
    )
  with open(path) as f:
    return json.load(f)


def read_state_dict(
  directory: str, names: tuple[str, ...] = _DIFFUSERS_WEIGHTS
) -> dict[str, np.ndarray]:
  """PyTorch weights of one component folder as float32 numpy arrays.

  Reads the first of `names` present: safetensors without torch, or a
  `.bin` pickle with `torch.load(weights_only=True)` (which refuses to run
  code from the file).
  """
  for name in names:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    if name.endswith(".safetensors"):
      from safetensors.numpy import load_file

      try:
        tensors = load_file(path)
      except (TypeError, ValueError):  # bfloat16 has no numpy dtype
        tensors = _torch_load(path, safetensors=True)
    else:
      tensors = _torch_load(path, safetensors=False)
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  raise FileNotFoundError(
    f"No weights in {directory}: expected one of {list(names)}."
  )


def _torch_load(path: str, *, safetensors: bool) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"Reading {path} needs torch: pip install 'aigc_jax[torch]', or save "
      "the weights as float32/float16 safetensors."
    ) from e
  if safetensors:
    from safetensors.torch import load_file

    tensors = load_file(path)
  else:
    tensors = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in tensors.items()}


def check_unet_config(config: dict) -> None:
  """Refuses UNet options that diffusers' Flax UNet silently ignores.

  `FlaxUNet2DConditionModel` hard-codes GroupNorm(32, eps 1e-5), SiLU and
  the plain time embedding: a checkpoint trained with other values would
  load and produce wrong outputs (0.8 max error with 8 groups).
  """
  wrong = {
    k: config[k]
    for k, v in _UNET_FIXED_OPTIONS.items()
    if k in config and config[k] != v
  }
  if wrong:
    raise ValueError(
      f"The UNet config sets {wrong}, which diffusers' "
      "FlaxUNet2DConditionModel does not implement (it always uses "
      f"{ {k: _UNET_FIXED_OPTIONS[k] for k in wrong} }). Re-train or "
      "convert the model with those values; loading it would give wrong "
      "outputs without an error."
    )


def _flax_class_kwargs(cls, config: dict) -> dict:
  """The config entries `cls` has fields for (diffusers' `from_config`)."""
  names = set(cls.__dataclass_fields__) - {"parent", "name"}
  return {k: v for k, v in config.items() if k in names}


def build_unet(config: dict, dtype=jnp.float32):
  """A `FlaxUNet2DConditionModel` from a diffusers UNet `config.json`."""
  import_torchvision()
  from diffusers import FlaxUNet2DConditionModel

  check_unet_config(config)
  kwargs = _flax_class_kwargs(FlaxUNet2DConditionModel, config)
  for key in ("block_out_channels", "down_block_types", "up_block_types"):
    kwargs[key] = tuple(kwargs[key])
  return FlaxUNet2DConditionModel(**kwargs, dtype=dtype)


def build_vae(config: dict, dtype=jnp.float32):
  """A `FlaxAutoencoderKL` from a diffusers VAE `config.json`."""
  import_torchvision()
  from diffusers import FlaxAutoencoderKL

  kwargs = _flax_class_kwargs(FlaxAutoencoderKL, config)
  for key in ("block_out_channels", "down_block_types", "up_block_types"):
    kwargs[key] = tuple(kwargs[key])
  return FlaxAutoencoderKL(**kwargs, dtype=dtype)


def build_text_encoder(directory: str, dtype=jnp.float32):
  """A `FlaxCLIPTextModel` from `text_encoder/config.json`, without weights."""
  from transformers import CLIPTextConfig, FlaxCLIPTextModel

  config = CLIPTextConfig.from_pretrained(directory)
  return FlaxCLIPTextModel(config, dtype=dtype, _do_init=False)


def abstract_params(model) -> dict:
  """Shapes and dtypes of a Flax model's parameters, without computing them."""
  if hasattr(model, "module"):
    # transformers' Flax models wrap a linen module and take an input shape;
    # diffusers' Flax models are linen modules with init_weights(rng).
    shapes = jax.eval_shape(
      lambda k: model.init_weights(k, model.input_shape), jax.random.key(0)
    )
  else:
    shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
  plain = traverse_util.unflatten_dict(traverse_util.flatten_dict(shapes))
  return jax.tree.map(  # a plain dict, whatever FrozenDict init returned
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), plain
  )


def convert_diffusers_weights(
  state_dict: dict[str, np.ndarray], target: dict, component: str
) -> dict:
  """PyTorch UNet/VAE weights -> the Flax parameter tree `target` describes.

  Uses diffusers' own renaming and reshaping rules; every weight must land
  on a parameter of the right shape and every parameter must be filled.
  """
  import_torchvision()
  from diffusers.models.modeling_flax_pytorch_utils import (
    rename_key,
    rename_key_and_reshape_tensor,
  )

  flat_target = traverse_util.flatten_dict(target)
  converted = {}
  for pt_key, tensor in state_dict.items():
    key, value = rename_key_and_reshape_tensor(
      tuple(rename_key(pt_key).split(".")), tensor, flat_target
    )
    converted[key] = value
  _check_complete(converted, flat_target, component)
  return traverse_util.unflatten_dict(
    {k: jnp.asarray(v) for k, v in converted.items()}
  )


def convert_text_encoder_weights(
  state_dict: dict[str, np.ndarray], target: dict
) -> dict:
  """PyTorch CLIP text-encoder weights -> `FlaxCLIPTextModel` parameters."""
  from transformers.modeling_flax_pytorch_utils import (
    rename_key_and_reshape_tensor,
  )

  flat_target = traverse_util.flatten_dict(target)
  converted = {}
  for pt_key, tensor in state_dict.items():
    if pt_key.endswith("position_ids"):  # a buffer, not a parameter
      continue
    key, value = rename_key_and_reshape_tensor(
      tuple(pt_key.split(".")), tensor, flat_target, "text_model"
    )
    converted[key] = value
  _check_complete(converted, flat_target, "text_encoder")
  return traverse_util.unflatten_dict(
    {k: jnp.asarray(v) for k, v in converted.items()}
  )


def _check_complete(converted: dict, flat_target: dict, component: str):
  missing = sorted(set(flat_target) - set(converted))
  unexpected = sorted(set(converted) - set(flat_target))
  wrong = [
    (k, converted[k].shape, flat_target[k].shape)
    for k in set(converted) & set(flat_target)
    if tuple(converted[k].shape) != tuple(flat_target[k].shape)
  ]
  if missing or unexpected or wrong:
    show = lambda keys: [".".join(k) for k in keys[:5]]
    raise ValueError(
      f"The {component} weights do not fit its config.json: "
      f"missing {show(missing)} ({len(missing)} in all), unexpected "
      f"{show(unexpected)} ({len(unexpected)} in all), shape mismatches "
      f"{wrong[:5]}. Is the folder a diffusers-layout checkpoint of this "
      "architecture?"
    )


def load_stable_diffusion(
  path: str,
  *,
  cache_dir: str | None = None,
  sharding=None,
  dtype=jnp.float32,
) -> tuple[StableDiffusion, dict]:
  """Loads a diffusers-layout Stable Diffusion folder for JAX.

  Args:
    path: the folder with unet/, vae/, text_encoder/, tokenizer/ and
      scheduler/ (e.g. a local copy of CompVis/stable-diffusion-v1-4).
    cache_dir: where the converted parameters are kept as an Orbax
      checkpoint; when it holds those of the folder's weight files (or the
      folder has configs only), they are restored from there: no PyTorch
      weights are read and torch is not needed.
    sharding: where the parameters go (one sharding for all leaves, e.g.
      `parallel.replicated(mesh)`); None leaves them on the default device.
    dtype: the modules' compute dtype; parameters stay float32.

  Returns:
    `(model, params)` with params a dict {"unet", "vae", "text_encoder"}.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"No Stable Diffusion folder at {path!r}. Give a local folder in "
      "diffusers' layout (unet/, vae/, text_encoder/, tokenizer/, "
      "scheduler/); nothing is downloaded."
    )
  from transformers import CLIPTokenizer

  part = lambda name: os.path.join(path, name)
  unet = build_unet(read_config(part("unet")), dtype)
  vae_config = read_config(part("vae"))
  vae = build_vae(vae_config, dtype)
  text_encoder = build_text_encoder(part("text_encoder"), dtype)
  scheduler = read_scheduler_config(part("scheduler"))
  model = StableDiffusion(
    unet=unet,
    vae=vae,
    text_encoder=text_encoder,
    tokenizer=CLIPTokenizer.from_pretrained(part("tokenizer")),
    schedule=make_schedule(
      scheduler.get("beta_schedule", "scaled_linear"),
      scheduler.get("num_train_timesteps", 1000),
      beta_start=scheduler.get("beta_start", 0.00085),
      beta_end=scheduler.get("beta_end", 0.012),
    ),
    scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
    steps_offset=int(scheduler.get("steps_offset", 0)),
  )
  target = {
    "unet": abstract_params(unet),
    "vae": abstract_params(vae),
    "text_encoder": abstract_params(text_encoder),
  }
  if cache_dir is not None and _cache_holds(cache_dir, path):
    return model, _restore_cache(cache_dir, target, sharding)
  params = {
    "unet": convert_diffusers_weights(
      read_state_dict(part("unet")), target["unet"], "unet"
    ),
    "vae": convert_diffusers_weights(
      read_state_dict(part("vae")), target["vae"], "vae"
    ),
    "text_encoder": convert_text_encoder_weights(
      read_state_dict(part("text_encoder"), _TRANSFORMERS_WEIGHTS),
      target["text_encoder"],
    ),
  }
  if cache_dir is not None:
    _write_cache(cache_dir, path, params)
  if sharding is not None:
    params = jax.device_put(params, sharding)
  return model, params


def read_scheduler_config(directory: str) -> dict:
  """The scheduler folder's `scheduler_config.json`, as a dict."""
  for name in ("scheduler_config.json", "config.json"):
    file = os.path.join(directory, name)
    if os.path.exists(file):
      with open(file) as f:
        return json.load(f)
  raise FileNotFoundError(f"No scheduler_config.json in {directory}.")


def _source_stamp(path: str) -> dict:
  """Which weight files the cache was made from (name, size, mtime)."""
  stamp = {}
  for component in ("unet", "vae", "text_encoder"):
    for name in _DIFFUSERS_WEIGHTS + _TRANSFORMERS_WEIGHTS:
      file = os.path.join(path, component, name)
      if os.path.exists(file):
        info = os.stat(file)
        stamp[f"{component}/{name}"] = [info.st_size, int(info.st_mtime)]
  return stamp


def _cache_holds(cache_dir: str, path: str) -> bool:
  """The cache was made from these weight files, or the folder has none.

  A folder of configs and tokenizer only (what a pod job ships next to the
  cache) uses the cache as it is.
  """
  stamp_file = os.path.join(cache_dir, "source.json")
  if not os.path.exists(stamp_file):
    return False
  with open(stamp_file) as f:
    stamp = json.load(f)
  current = _source_stamp(path)
  return not current or stamp == current


def _write_cache(cache_dir: str, path: str, params: dict) -> None:
  ckpt = checkpoint.Checkpointer(os.path.join(cache_dir, "params"))
  ckpt.save(0, params)
  ckpt.close()
  stamp = json.dumps(_source_stamp(path), indent=1)
  record.atomic_write(
    os.path.join(cache_dir, "source.json"), lambda f: f.write(stamp.encode())
  )


def _restore_cache(cache_dir: str, target: dict, sharding) -> dict:
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpoint.Checkpointer(os.path.join(cache_dir, "params"))
  params = ckpt.restore(checkpoint.abstract_state(target, sharding), step=0)
  ckpt.close()
  return params


def load_model(path: str):
  """The model to edit: a diffusers-layout Stable Diffusion folder."""
  if not path:
    raise ValueError(
      "No model given: pass --config.model=PATH, a diffusers-layout folder "
      "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
      "scheduler/), e.g. a local copy of CompVis/stable-diffusion-v1-4."
    )
  if not os.path.isdir(path):
    hint = (
      "re-create it with experiments/train_text_to_image.py (see "
      "checkpoints/MANIFEST.md)"
      if "checkpoints" in path
      else "download a Stable Diffusion v1.4 folder in diffusers layout "
      "elsewhere and pass its path with --config.model=PATH"
    )
    raise FileNotFoundError(f"No model folder at {path!r}: {hint}.")
  return load_stable_diffusion(path)

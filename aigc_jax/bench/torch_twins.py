"""PyTorch twins of the computations `aigc_jax.bench` times, same weights.

Each twin is built from this project's Flax parameters, so the JAX and the
PyTorch side of a benchmark row compute the same function on the same
inputs (tests/test_bench.py checks the outputs agree):

  * `ddpm_unet_twin`: diffusers' `UNet2DModel` configured as the DDPM UNet
    of `aigc_jax.models.DDPMUNet` (Ho et al.'s network, which is what
    `google/ddpm-cifar10-32` is in diffusers), weights renamed and
    transposed from NHWC Flax to NCHW PyTorch;
  * `lpips_twin`: the `lpips` package's LPIPS(net="alex") with the AlexNet
    and linear weights `aigc_jax.models.load_lpips` reads;
  * `CifarResNet18` / `resnet18_twin`: the kuangliu CIFAR ResNet-18 of
    `aigc_jax.models.ResNet18`, parameters and BatchNorm statistics copied;
  * `crop_flip`, `nchw_images`: the victims' augmentation and input range;
  * `uce_edit_twin`: UCE's ridge solve (Gandikota et al. 2024, Eq. 7) in
    torch, for every kernel at once as `aigc_jax.unlearn.ridge_edit` does.

PyTorch is imported lazily: the `[torch]` extra is needed only here.
"""

import numpy as np

from aigc_jax.models.unet import DDPMUNet


def torch_module():
  """PyTorch, imported on first use (the `[torch]` extra)."""
  import torch

  return torch


def nchw_images(images: np.ndarray, device: str):
  """uint8 NHWC images as a float32 NCHW tensor in [-1, 1] on `device`
  (`data.to_model_range`'s values)."""
  torch = torch_module()
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2))))
  return x.to(device).float() / 127.5 - 1.0


def crop_flip(torch, pad: int, flip: bool, seed: int, device: str):
  """`images -> images`: per-image random crop after padding with black (-1)
  and a random horizontal flip, as `train.random_crop_flip` draws them (its
  own random numbers, the same distribution), as one gather of each image's
  window on `device`."""
  gen = torch.Generator(device).manual_seed(seed)

  def apply(x):
    n, c, h, w = x.shape
    out = x
    if pad:
      padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
      offsets = torch.randint(
        0, 2 * pad + 1, (n, 2), generator=gen, device=device
      )
      rows = (offsets[:, :1] + torch.arange(h, device=device))[:, None, :, None]
      cols = (offsets[:, 1:] + torch.arange(w, device=device))[:, None, None, :]
      out = padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows,
        cols,
      ]
    if flip:
      flips = torch.rand(n, generator=gen, device=device) < 0.5
      out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out

  return apply


def _tensor(array):
  """A torch tensor holding a copy of `array` (JAX arrays are read-only)."""
  return torch_module().tensor(np.asarray(array))


def _conv(kernel) -> np.ndarray:
  """Flax (kh, kw, in, out) -> PyTorch (out, in, kh, kw)."""
  return np.transpose(np.asarray(kernel), (3, 2, 0, 1))


def _dense(kernel) -> np.ndarray:
  """Flax (in, out) -> PyTorch (out, in)."""
  return np.asarray(kernel).T


def diffusers_unet_config(unet: DDPMUNet, size: int, channels: int) -> dict:
  """`UNet2DModel` keyword arguments for `unet` on size x size images.

  Ho et al.'s choices in diffusers' terms: TensorFlow's (0, 1) padding of
  the stride-2 convolutions (downsample_padding=0), sin | cos embeddings
  with the frequency shift of 1, one attention head as wide as the block,
  GroupNorm ε 1e-6 (Flax's default).
  """
  attention = [
    size // 2**level in unet.attn_resolutions
    for level in range(len(unet.ch_mult))
  ]
  return dict(
    sample_size=size,
    in_channels=channels,
    out_channels=unet.out_channels or channels,
    block_out_channels=tuple(unet.ch * m for m in unet.ch_mult),
    layers_per_block=unet.num_res_blocks,
    down_block_types=tuple(
      "AttnDownBlock2D" if a else "DownBlock2D" for a in attention
    ),
    up_block_types=tuple(
      "AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)
    ),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_num_groups=unet.num_groups,
    norm_eps=1e-6,
    attention_head_dim=None,
    dropout=unet.dropout,
  )


def _ddpm_state_dict(unet: DDPMUNet, params) -> dict[str, np.ndarray]:
  """The Flax DDPMUNet parameters under diffusers' UNet2DModel names."""
  out = {}

  def conv(flax_name, torch_name):
    p = params[flax_name] if isinstance(flax_name, str) else flax_name
    out[f"{torch_name}.weight"] = _conv(p["kernel"])
    out[f"{torch_name}.bias"] = np.asarray(p["bias"])

  def dense(p, torch_name):
    out[f"{torch_name}.weight"] = _dense(p["kernel"])
    out[f"{torch_name}.bias"] = np.asarray(p["bias"])

  def norm(p, torch_name):
    out[f"{torch_name}.weight"] = np.asarray(p["scale"])
    out[f"{torch_name}.bias"] = np.asarray(p["bias"])

  def resnet(p, prefix):
    norm(p["norm1"], f"{prefix}.norm1")
    conv(p["conv1"], f"{prefix}.conv1")
    dense(p["temb_proj"], f"{prefix}.time_emb_proj")
    norm(p["norm2"], f"{prefix}.norm2")
    conv(p["conv2"], f"{prefix}.conv2")
    if "nin_shortcut" in p:
      conv(p["nin_shortcut"], f"{prefix}.conv_shortcut")

  def attention(p, prefix):
    norm(p["norm"], f"{prefix}.group_norm")
    for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
      dense(
        {"kernel": p[ours]["kernel"][0, 0], "bias": p[ours]["bias"]},
        f"{prefix}.{theirs}",
      )
    dense(
      {"kernel": p["proj_out"]["kernel"][0, 0], "bias": p["proj_out"]["bias"]},
      f"{prefix}.to_out.0",
    )

  conv("conv_in", "conv_in")
  dense(params["temb_dense0"], "time_embedding.linear_1")
  dense(params["temb_dense1"], "time_embedding.linear_2")
  levels = len(unet.ch_mult)
  for level in range(levels):
    up = f"up_blocks.{levels - 1 - level}"
    for i in range(unet.num_res_blocks + 1):
      for side, prefix, count in (
        ("down", f"down_blocks.{level}", unet.num_res_blocks),
        ("up", up, unet.num_res_blocks + 1),
      ):
        if i >= count:
          continue
        resnet(params[f"{side}_{level}_block_{i}"], f"{prefix}.resnets.{i}")
        if f"{side}_{level}_attn_{i}" in params:
          attention(
            params[f"{side}_{level}_attn_{i}"], f"{prefix}.attentions.{i}"
          )
    if f"down_{level}_downsample" in params:
      conv(
        params[f"down_{level}_downsample"]["conv"],
        f"down_blocks.{level}.downsamplers.0.conv",
      )
    if f"up_{level}_upsample" in params:
      conv(params[f"up_{level}_upsample"]["conv"], f"{up}.upsamplers.0.conv")
  resnet(params["mid_block_1"], "mid_block.resnets.0")
  attention(params["mid_attn_1"], "mid_block.attentions.0")
  resnet(params["mid_block_2"], "mid_block.resnets.1")
  norm(params["norm_out"], "conv_norm_out")
  conv("conv_out", "conv_out")
  return out


def ddpm_unet_twin(unet: DDPMUNet, params, size: int, channels: int):
  """diffusers' PyTorch `UNet2DModel` computing `unet` with `params`.

  Takes NCHW images and integer timesteps; `.sample` is ε̂.
  """
  from aigc_jax.sd.torchvision_fallback import import_torchvision

  import_torchvision()
  from diffusers import UNet2DModel

  model = UNet2DModel(**diffusers_unet_config(unet, size, channels))
  state = {k: _tensor(v) for k, v in _ddpm_state_dict(unet, params).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  if missing or unexpected:
    raise ValueError(
      f"The DDPM UNet does not map onto UNet2DModel: missing {missing}, "
      f"unexpected {unexpected}."
    )
  return model.eval()


def lpips_twin(variables: dict):
  """The `lpips` package's LPIPS(net="alex") with `variables`' weights
  (from `aigc_jax.models.load_lpips("alex")`): d(x, y) for NCHW in [-1, 1].

  Built with `pnet_rand=True` so that nothing is downloaded; the AlexNet
  and linear-layer weights are then copied in.
  """
  from aigc_jax.sd.torchvision_fallback import import_torchvision

  import_torchvision()
  import lpips

  torch = torch_module()
  params = variables["params"]
  if "alex" not in params:
    raise ValueError(
      "lpips_twin takes LPIPS-alex variables (load_lpips('alex'))."
    )
  net = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
  convs = [m for m in net.net.modules() if isinstance(m, torch.nn.Conv2d)]
  with torch.no_grad():
    for i, conv in enumerate(convs):
      p = params["alex"][f"Conv_{i}"]
      conv.weight.copy_(_tensor(_conv(p["kernel"])))
      conv.bias.copy_(_tensor(p["bias"]))
    for i, lin in enumerate(net.lins):
      lin.model[-1].weight.copy_(_tensor(_conv(params[f"lin{i}"]["kernel"])))
  return net.eval()


def _basic_block(torch, in_channels: int, channels: int, stride: int):
  nn = torch.nn

  class BasicBlock(nn.Module):
    def __init__(self):
      super().__init__()
      # Flax's "SAME" pads a stride-2 3x3 conv by (0, 1), PyTorch's
      # padding=1 by (1, 1): the twin pads as the Flax model does.
      pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)
      self.pad = nn.ZeroPad2d(pad)
      self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 0, bias=False)
      self.bn1 = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
      self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
      self.shortcut = nn.Sequential()
      if stride != 1 or in_channels != channels:
        self.shortcut = nn.Sequential(
          nn.Conv2d(in_channels, channels, 1, stride, bias=False),
          nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1),
        )

    def forward(self, x):
      h = torch.relu(self.bn1(self.conv1(self.pad(x))))
      h = self.bn2(self.conv2(h))
      return torch.relu(h + self.shortcut(x))

  return BasicBlock()


def cifar_resnet18(num_classes: int = 10, width: int = 64, channels: int = 3):
  """The kuangliu/pytorch-cifar ResNet-18 (3x3 stem, no max-pool), as
  `aigc_jax.models.ResNet18` computes it: Flax's BatchNorm momentum 0.9 is
  PyTorch's 0.1, both use ε 1e-5, and the stride-2 convolutions pad
  (0, 1) as Flax's "SAME" does (kuangliu's pad (1, 1); same cost)."""
  torch = torch_module()
  nn = torch.nn
  layers = [
    nn.Conv2d(channels, width, 3, 1, 1, bias=False),
    nn.BatchNorm2d(width),
    nn.ReLU(),
  ]
  in_channels = width
  for i, mult in enumerate((1, 2, 4, 8)):
    for j in range(2):
      stride = 2 if i > 0 and j == 0 else 1
      layers.append(_basic_block(torch, in_channels, width * mult, stride))
      in_channels = width * mult
  layers += [
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(in_channels, num_classes),
  ]
  return nn.Sequential(*layers)


def resnet18_twin(params, batch_stats, num_classes: int = 10):
  """`cifar_resnet18` holding a Flax ResNet18's parameters and statistics."""
  torch = torch_module()
  width = np.asarray(params["stem"]["kernel"]).shape[-1]
  channels = np.asarray(params["stem"]["kernel"]).shape[-2]
  model = cifar_resnet18(num_classes, width, channels)

  def copy_bn(bn, p, s):
    bn.weight.copy_(_tensor(p["scale"]))
    bn.bias.copy_(_tensor(p["bias"]))
    bn.running_mean.copy_(_tensor(s["mean"]))
    bn.running_var.copy_(_tensor(s["var"]))

  def copy_conv(conv, p):
    conv.weight.copy_(_tensor(_conv(p["kernel"])))

  with torch.no_grad():
    copy_conv(model[0], params["stem"])
    copy_bn(model[1], params["BatchNorm_0"], batch_stats["BatchNorm_0"])
    index = 3
    for i in range(4):
      for j in range(2):
        block, name = model[index], f"layer{i + 1}_{j}"
        p, s = params[name], batch_stats[name]
        copy_conv(block.conv1, p["Conv_0"])
        copy_bn(block.bn1, p["BatchNorm_0"], s["BatchNorm_0"])
        copy_conv(block.conv2, p["Conv_1"])
        copy_bn(block.bn2, p["BatchNorm_1"], s["BatchNorm_1"])
        if len(block.shortcut):
          copy_conv(block.shortcut[0], p["Conv_2"])
          copy_bn(block.shortcut[1], p["BatchNorm_2"], s["BatchNorm_2"])
        index += 1
    head = model[-1]
    head.weight.copy_(_tensor(_dense(params["head"]["kernel"])))
    head.bias.copy_(_tensor(params["head"]["bias"]))
  return model


def uce_edit_twin(
  kernels,
  erase_keys,
  target_keys,
  preserve_keys,
  *,
  lam,
  erase_scale=1.0,
  preserve_scale=1.0,
):
  """`aigc_jax.unlearn.uce_edit` in torch: one solve for all kernels.

  Args are torch tensors; `kernels` maps names to (d, out) matrices.
  """
  torch = torch_module()
  names = list(kernels)
  d = kernels[names[0]].shape[0]
  eye = torch.eye(d, dtype=erase_keys.dtype, device=erase_keys.device)
  lhs = lam * eye + erase_scale * erase_keys.T @ erase_keys
  lhs = lhs + preserve_scale * preserve_keys.T @ preserve_keys
  rhs = []
  for n in names:
    k = kernels[n]
    rhs.append(
      lam * k
      + erase_scale * erase_keys.T @ (target_keys @ k)
      + preserve_scale * preserve_keys.T @ (preserve_keys @ k)
    )
  solved = torch.linalg.solve(lhs, torch.cat(rhs, dim=1))
  widths = [kernels[n].shape[1] for n in names]
  return dict(zip(names, torch.split(solved, widths, dim=1), strict=True))

"""The Inception-v3 of FID (Heusel et al. 2017), in Flax, for users who have
its weights.

This is the network of pytorch-fid (`pytorch_fid.inception.InceptionV3` with
the FID weights `pt_inception-2015-12-05-6726825d.pth`, a port of the
TensorFlow graph FID was defined with): torchvision's Inception-v3 with the
FID variants of the A, C and E blocks (average pools that do not count
padding; a max pool in the last block). `fid_features` returns its 2048-wide
pool3 activations, the space FID is measured in.

Nothing here downloads anything: `load_fid_inception(path)` reads a weights
file the user supplies (a PyTorch state dict, read with `weights_only=True`,
which needs the `torch` extra; or an `.npz` of the same keys).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_INPUT_SIZE = 299


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """Convolution without bias, batch norm (ε = 1e-3, running statistics),
  ReLU: torchvision's BasicConv2d."""

  features: int
  kernel: int | tuple[int, int]
  strides: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel),
      _pair(self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # FID blocks average over the pixels inside the image only.
  return nn.avg_pool(
    x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False
  )


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name="branch1x1")(x)
    b5 = BasicConv(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, strides=2, name="branch3x3")(x)
    bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, 1, name="branch1x1")(x)
    b7 = BasicConv(c, 1, name="branch7x7_1")(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """The last blocks; FID's first one average-pools, its second max-pools."""

  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name="branch1x1")(x)
    b3 = BasicConv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Images in [-1, 1], (B, H, W, 3) at 299x299 -> pool3 features (B, 2048).

  Module names follow torchvision's, so a PyTorch state dict maps onto the
  parameters key by key (`load_fid_inception`).
  """

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (
      ("Mixed_6b", 128),
      ("Mixed_6c", 160),
      ("Mixed_6d", 160),
      ("Mixed_6e", 192),
    ):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return x.mean(axis=(1, 2))


def fid_features(variables, images: jax.Array) -> jax.Array:
  """Pool3 features of images in [-1, 1], (B, H, W, C) with C = 1 or 3.

  As pytorch-fid does, images are resized to 299x299 bilinearly (half-pixel
  centres, no antialiasing, like `F.interpolate(align_corners=False)`);
  grayscale is repeated over three channels. Resizing is linear, so resizing
  [-1, 1] images equals pytorch-fid's resize-then-rescale of [0, 1] ones.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"Expected images of shape (B, H, W, 1 or 3), got {images.shape}."
    )
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(
    x,
    (x.shape[0], FID_INPUT_SIZE, FID_INPUT_SIZE, 3),
    "bilinear",
    antialias=False,
  )
  return FIDInceptionV3().apply(variables, x)


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"Reading the PyTorch weights file {path!r} needs torch: "
      'pip install -e ".[torch]", or convert it to .npz elsewhere.'
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.numpy() for k, v in state.items()}


def load_fid_inception(path: str) -> dict:
  """The Flax variables of `FIDInceptionV3` from pytorch-fid's weights file.

  Args:
    path: `pt_inception-2015-12-05-6726825d.pth` (or any state dict of the
      same network), or an `.npz` holding the same keys.

  Returns:
    `{"params": ..., "batch_stats": ...}` for `fid_features`.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"No Inception weights at {path!r}. FID needs pytorch-fid's "
      f"{FID_WEIGHTS_FILE} (from its GitHub releases), which cannot be "
      "downloaded at run time here; pass the path of a local copy."
    )
  state = _read_state_dict(path)
  expected = jax.eval_shape(
    FIDInceptionV3().init,
    jax.random.key(0),
    jnp.zeros((1, FID_INPUT_SIZE, FID_INPUT_SIZE, 3)),
  )
  variables = {"params": {}, "batch_stats": {}}
  # torch name -> (collection, flax name, transform)
  rename = {
    "conv.weight": ("params", "kernel", lambda w: w.transpose(2, 3, 1, 0)),
    "bn.weight": ("params", "scale", None),
    "bn.bias": ("params", "bias", None),
    "bn.running_mean": ("batch_stats", "mean", None),
    "bn.running_var": ("batch_stats", "var", None),
  }
  for key, value in state.items():
    parts = key.split(".")
    if parts[0] in ("fc", "AuxLogits") or parts[-1] == "num_batches_tracked":
      continue  # the classifier heads are not part of the FID features
    tail = ".".join(parts[-2:])
    if len(parts) < 3 or tail not in rename:
      raise ValueError(f"Unexpected entry {key!r} in {path!r}.")
    collection, name, transform = rename[tail]
    node = variables[collection]
    for module in parts[:-1]:
      node = node.setdefault(module, {})
    node[name] = jnp.asarray(transform(value) if transform else value)
  got = jax.tree.map(lambda a: a.shape, variables)
  want = jax.tree.map(lambda a: a.shape, expected)
  if got != want:
    raise ValueError(
      f"{path!r} does not hold the FID Inception-v3 (pytorch-fid's "
      f"{FID_WEIGHTS_FILE}): its tensors do not match the network's."
    )
  return variables

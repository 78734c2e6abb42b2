"""Data augmentation in JAX, for images in [-1, 1]: the standard random crop
and flip, and UEraser's adversarial-augmentation family (Qin et al. 2023,
arXiv 2303.15127).

Every function is `augment(key, images) -> images` on a (B, H, W, C) batch,
with independent draws per image, so it jits, vmaps over keys (K views of a
batch) and runs inside a train step.
"""

import math

import jax
import jax.numpy as jnp


def random_crop_flip(
  key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True
) -> jax.Array:
  """Per-image random crop after padding with black (-1) and optional
  horizontal flip, like torchvision's RandomCrop(padding) on a PIL image and
  RandomHorizontalFlip."""
  b, h, w, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(
    images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0
  )
  offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(
      img, (off[0], off[1], 0), (h, w, img.shape[-1])
    )

  out = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
    out = jnp.where(mirror, out[:, :, ::-1], out)
  return out


def plasma(key: jax.Array, size: tuple[int, int], roughness) -> jax.Array:
  """A fractal map in [0, 1] of shape (H, W): octaves of Gaussian noise on
  2x2, 4x4, ... grids, bilinearly upsampled, octave k weighted roughness^k,
  then min-max normalised. The spectrum of kornia's diamond-square plasma
  (higher roughness: more fine detail), not its exact values."""
  h, w = size
  octaves = max(math.ceil(math.log2(max(h, w))), 1)
  total = jnp.zeros((h, w))
  for k in range(octaves):
    n = 2 ** (k + 1)
    grid = jax.random.normal(jax.random.fold_in(key, k), (n, n))
    total = total + roughness**k * jax.image.resize(grid, (h, w), "bilinear")
  lo, hi = total.min(), total.max()
  return (total - lo) / jnp.maximum(hi - lo, 1e-6)


def _plasma_brightness(key, img01):
  """kornia RandomPlasmaBrightness(roughness (0.3, 0.7), intensity
  (0.5, 1.0)): adds (plasma - 0.5) * intensity."""
  r_key, i_key, p_key = jax.random.split(key, 3)
  roughness = jax.random.uniform(r_key, (), minval=0.3, maxval=0.7)
  intensity = jax.random.uniform(i_key, (), minval=0.5, maxval=1.0)
  p = plasma(p_key, img01.shape[:2], roughness)[..., None]
  return img01 + (p - 0.5) * intensity


def _plasma_contrast(key, img01):
  """kornia RandomPlasmaContrast(roughness (0.3, 0.7)): scales the
  deviation from grey by a plasma map in [0, 2]."""
  r_key, p_key = jax.random.split(key)
  roughness = jax.random.uniform(r_key, (), minval=0.3, maxval=0.7)
  p = plasma(p_key, img01.shape[:2], roughness)[..., None]
  return (img01 - 0.5) * 2.0 * p + 0.5


def _channel_shuffle(key, img01):
  return img01[..., jax.random.permutation(key, img01.shape[-1])]


def _affine(img01, matrix):
  """Warps about the image centre with the inverse map `matrix` (2x2 on
  (row, col)) plus the translation in its last column; black fill."""
  h, w, c = img01.shape
  rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  centre = jnp.array([(h - 1) / 2, (w - 1) / 2])
  coords = jnp.stack([rows, cols]).reshape(2, -1) - centre[:, None]
  src = matrix[:, :2] @ coords + centre[:, None] + matrix[:, 2:]
  warp = lambda ch: jax.scipy.ndimage.map_coordinates(
    ch, list(src), order=1, mode="constant", cval=0.0
  )
  return jax.vmap(warp, in_axes=-1, out_axes=-1)(img01).reshape(h, w, c)


def _luma(img01):
  if img01.shape[-1] == 1:
    return img01
  return (img01 @ jnp.array([0.299, 0.587, 0.114]))[..., None]


def _blend(a, b, factor):
  """PIL ImageEnhance: b + factor * (a - b)."""
  return b + factor * (a - b)


def _equalize(img01):
  """Histogram equalisation per channel, as PIL's and torchvision's (which
  kornia follows): a lookup table from the cumulative histogram of the 256
  levels, the most frequent top level left out of the step."""
  levels = jnp.round(img01 * 255.0).astype(jnp.int32)

  def channel(c):
    hist = jnp.bincount(c.ravel(), length=256)
    top = jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))
    step = (hist.sum() - hist[top]) // 255
    lut = (jnp.cumsum(hist) + step // 2) // jnp.maximum(step, 1)
    lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255)
    return jnp.where(step == 0, c, lut[c])

  out = jax.vmap(channel, in_axes=-1, out_axes=-1)(levels)
  return out.astype(img01.dtype) / 255.0


def _trivial_op(index, img01, u, sign):
  """Operation `index` of kornia's `auto.TrivialAugment` default policy
  (UEraser's), at a uniform draw u in [0, 1) of its magnitude range."""
  h, w, _ = img01.shape
  eye = jnp.eye(2)
  zero = jnp.zeros((2, 1))

  def affine(lin, shift=zero):
    return _affine(img01, jnp.concatenate([lin, shift], axis=1))

  angle = jnp.deg2rad(30.0 * u * sign)
  rot = jnp.array(
    [[jnp.cos(angle), -jnp.sin(angle)], [jnp.sin(angle), jnp.cos(angle)]]
  )
  factor = 0.1 + 1.8 * u  # (0.1, 1.9)
  lo = img01.min(axis=(0, 1), keepdims=True)
  hi = img01.max(axis=(0, 1), keepdims=True)
  bits = jnp.floor(4.0 * u)  # 0 .. 3 bits kept; 0 bits is black, as kornia
  keep = 2.0 ** (8 - bits)
  posterized = jnp.floor(jnp.floor(img01 * 255.0) / keep) * keep / 255.0
  branches = (
    lambda: (img01 - lo) / jnp.maximum(hi - lo, 1e-3),  # auto_contrast
    lambda: _equalize(img01),
    lambda: affine(rot),  # rotate, up to 30 degrees
    lambda: jnp.where(bits > 0, posterized, 0.0),  # posterize
    lambda: jnp.where(img01 < u, img01, 1.0 - img01),  # solarize
    lambda: img01 * factor,  # contrast (kornia's is multiplicative)
    lambda: img01 + (factor - 1.0),  # brightness (kornia's is additive)
    lambda: _blend(img01, _smooth(img01), factor),  # sharpness
    lambda: affine(eye.at[1, 0].set(0.3 * u * sign)),  # shear x
    lambda: affine(eye.at[0, 1].set(0.3 * u * sign)),  # shear y
    lambda: affine(eye, jnp.array([[0.0], [0.5 * w * u * sign]])),
    lambda: affine(eye, jnp.array([[0.5 * h * u * sign], [0.0]])),
  )
  return jax.lax.switch(index, branches)


NUM_TRIVIAL_OPS = 12


def _smooth(img01):
  """PIL's SMOOTH kernel (centre 5, others 1, /13), edge-replicated."""
  k = jnp.ones((3, 3)).at[1, 1].set(5.0) / 13.0
  padded = jnp.pad(img01, ((1, 1), (1, 1), (0, 0)), mode="edge")
  conv = lambda ch: jax.scipy.signal.convolve2d(ch, k, mode="valid")
  return jax.vmap(conv, in_axes=-1, out_axes=-1)(padded)


def _trivial_augment(key, img01):
  """TrivialAugment (Müller & Hutter 2021) with kornia's default policy,
  the one UEraser's code calls (`K.auto.TrivialAugment()`): one of twelve
  operations, uniformly chosen, at a uniform magnitude with a random sign
  for the geometric ones (rotation up to 30 degrees, shear up to 0.3,
  translation up to half the side). Kornia picks one operation per call
  for the whole batch; here every image draws its own."""
  op_key, m_key, s_key = jax.random.split(key, 3)
  index = jax.random.randint(op_key, (), 0, NUM_TRIVIAL_OPS)
  u = jax.random.uniform(m_key, ())
  sign = jnp.where(jax.random.bernoulli(s_key), 1.0, -1.0)
  return _trivial_op(index, img01, u, sign)


def ueraser_augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """UEraser's augmentation A: plasma brightness (p 0.5), plasma contrast
  (p 0.5), channel shuffle (p 0.5), then kornia's TrivialAugment, each image
  with its own draws.

  Args:
    key: randomness.
    images: (B, H, W, C) in [-1, 1].

  Returns:
    Augmented images in [-1, 1].
  """

  def one(k, img):
    keys = jax.random.split(k, 7)
    x = (img + 1.0) / 2.0
    for gate, fn, fkey in (
      (keys[0], _plasma_brightness, keys[1]),
      (keys[2], _plasma_contrast, keys[3]),
      (keys[4], _channel_shuffle, keys[5]),
    ):
      x = jnp.where(jax.random.bernoulli(gate), fn(fkey, x), x).clip(0, 1)
    x = _trivial_augment(keys[6], x).clip(0.0, 1.0)
    return 2.0 * x - 1.0

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def _resized_crop(key, img, scale, ratio):
  """torchvision RandomResizedCrop to the input size: a crop of area
  fraction U(scale) and log-uniform aspect ratio in `ratio` (clipped to the
  image instead of re-drawn), bilinearly resampled. Differentiable in the
  image, so contrastive poisoning can descend through it."""
  h, w, _ = img.shape
  a_key, r_key, t_key, l_key = jax.random.split(key, 4)
  area = jax.random.uniform(a_key, (), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(
    r_key, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
  )
  ch = jnp.clip(jnp.sqrt(area * jnp.exp(log_r)) * h, 1.0, h)
  cw = jnp.clip(jnp.sqrt(area / jnp.exp(log_r)) * w, 1.0, w)
  top = jax.random.uniform(t_key, ()) * (h - ch)
  left = jax.random.uniform(l_key, ()) * (w - cw)
  rows = top + (jnp.arange(h) + 0.5) * ch / h - 0.5
  cols = left + (jnp.arange(w) + 0.5) * cw / w - 0.5
  grid = jnp.meshgrid(rows, cols, indexing="ij")
  sample = lambda c: jax.scipy.ndimage.map_coordinates(
    c, grid, order=1, mode="nearest"
  )
  return jax.vmap(sample, in_axes=-1, out_axes=-1)(img)


def _hue_shift(img01, shift):
  """Rotates the chroma plane (YIQ) by `shift` turns: a differentiable
  stand-in for torchvision's HSV hue shift."""
  yiq = jnp.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]]
  )
  t = 2.0 * jnp.pi * shift
  rot = jnp.array(
    [
      [1.0, 0.0, 0.0],
      [0.0, jnp.cos(t), -jnp.sin(t)],
      [0.0, jnp.sin(t), jnp.cos(t)],
    ]
  )
  return img01 @ (jnp.linalg.inv(yiq) @ rot @ yiq).T


def _colour_jitter(key, img01, strength):
  """ColorJitter(0.4, 0.4, 0.4, 0.1) scaled by `strength`, in the fixed
  order brightness, contrast, saturation, hue (torchvision permutes it)."""
  b_key, c_key, s_key, h_key = jax.random.split(key, 4)
  s = 0.4 * strength
  factor = lambda k: jax.random.uniform(k, (), minval=1.0 - s, maxval=1.0 + s)
  x = (img01 * factor(b_key)).clip(0.0, 1.0)
  x = _blend(x, _luma(x).mean(), factor(c_key)).clip(0.0, 1.0)
  if x.shape[-1] == 3:
    x = _blend(x, _luma(x), factor(s_key)).clip(0.0, 1.0)
    hue = 0.1 * strength
    shift = jax.random.uniform(h_key, (), minval=-hue, maxval=hue)
    x = _hue_shift(x, shift).clip(0.0, 1.0)
  return x


def simclr_augment(
  key: jax.Array,
  images: jax.Array,
  *,
  crop_scale: tuple[float, float] = (0.2, 1.0),
  flip: bool = True,
  jitter: float = 1.0,
  jitter_prob: float = 0.8,
  grayscale_prob: float = 0.2,
) -> jax.Array:
  """The contrastive-learning view of SimCLR, MoCo v2 and BYOL on CIFAR
  (as in contrastive poisoning's differentiable kornia pipeline, He et al.
  2023, arXiv 2202.11202): RandomResizedCrop(scale 0.2-1), horizontal
  flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with p 0.2.
  Differentiable in `images`.

  Args:
    key: randomness; every image draws its own.
    images: (B, H, W, C) in [-1, 1].
    crop_scale: the range of the crop's area fraction.
    flip: random horizontal flips (off for digits).
    jitter: colour-jitter strength (1: SimCLR's CIFAR setting).
    jitter_prob: probability of colour jitter.
    grayscale_prob: probability of converting to grey (colour images).

  Returns:
    The views, (B, H, W, C) in [-1, 1].
  """

  def one(k, img):
    keys = jax.random.split(k, 6)
    x = _resized_crop(keys[0], (img + 1.0) / 2.0, crop_scale, (3 / 4, 4 / 3))
    if flip:
      x = jnp.where(jax.random.bernoulli(keys[1]), x[:, ::-1], x)
    x = jnp.where(
      jax.random.bernoulli(keys[2], jitter_prob),
      _colour_jitter(keys[3], x, jitter),
      x,
    )
    if x.shape[-1] == 3:
      grey = jnp.broadcast_to(_luma(x), x.shape)
      x = jnp.where(jax.random.bernoulli(keys[4], grayscale_prob), grey, x)
    return 2.0 * x.clip(0.0, 1.0) - 1.0

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)

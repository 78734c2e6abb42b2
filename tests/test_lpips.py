"""LPIPS: the real weights load offline and reproduce the reference values."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.models import (
  LPIPS_BACKBONES,
  load_lpips,
  lpips_distance,
  lpips_weights_path,
  resize_for_lpips,
)


@pytest.fixture(scope="module")
def alex():
  return load_lpips("alex")


def _images(n=2, size=64, seed=0):
  rng = np.random.default_rng(seed)
  smooth = rng.uniform(-1, 1, (n, size // 8, size // 8, 3))
  return jnp.asarray(smooth.repeat(8, 1).repeat(8, 2), jnp.float32)


def _reference_images():
  """data/README.md's recipe: astronaut and coffee at 256x256 in [0, 1],
  Gaussian noise from one default_rng(0) stream, skimage blur."""
  from skimage import data, filters, transform

  def load(name):
    image = getattr(data, name)()
    return transform.resize(image, (256, 256), anti_aliasing=True)

  astronaut, coffee = load("astronaut"), load("coffee")
  rng = np.random.default_rng(0)
  noisy = [
    np.clip(astronaut + rng.normal(0, s, astronaut.shape), 0, 1)
    for s in (0.03, 0.10)
  ]
  blurred = [
    filters.gaussian(astronaut, sigma=s, channel_axis=-1) for s in (1, 3)
  ]
  others = np.stack([astronaut, *noisy, *blurred, coffee])
  to_model = lambda x: jnp.asarray(x * 2 - 1, jnp.float32)
  return to_model(np.stack([astronaut] * len(others))), to_model(others)


# data/README.md: identical, noise 0.03, noise 0.10, blur 1, blur 3, other.
REFERENCE = {
  "alex": [0.0, 0.070, 0.365, 0.167, 0.520, 0.728],
  "vgg": [0.0, 0.182, 0.422, 0.118, 0.401, 0.767],
}


@pytest.mark.parametrize("backbone", LPIPS_BACKBONES)
def test_lpips_reproduces_the_reference_values(backbone):
  x, y = _reference_images()
  variables = load_lpips(backbone)
  got = jax.jit(lpips_distance)(variables, x, y)
  np.testing.assert_allclose(got, REFERENCE[backbone], atol=1.5e-3)


def test_lpips_is_zero_on_identical_images_and_rises_with_noise_and_blur(
  alex,
):
  x = _images()
  assert np.allclose(lpips_distance(alex, x, x), 0.0)
  noise = jax.random.normal(jax.random.key(0), x.shape)
  scores = [lpips_distance(alex, x, x + s * noise) for s in (0.02, 0.1, 0.3)]
  assert np.all(np.diff(np.stack(scores), axis=0) > 0)
  small = resize_for_lpips(resize_for_lpips(x, 16), 64)
  smaller = resize_for_lpips(resize_for_lpips(x, 8), 64)
  assert np.all(lpips_distance(alex, x, smaller) > 0)
  assert np.all(
    lpips_distance(alex, x, smaller) >= lpips_distance(alex, x, small)
  )


def test_lpips_is_symmetric_and_differentiable(alex):
  x, y = _images(seed=0), _images(seed=1)
  np.testing.assert_allclose(
    lpips_distance(alex, x, y), lpips_distance(alex, y, x), rtol=1e-5
  )
  grad = jax.grad(lambda a: jnp.sum(lpips_distance(alex, a, y)))(x)
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_lpips_takes_grayscale_and_refuses_images_too_small(alex):
  gray = _images()[..., :1]
  rgb = jnp.repeat(gray, 3, axis=-1)
  np.testing.assert_allclose(
    lpips_distance(alex, gray, gray * 0.5),
    lpips_distance(alex, rgb, rgb * 0.5),
    rtol=1e-6,
  )
  tiny = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="too small for LPIPS-alex"):
    lpips_distance(alex, tiny, tiny)


def test_weights_loader_admits_numpy_arrays_only(tmp_path):
  class Exploit:
    def __reduce__(self):
      return (os.system, ("echo owned",))

  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"AlexNet_0": Exploit()}))
  with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
    load_lpips("alex", path=str(path))
  # A genuine file of the other backbone is named as the mistake it is.
  with pytest.raises(ValueError, match="holds no VGG16_0 weights"):
    load_lpips("vgg", path=lpips_weights_path("alex"))
  with pytest.raises(ValueError, match="Unknown LPIPS backbone"):
    lpips_weights_path("squeeze")


def test_imagenet_features_rank_noise_by_its_size_and_vmap(alex):
  from aigc_jax.metrics import frechet_distance
  from aigc_jax.models import imagenet_features

  x = _images(24, size=32)
  features = jax.jit(lambda v: imagenet_features(alex, v))
  clean = np.asarray(features(x))
  assert clean.shape == (24, 256) and np.isfinite(clean).all()
  noise = jax.random.normal(jax.random.key(0), x.shape)
  distances = [
    frechet_distance(
      clean, np.asarray(features(jnp.clip(x + s * noise, -1, 1)))
    )
    for s in (0.05, 0.3)
  ]
  assert 0 < distances[0] < distances[1]
  # One image at a time under vmap gives the batch's features.
  single = jax.vmap(lambda v: imagenet_features(alex, v[None])[0])(x[:3])
  np.testing.assert_allclose(single, clean[:3], rtol=1e-4, atol=1e-5)

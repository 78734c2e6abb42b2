"""Contrastive learners (SimCLR, MoCo v2, BYOL), their augmentation, the
linear probe, and contrastive poisoning's objective."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aigc_jax import data, parallel, protect, train
from aigc_jax.models import ContrastiveNet, SmallCNN


@pytest.fixture(scope="module")
def digits():
  ds = data.load_dataset("digits", "train")
  return data.to_model_range(ds.images[:64]), ds.labels[:64]


def _learner(method, width=8):
  model = ContrastiveNet(
    SmallCNN(num_classes=1, width=width),
    proj_dim=16,
    hidden=32,
    predictor=method == "byol",
  )
  optimizer = train.classifier_optimizer(0.05, momentum=0.9, weight_decay=0.0)
  init = functools.partial(
    train.init_contrastive_state,
    model,
    optimizer,
    jax.random.key(0),
    (8, 8, 1),
    method=method,
    queue_size=96,
  )
  augment = functools.partial(train.simclr_augment, crop_scale=(0.5, 1.0))
  step = functools.partial(
    train.contrastive_train_step,
    key=jax.random.key(1),
    model=model,
    optimizer=optimizer,
    method=method,
    augment=augment,
    target_momentum=0.9,
  )
  return model, init, step, augment


def test_nt_xent_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 5, 4))
  tau = 0.5
  z = np.concatenate([z1, z2])
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sim = np.exp(z @ z.T / tau)
  expected = []
  for i in range(10):
    j = (i + 5) % 10
    expected.append(-np.log(sim[i, j] / (sim[i].sum() - sim[i, i])))
  expected = 0.5 * (np.array(expected[:5]) + np.array(expected[5:]))
  got = train.contrastive.nt_xent_losses(jnp.array(z1), jnp.array(z2), tau)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_moco_and_byol_losses():
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  queue = jnp.array([[-1.0, 0.0]])
  loss = train.contrastive.moco_losses(q, q, queue, 1.0)
  expected = -np.log(np.e / (np.e + np.exp(-q[:, 0])))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(
    train.contrastive.byol_losses(q, 3.0 * q), [0.0, 0.0], atol=1e-6
  )
  np.testing.assert_allclose(train.contrastive.byol_losses(q, -q), [4.0, 4.0])
  # The target side is held fixed: no gradient flows into it.
  g = jax.grad(lambda z: train.contrastive.byol_losses(q, z).sum())(q + 1.0)
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("method", train.CONTRASTIVE_METHODS)
def test_contrastive_step_learns_and_updates_target_and_queue(method, digits):
  x, _ = digits
  model, init, step, augment = _learner(method)
  state = first = init()
  assert (state.queue is not None) == (method == "moco")
  jstep = jax.jit(step)
  for s in range(25):
    previous = state
    state, _ = jstep(state, x[data.batch_indices(0, s, 64, 32)])
  # Against the final target and queue, the trained encoder contrasts two
  # fixed views better than the initial one.
  v1, v2 = (augment(jax.random.key(k), x[:32]) for k in (8, 9))
  loss = lambda params: train.contrastive_losses(
    model, state, params, v1, v2, method=method, temperature=0.5
  )[0].mean()
  assert loss(state.params) < loss(first.params)
  if method == "simclr":
    assert state.target_params == {}
    return
  # θ' ← m θ' + (1 − m) θ with the step's new θ.
  expected = jax.tree.map(
    lambda t, p: 0.9 * t + 0.1 * p, previous.target_params, state.params
  )
  for a, b in zip(
    jax.tree.leaves(expected), jax.tree.leaves(state.target_params), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  if method == "moco":
    # The step's 2 x 32 normalised keys went in at the front; the oldest
    # 64 left.
    assert state.queue.shape == (96, 16)
    np.testing.assert_allclose(
      jnp.linalg.norm(state.queue, axis=1), 1.0, rtol=1e-6
    )
    np.testing.assert_array_equal(state.queue[64:], previous.queue[:32])
    assert not jnp.allclose(state.queue[:64], previous.queue[:64])


def test_contrastive_step_on_four_devices_matches_one(digits):
  x, _ = digits
  _, init, step, _ = _learner("moco")
  outs = []
  for n in (1, 4):
    mesh = parallel.make_mesh(n)
    rep = parallel.replicated(mesh)
    state = jax.jit(init, out_shardings=rep)()
    jstep = jax.jit(step, out_shardings=(rep, rep))
    for s in range(3):
      batch = x[data.batch_indices(0, s, 64, 32)]
      state, _ = jstep(state, parallel.shard_batch(mesh, batch))
    outs.append(jax.device_get((state.params, state.queue)))
  for a, b in zip(
    jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_simclr_augment_is_random_in_range_and_differentiable():
  rgb = jax.random.uniform(jax.random.key(0), (6, 16, 16, 3), minval=-1.0)
  views = train.simclr_augment(jax.random.key(1), rgb)
  assert views.shape == rgb.shape
  assert views.min() >= -1.0 and views.max() <= 1.0
  again = train.simclr_augment(jax.random.key(1), rgb)
  np.testing.assert_array_equal(views, again)
  other = train.simclr_augment(jax.random.key(2), rgb)
  assert not jnp.allclose(views, other)
  # Every image draws its own crop: identical inputs, different views.
  same = jnp.broadcast_to(rgb[:1], rgb.shape)
  v = train.simclr_augment(jax.random.key(3), same)
  assert not jnp.allclose(v[0], v[1])
  # CP descends through the augmentation.
  g = jax.grad(lambda im: train.simclr_augment(jax.random.key(4), im).sum())(
    rgb
  )
  assert jnp.all(jnp.isfinite(g)) and jnp.abs(g).max() > 0
  grey = train.simclr_augment(jax.random.key(5), rgb[..., :1], flip=False)
  assert grey.shape == (6, 16, 16, 1)


def test_linear_probe_reads_separable_features():
  rng = np.random.default_rng(0)
  labels = np.arange(300) % 3
  centres = rng.normal(size=(3, 20)) * 3
  feats = centres[labels] + rng.normal(size=(300, 20))
  acc = train.linear_probe_accuracy(
    jnp.array(feats[:200]),
    jnp.array(labels[:200]),
    jnp.array(feats[200:]),
    jnp.array(labels[200:]),
    num_classes=3,
    steps=200,
    learning_rate=0.05,
  )
  assert acc > 0.95
  noise = rng.normal(size=(300, 20))
  chance = train.linear_probe_accuracy(
    jnp.array(noise[:200]),
    jnp.array(labels[:200]),
    jnp.array(noise[200:]),
    jnp.array(labels[200:]),
    num_classes=3,
  )
  assert chance < 0.6


@pytest.mark.parametrize("classwise", [False, True])
def test_contrastive_poison_lowers_the_loss_within_the_budget(
  classwise, digits
):
  x, labels = digits
  x, labels = x[:32], labels[:32]
  model, init, step, augment = _learner("simclr")
  state = init()
  jstep = jax.jit(step)
  for _ in range(10):
    state, _ = jstep(state, x)
  objective = protect.contrastive_objective(
    lambda v1, v2: train.contrastive_losses(
      model, state, state.params, v1, v2, method="simclr"
    )[0],
    augment,
  )
  b = protect.budget(16)
  shape = (10, *x.shape[1:]) if classwise else x.shape
  groups = labels if classwise else None
  key = jax.random.key(7)
  delta, _ = protect.pgd(
    objective,
    x,
    jnp.zeros(shape),
    key,
    budget=b,
    steps=8,
    step_size=protect.budget(4).eps,
    ascent=False,
    groups=groups,
  )
  assert delta.shape == shape
  assert jnp.abs(delta).max() <= b.eps + 1e-6
  # Averaged over fresh views, the poisoned data is easier to contrast.
  keys = jax.random.split(jax.random.key(8), 8)
  mean_loss = lambda im: jnp.mean(
    jnp.stack([objective(im, k).mean() for k in keys])
  )
  poisoned = protect.apply_perturbation(x, delta, groups)
  assert mean_loss(poisoned) < mean_loss(x)


def test_unknown_method_is_named():
  with pytest.raises(ValueError, match="Unknown contrastive method 'swav'"):
    train.init_contrastive_state(
      None, optax.sgd(0.1), jax.random.key(0), (8, 8, 1), method="swav"
    )

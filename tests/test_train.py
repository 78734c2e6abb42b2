"""Trainers: they learn, they resume exactly, they agree on 1 and 4 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aigc_jax import checkpoint, data, diffusion, parallel, protect, train
from aigc_jax.models import DDPMUNet, SmallCNN

# One level (the middle block keeps its attention): a third of the compile
# time of two levels with attention (test_models covers those).
TINY_UNET = dict(
  ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4
)


@pytest.fixture(scope="module")
def digits():
  ds = data.load_dataset("digits", "train")
  return data.to_model_range(ds.images[:256]), ds.labels[:256]


def _ddpm_pieces(optimizer=None):
  model = DDPMUNet(**TINY_UNET, dropout=0.1)
  schedule = diffusion.linear_schedule(100)
  optimizer = optimizer or train.ddpm_optimizer(1e-3, 5, 1.0)
  init = functools.partial(
    train.init_ddpm_state, model, optimizer, jax.random.key(0), (8, 8, 1)
  )
  step = lambda s, b: train.ddpm_train_step(
    s,
    b,
    jax.random.key(1),
    model=model,
    optimizer=optimizer,
    schedule=schedule,
    ema_decay=0.9,
  )
  return init, step


def _classifier_pieces():
  model = SmallCNN(num_classes=10, width=16)
  optimizer = train.classifier_optimizer(0.1, 100)
  init = functools.partial(
    train.init_classifier_state, model, optimizer, jax.random.key(0), (8, 8, 1)
  )
  step = lambda s, b: train.classifier_train_step(
    s,
    b["images"],
    b["labels"],
    jax.random.key(1),
    model=model,
    optimizer=optimizer,
    crop_pad=1,
    flip=False,
  )
  return init, step


def _run(init, step, batch_fn, num_steps, mesh, ckpt_dir=None, every=1000):
  checkpointer = checkpoint.Checkpointer(ckpt_dir) if ckpt_dir else None
  state = train.init_or_restore(init, mesh, checkpointer)
  state = train.train_loop(
    state,
    step,
    batch_fn,
    num_steps=num_steps,
    mesh=mesh,
    checkpointer=checkpointer,
    checkpoint_every=every,
    log_every=1000,
  )
  if checkpointer:
    checkpointer.close()
  return state


def test_classifier_learns(digits):
  x, y = digits
  init, step = _classifier_pieces()
  batch_fn = lambda s: {
    "images": x[data.batch_indices(0, s, 256, 64)],
    "labels": y[data.batch_indices(0, s, 256, 64)],
  }
  losses = []
  state = parallel.replicate(parallel.make_mesh(1), init())
  jstep = jax.jit(step)
  for s in range(100):
    state, m = jstep(state, batch_fn(s))
    losses.append(float(m["loss"]))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_onecycle_rate_rises_linearly_then_falls_to_zero():
  opt = train.classifier_optimizer(
    0.4, 100, schedule="onecycle", weight_decay=0.0, momentum=0.0
  )
  params = {"w": jnp.zeros(())}
  state = opt.init(params)
  rates = []
  for _ in range(100):
    updates, state = opt.update({"w": jnp.ones(())}, state, params)
    rates.append(-float(updates["w"]))  # SGD without momentum: -lr * 1
  np.testing.assert_allclose(rates[:21:5], [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-6)
  np.testing.assert_allclose(rates[60], 0.2, atol=1e-6)
  assert rates[-1] < 0.01 and np.all(np.diff(rates[20:]) < 0)
  with pytest.raises(ValueError, match="onecycle"):
    train.classifier_optimizer(0.1, 10, schedule="step")


def test_label_smoothing_spreads_the_target():
  """With smoothing s the step's loss is the cross-entropy against
  (1 - s) one-hot + s / K; at 0, the plain one."""
  model, optimizer = SmallCNN(num_classes=4, width=4), optax.sgd(0.0)
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1)
  y = jnp.arange(6) % 4
  state = train.init_classifier_state(
    model, optimizer, jax.random.key(1), x.shape[1:]
  )
  logits = model.apply({"params": state.params}, x)
  logp = jax.nn.log_softmax(logits)
  for s in (0.0, 0.3):
    target = (1 - s) * jax.nn.one_hot(y, 4) + s / 4
    _, m = train.classifier_train_step(
      state,
      x,
      y,
      jax.random.key(2),
      model=model,
      optimizer=optimizer,
      crop_pad=0,
      flip=False,
      label_smoothing=s,
    )
    np.testing.assert_allclose(
      m["loss"], -(target * logp).sum(-1).mean(), rtol=1e-5
    )


def test_ddpm_loss_falls(digits):
  x, _ = digits
  init, step = _ddpm_pieces()
  state, jstep, losses = init(), jax.jit(step), []
  for s in range(30):
    state, m = jstep(state, x[data.batch_indices(0, s, 256, 64)])
    losses.append(float(m["loss"]))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  # EMA trails the parameters but has moved away from the initialisation.
  leaf = lambda t: jax.tree.leaves(t)[0]
  assert not jnp.allclose(leaf(state.ema_params), leaf(init().params))
  assert not jnp.allclose(leaf(state.ema_params), leaf(state.params))


@pytest.mark.parametrize("which", ["ddpm", "classifier"])
def test_step_on_four_devices_matches_one(which, digits):
  x, y = digits
  if which == "ddpm":
    # SGD, not Adam: Adam maps float-noise gradients (~1e-9, on parameters
    # the loss barely touches) to ±lr steps, which no reduction order fixes.
    init, step = _ddpm_pieces(optax.sgd(0.1))
    batch = x[:32]
  else:
    init, step = _classifier_pieces()
    batch = {"images": x[:32], "labels": y[:32]}
  outs = []
  for n in (1, 4):
    mesh = parallel.make_mesh(n)
    rep = parallel.replicated(mesh)
    state = jax.jit(init, out_shardings=rep)()
    jstep = jax.jit(step, out_shardings=(rep, rep))
    history = []
    for _ in range(3):
      state, metrics = jstep(state, parallel.shard_batch(mesh, batch))
      history.append(jax.device_get(metrics))
    outs.append((jax.device_get(state.params), history))
  for a, b in zip(
    jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _Killed(Exception):
  pass


def test_interrupted_run_resumes_to_the_same_parameters(digits, tmp_path):
  x, _ = digits
  init, step = _ddpm_pieces()
  mesh = parallel.make_mesh()
  batch_fn = lambda s: x[data.batch_indices(3, s, 256, 32)]
  straight = _run(init, step, batch_fn, 8, mesh)

  calls = []

  def dying_batch_fn(s):
    calls.append(s)
    if s == 6:  # killed after the checkpoint at step 4, mid-way to step 8
      raise _Killed
    return batch_fn(s)

  with pytest.raises(_Killed):
    _run(init, step, dying_batch_fn, 8, mesh, str(tmp_path), every=2)
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 6
  resumed = _run(init, step, batch_fn, 8, mesh, str(tmp_path), every=2)
  assert int(resumed.step) == 8
  for a, b in zip(
    jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_a_stage_resumes_through_its_phases_and_warm_starts_once(
  digits, tmp_path
):
  """`train_stage`: phases run in order to their steps; a stage killed in
  its second phase resumes to the straight run's state; `warm_start` acts on
  a fresh stage only, and a ready state serves as the initialiser."""
  x, labels = digits
  init, step = _classifier_pieces()
  mesh = parallel.make_mesh()
  ready = jax.jit(init)()
  halve = lambda s: s._replace(params=jax.tree.map(lambda p: p / 2, s.params))
  batch_fn = lambda s: {
    "images": x[data.batch_indices(3, s, 256, 32)],
    "labels": labels[data.batch_indices(3, s, 256, 32)],
  }
  plain = lambda s, b: step(s, b)
  stage = lambda path, batches, **kw: train.train_stage(
    str(path),
    kw.pop("init", init),
    ((step, 3), (plain, 6)),
    batches,
    mesh=mesh,
    checkpoint_every=2,
    log_every=1000,
    warm_start=halve,
    **kw,
  )
  straight = stage(tmp_path / "a", batch_fn)
  assert int(straight.step) == 6

  def dying_batch_fn(s):
    if s == 5:  # killed after the checkpoint at step 4, in the second phase
      raise _Killed
    return batch_fn(s)

  with pytest.raises(_Killed):
    stage(tmp_path / "b", dying_batch_fn)
  resumed = stage(tmp_path / "b", batch_fn)  # no second warm start
  from_ready = stage(tmp_path / "c", batch_fn, init=ready)
  leaves = jax.tree.leaves
  for a, b in zip(leaves(straight), leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  # The ready state was initialised by another compilation (an ulp apart).
  for a, b in zip(leaves(straight), leaves(from_ready), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_a_keyed_loop_matches_the_baked_key_and_compiles_once(digits):
  """`train_loop(..., key=k)` runs `step(state, batch, k)`; a second run
  that differs only in its key reuses the first one's compiled step."""
  x, y = digits
  init, baked_step = _classifier_pieces()
  keyed = functools.partial(
    _keyed_classifier_step,
    model=SmallCNN(num_classes=10, width=16),
    optimizer=train.classifier_optimizer(0.1, 100),
  )
  mesh = parallel.make_mesh(1)
  batch_fn = lambda s: {
    "images": x[data.batch_indices(0, s, 256, 32)],
    "labels": y[data.batch_indices(0, s, 256, 32)],
  }
  state = train.init_or_restore(init, mesh, None)
  starts = [jax.tree.map(jnp.copy, state) for _ in range(2)]
  keys = [jax.random.key(1), jax.random.key(2)]
  run = lambda i: train.train_loop(
    starts[i], keyed, batch_fn, num_steps=2, mesh=mesh, key=keys[i]
  )
  first = run(0)
  compiles = []
  listener = lambda name, secs, **_: compiles.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    second = run(1)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert "/jax/core/compile/backend_compile_duration" not in compiles
  baked = _run(init, baked_step, batch_fn, 2, mesh)  # its key is key(1)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(baked), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert any(
    not np.allclose(a, b)
    for a, b in zip(
      jax.tree.leaves(first), jax.tree.leaves(second), strict=True
    )
  )


def _keyed_classifier_step(state, batch, key, *, model, optimizer):
  return train.classifier_train_step(
    state,
    batch["images"],
    batch["labels"],
    key,
    model=model,
    optimizer=optimizer,
    crop_pad=1,
    flip=False,
  )


def test_random_crop_flip():
  x = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 1) / 32 - 0.5
  same = train.random_crop_flip(jax.random.key(0), x, pad=0, flip=False)
  np.testing.assert_array_equal(same, x)
  out = jax.vmap(lambda k: train.random_crop_flip(k, x, pad=1, flip=True))(
    jax.random.split(jax.random.key(0), 8)
  )
  assert out.shape == (8, *x.shape)
  # Padding is black (-1) and every value comes from the image or the padding.
  assert set(np.unique(out)) <= set(np.unique(x)) | {-1.0}
  assert not bool(jnp.all(out == x[None]))


def test_non_finite_loss_stops_the_run(digits):
  x, y = digits
  init, step = _classifier_pieces()

  def diverging_step(state, batch):
    state, metrics = step(state, batch)
    return state, {**metrics, "loss": metrics["loss"] * jnp.nan}

  batch_fn = lambda s: {"images": x[:32], "labels": y[:32]}
  with pytest.raises(FloatingPointError, match="learning rate"):
    train.train_loop(
      init(),
      diverging_step,
      batch_fn,
      num_steps=1,
      mesh=parallel.make_mesh(),
      log_every=1,
    )


def test_adversarial_training_step_attacks_inside_the_budget(digits):
  x, y = digits
  x, y = x[:64], y[:64]
  model = SmallCNN(num_classes=10, width=8)
  optimizer = train.classifier_optimizer(0.05)
  state = train.init_classifier_state(
    model, optimizer, jax.random.key(0), (8, 8, 1)
  )
  b = protect.budget(8)
  attack = train.pgd_attack(b, steps=3)
  logits_fn = lambda im: train.classifier_logits(model, state.params, {}, im)
  adv = attack(logits_fn, x, y, jax.random.key(2))
  assert float(jnp.abs(adv - x).max()) <= b.eps + 1e-6
  assert float(adv.min()) >= -1.0 and float(adv.max()) <= 1.0
  ce = lambda im: optax.softmax_cross_entropy_with_integer_labels(
    logits_fn(im), y
  ).mean()
  assert float(ce(adv)) > float(ce(x))
  step = jax.jit(
    lambda s, k: train.classifier_train_step(
      s, x, y, k, model=model, optimizer=optimizer, attack=attack
    )
  )
  new, metrics = step(state, jax.random.key(3))
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_adversarial_augmentation_takes_the_worst_view(digits):
  x, y = digits
  x, y = x[:32], y[:32]
  model = SmallCNN(num_classes=10, width=8)
  optimizer = train.classifier_optimizer(0.0)
  state = train.init_classifier_state(
    model, optimizer, jax.random.key(0), (8, 8, 1)
  )
  common = dict(model=model, optimizer=optimizer, crop_pad=0, flip=False)
  key = jax.random.key(1)
  plain = train.classifier_train_step(state, x, y, key, **common)[1]["loss"]
  # Identical views: the max over them is the plain loss.
  same = train.classifier_train_step(
    state, x, y, key, views=lambda k, im: im, num_views=3, **common
  )[1]["loss"]
  np.testing.assert_allclose(same, plain, rtol=1e-5)
  # Views that are the image or its negative: the max beats either one.
  flip_sign = lambda k, im: jnp.where(jax.random.bernoulli(k), im, -im)
  negated = train.classifier_train_step(state, -x, y, key, **common)[1]["loss"]
  worst = train.classifier_train_step(
    state, x, y, key, views=flip_sign, num_views=8, **common
  )[1]["loss"]
  assert float(worst) >= max(float(plain), float(negated)) - 1e-5


def test_ueraser_augment_is_random_per_image_and_stays_in_range():
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3), minval=-1.0)
  aug = jax.jit(train.ueraser_augment)
  a, b = aug(jax.random.key(1), x), aug(jax.random.key(1), x)
  np.testing.assert_array_equal(a, b)
  assert a.shape == x.shape and float(a.min()) >= -1 and float(a.max()) <= 1
  changed = np.asarray(jnp.abs(a - x).mean(axis=(1, 2, 3)) > 1e-3)
  assert changed.mean() > 0.5  # most images change, each with its own draws
  assert len(np.unique(np.round(np.asarray(a - x).sum((1, 2, 3)), 4))) > 8
  c = aug(jax.random.key(2), x)
  assert not np.allclose(a, c)
  # Composes with vmap over keys (K views of a batch).
  views = jax.vmap(train.ueraser_augment, in_axes=(0, None))(
    jax.random.split(jax.random.key(3), 4), x[:2]
  )
  assert views.shape == (4, 2, 8, 8, 3)


def test_equalize_is_pils():
  from PIL import Image, ImageOps

  from aigc_jax.train.augment import _equalize

  rng = np.random.default_rng(0)
  # Skewed levels, so that equalisation moves them; one constant channel.
  img = (rng.beta(2.0, 5.0, (16, 16, 3)) * 255).astype(np.uint8)
  img[..., 2] = 77
  want = np.asarray(ImageOps.equalize(Image.fromarray(img)))
  got = np.asarray(jax.jit(_equalize)(img / 255.0)) * 255.0
  np.testing.assert_array_equal(np.round(got).astype(np.uint8), want)
  assert not np.array_equal(want, img)


def test_plasma_is_normalised_and_roughness_adds_detail():
  key = jax.random.key(0)
  smooth = train.plasma(key, (32, 32), 0.2)
  rough = train.plasma(key, (32, 32), 0.9)
  for p in (smooth, rough):
    assert float(p.min()) == 0.0 and abs(float(p.max()) - 1.0) < 1e-6
  detail = lambda p: float(jnp.abs(jnp.diff(p, axis=0)).mean())
  assert detail(rough) > 2 * detail(smooth)

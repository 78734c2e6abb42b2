"""The PGD mechanism and UDP / EUDP / AdvDM."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import recipe_config

from aigc_jax import data, diffusion, parallel, protect, record, train
from aigc_jax.models import DDPMUNet
from aigc_jax.protect import udp_recipes

# One level (the middle block keeps its attention): a third of the compile
# time of two levels with attention (test_models covers those).
TINY_UNET = dict(
  ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4
)


def _images(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 8, 8, 1), np.uint8)


def test_budget_units_and_errors():
  b = protect.budget(8)
  assert b.norm == "linf" and np.isclose(b.eps, 16 / 255)
  assert np.isclose(b.eps_255, 8)
  for bad in (0, -1, 256):
    with pytest.raises(ValueError, match=r"\(0, 255\]"):
      protect.budget(bad)
  with pytest.raises(ValueError, match="linf"):
    protect.budget(8, "l1")


@pytest.mark.parametrize(
  ("eps", "norm"), [(8, "linf"), (3.5, "linf"), (40, "l2")]
)
def test_budget_holds_exactly_after_quantisation(eps, norm):
  b = protect.budget(eps, norm)
  clean = _images(16)
  raw = jax.random.normal(jax.random.key(0), clean.shape) * b.eps
  delta = np.asarray(protect.project(raw, b))
  protected = protect.quantize_protected(clean, delta, b)
  assert protected.dtype == np.uint8
  sizes = protect.perturbation_sizes(clean, protected, norm)
  assert sizes.max() <= eps + 1e-9
  assert sizes.max() > 0.5 * eps  # the perturbation survives rounding
  with pytest.raises(ValueError, match="not projected"):
    protect.quantize_protected(clean, 3 * np.asarray(raw), b)
  with pytest.raises(ValueError, match="the images' shape"):
    protect.quantize_protected(clean, delta[:1], b)  # not broadcast
  with pytest.raises(ValueError, match="the images' shape"):
    protect.quantize_protected(clean, np.repeat(delta, 3, axis=-1), b)
  with pytest.raises(TypeError, match="uint8"):
    protect.quantize_protected(clean / 255.0, delta, b)
  with pytest.raises(ValueError, match="NaN"):
    protect.quantize_protected(clean, delta * np.nan, b)


def test_pgd_ascends_and_descends_within_the_budget():
  b = protect.budget(8)
  x = jnp.zeros((4, 8, 8, 1))
  target = jnp.ones_like(x)
  objective = lambda xa, k: -jnp.sum((xa - target) ** 2, axis=(1, 2, 3))
  zero = jnp.zeros_like(x)
  up, trace = protect.pgd(
    objective,
    x,
    zero,
    jax.random.key(0),
    budget=b,
    steps=5,
    step_size=b.eps / 4,
  )
  assert trace.shape == (5,) and trace[-1] > trace[0]
  np.testing.assert_allclose(up, b.eps, rtol=1e-6)  # pushed to the boundary
  down, _ = protect.pgd(
    objective,
    x,
    zero,
    jax.random.key(0),
    budget=b,
    steps=5,
    step_size=b.eps / 4,
    ascent=False,
  )
  np.testing.assert_allclose(down, -b.eps, rtol=1e-6)
  l2 = protect.budget(40, "l2")
  d, _ = protect.pgd(
    objective, x, zero, jax.random.key(0), budget=l2, steps=5, step_size=l2.eps
  )
  norms = jnp.linalg.norm(d.reshape(4, -1), axis=-1)
  np.testing.assert_allclose(norms, l2.eps, rtol=1e-5)
  # The image box holds too: x near 1 cannot be pushed past it.
  near_one = jnp.full_like(x, 0.99)
  d, _ = protect.pgd(
    objective,
    near_one,
    zero,
    jax.random.key(0),
    budget=b,
    steps=3,
    step_size=b.eps,
  )
  assert float((near_one + d).max()) <= 1.0 + 1e-6
  with pytest.raises(ValueError, match="groups"):
    protect.pgd(
      objective,
      x,
      zero[:2],
      jax.random.key(0),
      budget=b,
      steps=1,
      step_size=0.1,
    )
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    protect.pgd(
      objective,
      x + 5,
      zero,
      jax.random.key(0),
      budget=b,
      steps=1,
      step_size=0.1,
    )


def test_class_wise_perturbations_are_shared_within_a_class():
  b = protect.budget(8)
  x = jax.random.uniform(
    jax.random.key(0), (6, 8, 8, 1), minval=-0.5, maxval=0.5
  )
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  # Class 0's examples pull δ_0 down, class 1's pull δ_1 up.
  w = jnp.array([-1.0, 1.0, 0.5, -2.0, 1.0, 0.5])[:, None, None, None]
  objective = lambda xa, k: jnp.sum(w * xa, axis=(1, 2, 3))
  delta, _ = protect.pgd(
    objective,
    x,
    jnp.zeros((3, 8, 8, 1)),
    jax.random.key(0),
    budget=b,
    steps=3,
    step_size=b.eps / 2,
    groups=labels,
  )
  assert delta.shape == (3, 8, 8, 1)
  applied = protect.apply_perturbation(x, delta, labels) - x
  np.testing.assert_allclose(applied[0], applied[3], atol=1e-6)
  np.testing.assert_allclose(applied[1], applied[4], atol=1e-6)
  np.testing.assert_allclose(applied[0], -b.eps, atol=1e-6)
  np.testing.assert_allclose(applied[1], b.eps, atol=1e-6)


def test_random_start_is_inside_the_budget():
  for b in (protect.budget(8), protect.budget(40, "l2")):
    d = protect.init_perturbation(
      jax.random.key(0), (5, 8, 8, 1), b, random_start=True
    )
    np.testing.assert_allclose(protect.project(d, b), d, atol=1e-6)
    assert float(jnp.abs(d).max()) > 0
  zero = protect.init_perturbation(
    jax.random.key(0), (2, 8, 8, 1), protect.budget(8), random_start=False
  )
  assert not bool(jnp.any(zero))


def test_random_perturbation_lies_on_the_budget_boundary():
  linf = protect.budget(8)
  d = protect.random_perturbation(jax.random.key(0), (5, 8, 8, 1), linf)
  np.testing.assert_allclose(jnp.abs(d), linf.eps, rtol=1e-6)
  assert 0.3 < float(jnp.mean(d > 0)) < 0.7  # both signs
  l2 = protect.budget(40, "l2")
  d = protect.random_perturbation(jax.random.key(0), (5, 8, 8, 1), l2)
  norms = jnp.linalg.norm(d.reshape(5, -1), axis=-1)
  np.testing.assert_allclose(norms, l2.eps, rtol=1e-5)


def _surrogate():
  model = DDPMUNet(**TINY_UNET)
  schedule = diffusion.linear_schedule(100)
  optimizer = train.ddpm_optimizer(1e-3, 2, 1.0)
  state = train.init_ddpm_state(model, optimizer, jax.random.key(0), (8, 8, 1))
  return model, schedule, optimizer, state


def test_udp_perturbation_raises_the_loss_and_vmaps_over_images():
  model, schedule, _, state = _surrogate()
  eps_fn = train.ddpm_eps_fn(model, state.params)
  x = data.to_model_range(_images(4))
  b = protect.budget(8)
  step = functools.partial(
    protect.udp_perturbation,
    eps_fn,
    schedule=schedule,
    budget=b,
    steps=3,
    step_size=b.eps / 2,
    num_draws=4,
  )
  delta, trace = step(x, jnp.zeros_like(x), jax.random.key(1))
  assert trace.shape == (3,)
  loss = lambda d: protect.denoising_objective(eps_fn, schedule, num_draws=64)(
    protect.apply_perturbation(x, d), jax.random.key(9)
  ).mean()
  assert float(loss(delta)) > float(loss(jnp.zeros_like(x)))
  assert float(jnp.abs(delta).max()) <= b.eps + 1e-6
  per_image = jax.vmap(
    lambda xi, k: step(xi[None], jnp.zeros_like(xi[None]), k)[0][0]
  )(x, jax.random.split(jax.random.key(1), 4))
  assert per_image.shape == x.shape
  assert float(jnp.abs(per_image).max()) <= b.eps + 1e-6


def test_eudp_policies():
  s = diffusion.linear_schedule(1000)
  for name in protect.EUDP_POLICIES:
    policy = protect.eudp_policy(name, s)
    np.testing.assert_allclose(policy.probs.sum(), 1.0, rtol=1e-5)
  assert float(protect.eudp_policy("early", s).probs[500]) == 0.0
  with pytest.raises(ValueError, match="early"):
    protect.eudp_policy("middle", s)


def test_udp_perturbation_is_deterministic_and_same_on_1_and_4_devices():
  model, schedule, _, state = _surrogate()
  b = protect.budget(8)
  policy = protect.eudp_policy("early", schedule)
  x = data.to_model_range(_images(8))

  def perturb(params, xs, delta, key):
    return protect.udp_perturbation(
      train.ddpm_eps_fn(model, params),
      xs,
      delta,
      key,
      schedule,
      budget=b,
      steps=3,
      step_size=b.eps / 4,
      policy=policy,
    )[0]

  outs = []
  for n in (1, 4, 4):
    mesh = parallel.make_mesh(n)
    jfn = jax.jit(perturb, out_shardings=parallel.data_sharding(mesh))
    d = jfn(
      parallel.replicate(mesh, state.params),
      parallel.shard_batch(mesh, x),
      parallel.shard_batch(mesh, np.zeros_like(x)),
      jax.random.key(3),
    )
    outs.append(np.asarray(d))
  np.testing.assert_array_equal(outs[1], outs[2])  # same seed, same δ
  # Sign steps turn float-rounding differences of near-zero gradients into
  # ±step, so 1 vs 4 devices agree on almost every coordinate, not all.
  assert np.mean(np.isclose(outs[0], outs[1], atol=1e-6)) > 0.99
  assert np.abs(outs[0]).max() <= b.eps + 1e-6


def _udp_smoke_config():
  config = recipe_config("udp_smoke")
  config.surrogate.model.update(TINY_UNET)
  config.surrogate.diffusion.num_timesteps = 100
  return config


def test_protection_run_resumes_without_redoing_finished_chunks(tmp_path):

  config = _udp_smoke_config()
  config.protect.chunk_size = 4
  mesh = parallel.make_mesh()
  *_, state = _surrogate()
  images = _images(10)
  workdir = str(tmp_path / "eudp")
  steps = udp_recipes.protection_steps(config, mesh)
  first, trace = udp_recipes.protect_dataset(
    config, workdir, "eudp:early", images, state, mesh, steps
  )
  assert trace.shape == (3, config.protect.rounds, config.protect.pgd_steps)
  assert sorted(os.listdir(workdir)) == [
    "chunk_0000.npz",
    "chunk_0001.npz",
    "chunk_0002.npz",
    "ckpt",
    "layout.json",
  ]
  assert protect.spent_seconds(workdir) > 0
  # Interrupted during the last chunk: its δ and checkpoint never landed.
  last = os.path.join(workdir, "chunk_0002.npz")
  os.remove(last)
  shutil.rmtree(os.path.join(workdir, "ckpt", "3"))
  done = os.path.getmtime(os.path.join(workdir, "chunk_0000.npz"))
  again, _ = udp_recipes.protect_dataset(
    config, workdir, "eudp:early", images, state, mesh, steps
  )
  np.testing.assert_array_equal(first, again)
  assert os.path.getmtime(os.path.join(workdir, "chunk_0000.npz")) == done
  # Killed between the last chunk and its checkpoint: the chunk is computed
  # again and its file, δ, trace and first time, stays as it was; the time
  # counts each chunk once.
  saved = record.load_arrays(last)
  shutil.rmtree(os.path.join(workdir, "ckpt", "3"))
  udp_recipes.protect_dataset(
    config, workdir, "eudp:early", images, state, mesh, steps
  )
  for k, v in record.load_arrays(last).items():
    np.testing.assert_array_equal(v, saved[k])
  assert protect.spent_seconds(workdir) == round(
    sum(
      float(record.load_arrays(f"{workdir}/chunk_000{c}.npz")["seconds"])
      for c in range(3)
    ),
    1,
  )
  assert protect.perturbation_sizes(images, again).max() <= 8
  with pytest.raises(ValueError, match="eudp:<policy>"):
    udp_recipes.protect_dataset(
      config, workdir, "photoguard", images, state, mesh, steps
    )


def test_random_control_is_model_free_noise_at_the_budget(tmp_path):

  config = _udp_smoke_config()
  mesh = parallel.make_mesh()
  *_, state = _surrogate()
  images = _images(8)
  steps = udp_recipes.protection_steps(config, mesh)
  unused = steps._replace(inner_min=None, perturb=None)  # no optimisation
  protected, _ = udp_recipes.protect_dataset(
    config, str(tmp_path / "random"), "random", images, state, mesh, unused
  )
  sizes = np.abs(protected.astype(int) - images.astype(int))
  # ±8 levels wherever the image box does not clip the noise.
  inside = (images >= 8) & (images <= 247)
  assert (sizes[inside] == 8).all() and sizes.max() == 8
  # The surrogate never changed: only the δ chunks (and their times) are
  # written, no ckpt/.
  assert sorted(os.listdir(tmp_path / "random")) == [
    "chunk_0000.npz",
    "layout.json",
  ]


@pytest.mark.parametrize("method", ["min", "bilevel"])
def test_every_reading_runs_through_the_launcher_steps(tmp_path, method):

  config = _udp_smoke_config()
  config.protect.update(rounds=2, pgd_steps=2)
  mesh = parallel.make_mesh()
  *_, state = _surrogate()
  images = _images(8)
  steps = udp_recipes.protection_steps(config, mesh)
  protected, trace = udp_recipes.protect_dataset(
    config, str(tmp_path / method), method, images, state, mesh, steps
  )
  assert trace.shape == (1, 2, 2) and np.isfinite(trace).all()
  sizes = protect.perturbation_sizes(images, protected)
  assert 0 < sizes.max() <= 8


@pytest.mark.parametrize("steps", [1, 4])
def test_pgd_unrolled_equals_the_loop(steps):
  x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1), minval=-1.0)
  target = jax.random.uniform(jax.random.key(1), x.shape, minval=-1.0)

  def objective(x_adv, key):
    noise = 0.1 * jax.random.normal(key, x_adv.shape)
    return ((x_adv - target + noise) ** 2).sum(axis=(1, 2, 3))

  runs = [
    protect.pgd(
      objective,
      x,
      jnp.zeros_like(x),
      jax.random.key(2),
      budget=protect.budget(8),
      steps=steps,
      step_size=protect.budget(2).eps,
      unroll=unroll,
    )
    for unroll in (1, True)
  ]
  assert runs[1][1].shape == (steps,)
  np.testing.assert_allclose(runs[0][0], runs[1][0], atol=1e-6)
  np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-5)


def test_step_sizes_are_stated_in_grey_levels():
  assert protect.step_size(1.0) == pytest.approx(2 / 255)
  assert protect.step_size(2.0) == pytest.approx(protect.budget(2).eps)
  with pytest.raises(ValueError, match=r"\[0, 255\] units"):
    protect.step_size(-1.0)


def test_latent_recipes_sweep_budgets_with_the_step_scaled():
  from aigc_jax.protect import latent_recipes

  config = recipe_config("udp_smoke")
  config.protect.update(eps=64.0, step_size=2.0, budgets=())
  assert latent_recipes.budgets(config) == (64.0,)
  assert not latent_recipes.sweeps(config)
  config.protect.budgets = (8.0, 64.0)
  assert latent_recipes.sweeps(config)
  at = latent_recipes.config_at_budget(config, 8.0)
  assert (at.protect.eps, at.protect.step_size) == (8.0, 0.25)
  assert config.protect.eps == 64.0  # the caller's config is left alone
  assert latent_recipes.anchor_class("class:4") == 4
  assert latent_recipes.anchor_class("gray") is None
  x = jnp.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8, 1)
  config.protect.encoder_target = "gray"
  gray = latent_recipes.encoder_target(config, x, jnp.zeros((1, 8, 8, 1)))
  np.testing.assert_array_equal(gray, jnp.zeros_like(x))
  config.protect.encoder_target = "class:3"
  anchors = jnp.stack([jnp.full((8, 8, 1), v) for v in (-1.0, 1.0)])
  nearest = latent_recipes.encoder_target(config, x, anchors)
  np.testing.assert_array_equal(nearest, anchors)  # dark to -1, light to 1
  config.protect.encoder_target = "sepia"
  with pytest.raises(ValueError, match="'gray', 'blur' or 'class:<k>'"):
    latent_recipes.encoder_target(config, x, anchors)


def _original_pgd(grad_fn, x, delta0, b, steps, size):
  """Madry et al.'s loop as the original code writes it (EMN's
  `min_min_attack`, REMN's and CP's attacks): the clipped image is the
  variable, so every pixel gets its gradient."""
  x_adv = np.clip(x + delta0, -1.0, 1.0)
  for _ in range(steps):
    x_adv = x_adv + size * np.sign(grad_fn(x_adv))
    eta = np.clip(x_adv - x, -b.eps, b.eps)
    x_adv = np.clip(x + eta, -1.0, 1.0)
  return x_adv - x


def test_pgd_random_start_steps_like_the_original_attacks():
  # Images near the box's edges, so that a random start leaves it.
  rng = np.random.default_rng(0)
  x = rng.choice([-1.0, -0.98, 0.0, 0.98, 1.0], (4, 6, 6, 1)).astype(np.float32)
  target = rng.uniform(-1, 1, x.shape).astype(np.float32)
  b = protect.budget(8)
  start = np.asarray(
    protect.init_perturbation(jax.random.key(0), x.shape, b, random_start=True)
  )
  assert np.any(np.abs(x + start) > 1.0)  # the case under test
  delta, _ = protect.pgd(
    lambda xa, k: -((xa - target) ** 2).sum(axis=(1, 2, 3)),
    jnp.asarray(x),
    jnp.asarray(start),
    jax.random.key(1),
    budget=b,
    steps=3,
    step_size=protect.step_size(2),
  )
  expected = _original_pgd(
    lambda xa: -2 * (xa - target), x, start, b, 3, protect.step_size(2)
  )
  np.testing.assert_allclose(delta, expected, atol=1e-6)
  # Pixels on the box's edge move too (through `jnp.clip` they got half
  # the gradient, and none beyond the edge).
  grad = jax.grad(lambda d: protect.at_clipped_image(x, d).sum())(
    jnp.asarray(start)
  )
  np.testing.assert_array_equal(grad, np.ones_like(x))

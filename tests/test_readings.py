"""The readings of UDP's max-min as objectives (aigc_jax.protect.udp,
aigc_jax.protect.encoder) and the alternation engine
(aigc_jax.protect.alternation)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import data, parallel, protect


def _finite_difference(f, x, direction, h=1e-5):
  """(f(x + h d) − f(x − h d)) / 2h in float64."""
  x, direction = np.asarray(x, np.float64), np.asarray(direction, np.float64)
  return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _linear_denoiser(w):
  """ε̂(x_t, t) = w · x_t: a model whose every derivative is known."""
  return lambda x_t, t: w * x_t


def _schedule():
  from aigc_jax import diffusion

  return diffusion.linear_schedule(50)


def test_denoising_objective_gradient_matches_finite_differences():
  schedule = _schedule()
  x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1), minval=-0.5)
  objective = protect.reading_objective(
    "max",
    eps_fn_of=_linear_denoiser,
    params=jnp.asarray(0.3),
    clean=x,
    schedule=schedule,
    num_draws=2,
  )
  f = lambda xa: float(objective(jnp.asarray(xa), jax.random.key(1)).sum())
  d = jax.random.normal(jax.random.key(2), x.shape)
  grad = jax.grad(lambda xa: objective(xa, jax.random.key(1)).sum())(x)
  np.testing.assert_allclose(
    float(jnp.vdot(grad, d)), _finite_difference(f, x, d), rtol=1e-6
  )


def test_encoder_objective_gradient_matches_finite_differences():
  a = jax.random.normal(jax.random.key(0), (16, 6))
  encode = lambda xa: jnp.tanh(xa.reshape(xa.shape[0], -1) @ a)
  x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1), minval=-1.0)
  target = jnp.zeros((1, 6))
  objective = protect.latent_distance_objective(encode, target)
  d = jax.random.normal(jax.random.key(2), x.shape)
  grad = jax.grad(lambda xa: objective(xa, None).sum())(x)
  f = lambda xa: float(objective(jnp.asarray(xa), None).sum())
  np.testing.assert_allclose(
    float(jnp.vdot(grad, d)), _finite_difference(f, x, d), rtol=1e-6
  )
  # Away from the clean latents: zero at δ = 0, positive elsewhere.
  away = protect.latent_distance_objective(encode, encode(x))
  assert float(away(x, None).max()) == 0.0
  assert float(away(x + 0.1 * d, None).min()) > 0.0


def test_bilevel_gradient_through_one_update_is_the_chain_rule():
  """With L_train(θ, x) = ½ mean_i ‖θ − x_i‖² and L_ref(θ) = ½ ‖θ − r‖², one
  SGD step gives θ₁ = θ − η (θ − x̄), so dL_ref(θ₁)/dx_i = η/B (θ₁ − r)."""
  b, eta = 4, 0.3
  x = jax.random.normal(jax.random.key(0), (b, 2, 2, 1))
  theta = jax.random.normal(jax.random.key(1), (2, 2, 1))
  r = jax.random.normal(jax.random.key(2), (2, 2, 1))
  train_loss = lambda p, xa, k: (
    0.5 * jnp.mean(jnp.sum(jnp.square(p - xa), axis=(1, 2, 3)))
  )
  ref_loss = lambda p, k: 0.5 * jnp.sum(jnp.square(p - r))
  objective = protect.bilevel_objective(
    train_loss, ref_loss, theta, inner_steps=1, inner_lr=eta
  )
  values = objective(x, jax.random.key(3))
  theta1 = theta - eta * (theta - x.mean(axis=0))
  np.testing.assert_allclose(values, ref_loss(theta1, None) * np.ones(b))
  grad = jax.grad(lambda xa: objective(xa, jax.random.key(3))[0])(x)
  expected = np.broadcast_to(eta / b * (theta1 - r), x.shape)
  np.testing.assert_allclose(grad, expected, rtol=1e-10)


def test_bilevel_gradient_through_two_updates_matches_finite_differences():
  schedule = _schedule()
  x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1), minval=-0.5)
  objective = protect.reading_objective(
    "bilevel",
    eps_fn_of=_linear_denoiser,
    params=jnp.asarray(0.2),
    clean=x,
    schedule=schedule,
    bilevel_steps=2,
    bilevel_lr=0.5,
  )
  key = jax.random.key(4)
  d = jax.random.normal(jax.random.key(5), x.shape)
  grad = jax.grad(lambda xa: objective(xa, key)[0])(x)
  f = lambda xa: float(objective(jnp.asarray(xa), key)[0])
  np.testing.assert_allclose(
    float(jnp.vdot(grad, d)), _finite_difference(f, x, d), rtol=1e-5
  )
  assert float(jnp.abs(grad).max()) > 0


def test_pgd_vmaps_over_budgets_and_keeps_each_exactly():
  x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1), minval=-0.9)
  target = jnp.ones_like(x)
  objective = lambda xa, k: -jnp.sum((xa - target) ** 2, axis=(1, 2, 3))
  eps_255 = jnp.asarray([8.0, 16.0, 32.0, 64.0])

  def protect_at(e):
    b = protect.Budget("linf", e / protect.LEVELS_PER_UNIT)
    delta, _ = protect.pgd(
      objective,
      x,
      jnp.zeros_like(x),
      jax.random.key(1),
      budget=b,
      steps=40,
      step_size=2.0 / protect.LEVELS_PER_UNIT,
    )
    return delta

  deltas = jax.vmap(protect_at)(eps_255)
  images = np.asarray(np.rint((x + 1) * 127.5), np.uint8)
  for e, delta in zip(eps_255, deltas, strict=True):
    got = np.abs(np.asarray(delta)).max() * protect.LEVELS_PER_UNIT
    np.testing.assert_allclose(got, float(e), rtol=1e-6)
    protected = protect.quantize_protected(
      images, np.asarray(delta), protect.budget(float(e))
    )
    sizes = protect.perturbation_sizes(images, protected)
    assert sizes.max() <= float(e)
    assert sizes.max() >= float(e) - 1


def test_method_names_parse_to_readings_and_policies():
  assert protect.parse_method("udp")[::2] == ("max", "uniform")
  assert protect.parse_method("eudp:early")[::2] == ("max", "early")
  assert protect.parse_method("min:snr_sampling")[::2] == (
    "min",
    "snr_sampling",
  )
  assert protect.parse_method("random")[2] is None
  for bad, match in [
    ("photoguard", "Unknown protection method"),
    ("eudp", "needs a policy"),
    ("random:early", "takes no timestep policy"),
    ("max:middle", "Unknown EUDP policy"),
  ]:
    with pytest.raises(ValueError, match=match):
      protect.parse_method(bad)


def test_snr_sampling_policy_draws_t_where_delta_outweighs_the_noise():
  schedule = _schedule()
  policy = protect.eudp_policy("snr_sampling", schedule)
  probs = np.asarray(policy.probs)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
  assert (np.diff(probs) < 0).all()  # the SNR falls with t


# The engine, with a quadratic "model": state θ, a model step moves θ toward
# the protected batch's mean, the perturbation step descends ‖x + δ − θ‖².


def _engine_parts():
  def model_step(state, batch):
    theta = state["theta"]
    return {"theta": theta + 0.5 * (batch.mean(axis=0) - theta)}, {}

  def perturbation_step(state, chunk, delta, key):
    def objective(xa, k):
      d = xa - state["theta"] + 0.01 * jax.random.normal(k, xa.shape)
      return jnp.sum(d**2, axis=(1, 2, 3))

    return protect.pgd(
      objective,
      chunk.x,
      delta,
      key,
      budget=protect.budget(8),
      steps=2,
      step_size=protect.budget(2).eps,
      ascent=False,
      groups=chunk.groups,
    )

  return jax.jit(model_step), jax.jit(perturbation_step)


def _alternate(mesh, workdir=None, **kwargs):
  model_step, perturbation_step = _engine_parts()
  x = np.asarray(
    jax.random.uniform(jax.random.key(0), (10, 4, 4, 1), minval=-1.0),
    np.float32,
  )
  kwargs.setdefault("schedule", protect.Schedule(2, 3, 4, 4))
  return protect.alternate(
    x,
    lambda k, shape: jnp.zeros(shape, jnp.float32),
    {"theta": jnp.zeros((4, 4, 1), jnp.float32)},
    jax.random.key(1),
    perturbation_step=perturbation_step,
    model_step=model_step,
    mesh=mesh,
    workdir=workdir,
    **kwargs,
  )


def test_alternation_is_the_same_on_1_and_4_devices():
  with jax.enable_x64(False):
    one = _alternate(parallel.make_mesh(1))
    four = _alternate(parallel.make_mesh(4))
  assert one[0].shape == (10, 4, 4, 1) and one[1].shape == (3, 2, 2)
  np.testing.assert_allclose(one[0], four[0], atol=1e-6)
  np.testing.assert_allclose(one[2]["theta"], four[2]["theta"], atol=1e-6)
  assert np.abs(one[0]).max() <= protect.budget(8).eps + 1e-6


def test_alternation_resumes_exactly_after_a_kill_between_delta_and_checkpoint(
  tmp_path,
):
  with jax.enable_x64(False):
    mesh = parallel.make_mesh(4)
    first = _alternate(mesh, str(tmp_path / "a"))
    # Killed after the last chunk's δ was written but before its
    # checkpoint: the next run must redo that chunk from the state the chunk
    # before left, and keep the finished chunks.
    shutil.rmtree(tmp_path / "a" / "ckpt" / "3")
    kept = os.path.getmtime(tmp_path / "a" / "chunk_0001.npz")
    again = _alternate(mesh, str(tmp_path / "a"))
    assert os.path.getmtime(tmp_path / "a" / "chunk_0001.npz") == kept
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[2]["theta"], again[2]["theta"])
    # Another chunking of the same workdir is refused.
    with pytest.raises(ValueError, match="same data and chunk size"):
      _alternate(
        mesh, str(tmp_path / "a"), schedule=protect.Schedule(2, 3, 4, 5)
      )


def test_alternation_of_class_wise_delta_shares_rows_across_chunks(tmp_path):
  with jax.enable_x64(False):
    groups = np.asarray([0, 1, 2] * 3 + [0])
    delta, trace, _ = _alternate(
      parallel.make_mesh(4),
      str(tmp_path / "c"),
      groups=groups,
      num_groups=3,
    )
    assert delta.shape == (3, 4, 4, 1) and trace.shape == (3, 2, 2)
    assert np.abs(delta).max() <= protect.budget(8).eps + 1e-6
    again, *_ = _alternate(
      parallel.make_mesh(4),
      str(tmp_path / "c"),
      groups=groups,
      num_groups=3,
    )
    np.testing.assert_array_equal(delta, again)
    assert os.path.exists(tmp_path / "c" / "chunk_0002.npz")
    with pytest.raises(ValueError, match="groups must lie"):
      _alternate(parallel.make_mesh(4), groups=groups + 1, num_groups=3)


def _rowwise_perturbation_step(state, chunk, delta, key):
  """A key-free, row-wise objective: the result of each image is the same
  whichever slice it is updated in."""
  del key
  objective = lambda xa, k: jnp.sum((xa - state["theta"]) ** 2, axis=(1, 2, 3))
  return protect.pgd(
    objective,
    chunk.x,
    delta,
    jax.random.key(0),
    budget=protect.budget(8),
    steps=2,
    step_size=protect.budget(2).eps,
    ascent=False,
    groups=chunk.groups,
  )


def test_alternation_slices_stops_and_draws_in_epoch_order():
  """EMN's and CP's schedules: δ updated slice by slice (all of them, or a
  few drawn in epoch order), model minibatches in training order, and a
  stopping rule asked after every round."""
  with jax.enable_x64(False):
    mesh = parallel.make_mesh(2)
    perturbation_step = jax.jit(_rowwise_perturbation_step)
    seen = []

    def model_step(state, batch):
      seen.append(np.asarray(batch))
      return {"theta": state["theta"] + 0.5 * batch.mean(axis=0)}, {}

    x = np.asarray(
      jax.random.uniform(jax.random.key(0), (10, 4, 4, 1), minval=-1.0),
      np.float32,
    )

    def run(schedule, **kwargs):
      seen.clear()
      return protect.alternate(
        x,
        lambda k, shape: jnp.zeros(shape, jnp.float32),
        {"theta": jnp.zeros((4, 4, 1), jnp.float32)},
        jax.random.key(1),
        perturbation_step=perturbation_step,
        model_step=model_step,
        schedule=schedule,
        mesh=mesh,
        seed=3,
        **kwargs,
      )

    whole = run(protect.Schedule(2, 3, 4, 10, epoch_order=True))
    # Training order: step s = r * inner_steps + m is batch_indices(seed, s).
    first = x[data.batch_indices(3, 0, 10, 4)]
    np.testing.assert_array_equal(seen[0], first)
    sliced = run(protect.Schedule(2, 3, 4, 10, slice_size=3, epoch_order=True))
    np.testing.assert_allclose(sliced[0], whole[0], atol=1e-6)
    assert sliced[1].shape == whole[1].shape == (1, 2, 2)
    # A stop after the first round: its δ, and NaN for the round not run.
    stopped = run(
      protect.Schedule(2, 3, 4, 10, epoch_order=True),
      until=lambda state, protected, conditions: True,
    )
    once = run(protect.Schedule(1, 3, 4, 10, epoch_order=True))
    np.testing.assert_array_equal(stopped[0], once[0])
    assert (
      np.isnan(stopped[1][0, 1]).all() and not np.isnan(stopped[1][0, 0]).any()
    )
    # A few slices drawn in epoch order: only their rows move.
    drawn = run(
      protect.Schedule(1, 0, 4, 10, slice_size=4, random_slices=1),
    )
    moved = np.flatnonzero(np.abs(drawn[0]).reshape(10, -1).max(axis=1) > 0)
    np.testing.assert_array_equal(
      moved, np.sort(data.batch_indices(3 + 1, 0, 10, 4))
    )


def test_random_like_keeps_each_norm_through_uint8_rounding():
  with jax.enable_x64(False):
    b = protect.budget(8)
    levels = jax.random.randint(jax.random.key(0), (3, 8, 8, 1), -8, 9)
    delta = levels.astype(jnp.float32) / protect.LEVELS_PER_UNIT
    noise = protect.random_like(jax.random.key(1), delta)
    norms = lambda a: np.linalg.norm(np.asarray(a).reshape(3, -1), axis=1)
    np.testing.assert_allclose(norms(noise), norms(delta), rtol=1e-6)
    assert float(jnp.abs(noise).max()) <= b.eps + 1e-7
    # Half black, half mid-gray: no sign may leave the image box.
    clean = np.full((3, 8, 8, 1), 128, np.uint8)
    clean[:, :4] = 0
    x = jnp.asarray(clean / 127.5 - 1.0, jnp.float32)
    noise = protect.random_like(jax.random.key(1), delta, x)
    assert float(jnp.min(x + noise)) >= -1.0
    protected = protect.quantize_protected(clean, np.asarray(noise), b)
    np.testing.assert_allclose(
      protect.perturbation_sizes(clean, protected, "l2"),
      norms(delta) * protect.LEVELS_PER_UNIT,
      rtol=1e-5,
    )
    # Not the reference's direction: a random one.
    cosine = float(jnp.vdot(noise[0], delta[0])) / (
      norms(noise)[0] * norms(delta)[0]
    )
    assert abs(cosine) < 0.5


def test_nearest_anchors_pairs_each_image_with_its_closest_anchor():
  anchors = jax.random.uniform(jax.random.key(0), (5, 4, 4, 1), minval=-1.0)
  # Each image is an anchor plus a little noise, in a shuffled order.
  order = jnp.array([3, 0, 4, 4, 1])
  noise = 0.01 * jax.random.normal(jax.random.key(1), (5, 4, 4, 1))
  x = anchors[order] + noise
  np.testing.assert_array_equal(
    protect.nearest_anchors(x, anchors), anchors[order]
  )
  # The decoded form of the target attack is the same objective with the
  # reconstruction as `encode` and the target images as the reference.
  reconstruct = lambda xa: jnp.tanh(2 * xa)
  objective = protect.latent_distance_objective(
    reconstruct, protect.nearest_anchors(x, anchors)
  )
  grad = jax.grad(lambda xa: objective(xa, None).sum())(x)
  d = jax.random.normal(jax.random.key(2), x.shape)
  f = lambda xa: float(objective(jnp.asarray(xa), None).sum())
  np.testing.assert_allclose(
    float(jnp.vdot(grad, d)), _finite_difference(f, x, d), rtol=1e-6
  )

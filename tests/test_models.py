"""Networks: the paper configurations' sizes, shapes, gradients."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import pytest

from aigc_jax.models import (
  DDPM_CIFAR10,
  DDPMUNet,
  ResNet18,
  SmallCNN,
  count_params,
  make_classifier,
  timestep_embedding,
)

TINY_UNET = dict(
  ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4
)


def _init_shapes(model, x, *args):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, *args))


def test_ddpm_unet_cifar10_has_ho_et_al_parameter_count():
  shapes = _init_shapes(
    DDPMUNet(**DDPM_CIFAR10),
    jnp.zeros((1, 32, 32, 3)),
    jnp.zeros((1,), jnp.int32),
  )
  assert count_params(shapes["params"]) == 35_746_307  # 35.7M, Ho et al.


def test_tiny_unet_shapes_dropout_and_input_gradient():
  # Jitted: a UNet run op by op compiles every primitive on its own, which
  # takes several times longer than compiling the whole forward pass.
  model = DDPMUNet(**TINY_UNET, dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.array([0, 999])
  params = jax.jit(model.init)(jax.random.key(1), x, t)["params"]
  apply = jax.jit(lambda y, s: model.apply({"params": params}, y, s))
  out = apply(x, t)
  assert out.shape == x.shape
  # Different timesteps give different outputs; dropout only when training.
  assert not jnp.allclose(out[0], apply(x, t[::-1])[0])
  train = jax.jit(
    lambda k: model.apply(
      {"params": params}, x, t, train=True, rngs={"dropout": k}
    )
  )
  assert not jnp.allclose(train(jax.random.key(2)), train(jax.random.key(3)))
  g = jax.jit(jax.grad(lambda y: apply(y, t).sum()))(x)
  assert g.shape == x.shape and bool(jnp.any(g != 0))
  per_example = jax.jit(jax.vmap(lambda y, s: apply(y[None], s[None])[0]))(x, t)
  assert jnp.allclose(per_example, out, atol=1e-5)


def test_bfloat16_unet_keeps_the_pgd_gradient_sign():
  """bfloat16 computation (float32 parameters) moves ε̂ by about 1.3% and
  flips the sign of the denoising loss's input gradient, the one thing a
  PGD step (UDP, AdvDM, EMN) takes from it, on under 1% of pixels
  (measured over four seeds: 1.2-1.4% and 0.4-0.7%)."""
  x = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3), minval=-1)
  noise = jax.random.normal(jax.random.key(1), x.shape)
  t = jnp.arange(8) * 120
  full = DDPMUNet(**TINY_UNET)
  params = jax.jit(full.init)(jax.random.key(2), x, t)["params"]

  def eps_and_grad(model):
    eps = lambda y: model.apply({"params": params}, y, t)
    loss = lambda y: jnp.mean((eps(y + 0.5 * noise) - noise) ** 2)
    return jax.jit(lambda y: (eps(y), jax.grad(loss)(y)))(x)

  eps32, g32 = eps_and_grad(full)
  eps16, g16 = eps_and_grad(full.clone(dtype=jnp.bfloat16))
  assert eps16.dtype == jnp.float32 and g16.dtype == jnp.float32
  relative = jnp.linalg.norm(eps16 - eps32) / jnp.linalg.norm(eps32)
  flipped = jnp.mean(jnp.sign(g16) != jnp.sign(g32))
  assert 0 < relative < 0.03, relative
  assert flipped < 0.02, flipped


def test_remat_unet_computes_the_same_from_fewer_residuals():
  """`remat=True` keeps the parameters and the function (values and
  gradients) and keeps far fewer activations between the forward and the
  backward pass: the vjp's residuals, parameters included (7.5 -> 1.4 MB
  here; the CIFAR-10 UNet's training step at batch 128: 12.0 -> 1.9 GB)."""
  x = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3), minval=-1)
  t = jnp.arange(8) * 120
  full = DDPMUNet(**TINY_UNET, dropout=0.1)
  params = jax.jit(full.init)(jax.random.key(2), x, t)["params"]
  remat = full.clone(remat=True)
  assert jax.tree.structure(
    jax.eval_shape(remat.init, jax.random.key(2), x, t)["params"]
  ) == jax.tree.structure(params)

  def forward_grads_and_residual_bytes(model):
    # train=True with dropout: the static `train` and the rng pass through.
    apply = lambda p, y: model.apply(
      {"params": p}, y, t, train=True, rngs={"dropout": jax.random.key(3)}
    )
    residuals = lambda p, y: jax.tree.leaves(jax.vjp(apply, p, y)[1])
    kept = jax.eval_shape(residuals, params, x)

    def forward_and_grads(p, y):
      eps, vjp = jax.vjp(apply, p, y)
      return eps, vjp(jnp.ones_like(eps))

    eps, grads = jax.jit(forward_and_grads)(params, x)
    return eps, grads, sum(r.size * r.dtype.itemsize for r in kept)

  eps, grads, kept = forward_grads_and_residual_bytes(full)
  eps_r, grads_r, kept_r = forward_grads_and_residual_bytes(remat)
  assert jnp.allclose(eps, eps_r, atol=1e-5)
  # One relative error over all gradients: some (the biases before a
  # GroupNorm) are zero up to rounding.
  g, g_r = (jax.flatten_util.ravel_pytree(v)[0] for v in (grads, grads_r))
  assert jnp.linalg.norm(g - g_r) <= 1e-5 * jnp.linalg.norm(g)
  assert kept_r < kept / 3, (kept, kept_r)


def test_unet_rejects_bad_shapes():
  model = DDPMUNet(**TINY_UNET)
  with pytest.raises(ValueError, match="divisible"):
    model.init(jax.random.key(0), jnp.zeros((1, 7, 7, 1)), jnp.zeros((1,), int))
  with pytest.raises(ValueError, match="NHWC"):
    model.init(jax.random.key(0), jnp.zeros((7, 7, 1)), jnp.zeros((1,), int))


def test_timestep_embedding():
  emb = timestep_embedding(jnp.array([0, 10]), 6)
  assert emb.shape == (2, 6)
  assert jnp.allclose(emb[0], jnp.array([0, 0, 0, 1, 1, 1.0]))


def test_resnet18_size_and_batchnorm_state():
  model = ResNet18(num_classes=10)
  shapes = _init_shapes(model, jnp.zeros((1, 32, 32, 3)))
  assert count_params(shapes["params"]) == 11_173_962
  assert "batch_stats" in shapes


@pytest.mark.parametrize("name", ["resnet18", "small_cnn"])
def test_bfloat16_classifiers_keep_float32_parameters_and_logits(name):
  """Mixed precision: the same parameters, bfloat16 convolutions, float32
  logits within bfloat16's rounding of the float32 model's."""
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1)
  full = make_classifier(name, 10, width=8)
  half = make_classifier(name, 10, width=8, dtype="bfloat16")
  variables = full.init(jax.random.key(0), x)
  assert jax.tree.all(
    jax.tree.map(lambda p: p.dtype == jnp.float32, variables["params"])
  )
  want = full.apply(variables, x)
  got = half.apply(variables, x)
  assert got.dtype == jnp.float32
  assert jnp.abs(got - want).max() < 0.05 * jnp.abs(want).max()
  assert not jnp.array_equal(got, want)  # bfloat16 did the work


def test_small_cnn_features_and_grad():
  model = make_classifier("small_cnn", 10, width=8)
  assert isinstance(model, SmallCNN)
  x = jnp.zeros((3, 8, 8, 1))
  params = model.init(jax.random.key(0), x)["params"]
  logits, feats = model.apply({"params": params}, x, return_features=True)
  assert logits.shape == (3, 10) and feats.shape == (3, 32)
  g = jax.grad(lambda y: model.apply({"params": params}, y)[:, 0].sum())(x)
  assert g.shape == x.shape
  with pytest.raises(ValueError, match="resnet18"):
    make_classifier("vgg", 10)


def test_small_cnn_norm_adds_batchnorm_and_keeps_the_plain_names():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  plain = SmallCNN(width=8).init(jax.random.key(0), x)
  normed = SmallCNN(width=8, norm=True)
  variables = normed.init(jax.random.key(0), x)
  assert "batch_stats" not in plain and "batch_stats" in variables
  assert set(plain["params"]) < set(variables["params"])
  assert {"bn0a", "bn1b", "bn_fc"} <= set(variables["batch_stats"])
  _, updates = normed.apply(variables, x, train=True, mutable=["batch_stats"])
  before = variables["batch_stats"]["bn0a"]["mean"]
  assert not jnp.allclose(updates["batch_stats"]["bn0a"]["mean"], before)


@pytest.mark.parametrize(
  ("strides", "padding", "kernel"),
  [
    ((1, 1), "SAME", 3),
    ((2, 2), "SAME", 3),
    ((2, 2), "VALID", 3),
    ((1, 2), ((2, 1), (0, 3)), 5),
    ((2, 2), "SAME", 1),
  ],
)
def test_cpu_conv_gradients_equal_xlas(strides, padding, kernel):
  """The matmul kernel gradient of `models.conv` is the convolution's."""
  from jax import lax

  from aigc_jax.models import conv

  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (3, 9, 10, 4))
  w = jax.random.normal(keys[1], (kernel, kernel, 4, 5))
  numbers = lax.conv_dimension_numbers(
    x.shape, w.shape, ("NHWC", "HWIO", "NHWC")
  )

  def grads(fn):
    loss = lambda x, w: jnp.sum(
      jnp.sin(fn(x, w, strides, padding, dimension_numbers=numbers))
    )
    return jax.grad(loss, argnums=(0, 1))(x, w)

  ours, xla = grads(conv.conv_general_dilated), grads(lax.conv_general_dilated)
  for a, b in zip(ours, xla, strict=True):
    assert a.shape == b.shape
    assert jnp.allclose(a, b, atol=1e-4, rtol=1e-5)
  # Grouped convolutions go to XLA unchanged.
  grouped = conv.conv_general_dilated(
    x, jnp.ones((kernel, kernel, 2, 6)), strides, padding,
    dimension_numbers=numbers, feature_group_count=2,
  )  # fmt: skip
  assert grouped.shape[-1] == 6


@pytest.mark.parametrize(
  ("shape", "groups", "dtype"),
  [
    ((3, 5, 6, 8), 4, jnp.float32),
    ((2, 7, 16), 16, jnp.float32),
    ((2, 4, 4, 8), 1, jnp.bfloat16),
  ],
)
def test_group_norm_equals_flax_with_the_same_parameters(shape, groups, dtype):
  """`models.norm.GroupNorm` is `nn.GroupNorm`: values, parameter tree,
  gradients with respect to input and parameters."""
  import flax.linen as nn

  from aigc_jax.models.norm import GroupNorm

  keys = jax.random.split(jax.random.key(0), 4)
  # An offset mean, so that the fast variance's cancellation is exercised.
  x = (3.0 + 2.0 * jax.random.normal(keys[0], shape)).astype(dtype)
  ours, flax_gn = GroupNorm(groups), nn.GroupNorm(groups)
  params = ours.init(keys[1], x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, flax_gn.init(keys[1], x)
  )
  params = jax.tree.map(
    lambda p, k: p + jax.random.normal(k, p.shape),
    params,
    {"params": {"scale": keys[2], "bias": keys[3]}},
  )
  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  y, y_flax = ours.apply(params, x), flax_gn.apply(params, x)
  assert y.dtype == y_flax.dtype
  assert jnp.allclose(y, y_flax, atol=tol)

  def grads(module):
    loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
    return jax.grad(loss, argnums=(0, 1))(params, x.astype(jnp.float32))

  for a, b in zip(
    *map(jax.tree.leaves, (grads(ours), grads(flax_gn))), strict=True
  ):
    assert jnp.allclose(a, b, atol=10 * tol, rtol=1e-3)


def test_group_norm_names_indivisible_channels():
  from aigc_jax.models.norm import group_norm

  with pytest.raises(ValueError, match="6 channels do not split into 4"):
    group_norm(jnp.zeros((1, 2, 2, 6)), 4, jnp.ones(6), jnp.zeros(6))

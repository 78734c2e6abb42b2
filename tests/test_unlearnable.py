"""Unlearnable examples for classifiers: LSP, EMN, REMN, CP and their
config-driven recipes."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import recipe_config

from aigc_jax import data, parallel, protect, train
from aigc_jax.models import SmallCNN


def _rgb(n=6, size=8, seed=0):
  return np.random.default_rng(seed).integers(
    0, 256, (n, size, size, 3), np.uint8
  )


def test_lsp_is_class_separable_at_the_l2_budget():
  labels = np.repeat(np.arange(10), 20)
  b = protect.budget(255, "l2")  # L2 = 1.0 in [0, 1] units, as ISS tests LSP
  make = jax.jit(
    functools.partial(
      protect.lsp_perturbations,
      num_classes=10,
      image_shape=(32, 32, 3),
      budget=b,
    )
  )
  delta = np.asarray(make(jax.random.key(0), labels))
  assert delta.shape == (200, 32, 32, 3)
  np.testing.assert_allclose(
    np.linalg.norm(delta.reshape(200, -1), axis=-1), b.eps, rtol=1e-5
  )
  # Constant over each 8x8 patch: 4 x 4 x 3 = 48 free values per image.
  assert np.all(delta[:, :8, :8] == delta[:, :1, :1])
  # Nearest class mean classifies every perturbation correctly.
  flat = delta.reshape(200, -1)
  means = np.stack([flat[labels == c].mean(0) for c in range(10)])
  nearest = np.argmin(((flat[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(nearest == labels) == 1.0
  # Same key, same perturbations; after uint8 rounding the budget holds.
  np.testing.assert_array_equal(delta, make(jax.random.key(0), labels))
  images = _rgb(200, 32)
  protected = protect.quantize_protected(images, delta, b)
  assert protect.perturbation_sizes(images, protected, "l2").max() <= 255 + 1e-6


def test_lsp_errors():
  labels = np.zeros(4, np.int32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="L2 budget"):
    protect.lsp_perturbations(key, labels, 2, (32, 32, 3), protect.budget(8))
  with pytest.raises(ValueError, match="multiple of patch"):
    protect.lsp_perturbations(
      key, labels, 2, (30, 30, 3), protect.budget(255, "l2")
    )
  with pytest.raises(ValueError, match="smaller patch"):
    protect.lsp_perturbations(
      key, labels, 10, (8, 8, 1), protect.budget(255, "l2"), patch=8
    )


def _classifier():
  model = SmallCNN(num_classes=3, width=8)
  x = jax.random.uniform(jax.random.key(0), (12, 8, 8, 1), minval=-1.0)
  params = model.init(jax.random.key(1), x)["params"]
  labels = jnp.arange(12) % 3
  return (lambda images: model.apply({"params": params}, images)), x, labels


def test_emn_lowers_the_loss_sample_wise_and_class_wise():
  logits_fn, x, labels = _classifier()
  objective = protect.cross_entropy_objective(logits_fn, labels)
  b = protect.budget(16)
  key = jax.random.key(2)
  before = objective(x, key).mean()
  delta = protect.pgd(
    objective,
    x,
    jnp.zeros_like(x),
    key,
    budget=b,
    steps=5,
    step_size=protect.budget(4).eps,
    ascent=False,
  )[0]
  after = objective(protect.apply_perturbation(x, delta), key).mean()
  assert after < before

  # Sample-wise noise is per example: vmapping over single images agrees.
  def one(image, label):
    return protect.pgd(
      protect.cross_entropy_objective(logits_fn, label[None]),
      image[None],
      jnp.zeros_like(image[None]),
      key,
      budget=b,
      steps=5,
      step_size=protect.budget(4).eps,
      ascent=False,
    )[0][0]

  np.testing.assert_allclose(jax.vmap(one)(x, labels), delta, atol=1e-6)
  assert jnp.abs(delta).max() <= b.eps + 1e-6
  shared = protect.pgd(
    objective,
    x,
    jnp.zeros((3, 8, 8, 1)),
    key,
    budget=b,
    steps=5,
    step_size=protect.budget(4).eps,
    ascent=False,
    groups=labels,
  )[0]
  assert shared.shape == (3, 8, 8, 1)
  protected = protect.apply_perturbation(x, shared, labels)
  assert objective(protected, key).mean() < before


def test_remn_objective_attacks_then_descends_and_composes_with_grad():
  logits_fn, x, labels = _classifier()
  plain = protect.cross_entropy_objective(logits_fn, labels)
  robust = protect.robust_objective(
    logits_fn,
    labels,
    augment=lambda key, images: train.random_crop_flip(key, images, pad=1),
    attack_budget=protect.budget(8),
    attack_steps=3,
    attack_step_size=protect.budget(2).eps,
    num_augmentations=2,
  )
  key = jax.random.key(3)
  identity = protect.robust_objective(
    logits_fn,
    labels,
    augment=lambda key, images: images,
    attack_budget=protect.budget(8),
    attack_steps=3,
    attack_step_size=protect.budget(2).eps,
    num_augmentations=1,
  )
  # The inner attack can only raise the loss of the un-augmented images.
  assert identity(x, key).mean() > plain(x, key).mean()
  grad = jax.grad(lambda images: robust(images, key).sum())(x)
  assert grad.shape == x.shape and jnp.all(jnp.isfinite(grad))
  assert jnp.abs(grad).max() > 0
  delta = protect.pgd(
    robust,
    x,
    jnp.zeros_like(x),
    key,
    budget=protect.budget(8),
    steps=3,
    step_size=protect.budget(2).eps,
    ascent=False,
  )[0]
  assert jnp.abs(delta).max() <= protect.budget(8).eps + 1e-6


def _generator_case(name):
  from aigc_jax.protect import recipes

  ds = data.balanced_subset(data.load_dataset("digits", "train"), 64, 0)
  if name.startswith("cp_"):
    config = recipe_config("cp_smoke")
    config.protect.batch_size = 32
    generate = functools.partial(
      recipes.generate_cp, config, ds, classwise=name == "cp_class"
    )
    return generate, protect.budget(config.protect.eps)
  config = recipe_config("unlearnable_smoke")
  config.protect.update(model_batch_size=32, noise_batch_size=32)
  recipe = recipes.PROTECTIONS[name]
  return (
    lambda mesh: recipe.generate(config, ds, mesh),
    recipe.budget(config, ds.images.shape[1:]),
  )


@pytest.mark.parametrize(
  "name",
  [
    "emn_sample",
    "emn_class",
    "remn",
    "lsp",
    "random_sample",
    "random_class",
    "cp_class",
    "cp_sample",
  ],
)
def test_generators_keep_the_budget_repeat_and_agree_on_1_and_4_devices(name):
  generate, b = _generator_case(name)
  outs = [
    np.asarray(generate(mesh=parallel.make_mesh(n))[0]) for n in (1, 4, 4)
  ]
  np.testing.assert_array_equal(outs[1], outs[2])  # same seed, same δ
  # Sign steps turn float-rounding differences of near-zero gradients into
  # ±step, so 1 vs 4 devices agree on almost every coordinate, not all.
  assert np.mean(np.isclose(outs[0], outs[1], atol=1e-5)) > 0.99
  sizes = protect.perturbation_sizes(
    np.zeros_like(outs[0]), outs[0] * protect.LEVELS_PER_UNIT, b.norm
  )
  assert sizes.max() <= b.eps_255 + 1e-3
  assert np.abs(outs[0]).max() > 0
  if name.endswith("_class"):  # one δ per class
    labels = data.balanced_subset(
      data.load_dataset("digits", "train"), 64, 0
    ).labels
    for c in np.unique(labels):
      members = outs[0][labels == c]
      np.testing.assert_array_equal(
        members, np.broadcast_to(members[0], members.shape)
      )


def test_random_controls_fill_the_budget_in_blocks():
  from aigc_jax.protect import recipes

  ds = data.balanced_subset(data.load_dataset("digits", "train"), 64, 0)
  config = recipe_config("unlearnable_smoke")
  config.protect.random.patch = 3  # 8 is not a multiple: the edge is cut
  delta, _ = recipes.generate_random(config, ds, classwise=False)
  eps = protect.budget(config.protect.eps).eps
  assert delta.shape == ds.images.shape
  np.testing.assert_allclose(np.abs(delta), eps)  # every value at ±ε
  blocks = delta[:, :6, :6].reshape(64, 2, 3, 2, 3, 1)
  np.testing.assert_array_equal(  # constant within each 3x3 block
    blocks, np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape)
  )
  # One draw per example (2^9 patterns of 3x3 blocks: a few may repeat),
  # not one per class.
  assert len(np.unique(delta.reshape(64, -1), axis=0)) > 32


def test_a_protection_is_generated_once_and_again_without_its_record(
  tmp_path,
):
  from aigc_jax.protect import recipes

  ds = data.balanced_subset(data.load_dataset("digits", "train"), 16, 0)
  config = recipe_config("unlearnable_smoke")
  calls = []

  def generate():
    calls.append(1)
    return recipes.generate_random(config, ds, classwise=False)

  def protected():
    b = protect.budget(config.protect.eps)
    return recipes.protected_set(str(tmp_path), "random", ds, b, generate)

  first, info = protected()
  again, same = protected()
  assert len(calls) == 1 and same == info
  np.testing.assert_array_equal(again, first)
  # Killed between the images and their record: generated again, the same.
  path = tmp_path / "protections" / "random.npz"
  os.remove(str(path).replace(".npz", ".json"))
  redone, info = protected()
  assert len(calls) == 2 and info.keys() == same.keys()
  np.testing.assert_array_equal(redone, first)
  # A truncated file is named, with the fix.
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"random\.npz.*Delete it"):
    protected()


def test_emn_stops_at_its_accuracy_threshold():
  from aigc_jax.protect import recipes

  ds = data.balanced_subset(data.load_dataset("digits", "train"), 64, 0)
  config = recipe_config("unlearnable_smoke")
  config.protect.update(model_batch_size=32, noise_batch_size=32)
  config.protect.emn.max_rounds = 3
  mesh = parallel.make_mesh(4)
  for stop, rounds in ((0.0, 1), (1.0, 3)):
    config.protect.emn.stop_accuracy = stop
    _, info = recipes.generate_emn(config, ds, mesh, classwise=True)
    assert info["rounds"] == rounds
    if rounds == 1:
      assert info["train_accuracy"] > stop

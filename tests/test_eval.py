"""aigc_jax.eval: the classifier and victim evaluators."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from aigc_jax import data, parallel, record
from aigc_jax.eval import classifiers, ddpm, purifiers, victims


def _classifier_config(**counter) -> ml_collections.ConfigDict:
  """A tiny digits classifier (and victim) config, as the experiments'
  configs describe one."""
  return ml_collections.ConfigDict(
    {
      "variant": "test",
      "seed": 0,
      "num_devices": 1,
      "eval_batch_size": 100,
      "data": {"train": "digits:train", "test": "digits:test", "data_dir": ""},
      "model": {"name": "small_cnn", "width": 8},
      "train": {
        "batch_size": 32,
        "num_epochs": 1,
        "learning_rate": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "grad_clip": 0.0,
        "crop_pad": 1,
        "flip": False,
        "checkpoint_every": 5,
        "log_every": 5,
      },
      "counter": {
        "jpeg_quality": 10,
        "bdr_bits": 2,
        "at_eps": 8.0,
        "at_steps": 2,
        "at_step_size": 2.0,
        "aa_views": 2,
        "aa_epochs": 3,
        "aa_max_epochs": 1,
        **counter,
      },
    }
  )


def test_trained_classifier_restores_and_applies_on_any_mesh(tmp_path):
  config = _classifier_config()
  workdir = str(tmp_path / "clf")
  classifier = classifiers.trained_classifier(config, workdir)
  for name in ("config.json", "metrics.jsonl", "report.md"):
    assert os.path.exists(os.path.join(workdir, name))
  assert classifier.model.num_classes == 10 and classifier.params
  assert classifier.input_shape == (8, 8, 1)
  assert classifier.test_accuracy == record.last_metric(
    workdir, "eval/test_accuracy"
  )
  # A finished run is read back, not trained again.
  again = classifiers.trained_classifier(config, workdir)
  leaves = (jax.tree.leaves(c.params) for c in (classifier, again))
  for a, b in zip(*leaves, strict=True):
    np.testing.assert_array_equal(a, b)
  # The restored classifier lives on one device; it still evaluates batches
  # split over a larger mesh (udp.py's `:cifar10_small` failed here).
  images = classifiers.load_train_test(config)[1].images[:8]
  x = images.astype(np.float32) / 127.5 - 1
  logits = [
    classifiers.predict_logits(classifier, x, 4, parallel.make_mesh(n))
    for n in (1, 2)
  ]
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
  # Padded images are cropped back to the classifier's input size.
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1)
  np.testing.assert_array_equal(
    classifiers.predicted_labels(classifier, padded, parallel.make_mesh(1)),
    np.asarray(logits[0]).argmax(-1),
  )


def test_victim_recipes_follow_the_countermeasure():
  config = _classifier_config()
  recipe = victims.victim_recipe(config, "aa", 200, 10, (8, 8, 1))
  # UEraser: K views for aa_max_epochs epochs, then one view to aa_epochs.
  per_epoch = 200 // config.train.batch_size  # full batches
  assert [until for _, until in recipe.phases] == [
    config.counter.aa_max_epochs * per_epoch,
    config.counter.aa_epochs * per_epoch,
  ]
  plain = victims.victim_recipe(config, "none", 200, 10, (8, 8, 1))
  assert [until for _, until in plain.phases] == [
    config.train.num_epochs * per_epoch
  ]
  with pytest.raises(ValueError, match="Unknown countermeasure 'cutout'"):
    victims.victim_recipe(config, "cutout", 200, 10, (8, 8, 1))
  # Another seed: another initialisation (and batch order, recipe.seed).
  other = victims.victim_recipe(config, "none", 200, 10, (8, 8, 1), 1)
  assert (plain.seed, other.seed) == (config.seed, config.seed + 1)
  first, second = (jax.tree.leaves(r.init().params) for r in (plain, other))
  assert not all(np.allclose(a, b) for a, b in zip(first, second, strict=True))
  assert victims.countermeasure_label(config, "at") == "AT (PGD-2, 8/255)"


def test_victim_trainer_reads_finished_cells_back(tmp_path):
  """A finished cell is read back; grayscale on one channel is the vanilla
  victim's cell; other training data in a finished cell is refused."""
  config = _classifier_config()
  train_set, test_set = classifiers.load_train_test(config)
  images, labels = train_set.images[:64], train_set.labels[:64]
  train = victims.victim_trainer(config, test_set, parallel.make_mesh(1))
  root = tmp_path / "victims"
  first = train(str(root / "none"), images, labels, "none")
  assert 0 <= first["test_accuracy"] <= 1 and first["steps"] == 2
  gray = train(str(root / "iss_grayscale"), images, labels, "iss_grayscale")
  assert gray == first
  assert not (root / "iss_grayscale").exists()
  with pytest.raises(ValueError, match="inputs"):
    train(str(root / "none"), images[::-1].copy(), labels, "none")


def _tiny_ddpm_config() -> ml_collections.ConfigDict:
  """A DDPM small enough to purify a few 8x8 digits in a test."""
  return ml_collections.ConfigDict(
    {
      "model": {
        "ch": 8,
        "ch_mult": (1,),
        "num_res_blocks": 1,
        "attn_resolutions": (),
        "dropout": 0.0,
        "num_groups": 4,
      },
      "diffusion": {"schedule": "linear", "num_timesteps": 1000},
      "train": {"learning_rate": 1e-3, "warmup_steps": 2, "grad_clip": 1.0},
    }
  )


def test_the_manifold_leaves_out_the_protected_images():
  import hashlib

  train_set = data.load_split("digits:train")
  manifold_config = ml_collections.ConfigDict(
    {"source": "digits:all", "crop": 0, "limit": 0}
  )
  manifold = purifiers.manifold_images(manifold_config, "", train_set.images, 0)
  digest = lambda x: hashlib.sha1(x.tobytes()).digest()
  protected = {digest(x) for x in train_set.images}
  everything = data.load_dataset("digits", "all").images
  assert not any(digest(x) in protected for x in manifold)
  assert len(manifold) == sum(digest(x) not in protected for x in everything)
  assert 0 < len(manifold) < len(everything)
  manifold_config.source = "digits:train"  # nothing left to learn from
  with pytest.raises(ValueError, match="has no images left"):
    purifiers.manifold_images(manifold_config, "", train_set.images, 0)


def test_purification_is_the_same_on_one_and_four_devices():
  import jax

  from aigc_jax import models, parallel, train

  ddpm_config = _tiny_ddpm_config()
  purify_config = ml_collections.ConfigDict(
    dict(t_star=3, rounds=1, split=1, variance="fixed_large", lpips_size=32)
  )
  model, _, optimizer = ddpm.build_ddpm(ddpm_config)
  state = train.init_ddpm_state(model, optimizer, jax.random.key(0), (8, 8, 1))
  fn = purifiers.purifier(
    ddpm_config,
    purify_config,
    "le",
    jax.random.key(0),
    state.ema_params,
    models.load_lpips(),
  )
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32)
  inputs = (images, np.arange(10, dtype=np.int32))
  out = {
    n: parallel.batched_apply(
      fn, inputs, batch_size=8, mesh=parallel.make_mesh(n)
    )
    for n in (1, 4)
  }
  np.testing.assert_allclose(out[1], out[4], atol=1e-5)
  assert not np.allclose(out[1], images, atol=1e-3)


def test_purifiers_are_checked_cached_and_leave_out_the_originals(tmp_path):
  purify_config = ml_collections.ConfigDict(
    dict(t_star=3, rounds=1, split=1, variance="fixed_large", lpips_size=32)
  )
  assert purifiers.guidance(purify_config, "avatar") is None
  le = purifiers.guidance(purify_config, "le")
  assert le["form"] == "original" and le["lpips_size"] == 32
  with pytest.raises(ValueError, match="Unknown purifier 'le_paper'"):
    purifiers.guidance(purify_config, "le_paper")  # no paper_mse given
  calls = []
  images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)

  def purify_fn(batch):
    calls.append(1)
    return -batch[0]

  path = str(tmp_path / "purified" / "set.npz")
  mesh = parallel.make_mesh(1)
  out, _ = purifiers.purified_set(path, images, purify_fn, 2, mesh)
  again, _ = purifiers.purified_set(path, images, purify_fn, 2, mesh)
  np.testing.assert_array_equal(out, again)
  assert len(calls) == 1 and os.path.exists(path.replace(".npz", "_grid.png"))
  np.testing.assert_array_equal(
    out, data.to_uint8(-data.to_model_range(images))
  )
  clean = data.load_split("digits:train").images[:5]
  padded = np.pad(clean, [(0, 0), (2, 2), (2, 2), (0, 0)])
  manifold = purifiers.padded_manifold("digits:train", "", padded)
  assert manifold.shape[1:] == (12, 12, 1)
  assert len(manifold) == len(data.load_split("digits:train").images) - 5

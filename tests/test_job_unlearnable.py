"""`experiments/unlearnable.py`: its smoke run and errors."""

import os

import numpy as np
import pytest
from conftest import run_experiment

from aigc_jax.eval import classifiers


@pytest.mark.long
def test_unlearnable_smoke_saves_protections_and_resumes(tmp_path):
  from experiments import unlearnable
  from experiments.configs import unlearnable as ul_configs

  config = ul_configs.get_config("smoke")
  config.countermeasures = ("iss_grayscale", "none", "at", "aa")
  result, workdir = run_experiment(
    unlearnable, config, tmp_path / "ul", num_devices=4
  )
  accuracy = result["accuracy"]
  assert len(accuracy) == 5 * 4
  assert all(0.0 <= a <= 1.0 for a in accuracy.values())
  # Grayscale is the identity on one channel: the vanilla victim, trained
  # once (first, here, for the grayscale cell) and read back for "none".
  for s in ("clean", *config.protections):
    assert accuracy[f"{s}/iss_grayscale"] == accuracy[f"{s}/none"]
    assert not os.path.exists(
      os.path.join(workdir, "victims", s, "iss_grayscale")
    )
  clean = np.asarray(  # the class-balanced 200-image subset
    classifiers.load_train_test(config)[0].images, np.int16
  )
  for name in config.protections:
    with np.load(os.path.join(workdir, "protections", f"{name}.npz")) as f:
      images, delta = f["images"], f["delta"]
    assert images.dtype == np.uint8 and images.shape == clean.shape
    np.testing.assert_array_equal(images.astype(np.int16) - clean, delta)
    info = result["protections"][name]
    assert info["max_size_255"] <= info["eps_255"] + 1e-6
    if name != "lsp":
      assert np.abs(delta).max() <= 8
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert "| vanilla (no countermeasure) |" in report and "EMN (C)" in report
  # Same command again: every protection and classifier is read back.
  again, _ = run_experiment(unlearnable, config, tmp_path / "ul", num_devices=4)
  assert again["accuracy"] == result["accuracy"]


def test_unlearnable_rejects_unknown_names_before_any_work(tmp_path):
  from experiments import unlearnable
  from experiments.configs import unlearnable as ul_configs

  config = ul_configs.get_config("smoke")
  config.protections = ("emn_sample", "tap")
  with pytest.raises(ValueError, match="Unknown protection 'tap'"):
    unlearnable.train_and_evaluate(config, str(tmp_path))
  config.protections = ("lsp",)
  config.countermeasures = ("none", "cutout")
  with pytest.raises(ValueError, match="Unknown countermeasure 'cutout'"):
    unlearnable.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)

"""`experiments/feature_unlearn.py`: its smoke run and errors."""

import os
import shutil

import numpy as np
import pytest
from conftest import run_experiment, write_torch_state_dict


def test_feature_unlearn_smoke_resumes_and_takes_user_labels(tmp_path):
  from experiments import feature_unlearn
  from experiments.configs import feature_unlearn as fu_configs

  config = fu_configs.get_config("smoke")
  result, workdir = run_experiment(feature_unlearn, config, tmp_path / "a")
  for name in ("report.md", "before_after.png", "labelling/grid.png"):
    assert os.path.exists(os.path.join(workdir, name))
  assert 0 < result["labelled_positive"] < config.feature.num_labelled
  assert 0.0 <= result["share_after"] <= 1.0
  # The samples with the feature below the threshold are part of them.
  for when in ("before", "after"):
    assert 0.0 <= result[f"unmoved_share_{when}"] <= result[f"share_{when}"]
  # The re-run restores every stage from its checkpoint: same numbers.
  again, _ = run_experiment(feature_unlearn, config, workdir)
  assert again["share_after"] == result["share_after"]
  assert again["l1_without_feature"] == result["l1_without_feature"]

  # A user's own labels for the saved latents (every third one) drive the
  # direction; the generator is reused, and a pretrained LeNet-5 (a
  # stand-in of its layout) evaluates instead of a trained classifier.
  latents = np.load(os.path.join(workdir, "labelling", "latents.npy"))
  labels = np.arange(len(latents)) % 3 == 0
  np.save(tmp_path / "labels.npy", labels)
  other = tmp_path / "b"
  shutil.copytree(os.path.join(workdir, "generator"), other / "generator")
  config.feature.labels = str(tmp_path / "labels.npy")
  lenet = tmp_path / "lenet5_classifier.npz"
  shapes = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 16, 5, 5), (84, 120), (10, 84)]
  write_torch_state_dict(
    lenet, zip(("c1", "c3", "c5", "f6", "f7"), shapes, strict=True)
  )
  config.eval.pretrained_classifier = str(lenet)
  mine, _ = run_experiment(feature_unlearn, config, other)
  assert mine["labelled_positive"] == labels.sum()
  assert not os.path.exists(other / "classifier")
  with open(other / "report.md") as f:
    assert f"the pretrained LeNet-5 {lenet}" in f.read()
  np.save(tmp_path / "bad.npy", labels[:10])
  config.feature.labels = str(tmp_path / "bad.npy")
  with pytest.raises(ValueError, match="one label per row"):
    feature_unlearn.check_config(config)


def test_feature_unlearn_refuses_unknown_kinds():
  from experiments import feature_unlearn
  from experiments.configs import feature_unlearn as fu_configs

  refusals = [  # (variant, section, key, value, what the error names)
    ("smoke", "generator", "kind", "stylegan", r"generator\.kind"),
    ("smoke", "feature", "kind", "eyeglasses", r"feature\.kind"),
    ("pretrained_gan", "generator", "weights", "", r"generator\.weights"),
    ("gan", "generator", "weights", "gan.npz", "not conv_gan"),
  ]
  for variant, section, key, value, match in refusals:
    config = fu_configs.get_config(variant)
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
      feature_unlearn.check_config(config)

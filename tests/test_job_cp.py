"""`experiments/cp.py`: its smoke run (and LE on its sets), the random
control and errors."""

import os

import numpy as np
import pytest
from conftest import le_on_upstream, run_experiment

from aigc_jax.eval import classifiers


@pytest.mark.long
def test_cp_smoke_saves_poisons_and_resumes(tmp_path, full_xla_optimisation):
  from experiments import cp
  from experiments.configs import cp as cp_configs

  config = cp_configs.get_config("smoke")
  result, workdir = run_experiment(cp, config, tmp_path / "cp")
  assert len(result["probe_accuracy"]) == 3 * 3
  assert all(0.0 <= a <= 1.0 for a in result["probe_accuracy"].values())
  clean = np.asarray(classifiers.load_train_test(config)[0].images)
  for name in ("cp_class", "cp_sample"):
    with np.load(os.path.join(workdir, "protections", f"{name}.npz")) as f:
      assert f["images"].shape == clean.shape
      assert np.abs(f["delta"]).max() <= 8
  with open(os.path.join(workdir, "report.md")) as f:
    assert "| MoCo v2 |" in f.read()
  again, _ = run_experiment(cp, config, tmp_path / "cp")
  assert again["probe_accuracy"] == result["probe_accuracy"]
  # LE purifies this run's sets and trains its recipe on them; the
  # unpurified cells are this run's own encoders, read back.
  with full_xla_optimisation():
    le_result, le_dir = le_on_upstream(tmp_path, contrastive_from=workdir)
  probe = le_result["probe_accuracy"]
  assert set(probe) == {
    "clean/none/simclr",
    *(
      f"{s}/{r}/simclr"
      for s in ("cp_class", "cp_sample")
      for r in ("none", "le")
    ),
  }
  for s in ("clean", "cp_class", "cp_sample"):
    assert probe[f"{s}/none/simclr"] == result["probe_accuracy"][f"{s}/simclr"]
  with np.load(
    os.path.join(le_dir, "purified", "le", "cp", "cp_class.npz")
  ) as f:
    assert f["images"].shape == clean.shape
  with open(os.path.join(le_dir, "report.md")) as f:
    assert "| SimCLR |" in f.read()


def test_cp_runs_the_random_control(tmp_path):
  from experiments import cp
  from experiments.configs import cp as cp_configs

  config = cp_configs.get_config("smoke")
  config.methods, config.protections = ("simclr",), ("random_class",)
  result, workdir = run_experiment(cp, config, tmp_path / "cp")
  assert set(result["probe_accuracy"]) == {
    "clean/simclr",
    "random_class/simclr",
  }
  labels = classifiers.load_train_test(config)[0].labels
  with np.load(os.path.join(workdir, "protections", "random_class.npz")) as f:
    delta = f["delta"]
  assert np.abs(delta).max() <= 8
  for c in np.unique(labels):  # one pattern per class (clipping aside)
    members = delta[labels == c]
    assert (members == members[:1]).mean() > 0.8
  with open(os.path.join(workdir, "report.md")) as f:
    assert "random (C)" in f.read()


def test_cp_rejects_unknown_methods_before_any_work(tmp_path):
  from experiments import cp
  from experiments.configs import cp as cp_configs

  config = cp_configs.get_config("smoke")
  config.methods = ("simclr", "swav")
  with pytest.raises(ValueError, match="Unknown contrastive method 'swav'"):
    cp.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)

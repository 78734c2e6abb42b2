"""`experiments/le.py`: its smoke run and errors."""

import json
import os

import numpy as np
import pytest
from conftest import (
  run_experiment,
)

from aigc_jax.eval import classifiers


@pytest.mark.optimized_xla
def test_le_smoke_purifies_trains_and_resumes(tmp_path):
  from experiments import le
  from experiments.configs import le as le_configs

  config = le_configs.get_config("smoke")
  config.victim_seeds = 2
  config.countermeasures = ("none", "iss_grayscale")
  result, workdir = run_experiment(le, config, tmp_path / "le")
  cells = le.victim_cells(config)
  assert ("lsp", "le_mse") in cells and ("emn_class", "le_mse") not in cells
  assert set(result["accuracy"]) == {f"{s}/{r}" for s, r in cells}
  assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
  # Every cell but AT and AA: two victims, the table shows their mean.
  # Grayscale on one channel is the vanilla victims, both seeds.
  for s, r in cells:
    if r == "iss_grayscale":
      assert result["accuracy"][f"{s}/{r}"] == result["accuracy"][f"{s}/none"]
      continue
    seeded = r not in le.ONE_SEED_ROWS
    second = os.path.join(workdir, "victims", s, f"{r}_seed1")
    assert os.path.exists(second) == seeded, (s, r)
    if seeded:
      accuracies = []
      for d in (r, f"{r}_seed1"):
        with open(os.path.join(workdir, "victims", s, d, "result.json")) as f:
          accuracies.append(json.load(f)["test_accuracy"])
      assert result["accuracy"][f"{s}/{r}"] == pytest.approx(
        np.mean(accuracies)
      )
  shape = classifiers.load_train_test(config)[0].images.shape
  for key in result["purification"]:
    name, set_name = key.split("/")
    path = os.path.join(workdir, "purified", name, f"{set_name}.npz")
    with np.load(path) as f:
      assert f["images"].dtype == np.uint8 and f["images"].shape == shape
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert "| LE (JCDP) |" in report and "mean over the protections" in report
  assert "the mean of 2" in report and "per victim seed" in report
  # Same command again: purified sets and victims are read back.
  again, _ = run_experiment(le, config, tmp_path / "le")
  assert again["accuracy"] == result["accuracy"]
  assert again["purification"] == result["purification"]


def test_le_names_missing_protections_and_unknown_purifiers(tmp_path):
  from experiments import le
  from experiments.configs import le as le_configs

  config = le_configs.get_config("smoke")
  config.purifiers = ("avatar", "diffpure")
  with pytest.raises(ValueError, match="Unknown purifier 'diffpure'"):
    le.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)
  config = le_configs.get_config("smoke")
  config.protections_from = str(tmp_path / "no_run")
  with pytest.raises(FileNotFoundError, match=r"experiments/unlearnable\.py"):
    le.train_and_evaluate(config, str(tmp_path / "le"))
  config = le_configs.get_config("smoke")
  config.udp_from = str(tmp_path / "no_run")
  with pytest.raises(FileNotFoundError, match=r"experiments/udp\.py"):
    le.train_and_evaluate(config, str(tmp_path / "le"))
  config = le_configs.get_config("smoke")
  config.contrastive_methods = ("swav",)
  with pytest.raises(ValueError, match="Unknown contrastive method 'swav'"):
    le.train_and_evaluate(config, str(tmp_path / "le"))

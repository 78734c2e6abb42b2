"""`experiments/train_ddpm.py`: its smoke run, resume and fine-tuning."""

import json
import os

import numpy as np
import pytest
from conftest import (
  run_experiment,
)

from aigc_jax.eval import classifiers, ddpm
from experiments import train_ddpm
from experiments.configs import train_ddpm as ddpm_configs


def test_programs_are_built_once_per_config():
  """Equal configs share one DDPM program (so its step compiles once for
  every training set), a changed config gets its own, and a caller's later
  edit does not reach the program already built."""
  config = ddpm_configs.get_config("smoke")
  program = ddpm.ddpm_program(config)
  assert ddpm.ddpm_program(config.copy_and_resolve_references()) is (program)
  assert program.init((8, 8, 1)) is program.init((8, 8, 1))
  config.train.ema_decay = 0.5
  assert ddpm.ddpm_program(config) is not program
  config.sample.sampler = "euler"
  with pytest.raises(ValueError, match="Unknown sampler 'euler'"):
    ddpm.ddpm_program(config)


def test_train_ddpm_smoke_and_resume(tmp_path):
  config = ddpm_configs.get_config("smoke")
  result, workdir = run_experiment(train_ddpm, config, tmp_path / "ddpm")
  assert result["num_classes"] == 10
  assert 0.0 <= result["confident_share"] <= 1.0
  for name in ("samples.png", "samples.npz", "real.png", "report.md"):
    assert os.path.exists(os.path.join(workdir, name))
  with open(os.path.join(workdir, "report.md")) as f:
    assert "samples classified with p > 0.5" in f.read()
  # Same command again: resumes from the final checkpoint, trains no more.
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics) as f:
    lines = len(f.readlines())
  again, _ = run_experiment(train_ddpm, config, tmp_path / "ddpm")
  with open(metrics) as f:
    records = [json.loads(x) for x in f.readlines()[lines:]]
  assert not any(k.startswith("train/") for r in records for k in r)
  assert again["confident_share"] == result["confident_share"]


@pytest.mark.optimized_xla
def test_ddpm_fine_tunes_from_a_pretrained_run(tmp_path):
  import jax

  from aigc_jax import checkpoint, parallel, train

  config = ddpm_configs.get_config("smoke")
  images = classifiers.load_train_test(config)[0].images[:64]
  mesh = parallel.make_mesh()
  # A pretrained run's checkpoint, made by hand (training one would compile
  # a train step this test does not need): EMA weights unlike a fresh init.
  pretrained = str(tmp_path / "pre")
  init = ddpm.ddpm_program(config).init(images.shape[1:])
  pre = train.init_or_restore(init, mesh, None)
  pre = pre._replace(ema_params=jax.tree.map(lambda p: p + 1.0, pre.params))
  saver = checkpoint.Checkpointer(os.path.join(pretrained, "ckpt"))
  saver.save(1, pre)
  saver.close()
  config.train.update(init_from=pretrained, num_steps=0)
  ft = ddpm.train_ddpm(config, str(tmp_path / "ft"), images, mesh)
  assert int(ft.step) == 0
  for a, b, c in zip(
    jax.tree.leaves(ft.params),
    jax.tree.leaves(ft.ema_params),
    jax.tree.leaves(pre.ema_params),
    strict=True,
  ):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
  config.model.ch *= 2
  with pytest.raises(ValueError, match="does not fit this config's model"):
    ddpm.train_ddpm(config, str(tmp_path / "wide"), images, mesh)
  config.train.init_from = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    ddpm.train_ddpm(config, str(tmp_path / "none"), images, mesh)

"""What every launcher shares: workdirs, report commands, flags, kills and
resumes, and the configs the library's tests read."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
  ROOT,
)

from aigc_jax import record
from aigc_jax.eval import classifiers
from experiments.configs import train_classifier as clf_configs
from experiments.configs import train_ddpm as ddpm_configs


def test_workdir_with_another_config_is_refused(tmp_path):
  record.prepare_workdir(
    str(tmp_path), clf_configs.get_config("smoke").to_json()
  )
  other = clf_configs.get_config("smoke")
  other.train.batch_size = 64
  with pytest.raises(ValueError, match=r"train\.batch_size"):
    record.prepare_workdir(str(tmp_path), other.to_json())


def test_unknown_variant_lists_choices():
  with pytest.raises(ValueError, match="digits"):
    ddpm_configs.get_config("imagenet")


def test_report_command_reruns_the_reported_config(monkeypatch):
  """The command in a report parses back to the config it reports."""
  import shlex

  from absl import flags
  from ml_collections import config_flags

  from aigc_jax import launch
  from experiments.configs import erase as erase_configs

  config = erase_configs.get_config("mace")
  config.erase = ("three", "five")
  config.target = "a blank"
  config.uce.erase_scale = 3.0
  config.preserve_kept = True
  command = launch.command_line(
    os.path.join(ROOT, "experiments", "erase.py"), config, "runs/x"
  )
  argv = shlex.split(command.replace("\\\n", " "))
  assert argv[:2] == ["python", "experiments/erase.py"]
  assert argv[-1] == "--workdir=runs/x" and len(argv) == 8
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config",
    os.path.join(ROOT, "experiments", "configs", "erase.py"),
    flag_values=flag_values,
    lock_config=True,
  )
  args = [argv[1], argv[2].replace("=", f"={ROOT}/", 1), *argv[3:-1]]
  monkeypatch.setattr(sys, "argv", args)  # config_flags reads overrides here
  flag_values(args)
  assert flag_values.config.to_json() == config.to_json()


def _launch(*args):
  return subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "train_classifier.py"),
      *args,
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )


def test_launcher_rejects_unknown_keys_and_indivisible_batches(tmp_path):
  config = os.path.join(ROOT, "experiments", "configs", "train_classifier.py")
  out = _launch(
    f"--config={config}:smoke",
    f"--workdir={tmp_path}/a",
    "--config.train.nope=1",
  )
  assert out.returncode != 0 and "nope" in out.stderr
  out = _launch(
    f"--config={config}:smoke",
    f"--workdir={tmp_path}/b",
    "--config.train.batch_size=33",
  )
  assert out.returncode != 0 and "does not divide" in out.stderr
  # Refused before any work: nothing is kept, and the corrected command
  # runs in the same workdir instead of meeting "a different config".
  assert not os.path.exists(tmp_path / "b" / "config.json")
  out = _launch(
    f"--config={config}:smoke",
    f"--workdir={tmp_path}/b",
    "--config.train.checkpoint_every=0",
  )
  assert out.returncode != 0
  assert "--config.train.checkpoint_every=0" in out.stderr
  assert "must be at least 1" in out.stderr


def test_sigkilled_run_resumes_to_the_same_parameters(tmp_path):
  import signal
  import time

  config = os.path.join(ROOT, "experiments", "configs", "train_classifier.py")
  args = [
    f"--config={config}:smoke",
    "--config.train.num_epochs=8",
    "--config.train.checkpoint_every=20",
  ]
  killed_dir = tmp_path / "killed"
  cmd = [
    sys.executable,
    os.path.join(ROOT, "experiments", "train_classifier.py"),
    *args,
    f"--workdir={killed_dir}",
  ]
  proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
  ckpt_dir = killed_dir / "ckpt"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
  assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
  assert _launch(*args, f"--workdir={tmp_path / 'straight'}").returncode == 0
  _, a, sa, *_ = classifiers.load_classifier(str(killed_dir))
  _, b, sb, *_ = classifiers.load_classifier(str(tmp_path / "straight"))
  import jax

  for x, y in zip(
    jax.tree.leaves((a, sa)), jax.tree.leaves((b, sb)), strict=True
  ):
    np.testing.assert_array_equal(x, y)


def test_shared_models_dir_finds_either_folder(tmp_path):
  from experiments.configs import feature_unlearn as fu_configs

  root = tmp_path / "project"
  root.mkdir()
  documented = tmp_path / "shared" / "data" / "models" / "mnist"
  assert fu_configs.shared_models_dir(str(root)) == str(documented)
  (tmp_path / "shared" / "models" / "mnist").mkdir(parents=True)
  assert fu_configs.shared_models_dir(str(root)) == str(
    tmp_path / "shared" / "models" / "mnist"
  )
  documented.mkdir(parents=True)
  assert fu_configs.shared_models_dir(str(root)) == str(documented)


@pytest.mark.parametrize("name", ["udp", "unlearnable", "cp"])
def test_library_tests_configs_are_the_experiments_smoke_configs(name):
  """tests/configs/<name>_smoke.json, which the library's tests read
  instead of importing experiments, is the experiment's smoke config."""
  import importlib

  from conftest import recipe_config

  module = importlib.import_module(f"experiments.configs.{name}")
  expected = json.loads(module.get_config("smoke").to_json())
  assert json.loads(recipe_config(f"{name}_smoke").to_json()) == expected, (
    f"Rewrite tests/configs/{name}_smoke.json from "
    f"experiments/configs/{name}.py:smoke."
  )

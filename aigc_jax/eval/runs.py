"""Finished runs of other experiments, read back so that a later
experiment treats their sets as they did (LE purifies the sets of a CP or
UDP run and evaluates them with that run's own recipe).
"""

import os
from typing import NamedTuple

import ml_collections
import numpy as np

from aigc_jax import data, record
from aigc_jax.eval import classifiers


class Run(NamedTuple):
  """Another experiment's finished run whose sets LE purifies.

  Attributes:
    path: its workdir.
    config: the config it ran with (its training and evaluation recipe,
      reused so that purified and unpurified sets are treated alike).
    train_set: its clean training set.
    test_set: its clean test set.
    sets: its training sets (uint8) by name, "clean" first.
  """

  path: str
  config: ml_collections.ConfigDict
  train_set: data.Dataset
  test_set: data.Dataset
  sets: dict[str, np.ndarray]


def load_run(path, script, set_paths, like) -> Run:
  """The run of experiments/<script> in `path` and its sets.

  Args:
    path: the run's workdir.
    script: the experiment that made it ("cp.py", "udp.py"), for errors.
    set_paths: `config -> {set name: .npz path relative to path}`.
    like: uint8 images of the shape the DDPM purifies.
  """
  try:
    config = ml_collections.ConfigDict(record.load_config_json(path))
  except FileNotFoundError:
    raise FileNotFoundError(
      f"{path} holds no run of experiments/{script}: run it with "
      f"--workdir={path} first, or leave this setting empty."
    ) from None
  train_set, test_set = classifiers.load_train_test(config)
  if train_set.images.shape[1:] != like.shape[1:]:
    raise ValueError(
      f"The run in {path} has images of shape {train_set.images.shape[1:]}, "
      f"the purifying DDPM's are {like.shape[1:]}: run it on data of the "
      "same shape."
    )
  sets = {"clean": train_set.images}
  for name, rel in set_paths(config).items():
    npz = os.path.join(path, rel)
    if not os.path.exists(npz):
      raise FileNotFoundError(
        f"{npz} does not exist: run experiments/{script} to the end with "
        f"--workdir={path}."
      )
    with np.load(npz) as f:
      # udp.py saves the clean images beside the protected ones; cp.py
      # the protected images alone.
      sets[name] = f["protected" if "protected" in f.files else "images"]
  return Run(path, config, train_set, test_set, sets)


def cp_set_paths(cp_config) -> dict[str, str]:
  """The protected sets of an `experiments/cp.py` run."""
  return {
    name: os.path.join("protections", f"{name}.npz")
    for name in cp_config.protections
  }


def udp_set_paths(udp_config) -> dict[str, str]:
  """The protected sets of an `experiments/udp.py` run."""
  return {
    method: os.path.join("protect", record.slug(method), "protected.npz")
    for method in udp_config.protect.methods
  }

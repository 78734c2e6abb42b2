"""`experiments/erase.py`: its errors and scores."""

import numpy as np
import pytest

from aigc_jax import record


def test_erase_refuses_bad_configs_before_any_work(tmp_path):
  from experiments import erase
  from experiments.configs import erase as erase_configs

  config = erase_configs.get_config("uce")
  config.model = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=r"--config\.model"):
    erase.train_and_evaluate(config, str(tmp_path))
  config.model = ""
  with pytest.raises(ValueError, match=r"--config\.model=PATH"):
    erase.train_and_evaluate(config, str(tmp_path))
  config.methods = ("uce", "esd")
  with pytest.raises(ValueError, match="Unknown methods"):
    erase.train_and_evaluate(config, str(tmp_path))
  config.methods = ("rece",)
  with pytest.raises(ValueError, match="starts from the UCE edit"):
    erase.train_and_evaluate(config, str(tmp_path))
  config.methods = ("uce",)
  config.erase = ("eleven",)
  with pytest.raises(ValueError, match="not in concepts"):
    erase.train_and_evaluate(config, str(tmp_path))


def test_erase_scores_and_harmonic_mean():
  from experiments import erase
  from experiments.configs import erase as erase_configs

  config = erase_configs.get_config("uce")
  config.sample.per_prompt = 2
  pairs = [(c, c) for c in config.concepts]
  class_of = {c: i for i, c in enumerate(config.concepts)}
  # Both samples of every digit right, except "three" (erased): one of two.
  predicted = np.repeat(np.arange(10), 2)
  predicted[6] = 0
  s = erase.score_samples(config, predicted, pairs, class_of)
  assert s == {
    "erased": 0.5,
    "kept": 1.0,
    "lookalike/eight": 1.0,
    "n/erased": 2,
    "n/kept": 18,
    "n/lookalike/eight": 2,
  }
  assert record.share_text(5 / 32, 32) == "15.6 (5/32, 6.9–31.8)"
  assert erase.harmonic_mean(0.0, 1.0, 0.0) == pytest.approx(1.0)
  assert erase.harmonic_mean(0.5, 1.0, 0.5) == pytest.approx(3 / 5)
  assert erase.harmonic_mean(1.0, 1.0, 0.0) == 0.0

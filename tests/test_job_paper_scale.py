"""`experiments/paper_scale.py`: the suite on its smoke stages, its report,
and a budget that stops a stage which the next call resumes to the end an
uninterrupted call reaches."""

import time

import numpy as np
import pytest
from conftest import run_state

from aigc_jax import checkpoint, launch
from experiments import paper_scale
from experiments.configs import paper_scale as ps_configs


def _suite(workdir, **updates):
  """The smoke suite in `workdir`, every stage on one device."""
  config = ps_configs.get_config("smoke")
  for stage in config.stage.values():
    with stage.overrides.unlocked():
      stage.overrides.num_devices = 1
  config.update(updates)
  return launch.run_in_workdir(
    paper_scale.train_and_evaluate,
    config,
    str(workdir),
    paper_scale.PER_CALL,
  )


@pytest.mark.optimized_xla
def test_paper_scale_smoke_runs_each_stage_and_collects_their_reports(
  tmp_path,
):
  every = {"victims": "done", "le": "done", "bench": "done"}
  assert _suite(tmp_path) == every
  report = (tmp_path / "report.md").read_text()
  for name, title in [
    ("victims", "## Unlearnable examples"),
    ("le", "## LE on"),
    ("bench", "## "),
  ]:
    assert f"| {name} | " in report and f"## Stage `{name}`" in report
    assert title in report.split(f"## Stage `{name}`")[1]
    # Each stage reran alone by the command in its own report.
    assert f"--workdir={tmp_path}/{name}" in report
  # The bench stage timed the victim recipe to its target on both sides.
  assert "## Time to 20% test accuracy" in report
  # The le stage purified the victims stage's LSP set.
  assert "--config.protections_from=" in report
  assert (tmp_path / "le" / "purified" / "le" / "lsp.npz").exists()
  # Finished stages are read back, not run again.
  assert _suite(tmp_path) == every


@pytest.mark.optimized_xla
def test_budget_stops_a_stage_and_the_next_call_resumes_it(
  tmp_path, monkeypatch
):
  one = {"stages": ("victims",)}
  assert _suite(tmp_path / "whole", **one) == {"victims": "done"}
  # Two seconds, and every checkpoint save a second late (a warm smoke stage
  # can finish in less): the stage is interrupted at its next step, the
  # next stage is not started, and the report says so.
  save = checkpoint.Checkpointer.save

  def late_save(self, step, state):
    time.sleep(1.0)
    save(self, step, state)

  with monkeypatch.context() as m:
    m.setattr(checkpoint.Checkpointer, "save", late_save)
    stopped = _suite(
      tmp_path / "cut", stages=("victims", "le"), budget_seconds=2
    )
  assert stopped == {"victims": "stopped", "le": "skipped"}
  report = (tmp_path / "cut" / "report.md").read_text()
  assert "stopped by the budget: run the same command to resume" in report
  assert "not started" in report
  # Another call, with the time it needs, resumes it to the same end.
  assert _suite(tmp_path / "cut", **one) == {"victims": "done"}
  got, want = (
    run_state(tmp_path / "cut/victims"),
    run_state(tmp_path / "whole/victims"),
  )
  assert got[0].keys() == want[0].keys() and want[0]
  for k, v in want[0].items():
    np.testing.assert_array_equal(got[0][k], v, err_msg=k)
  assert got[1:] == want[1:]


def test_paper_scale_refuses_unknown_stages_and_overrides(tmp_path):
  with pytest.raises(ValueError, match="Unknown stages"):
    _suite(tmp_path / "a", stages=("victims", "sd15"))
  config = ps_configs.get_config("smoke")
  config.stage.victims.overrides.train.update({"num_epoch": 2})
  with pytest.raises(ValueError, match="num_epoch"):
    paper_scale.stage_config(config, "victims", str(tmp_path))


def test_every_gpu_stage_builds_its_launcher_config(tmp_path):
  """The paper-scale overrides name fields the launchers' configs have."""
  config = ps_configs.get_config()
  for name in config.stage:
    c = paper_scale.stage_config(config, name, str(tmp_path))
    assert c.variant == config.stage[name].variant
  victims = paper_scale.stage_config(config, "victims", str(tmp_path))
  assert victims.model.dtype == "bfloat16" and victims.train.batch_size == 512
  le = paper_scale.stage_config(config, "le", str(tmp_path))
  assert le.protections_from == str(tmp_path / "victims")

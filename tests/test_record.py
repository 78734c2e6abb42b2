"""aigc_jax.record: the workdir's cells, written atomically and read back."""

import json
import os

import numpy as np
import pytest

from aigc_jax import record


def test_cell_computed_from_other_inputs_is_refused(tmp_path):
  calls = []
  compute = lambda: calls.append(1) or {"accuracy": 0.5}
  images = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
  digest = record.array_digest(images, np.zeros(3, np.int32))
  cell = str(tmp_path / "victims" / "emn" / "none")
  assert record.cached_result(cell, compute, digest) == {"accuracy": 0.5}
  assert record.cached_result(cell, compute, digest) == {"accuracy": 0.5}
  assert len(calls) == 1  # read back the second time
  # One pixel changed (say, another purification's output): refused, not
  # read back, and so is a cell left with only a checkpoint.
  images[0, 0, 0] += 1
  other = record.array_digest(images, np.zeros(3, np.int32))
  assert other != digest
  with pytest.raises(ValueError, match=r"other inputs.*delete the folder"):
    record.cached_result(cell, compute, other)
  os.remove(os.path.join(cell, "result.json"))
  with pytest.raises(ValueError, match="other inputs"):
    record.cached_result(cell, compute, other)
  # Same bytes, other shape or dtype: another digest.
  assert record.array_digest(images.reshape(3, 4)) != record.array_digest(
    images
  )
  assert record.array_digest(images.astype(np.int8)) != record.array_digest(
    images
  )
  # A cell from before digests were kept is read back and gains one.
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "result.json").write_text('{"accuracy": 0.25}')
  assert record.cached_result(str(legacy), compute, other) == {"accuracy": 0.25}
  assert (legacy / "inputs.sha256").read_text().strip() == other


def test_cached_arrays_are_computed_once_and_written_whole(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return {"images": np.arange(6, dtype=np.uint8), "seconds": 1.5}

  path = str(tmp_path / "purified" / "le" / "emn.npz")
  first = record.cached_arrays(path, compute)
  again = record.cached_arrays(path, compute)
  assert len(calls) == 1
  np.testing.assert_array_equal(first["images"], again["images"])
  assert float(again["seconds"]) == 1.5
  # Nothing but the finished file is left behind.
  assert os.listdir(tmp_path / "purified" / "le") == ["emn.npz"]

  def killed():
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    record.cached_arrays(str(tmp_path / "killed.npz"), killed)
  assert not (tmp_path / "killed.npz").exists()


def test_report_pieces_state_targets_and_intervals(tmp_path):
  import ml_collections

  expected = ml_collections.ConfigDict(
    {
      "source": "the paper",
      "drop_points": {"at_least": 40.0},
      "gap_points": {"at_most": 10.0},
    }
  )
  assert record.expectation(expected, "drop_points", 41.0) == (
    "met (drop_points ≥ 40, the paper)"
  )
  assert record.expectation(expected, "drop_points", 39.9).startswith("missed")
  assert record.expectation(expected, "gap_points", 10.0).startswith("met")
  assert record.expectation(expected, "gap_points", 12.0).startswith("missed")
  with pytest.raises(ValueError, match="no 'fd_ratio' target"):
    record.expectation(expected, "fd_ratio", 1.0)
  # Wilson's interval of 5 in 32 is 6.9-31.8%; of 50 in 100, 40.4-59.6%.
  assert record.share_text(5 / 32, 32) == "15.6 (5/32, 6.9–31.8)"
  assert record.share_text(float("nan"), 0) == "–"
  assert record.percent_text(0.5, 100) == "50.0 (40.4–59.6)"
  assert record.flat({"a": {"b": 1, "c": None}, "d": 2}) == {"a/b": 1, "d": 2}
  path = str(tmp_path / "curve.png")
  record.plot_curves(
    path,
    (8, 16, 32),
    {"m": [80.0, 60.0, 20.0]},
    xlabel="budget",
    ylabel="success (%)",
    reference=("clean", 82.0),
  )
  assert os.path.getsize(path) > 0


def test_metrics_are_written_once_per_step_and_keys(tmp_path):
  writer = record.MetricWriter(str(tmp_path), prefix="train/")
  writer.write(5, {"loss": 1.0})
  writer.write(5, {"loss": 1.0})  # a resumed run retracing step 5
  writer.write(5, {"accuracy": 0.5})  # other keys at the same step
  with open(tmp_path / record.METRICS_FILE, "a") as f:
    f.write('{"step": 6, "train/lo')  # a line cut short by a kill
  again = record.MetricWriter(str(tmp_path), prefix="train/")
  again.write(5, {"loss": 1.0})
  again.write(6, {"loss": 0.9})
  lines = (tmp_path / record.METRICS_FILE).read_text().splitlines()
  # The cut line stays on its own; the new records follow it whole.
  assert len(lines) == 4 and lines[2] == '{"step": 6, "train/lo'
  assert json.loads(lines[3])["train/loss"] == 0.9
  assert record.last_metric(str(tmp_path), "train/loss") == 0.9


def test_run_time_counts_every_invocation_up_to_its_last_write(
  tmp_path, monkeypatch
):
  clock = iter([1000.0, 2000.0, 2100.0])  # starts of two invocations, now
  monkeypatch.setattr(record.time, "time", lambda: next(clock))
  workdir = str(tmp_path)
  record.prepare_workdir(workdir, '{"a": 1}')
  # The first invocation's last write, 300 s in; then it is killed.
  path = tmp_path / "chunk.npz"
  path.write_bytes(b"x")
  os.utime(path, (1300.0, 1300.0))
  record.prepare_workdir(workdir, '{"a": 1}')  # the resumed invocation
  assert record.run_seconds(workdir) == 300.0 + 100.0
  # A run refused before any work leaves nothing behind.
  fresh = str(tmp_path / "refused")
  monkeypatch.setattr(record.time, "time", lambda: 5.0)
  record.prepare_workdir(fresh, '{"a": 1}')
  record.forget_config(fresh)
  assert os.listdir(fresh) == []

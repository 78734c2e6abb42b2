"""`experiments/udp.py`: the pixel setting's smoke run (and LE on its
sets), its errors and reports, and its resumes after a kill."""

import os
import re
import shutil

import numpy as np
import pytest
from conftest import (
  UDP_ONE_METHOD,
  le_on_upstream,
  run_experiment,
  run_job,
  run_state,
)

from aigc_jax import faults
from aigc_jax.eval import classifiers


@pytest.mark.long
def test_udp_smoke(tmp_path, full_xla_optimisation):
  from experiments import udp
  from experiments.configs import udp as udp_configs

  config = udp_configs.get_config("smoke")
  config.protect.methods = ("eudp:early",)
  config.eval.robust_method = ""
  config.eval.perceptual = "alex"
  result, workdir = run_experiment(udp, config, tmp_path / "udp")
  assert set(result["results"]) == {"clean", "eudp:early"}
  sizes = result["perturbations"]["eudp:early"]
  assert 0 < sizes["linf_255"] <= 8
  with np.load(
    os.path.join(workdir, "protect", "eudp_early", "protected.npz")
  ) as f:
    assert f["protected"].dtype == f["clean"].dtype == np.uint8
    assert len(f["protected"]) == 128
    diff = f["protected"].astype(int) - f["clean"].astype(int)
    assert 0 < np.abs(diff).max() <= 8
  for r in result["results"].values():
    assert r["perceptual_fd"] > 0 and 0 <= r["perceptual_recall"] <= 1
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert "eudp:early" in report and "Verdict" in report
  assert "FD (alex)" in report
  # LE purifies the clean and the protected set; the unpurified cells are
  # this run's own results, read back.
  with full_xla_optimisation():
    le_result, le_dir = le_on_upstream(tmp_path, udp_from=workdir)
  assert set(le_result["udp"]) == {
    f"{s}/{r}" for s in ("clean", "eudp:early") for r in ("none", "le")
  }
  for s in ("clean", "eudp:early"):
    assert le_result["udp"][f"{s}/none"] == result["results"][s]
    assert le_result["udp"][f"{s}/le"]["frechet_distance"] > 0
  with open(os.path.join(le_dir, "report.md")) as f:
    assert "eudp:early + LE: FD above clean" in f.read()


def test_udp_rejects_an_empty_dataset(tmp_path):
  from experiments.configs import udp as udp_configs

  path = str(tmp_path / "empty.npz")
  np.savez(path, images=np.zeros((0, 8, 8, 1), np.uint8), labels=np.zeros(0))
  config = udp_configs.get_config("smoke")
  config.data.train = path
  with pytest.raises(ValueError, match="empty"):
    classifiers.load_train_test(config)


def test_udp_rejects_unknown_methods_before_any_work(tmp_path):
  from experiments import udp
  from experiments.configs import udp as udp_configs

  config = udp_configs.get_config("smoke")
  config.protect.methods = ("eudp:early", "glaze")
  with pytest.raises(ValueError, match="eudp:<policy>"):
    udp.train_and_evaluate(config, str(tmp_path))
  config.protect.methods = ("udp",)
  with pytest.raises(ValueError, match="robust_method"):
    udp.train_and_evaluate(config, str(tmp_path))
  config.eval.robust_method = ""
  config.protect.methods = ("encoder_away",)  # a pixel DDPM has no encoder
  with pytest.raises(ValueError, match="latent model's encoder"):
    udp.train_and_evaluate(config, str(tmp_path))
  config.protect.methods = ("udp",)
  config.eval.attacks = ("jpeg", "median")
  with pytest.raises(ValueError, match=r"Unknown eval\.attacks"):
    udp.train_and_evaluate(config, str(tmp_path))
  config.eval.attacks = ("le",)  # the pixel settings have no eval.le
  with pytest.raises(ValueError, match=r"no eval\.le block"):
    udp.train_and_evaluate(config, str(tmp_path))
  concept = udp_configs.get_config("concept")
  concept.eval.robust_method = "max"  # not among its methods
  with pytest.raises(ValueError, match="robust_method"):
    udp.train_and_evaluate(concept, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was trained or written


def test_concept_verdict_holds_methods_to_the_target_budget_only():
  from experiments import udp
  from experiments.configs import udp as udp_configs

  config = udp_configs.get_config("concept_budget")
  config.protect.budgets = (8.0, 64.0)

  def runs(*shares):
    return [
      {
        "success": s,
        "success_interval": (s - 0.1, s + 0.1),
        "frechet_distance": 1.0,
        "precision": 1.0,
        "recall": 1.0,
      }
      for s in shares
    ]

  results = {
    "clean": runs(0.8, 0.9),
    "random@8": runs(0.8, 0.8),
    "decoded_target@8": runs(0.7, 0.8),
    "random@64": runs(0.7, 0.8),
    "decoded_target@64": runs(0.2, 0.3),
  }
  rows, text = udp.verdict(config, results)
  assert [r[0] for r in rows] == list(results)
  assert "at 8/255" in text and "**missed** by every method" in text
  assert "other budgets the criterion holds for decoded_target@64" in text
  # A seed that falls short of the drop fails the method.
  results["decoded_target@8"] = runs(0.3, 0.6)
  assert "**missed**" in udp.verdict(config, results)[1]
  results["decoded_target@8"] = runs(0.3, 0.4)
  assert "**met** by decoded_target@8" in udp.verdict(config, results)[1]
  del results["random@8"], results["decoded_target@8"]
  assert "not measured" in udp.verdict(config, results)[1]


def test_udp_report_gains_an_inception_fid_column(tmp_path):
  from experiments import udp
  from experiments.configs import udp as udp_configs

  row = {
    "data_frechet_distance": 1.0,
    "frechet_distance": 2.0,
    "precision": 0.5,
    "recall": 0.5,
    "confident_share": 0.9,
    "classes_covered": 10,
    "heldout_loss": 0.1,
    "inception_fid": 12.345,
  }
  config = udp_configs.get_config("smoke")
  results = {"clean": row, "eudp:early": row}
  report = udp.pixel_report(config, str(tmp_path), results, 0.99, 1.0)
  assert "Inception FID" in report and "12.35" in report
  assert "missed (fd_ratio ≥ 2" in report
  perturbation = {"linf_255": 8, "l2_255": 40, "psnr_db": 34, "ssim": 0.99}
  table = udp.perturbation_table(
    {"eudp:early": perturbation},
    {"eudp:early": 1.0},
    {"eudp:early": np.array([[[0.25, 0.5], [0.75, 0.875]]])},
  )
  # The objective before the first and the last PGD step.
  assert "| 0.2500 | 0.8750 |" in table


def _udp(workdir, *, devices=1, exit_after=None):
  env = {} if exit_after is None else {faults.VARIABLE: str(exit_after)}
  return run_job(
    [*UDP_ONE_METHOD, f"--workdir={workdir}"], devices=devices, **env
  )


@pytest.mark.long
def test_udp_killed_after_every_write_resumes_to_the_same_run(tmp_path):
  """Killed (os._exit, `aigc_jax.faults`) right after each of its writes in
  turn and resumed each time, the run ends as the uninterrupted one, bit for
  bit; resumed on two devices from a kill between a chunk and its
  checkpoint, it protects the same images."""
  whole = _udp(tmp_path / "whole")
  assert whole.returncode == 0, whole.stderr[-2000:]
  killed = tmp_path / "killed"
  kills = []
  for _ in range(80):
    # After a kill at the last write (the report), a resume rewrites it
    # with its own total time: it runs to the end uninjected.
    last = bool(kills) and kills[-1] == str(killed / "report.md")
    run = _udp(killed, exit_after=None if last else 1)
    if run.returncode == 0:
      break
    assert run.returncode == faults.EXIT_CODE, run.stderr[-2000:]
    path = re.search(r"exit after write 1: (.*)", run.stderr).group(1)
    # Each resume gets one write further: a file written again with other
    # contents (an inexact resume) would be killed at again.
    assert not kills or path != kills[-1] or path.endswith(".jsonl"), path
    kills.append(path)
    if path.endswith("chunk_0000.npz"):  # the chunk, not its checkpoint
      shutil.copytree(killed, tmp_path / "between")
  else:
    pytest.fail(f"no end after {len(kills)} kills: {kills[-5:]}")
  assert last and len(kills) > 25 and any("ckpt" in p for p in kills)
  expected = run_state(tmp_path / "whole")
  got = run_state(killed)
  assert got[0].keys() == expected[0].keys()
  for k in expected[0]:
    np.testing.assert_array_equal(got[0][k], expected[0][k])
  assert got[1:] == expected[1:]
  # Another device count: chunks and keys do not depend on it.
  other = _udp(tmp_path / "between", devices=2)
  assert other.returncode == 0, other.stderr[-2000:]
  arrays = run_state(tmp_path / "between")[0]
  for k in [k for k in expected[0] if "protected.npz" in k]:
    np.testing.assert_array_equal(arrays[k], expected[0][k])

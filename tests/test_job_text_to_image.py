"""`experiments/train_text_to_image.py`: its smoke model, which erase.py
and udp.py's latent settings then run on."""

import os
import shutil

import numpy as np
import pytest
from conftest import run_experiment


@pytest.mark.long
def test_text_to_image_smoke_model_feeds_erase_and_udp_sd(tmp_path):
  from aigc_jax import sd
  from experiments import train_text_to_image
  from experiments.configs import train_text_to_image as t2i_configs

  config = t2i_configs.get_config("smoke")
  result, workdir = run_experiment(
    train_text_to_image, config, tmp_path / "t2i"
  )
  for name in ("accuracy/train_captions", "accuracy/paraphrases"):
    assert 0.0 <= result[name] <= 1.0
  model, params = sd.load_stable_diffusion(os.path.join(workdir, "model"))
  assert len(sd.projection_names(params["unet"])) == 4 * 2
  assert model.scaling_factor == pytest.approx(result["scaling_factor"])
  with open(os.path.join(workdir, "report.md")) as f:
    assert "accuracy/paraphrases" in f.read()
  # Same command again: both stages restore their final checkpoints.
  again, _ = run_experiment(train_text_to_image, config, tmp_path / "t2i")
  assert again["accuracy/train_captions"] == result["accuracy/train_captions"]

  # The folder is what erase.py edits: every method, scored and attacked.
  from experiments import erase
  from experiments.configs import erase as erase_configs

  config = erase_configs.get_config("smoke")
  config.model = os.path.join(workdir, "model")
  # The same classifier config: its finished run is reused, not retrained.
  shared_classifier = os.path.join(workdir, "classifier")
  shutil.copytree(shared_classifier, tmp_path / "erase" / "classifier")
  result, erase_dir = run_experiment(erase, config, tmp_path / "erase")
  names = ["original", "uce", "rece epoch 1", "mace refinement only", "mace"]
  assert list(result["scores"]) == names
  for scores in result["scores"].values():
    for key in ("captions/erased", "captions/kept", "paraphrases/erased"):
      assert 0.0 <= scores[key] <= 1.0
    assert "captions/lookalike/eight" in scores
  assert len(result["attack_success"]) == 3
  assert set(result["mace_lora_loss_first_last"]) == {"three", "five"}
  with open(os.path.join(erase_dir, "report.md")) as f:
    text = f.read()
  assert "| rece epoch 1 attacked (derived against uce) |" in text
  assert os.path.exists(os.path.join(erase_dir, "samples", "uce_captions.png"))

  # ... and udp.py's latent-diffusion variant protects through it.
  from experiments import udp
  from experiments.configs import udp as udp_configs

  config = udp_configs.get_config("concept_smoke")
  config.sd.model = os.path.join(workdir, "model")
  shutil.copytree(shared_classifier, tmp_path / "udp_sd" / "classifier")
  result, udp_dir = run_experiment(udp, config, tmp_path / "udp_sd")
  # The smoke variant sweeps two budgets: every method at each.
  assert list(result["results"]) == [
    "clean",
    *(f"{m}@{e}" for e in (8, 16) for m in config.protect.methods),
    "decoded_target@8 + JPEG 75",
    "decoded_target@8 + LE",
  ]
  for name, row in result["perturbations"].items():
    assert 0 < row["linf_255"] <= float(name.split("@")[1])
  for runs in result["results"].values():
    assert len(runs) == config.finetune.seeds == 2
    for r in runs:
      assert 0.0 <= r["success"] <= 1.0 and r["frechet_distance"] >= 0
      lo, hi = r["success_interval"]
      assert lo <= r["success"] <= hi and r["num_samples"] == 4
  for eps in (8, 16):
    path = os.path.join(udp_dir, f"eps{eps}", "protect", "bilevel")
    saved = np.load(os.path.join(path, "protected.npz"))
    # Only nines, each beside its clean original, within the budget.
    assert saved["protected"].shape == saved["clean"].shape == (16, 32, 32, 1)
    assert (saved["labels"] == 9).all()
    diff = saved["protected"].astype(int) - saved["clean"].astype(int)
    assert 0 < np.abs(diff).max() <= eps
  with open(os.path.join(udp_dir, "report.md")) as f:
    text = f.read()
  assert "concept success" in text and "Target (from `expected`" in text
  assert "budget to protect" in text
  assert os.path.exists(os.path.join(udp_dir, "budget.png"))
  purified = np.load(os.path.join(udp_dir, "le", "purified.npz"))["images"]
  assert purified.shape == (16, 32, 32, 1) and purified.dtype == np.uint8

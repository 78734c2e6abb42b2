"""`experiments/sd14.py` on its smoke variant (the tiny architecture): the
random folder, parity with PyTorch, edit and sampling times, resumption and
the refusal of a UNet that does not match PyTorch's; and SD v1.4's
architecture at v1.4's parameter counts."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import run_experiment

from aigc_jax import sd
from aigc_jax.sd import architectures
from experiments import sd14
from experiments.configs import sd14 as sd14_configs

pytest.importorskip("torch")


def test_sd14_smoke_checks_parity_times_edits_and_sampling_and_resumes(
  tmp_path,
):
  config = sd14_configs.get_config("smoke")
  result, workdir = run_experiment(sd14, config, tmp_path)
  assert os.path.exists(os.path.join(workdir, "model", "model_index.json"))
  assert result["parity"]["relative_error"] < config.parity.tolerance
  assert result["parity"]["output_rms"] > 0.01  # a forward, not zeros
  assert set(result["edits"]) == {"uce", "rece"}
  assert set(result["sampling"]) == {"float32", "bfloat16"}
  for times in [*result["edits"].values(), *result["sampling"].values()]:
    assert 0 < times["median_s"] < times["first_s"]  # compiled once
  report = (tmp_path / "report.md").read_text()
  assert "| uce |" in report and "| bfloat16 |" in report
  assert "Guided DDIM, 4 images of 16x16, 2 steps" in report

  # A second call reads the folder and every finished step back.
  weights = os.path.join(workdir, "model", "unet")
  stamp = lambda: {
    f: os.stat(os.path.join(weights, f)).st_mtime_ns
    for f in os.listdir(weights)
  }
  before = stamp()
  again, _ = run_experiment(sd14, config, tmp_path)
  for key in ("parity", "edits", "sampling", "parameters"):
    assert again[key] == result[key]
  assert stamp() == before

  # A UNet that computes something else than PyTorch's fails the run.
  path = tmp_path / "parity" / "result.json"
  gap = json.loads(path.read_text())
  path.write_text(json.dumps({**gap, "relative_error": 0.3}))
  with pytest.raises(
    RuntimeError, match=r"differs from PyTorch's by 3\.00e-01"
  ):
    run_experiment(sd14, config, tmp_path)


def test_the_sd14_architecture_has_sd14s_parameter_counts():
  from transformers import CLIPTextConfig, FlaxCLIPTextModel

  arch = architectures.SD14
  models = {
    "unet": sd.load.build_unet(dict(arch["unet"])),
    "vae": sd.load.build_vae(dict(arch["vae"])),
    "text_encoder": FlaxCLIPTextModel(
      CLIPTextConfig(**arch["text_encoder"]), _do_init=False
    ),
  }
  # CompVis/stable-diffusion-v1-4's UNet, VAE and CLIP ViT-L/14 text model.
  expected = {
    "unet": 859_520_964,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
  }
  for name, model in models.items():
    shapes = sd.load.abstract_params(model)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == expected[name], name


def test_sd14_on_a_given_folder_saves_its_samples_and_names_bad_input(
  tiny_sd, tmp_path
):
  config = sd14_configs.get_config("smoke")
  config.update(model=tiny_sd, later_calls=0)
  config.sample.dtypes = ("float32",)
  result, workdir = run_experiment(sd14, config, tmp_path / "given")
  assert result["sampling"]["float32"]["median_s"] is None
  assert os.path.exists(os.path.join(workdir, "samples", "float32.png"))
  assert not os.path.exists(os.path.join(workdir, "model"))
  config = sd14_configs.get_config("smoke")
  config.architecture = "sd15"
  with pytest.raises(ValueError, match="Unknown architecture 'sd15'; choose"):
    run_experiment(sd14, config, tmp_path / "bad")

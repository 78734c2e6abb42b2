"""The benchmark: its PyTorch twins compute what the JAX side computes, and
its smoke variant times every row without retracing a hot function."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.sd.torchvision_fallback import import_torchvision

torch = pytest.importorskip("torch")
import_torchvision()  # before lpips, which imports torchvision
pytest.importorskip("lpips")

from aigc_jax import record, unlearn  # noqa: E402
from aigc_jax.bench import torch_twins  # noqa: E402
from aigc_jax.models import ResNet18, load_lpips, lpips_distance  # noqa: E402
from aigc_jax.models.unet import DDPMUNet  # noqa: E402


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def test_twins_compute_what_the_jax_models_compute():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)

  # The DDPM UNet, attention at 8x8 and in the middle, through diffusers.
  unet = DDPMUNet(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
    dropout=0.0, num_groups=4,
  )  # fmt: skip
  x, t = images[:, :16, :16], np.array([3, 700])
  # Jitted: an eager init compiles every parameter draw on its own.
  params = jax.jit(unet.init)(jax.random.key(0), x, t)["params"]
  twin = torch_twins.ddpm_unet_twin(unet, params, 16, 3)
  with torch.no_grad():
    ref = twin(_nchw(x), torch.from_numpy(t)).sample
  np.testing.assert_allclose(
    unet.apply({"params": params}, x, t), _nhwc(ref), atol=1e-4
  )

  # LPIPS-alex, the lpips package's network with this project's weights.
  variables = load_lpips("alex")
  noisy = np.clip(images + rng.normal(0, 0.2, images.shape), -1, 1)
  noisy = noisy.astype(np.float32)
  with torch.no_grad():
    ref = torch_twins.lpips_twin(variables)(_nchw(images), _nchw(noisy))
  np.testing.assert_allclose(
    lpips_distance(variables, images, noisy), ref.flatten(), rtol=1e-4
  )

  # The CIFAR ResNet-18 with trained-looking BatchNorm statistics.
  model = ResNet18(width=4)
  variables = jax.jit(model.init)(jax.random.key(1), images)
  stats = jax.tree.map(
    lambda v: v + 0.1 * jnp.abs(jax.random.normal(jax.random.key(2), v.shape)),
    variables["batch_stats"],
  )
  variables = {"params": variables["params"], "batch_stats": stats}
  twin = torch_twins.resnet18_twin(variables["params"], stats).eval()
  with torch.no_grad():
    ref = twin(_nchw(images)).numpy()
  np.testing.assert_allclose(model.apply(variables, images), ref, atol=1e-4)

  # UCE's ridge solve over several kernels.
  emb = lambda n: rng.normal(size=(n, 16)).astype(np.float32)
  kernels = {"a": emb(16)[:, :8], "b": emb(16)}
  erase, target, preserve = emb(3), emb(3), emb(5)
  ours = unlearn.uce_edit(kernels, erase, target, preserve, lam=0.5)
  theirs = torch_twins.uce_edit_twin(
    {k: torch.from_numpy(v) for k, v in kernels.items()},
    *map(torch.from_numpy, (erase, target, preserve)),
    lam=0.5,
  )
  for name in kernels:
    np.testing.assert_allclose(ours[name], theirs[name].numpy(), atol=1e-4)


def test_bench_smoke_times_every_row_without_retracing(tmp_path):
  from experiments import bench
  from experiments.configs import bench as bench_configs

  config = bench_configs.get_config("smoke")
  # udp_step_cifar10 is udp_step_digits's function at other shapes; the
  # device-count subprocesses run `bench.py` itself (30 s), by hand.
  config.only = "jcdp_step_cifar10,resnet18_step,sd_unet_step,uce_sd14"
  config.only += ",udp_step_digits"
  config.scaling.device_counts = ()
  config.peak_tflops.float32 = 0.5  # a CPU has no entry in PEAK_TFLOPS
  # Time to accuracy has its own test below; the paper-scale smoke suite
  # runs it through this launcher.
  config.time_to_accuracy.target = 0.0
  workdir = record.prepare_workdir(str(tmp_path), config.to_json())
  result = bench.train_and_evaluate(config, workdir)
  names = config.only.split(",")
  assert [r["row"] for r in result["rows"]] == names
  for row in result["rows"] + result["batch_scaling"]:
    assert row["jax_s"] > 0 and row["torch_s"] > 0
    # Every hot function reuses its first call's program.
    assert row["jax_retraces"] == 0, row["row"]
    # The share of the peak is the achieved rate over the given peak.
    assert row["jax_peak_share"] == pytest.approx(
      row["gflop_per_s_jax"] / 500.0
    )
  assert [r["batch"] for r in result["batch_scaling"]] == [2]
  assert result["device_scaling"] == []
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  for name in names:
    assert f"| {name} |" in text
  assert "JAX % of peak" in text
  assert result["time_to_accuracy"] == {} and "## Time to" not in text
  with open(os.path.join(workdir, "result.json")) as f:
    saved = json.load(f)
  assert [r["row"] for r in saved["rows"]] == names

  config.only = "uce_sd14,esd"
  with pytest.raises(ValueError, match="Unknown benchmark rows"):
    bench.train_and_evaluate(config, workdir)


def test_time_to_accuracy_runs_one_recipe_on_both_sides():
  """JAX and PyTorch train the same ResNet-18 recipe on the same batches:
  both learn the digits (about 60% after 3 epochs), both stop at the first
  epoch at the target, and PyTorch is given optax's rate at every step."""
  from aigc_jax import parallel, train
  from aigc_jax.bench import time_to_accuracy as tta
  from aigc_jax.eval import classifiers
  from experiments.configs import bench as bench_configs

  config = bench_configs.get_config("smoke").time_to_accuracy
  config.data.limit, config.model.width = 512, 8
  config.train.update(
    num_epochs=3, batch_size=16, schedule="onecycle", label_smoothing=0.1
  )
  train_set, test_set = classifiers.load_train_test(config)
  runs = {
    "jax": lambda t: tta.jax_run(
      config, train_set, test_set, parallel.make_mesh(1), t
    ),
    "torch": lambda t: tta.torch_run(config, train_set, test_set, "cpu", t),
  }
  for side, run in runs.items():
    got = run(0.5)
    accuracies = [p["accuracy"] for p in got["curve"]]
    # Chance is 10%; both sides pass 50% in two or three epochs.
    assert got["best_accuracy"] == max(accuracies) > 0.4, side
    if accuracies[-1] >= 0.5:  # stopped at the first epoch at the target
      assert max(accuracies[:-1], default=0) < 0.5, side
      assert got["epochs"] == len(accuracies), side
      assert got["seconds"] == got["curve"][-1]["seconds"] > 0, side
    else:  # never reached: every epoch ran
      assert len(accuracies) == 3 and got["seconds"] is None, side
  rates = tta._learning_rates(config, 512 // 16)
  schedule = train.learning_rate_schedule(0.05, 96, "onecycle")
  np.testing.assert_allclose(rates, [schedule(s) for s in range(96)])
  assert rates[0] == 0 and rates.max() == pytest.approx(0.05)

"""Each experiment's smallest variant, end to end, and launcher errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_torch_state_dict

from aigc_jax import record
from aigc_jax.eval import classifiers, ddpm
from experiments import train_ddpm
from experiments.configs import train_classifier as clf_configs
from experiments.configs import train_ddpm as ddpm_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Full XLA optimisation (`optimized_xla`, `full_xla_optimisation`) only where
# run time dominates: LE's LPIPS-guided purification runs several times
# slower unoptimised (the LE smoke run alone: 196 s against 44 s), while the
# other smoke runs compile more than they run (unlearnable: 37 s against 85
# s, the text-to-image chain 191 s against 252 s; one process).


def _run(module, config, workdir, *, num_devices=1):
  """Runs an experiment in `workdir`, on one device unless told otherwise.

  One device because four forced CPU devices on two cores make a smoke run
  three times slower; sharded agreement has its own tests, and
  `test_unlearnable_smoke_saves_protections_and_resumes` runs on four.
  """
  config.num_devices = num_devices
  workdir = record.prepare_workdir(str(workdir), config.to_json())
  return module.train_and_evaluate(config, workdir), workdir


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
  result, workdir = _run(train_ddpm, config, tmp_path / "ddpm")
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
  again, _ = _run(train_ddpm, config, tmp_path / "ddpm")
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


@pytest.mark.long
def test_udp_smoke(tmp_path, full_xla_optimisation):
  from experiments import udp
  from experiments.configs import udp as udp_configs

  config = udp_configs.get_config("smoke")
  config.protect.methods = ("eudp:early",)
  config.eval.robust_method = ""
  config.eval.perceptual = "alex"
  result, workdir = _run(udp, config, tmp_path / "udp")
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
    le_result, le_dir = _le_on_upstream(tmp_path, udp_from=workdir)
  assert set(le_result["udp"]) == {
    f"{s}/{r}" for s in ("clean", "eudp:early") for r in ("none", "le")
  }
  for s in ("clean", "eudp:early"):
    assert le_result["udp"][f"{s}/none"] == result["results"][s]
    assert le_result["udp"][f"{s}/le"]["frechet_distance"] > 0
  with open(os.path.join(le_dir, "report.md")) as f:
    assert "eudp:early + LE: FD above clean" in f.read()


def _le_on_upstream(tmp_path, **upstream):
  """experiments/le.py's smoke variant on another run's sets only."""
  from experiments import le
  from experiments.configs import le as le_configs

  config = le_configs.get_config("smoke")
  config.update(
    protections=(), clean_rows=(), purifiers=("le",), ablations=(), **upstream
  )
  return _run(le, config, tmp_path / "le")


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
  concept = udp_configs.get_config("concept")
  concept.eval.robust_method = "max"  # not among its methods
  with pytest.raises(ValueError, match="robust_method"):
    udp.train_and_evaluate(concept, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was trained or written


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


def test_sigkilled_run_resumes_to_the_same_parameters(tmp_path):
  import signal
  import time

  import numpy as np

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


@pytest.mark.long
def test_unlearnable_smoke_saves_protections_and_resumes(tmp_path):
  from experiments import unlearnable
  from experiments.configs import unlearnable as ul_configs

  config = ul_configs.get_config("smoke")
  config.countermeasures = ("iss_grayscale", "none", "at", "aa")
  result, workdir = _run(unlearnable, config, tmp_path / "ul", num_devices=4)
  accuracy = result["accuracy"]
  assert len(accuracy) == 5 * 4
  assert all(0.0 <= a <= 1.0 for a in accuracy.values())
  # Grayscale is the identity on one channel: the vanilla victim, trained
  # once (first, here, for the grayscale cell) and read back for "none".
  for s in ("clean", *config.protections):
    assert accuracy[f"{s}/iss_grayscale"] == accuracy[f"{s}/none"]
    assert not os.path.exists(
      os.path.join(workdir, "victims", s, "iss_grayscale")
    )
  clean = np.asarray(  # the class-balanced 200-image subset
    classifiers.load_train_test(config)[0].images, np.int16
  )
  for name in config.protections:
    with np.load(os.path.join(workdir, "protections", f"{name}.npz")) as f:
      images, delta = f["images"], f["delta"]
    assert images.dtype == np.uint8 and images.shape == clean.shape
    np.testing.assert_array_equal(images.astype(np.int16) - clean, delta)
    info = result["protections"][name]
    assert info["max_size_255"] <= info["eps_255"] + 1e-6
    if name != "lsp":
      assert np.abs(delta).max() <= 8
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert "| vanilla (no countermeasure) |" in report and "EMN (C)" in report
  # Same command again: every protection and classifier is read back.
  again, _ = _run(unlearnable, config, tmp_path / "ul", num_devices=4)
  assert again["accuracy"] == result["accuracy"]


def test_unlearnable_rejects_unknown_names_before_any_work(tmp_path):
  from experiments import unlearnable
  from experiments.configs import unlearnable as ul_configs

  config = ul_configs.get_config("smoke")
  config.protections = ("emn_sample", "tap")
  with pytest.raises(ValueError, match="Unknown protection 'tap'"):
    unlearnable.train_and_evaluate(config, str(tmp_path))
  config.protections = ("lsp",)
  config.countermeasures = ("none", "cutout")
  with pytest.raises(ValueError, match="Unknown countermeasure 'cutout'"):
    unlearnable.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.long
def test_cp_smoke_saves_poisons_and_resumes(tmp_path, full_xla_optimisation):
  from experiments import cp
  from experiments.configs import cp as cp_configs

  config = cp_configs.get_config("smoke")
  result, workdir = _run(cp, config, tmp_path / "cp")
  assert len(result["probe_accuracy"]) == 3 * 3
  assert all(0.0 <= a <= 1.0 for a in result["probe_accuracy"].values())
  clean = np.asarray(classifiers.load_train_test(config)[0].images)
  for name in ("cp_class", "cp_sample"):
    with np.load(os.path.join(workdir, "protections", f"{name}.npz")) as f:
      assert f["images"].shape == clean.shape
      assert np.abs(f["delta"]).max() <= 8
  with open(os.path.join(workdir, "report.md")) as f:
    assert "| MoCo v2 |" in f.read()
  again, _ = _run(cp, config, tmp_path / "cp")
  assert again["probe_accuracy"] == result["probe_accuracy"]
  # LE purifies this run's sets and trains its recipe on them; the
  # unpurified cells are this run's own encoders, read back.
  with full_xla_optimisation():
    le_result, le_dir = _le_on_upstream(tmp_path, contrastive_from=workdir)
  probe = le_result["probe_accuracy"]
  assert set(probe) == {
    "clean/none/simclr",
    *(
      f"{s}/{r}/simclr"
      for s in ("cp_class", "cp_sample")
      for r in ("none", "le")
    ),
  }
  for s in ("clean", "cp_class", "cp_sample"):
    assert probe[f"{s}/none/simclr"] == result["probe_accuracy"][f"{s}/simclr"]
  with np.load(
    os.path.join(le_dir, "purified", "le", "cp", "cp_class.npz")
  ) as f:
    assert f["images"].shape == clean.shape
  with open(os.path.join(le_dir, "report.md")) as f:
    assert "| SimCLR |" in f.read()


def test_cp_runs_the_random_control(tmp_path):
  from experiments import cp
  from experiments.configs import cp as cp_configs

  config = cp_configs.get_config("smoke")
  config.methods, config.protections = ("simclr",), ("random_class",)
  result, workdir = _run(cp, config, tmp_path / "cp")
  assert set(result["probe_accuracy"]) == {
    "clean/simclr",
    "random_class/simclr",
  }
  labels = classifiers.load_train_test(config)[0].labels
  with np.load(os.path.join(workdir, "protections", "random_class.npz")) as f:
    delta = f["delta"]
  assert np.abs(delta).max() <= 8
  for c in np.unique(labels):  # one pattern per class (clipping aside)
    members = delta[labels == c]
    assert (members == members[:1]).mean() > 0.8
  with open(os.path.join(workdir, "report.md")) as f:
    assert "random (C)" in f.read()


def test_cp_rejects_unknown_methods_before_any_work(tmp_path):
  from experiments import cp
  from experiments.configs import cp as cp_configs

  config = cp_configs.get_config("smoke")
  config.methods = ("simclr", "swav")
  with pytest.raises(ValueError, match="Unknown contrastive method 'swav'"):
    cp.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.optimized_xla
def test_le_smoke_purifies_trains_and_resumes(tmp_path):
  from experiments import le
  from experiments.configs import le as le_configs

  config = le_configs.get_config("smoke")
  config.victim_seeds = 2
  config.countermeasures = ("none", "iss_grayscale")
  result, workdir = _run(le, config, tmp_path / "le")
  cells = le.victim_cells(config)
  assert ("lsp", "le_mse") in cells and ("emn_class", "le_mse") not in cells
  assert set(result["accuracy"]) == {f"{s}/{r}" for s, r in cells}
  assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
  # Every cell but AT and AA: two victims, the table shows their mean.
  # Grayscale on one channel is the vanilla victims, both seeds.
  for s, r in cells:
    if r == "iss_grayscale":
      assert result["accuracy"][f"{s}/{r}"] == result["accuracy"][f"{s}/none"]
      continue
    seeded = r not in le.ONE_SEED_ROWS
    second = os.path.join(workdir, "victims", s, f"{r}_seed1")
    assert os.path.exists(second) == seeded, (s, r)
    if seeded:
      accuracies = []
      for d in (r, f"{r}_seed1"):
        with open(os.path.join(workdir, "victims", s, d, "result.json")) as f:
          accuracies.append(json.load(f)["test_accuracy"])
      assert result["accuracy"][f"{s}/{r}"] == pytest.approx(
        np.mean(accuracies)
      )
  shape = classifiers.load_train_test(config)[0].images.shape
  for key in result["purification"]:
    name, set_name = key.split("/")
    path = os.path.join(workdir, "purified", name, f"{set_name}.npz")
    with np.load(path) as f:
      assert f["images"].dtype == np.uint8 and f["images"].shape == shape
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert "| LE (JCDP) |" in report and "mean over the protections" in report
  assert "the mean of 2" in report and "per victim seed" in report
  # Same command again: purified sets and victims are read back.
  again, _ = _run(le, config, tmp_path / "le")
  assert again["accuracy"] == result["accuracy"]
  assert again["purification"] == result["purification"]


def test_le_names_missing_protections_and_unknown_purifiers(tmp_path):
  from experiments import le
  from experiments.configs import le as le_configs

  config = le_configs.get_config("smoke")
  config.purifiers = ("avatar", "diffpure")
  with pytest.raises(ValueError, match="Unknown purifier 'diffpure'"):
    le.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)
  config = le_configs.get_config("smoke")
  config.protections_from = str(tmp_path / "no_run")
  with pytest.raises(FileNotFoundError, match=r"experiments/unlearnable\.py"):
    le.train_and_evaluate(config, str(tmp_path / "le"))
  config = le_configs.get_config("smoke")
  config.udp_from = str(tmp_path / "no_run")
  with pytest.raises(FileNotFoundError, match=r"experiments/udp\.py"):
    le.train_and_evaluate(config, str(tmp_path / "le"))
  config = le_configs.get_config("smoke")
  config.contrastive_methods = ("swav",)
  with pytest.raises(ValueError, match="Unknown contrastive method 'swav'"):
    le.train_and_evaluate(config, str(tmp_path / "le"))


@pytest.mark.long
def test_text_to_image_smoke_model_feeds_erase_and_udp_sd(tmp_path):
  from aigc_jax import sd
  from experiments import train_text_to_image
  from experiments.configs import train_text_to_image as t2i_configs

  config = t2i_configs.get_config("smoke")
  result, workdir = _run(train_text_to_image, config, tmp_path / "t2i")
  for name in ("accuracy/train_captions", "accuracy/paraphrases"):
    assert 0.0 <= result[name] <= 1.0
  model, params = sd.load_stable_diffusion(os.path.join(workdir, "model"))
  assert len(sd.projection_names(params["unet"])) == 4 * 2
  assert model.scaling_factor == pytest.approx(result["scaling_factor"])
  with open(os.path.join(workdir, "report.md")) as f:
    assert "accuracy/paraphrases" in f.read()
  # Same command again: both stages restore their final checkpoints.
  again, _ = _run(train_text_to_image, config, tmp_path / "t2i")
  assert again["accuracy/train_captions"] == result["accuracy/train_captions"]

  # The folder is what erase.py edits: every method, scored and attacked.
  from experiments import erase
  from experiments.configs import erase as erase_configs

  config = erase_configs.get_config("smoke")
  config.model = os.path.join(workdir, "model")
  # The same classifier config: its finished run is reused, not retrained.
  shared_classifier = os.path.join(workdir, "classifier")
  shutil.copytree(shared_classifier, tmp_path / "erase" / "classifier")
  result, erase_dir = _run(erase, config, tmp_path / "erase")
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
  result, udp_dir = _run(udp, config, tmp_path / "udp_sd")
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


def test_feature_unlearn_smoke_resumes_and_takes_user_labels(tmp_path):
  from experiments import feature_unlearn
  from experiments.configs import feature_unlearn as fu_configs

  config = fu_configs.get_config("smoke")
  result, workdir = _run(feature_unlearn, config, tmp_path / "a")
  for name in ("report.md", "before_after.png", "labelling/grid.png"):
    assert os.path.exists(os.path.join(workdir, name))
  assert 0 < result["labelled_positive"] < config.feature.num_labelled
  assert 0.0 <= result["share_after"] <= 1.0
  # The samples with the feature below the threshold are part of them.
  for when in ("before", "after"):
    assert 0.0 <= result[f"unmoved_share_{when}"] <= result[f"share_{when}"]
  # The re-run restores every stage from its checkpoint: same numbers.
  again, _ = _run(feature_unlearn, config, workdir)
  assert again["share_after"] == result["share_after"]
  assert again["l1_without_feature"] == result["l1_without_feature"]

  # A user's own labels for the saved latents (every third one) drive the
  # direction; the generator is reused, and a pretrained LeNet-5 (a
  # stand-in of its layout) evaluates instead of a trained classifier.
  latents = np.load(os.path.join(workdir, "labelling", "latents.npy"))
  labels = np.arange(len(latents)) % 3 == 0
  np.save(tmp_path / "labels.npy", labels)
  other = tmp_path / "b"
  shutil.copytree(os.path.join(workdir, "generator"), other / "generator")
  config.feature.labels = str(tmp_path / "labels.npy")
  lenet = tmp_path / "lenet5_classifier.npz"
  shapes = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 16, 5, 5), (84, 120), (10, 84)]
  write_torch_state_dict(
    lenet, zip(("c1", "c3", "c5", "f6", "f7"), shapes, strict=True)
  )
  config.eval.pretrained_classifier = str(lenet)
  mine, _ = _run(feature_unlearn, config, other)
  assert mine["labelled_positive"] == labels.sum()
  assert not os.path.exists(other / "classifier")
  with open(other / "report.md") as f:
    assert f"the pretrained LeNet-5 {lenet}" in f.read()
  np.save(tmp_path / "bad.npy", labels[:10])
  config.feature.labels = str(tmp_path / "bad.npy")
  with pytest.raises(ValueError, match="one label per row"):
    feature_unlearn.check_config(config)


def test_feature_unlearn_refuses_unknown_kinds():
  from experiments import feature_unlearn
  from experiments.configs import feature_unlearn as fu_configs

  refusals = [  # (variant, section, key, value, what the error names)
    ("smoke", "generator", "kind", "stylegan", r"generator\.kind"),
    ("smoke", "feature", "kind", "eyeglasses", r"feature\.kind"),
    ("pretrained_gan", "generator", "weights", "", r"generator\.weights"),
    ("gan", "generator", "weights", "gan.npz", "not conv_gan"),
  ]
  for variant, section, key, value, match in refusals:
    config = fu_configs.get_config(variant)
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
      feature_unlearn.check_config(config)


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

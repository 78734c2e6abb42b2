"""UDP / EUDP / AdvDM protection against diffusion-model training.

Default (`digits`): protects the embedded scikit-learn digits (8/255, L∞),
then trains fresh DDPMs with the same seed and steps on clean, randomly
perturbed (the control), AdvDM-, UDP- and EUDP-protected data (and on EUDP
data after JPEG-75 and a Gaussian blur), and compares their samples:

  python experiments/udp.py --config=experiments/configs/udp.py \
    --workdir=runs/udp_digits

Expected: the report's tables (Fréchet distance in a digit classifier's
feature space, precision/recall, confident share, classes covered, held-out
denoising loss; PSNR/SSIM/L∞/L2 of the perturbations). The issue's target is
EUDP at least 2x the clean Fréchet distance and 30 points less
recognisability; the report says whether it is met.

`:strong` gives EUDP 16x the PGD work (twice the rounds and steps, four
(t, ε) draws per gradient, a random start). `:policies` runs EUDP with every
timestep policy (uniform = UDP, signal, snr,
early, late) to measure which protects best. `:cifar10` is the paper-scale
setting (CIFAR-10, 8/255, Ho et al.'s DDPM) for accelerators;
`:cifar10_small` is a reduced CIFAR-10 run a CPU can finish (local archive
from ../shared/data). `:smoke` is a few steps for tests.
"""

import ml_collections

from aigc_jax.train.text_to_image import DIGIT_WORDS
from experiments.configs import train_classifier, train_ddpm
from experiments.configs.base import base_config


def _ddpm(num_steps: int, **updates) -> ml_collections.ConfigDict:
  c = train_ddpm.get_config("digits")
  c.train.num_steps = num_steps
  c.train.checkpoint_every = max(num_steps // 2, 1)
  for k, v in updates.items():
    getattr(c, k).update(v)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "digits"
  c = base_config(variant)
  c.protect = ml_collections.ConfigDict(
    {
      # "random" (the control: ±eps noise, no model), "advdm", "udp" or
      # "eudp:<policy>" (policies: uniform, signal, snr, early, late).
      "methods": ("random", "advdm", "udp", "eudp:early"),
      "eps": 8.0,  # [0, 255] units
      "norm": "linf",
      "step_size": 1.0,  # [0, 255] units
      "random_start": False,
      "chunk_size": 512,
      "rounds": 4,
      "inner_steps": 20,  # surrogate steps per round (inner min)
      "pgd_steps": 5,  # perturbation steps per round (outer max)
      "num_draws": 1,  # (t, ε) draws per PGD gradient
      "batch_size": 64,  # surrogate minibatch
    }
  )
  # The surrogate: a DDPM warmed up on clean data before protection (AdvDM
  # attacks it as it is; UDP/EUDP keep training it on protected data).
  # Batches of 64 keep the whole default within 15 minutes on 2 CPU cores.
  c.surrogate = _ddpm(300, train={"batch_size": 64})
  # The unauthorised trainer's DDPM, trained from scratch on each set. Seven
  # of them (clean, the control, three protections, two transforms) at 0.13 s
  # a step on 2 CPU cores: 400 steps keep the default within 15 minutes. EMA
  # 0.99, not 0.995: at 400 steps the slower average still holds weights of
  # the first half and doubled the clean samples' FD (71 against 38).
  c.ddpm = _ddpm(
    400,
    train={"batch_size": 64, "warmup_steps": 100, "ema_decay": 0.99},
    sample={"num_samples": 300, "num_steps": 50},
  )
  c.eval = ml_collections.ConfigDict(
    {
      "classifier": train_classifier.get_config("digits"),
      "confidence": 0.5,
      "robust_method": "eudp:early",  # '' skips the robustness rows
      "jpeg_quality": 75,
      "blur_sigma": 0.5,
      # Also train on clean data after the same JPEG / blur (what the
      # transforms alone cost a DDPM): two more trainings.
      "transform_controls": False,
      "heldout_draws": 8,
      # Test images the held-out denoising loss is measured on (0: all).
      "heldout_size": 0,
      # pytorch-fid's pt_inception-2015-12-05-6726825d.pth, if you have it:
      # adds a real Inception FID column ('' leaves it out).
      "inception_weights": "",
      "ssim_filter": 7,
    }
  )

  if variant == "digits":
    pass
  elif variant == "strong":
    # 16x the default's PGD work on EUDP: does more optimisation help?
    c.protect.methods = ("eudp:early",)
    c.protect.update(rounds=8, pgd_steps=10, num_draws=4, random_start=True)
    c.eval.robust_method = ""
  elif variant == "policies":
    c.protect.methods = tuple(
      f"eudp:{p}" for p in ("uniform", "signal", "snr", "early", "late")
    )
    c.eval.robust_method = ""
  elif variant in ("cifar10", "cifar10_small"):
    c.data.train, c.data.test = "cifar10:train", "cifar10:test"
    big = train_ddpm.get_config("cifar10")
    c.surrogate = big.copy_and_resolve_references()
    c.surrogate.train.num_steps = 20_000
    c.ddpm = big.copy_and_resolve_references()
    c.ddpm.train.num_steps = 100_000
    c.ddpm.sample.update(num_samples=10_000, num_steps=100)
    c.protect.update(
      chunk_size=5000, rounds=10, inner_steps=100, pgd_steps=10, batch_size=128
    )
    c.eval.classifier = train_classifier.get_config("cifar10")
    c.eval.update(blur_sigma=1.0, ssim_filter=11)
    if variant == "cifar10_small":
      local = "../shared/data/cifar10/"
      c.data.train = local + "train_jpeg.npz"
      c.data.test = local + "test_dev.npz"
      c.eval.classifier.data.train = c.data.train
      c.eval.classifier.data.test = c.data.test
      c.eval.classifier.model = ml_collections.ConfigDict(
        {"name": "small_cnn", "width": 32}
      )
      c.eval.classifier.train.num_epochs = 15
      c.eval.classifier.data.limit = 10_000
      small = {
        "ch": 32,
        "ch_mult": (1, 2, 2),
        "num_res_blocks": 1,
        "attn_resolutions": (8,),
        "dropout": 0.0,
        "num_groups": 8,
        "remat": False,
      }
      # Sized to a 2-core CPU: 1,000 images (balanced over the classes),
      # batches of 32, 500 DDPM steps per evaluation model, no robustness
      # rows. A DDPM step at this size costs 1.16 s there (1.67 s at batch
      # 64: 2,000 images and 1,000-step DDPMs came to about 4 hours); the
      # whole run about 80 minutes (README).
      for d, steps in ((c.surrogate, 200), (c.ddpm, 500)):
        d.model = ml_collections.ConfigDict(small)
        d.train.update(
          num_steps=steps,
          batch_size=32,
          learning_rate=1e-3,
          warmup_steps=50,
          ema_decay=0.99,
          checkpoint_every=max(steps // 2, 1),
        )
      c.ddpm.sample.update(num_samples=300, num_steps=50, batch_size=150)
      c.data.limit = 1000
      c.protect.update(
        chunk_size=500, rounds=4, inner_steps=10, pgd_steps=5, batch_size=32
      )
      c.eval.robust_method = ""
      # 2 x 1,000 UNet passes per DDPM instead of 8 x 5,000 (10 minutes).
      c.eval.update(heldout_size=1000, heldout_draws=2)
  elif variant in ("sd", "sd_smoke"):
    # The latent-diffusion setting: the embedded text-to-image model is the
    # surrogate and what the unauthorised trainer fine-tunes.
    del c["surrogate"], c["ddpm"]
    c.data.train, c.data.test = "mnist5k:train", "mnist5k:test"
    c.data.limit = 256
    c.sd = ml_collections.ConfigDict(
      {
        "model": "checkpoints/t2i_digits/model",
        "caption": "a handwritten digit {}",
        "class_words": DIGIT_WORDS,
      }
    )
    c.protect.update(
      chunk_size=256, rounds=4, inner_steps=10, pgd_steps=5, batch_size=32
    )
    c.finetune = ml_collections.ConfigDict(
      {
        "num_steps": 300,
        "batch_size": 32,
        "learning_rate": 1e-4,
        "weight_decay": 1e-2,
        "ema_decay": 0.99,
      }
    )
    c.sample = ml_collections.ConfigDict(
      {"per_class": 20, "num_steps": 25, "guidance_scale": 4.0}
    )
    c.eval.classifier = train_classifier.get_config("mnist5k")
    c.eval.robust_method = ""
    if variant == "sd_smoke":
      c.sd.model = ""  # set by the test
      # The control and one optimised method: both code paths, half the time.
      c.protect.methods = ("random", "eudp:early")
      c.data.limit = 16
      c.protect.update(chunk_size=8, rounds=1, inner_steps=1, pgd_steps=1)
      c.protect.batch_size = 4
      c.finetune.update(num_steps=2, batch_size=4)
      c.sample.update(per_class=1, num_steps=2)
      c.eval.classifier = train_classifier.get_config("mnist5k_smoke")
  elif variant == "smoke":
    c.protect.update(chunk_size=64, rounds=1, inner_steps=2, pgd_steps=2)
    for d in (c.surrogate, c.ddpm):
      d.model.update(ch=8, num_groups=4, ch_mult=(1,), attn_resolutions=())
      d.train.update(num_steps=4, batch_size=16, warmup_steps=2, log_every=2)
      d.sample.update(num_samples=20, num_steps=4, batch_size=8)
    c.protect.batch_size = 16
    c.data.limit = 128
    c.eval.classifier = train_classifier.get_config("smoke")
    c.eval.heldout_draws = 1
  else:
    raise ValueError(
      f"Unknown variant {variant!r}; choose digits, strong, policies, "
      "cifar10, cifar10_small, sd, sd_smoke or smoke."
    )
  if "limit" not in c.data:
    c.data.limit = 0  # 0: all training images
  return c

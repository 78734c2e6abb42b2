"""DDPM training, sampling, and a recognisability check of the samples.

Default (`digits`): a small DDPM UNet on the embedded scikit-learn digits
(8x8), on 2 CPU cores in under 10 minutes:

  python experiments/train_ddpm.py \
    --config=experiments/configs/train_ddpm.py --workdir=runs/ddpm_digits

It samples 500 digits with DDIM and scores them with a small CNN trained on
real digits by train_classifier.py (test accuracy >= 0.95). Expected: at least
80% of samples classified with probability > 0.5, every class present; the
report states the measured numbers.

`:cifar10` is Ho et al.'s CIFAR-10 setting (35.7M-parameter UNet, batch 128,
Adam 2e-4, 5000 warm-up steps, clip 1, dropout 0.1, EMA 0.9999, 800k steps)
for accelerators. `:smoke` is a few steps for tests.
"""

import ml_collections

from experiments.configs import train_classifier
from experiments.configs.base import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "digits"
  c = base_config(variant)
  c.model = ml_collections.ConfigDict(
    {
      "ch": 32,
      "ch_mult": (1, 2),
      "num_res_blocks": 1,
      "attn_resolutions": (4,),
      "dropout": 0.0,
      "num_groups": 8,
      # True: recompute each block's activations in the backward pass
      # (DDPMUNet.remat): the CIFAR-10 UNet's step at batch 128 keeps 1.9 GB
      # of residuals instead of 12.0 GB, for about 20% more time.
      "remat": False,
    }
  )
  c.diffusion = ml_collections.ConfigDict(
    {"schedule": "linear", "num_timesteps": 1000}
  )
  c.train = ml_collections.ConfigDict(
    {
      "batch_size": 128,
      "num_steps": 1500,
      "learning_rate": 1e-3,
      "warmup_steps": 200,
      "grad_clip": 1.0,
      "ema_decay": 0.995,
      "checkpoint_every": 500,
      "log_every": 100,
      # > 0: train on t < max_timestep only (for a model that is only
      # queried there, e.g. by a purifier); 0: all timesteps.
      "max_timestep": 0,
      # The workdir of a DDPM run (same model) to fine-tune from; empty:
      # train from scratch.
      "init_from": "",
    }
  )
  c.sample = ml_collections.ConfigDict(
    {
      "num_samples": 500,
      "sampler": "ddim",  # or "ddpm"
      "num_steps": 100,
      "eta": 0.0,
      "batch_size": 500,
    }
  )
  c.eval = ml_collections.ConfigDict(
    {
      # The workdir of a finished train_classifier.py run; empty: train one
      # into <workdir>/classifier with `classifier` below.
      "classifier_workdir": "",
      "classifier": train_classifier.get_config("digits"),
      "confidence": 0.5,
    }
  )

  if variant == "digits":
    pass
  elif variant == "cifar10":
    c.data.train, c.data.test = "cifar10:train", "cifar10:test"
    c.model = ml_collections.ConfigDict(
      {
        "ch": 128,
        "ch_mult": (1, 2, 2, 2),
        "num_res_blocks": 2,
        "attn_resolutions": (16,),
        "dropout": 0.1,
        "num_groups": 32,
        "remat": False,
      }
    )
    c.train.update(
      num_steps=800_000,
      learning_rate=2e-4,
      warmup_steps=5000,
      ema_decay=0.9999,
      checkpoint_every=5000,
      log_every=500,
    )
    c.sample.update(num_samples=10_000, batch_size=1000)
    c.eval.classifier = train_classifier.get_config("cifar10")
  elif variant == "smoke":
    # One level, no attention outside the middle block: compiles about 3x
    # faster than the digits shape at this width (tests run a few steps).
    c.model.update(ch=8, num_groups=4, ch_mult=(1,), attn_resolutions=())
    c.train.update(
      num_steps=6,
      batch_size=16,
      warmup_steps=2,
      checkpoint_every=3,
      log_every=3,
    )
    c.sample.update(num_samples=20, num_steps=5, batch_size=8)
    c.eval.classifier = train_classifier.get_config("smoke")
  else:
    raise ValueError(
      f"Unknown variant {variant!r}; choose digits, cifar10 or smoke."
    )
  return c

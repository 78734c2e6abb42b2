"""The paper-scale suite: the seed's CIFAR-10 tables on one accelerator.

Default (`gpu`), sized for one H100/H200 and a 13-minute budget:

  python experiments/paper_scale.py --workdir=runs/paper_scale
  make gpu-check   # the same, with the budget as GPU_BUDGET=<seconds>

Stages, in order of value (each one launcher, `stage.<name>`):
- `victims`: `unlearnable.py:cifar10` on the 50,000 images of the local
  CIFAR-10 archive: ResNet-18 victims in bfloat16 with a one-cycle schedule
  (batch 512, 15 epochs), EMN class-wise, LSP and EMN sample-wise at the
  seed's budgets, each set vanilla and with ISS (grayscale, JPEG-10).
  Estimated from the bench's H100 ResNet-18 step (6.5 ms at batch 128 in
  TF32): about 25 s a victim, 12 victims (5 minutes), EMN class-wise's
  rounds (1 minute) and sample-wise's (20 descent steps over the 50,000
  images a round, about 30 s; up to 10 rounds): 8 to 11 minutes, so it
  spans two calls.
- `le`: `le.py:cifar10` on the victims stage's three sets: LE (JCDP) and
  AVATAR-style purification (t* = 20, one round) with Ho et al.'s CIFAR-10
  DDPM trained from scratch for 4,000 steps on 10,000 images the
  protection never saw, and a victim on each purified set. Estimated from
  the bench's H100 rows (DDPM step 25 ms, JCDP step 13.8 ms for 128
  images): 100 s of DDPM, 110 s of LE and about 40 s of AVATAR per set of
  50,000 images, 10 victims (clean; each set unpurified and after each
  purifier): about 13 minutes, so it spans two calls.
- `udp`: `udp.py:cifar10` with UDP's strongest reading (`min`) and random
  noise of its size on 5,000 images: a 2,000-step surrogate, five
  alternation rounds, 4,000-step DDPMs trained from scratch on each set
  and 5,000 samples of 50 steps each, scored with the perceptual Fréchet
  distance. Estimated: 60 s of protection, 3 x (100 s of training and
  about 30 s of sampling): 6 to 7 minutes, so it may span two calls.
- `sd14`: `sd14.py:v14`, Stable Diffusion v1.4's architecture with random
  weights written as a diffusers folder: loading, one UNet forward against
  PyTorch's, UCE and RECE, and 8 images of 25 guided DDIM steps at 512x512
  in float32 and bfloat16. Estimated: 1 to 2 minutes writing and reading
  the 4 GB folder, 2 minutes compiling and sampling.
- `bench`: `bench.py:gpu`, the JAX / PyTorch rows and the time the victim
  recipe takes to reach 93% on both sides (about 8 minutes).

No number of the `gpu` variant has been measured on an accelerator yet;
docs/results/paper_scale.md gives the estimates and will hold the tables.

`:smoke` is every stage on its launcher's `:smoke` variant, cut to seconds,
for tests on a CPU; it runs `victims`, `le` and `bench` (`udp`'s and
`sd14`'s smoke runs are tests/test_job_udp.py's and test_job_sd14.py's).
"""

import ml_collections

from experiments.configs.base import LOCAL_CIFAR10, base_config
from experiments.configs.train_classifier import FAST_CIFAR10


def _stage(script, variant, min_seconds, overrides=None, from_stages=None):
  return ml_collections.ConfigDict(
    {
      "script": script,  # experiments/<script>
      "variant": variant,  # of experiments/configs/<script>
      # A stage starts only with this much of the budget left.
      "min_seconds": min_seconds,
      # Nested values that replace the variant's.
      "overrides": overrides or {},
      # Config keys set to another stage's workdir.
      "from_stages": from_stages or {},
    }
  )


# The victims: train_classifier's fast CIFAR-10 recipe, checkpointed every
# 500 steps.
_FAST_VICTIM = {
  **FAST_CIFAR10,
  "train": {**FAST_CIFAR10["train"], "checkpoint_every": 500},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "gpu"
  c = base_config(variant)
  del c["data"]
  c.budget_seconds = 780  # the suite stops before this, resumable
  c.stages = ("victims", "le", "udp", "sd14", "bench")
  # On another machine point `--config.stage.victims.overrides.data.train`
  # etc. at a copy of the local archive.
  data = {
    "train": LOCAL_CIFAR10 + "train_jpeg.npz",
    "test": LOCAL_CIFAR10 + "test_dev.npz",
  }
  c.stage = ml_collections.ConfigDict(
    {
      "victims": _stage(
        "unlearnable.py",
        "cifar10",
        60,
        {
          "data": data,
          # The cheap ones first: each is kept as soon as it is made.
          "protections": ("emn_class", "lsp", "emn_sample"),
          "countermeasures": ("none", "iss_grayscale", "iss_jpeg"),
          **_FAST_VICTIM,
          "protect": {
            "model": {"dtype": "bfloat16"},
            "emn": {"max_rounds": 10},
          },
        },
      ),
      "le": _stage(
        "le.py",
        "cifar10",
        60,
        {
          "data": data,
          "manifold": {"source": LOCAL_CIFAR10 + "train_jpeg.npz"},
          "protections": ("emn_class", "lsp", "emn_sample"),
          "countermeasures": ("none",),
          "ablations": (),
          **_FAST_VICTIM,
          "ddpm": {"train": {"num_steps": 4000, "checkpoint_every": 1000}},
          "purify": {"rounds": 1},
        },
        {"protections_from": "victims"},
      ),
      "udp": _stage(
        "udp.py",
        "cifar10",
        60,
        {
          "data": {**data, "limit": 5000},
          "protect": {"methods": ("random", "min"), "rounds": 5},
          "surrogate": {"train": {"num_steps": 2000}},
          "ddpm": {
            "train": {"num_steps": 4000, "checkpoint_every": 1000},
            "sample": {"num_samples": 5000, "num_steps": 50},
          },
          "eval": {
            "robust_method": "",
            "classifier": {"data": data, **_FAST_VICTIM},
          },
        },
      ),
      "sd14": _stage("sd14.py", "v14", 60),
      "bench": _stage("bench.py", "gpu", 30),
    }
  )
  if variant == "gpu":
    pass
  elif variant == "smoke":
    c.budget_seconds = 3600
    c.stages = ("victims", "le", "bench")
    c.stage = ml_collections.ConfigDict(
      {
        "victims": _stage(
          "unlearnable.py",
          "smoke",
          1,
          {
            "protections": ("lsp",),
            "countermeasures": ("none", "iss_jpeg"),
            "model": {"dtype": "bfloat16"},
            "train": {"schedule": "onecycle", "label_smoothing": 0.1},
          },
        ),
        "le": _stage(
          "le.py",
          "smoke",
          1,
          {"protections": ("lsp",), "ablations": ()},
          {"protections_from": "victims"},
        ),
        "udp": _stage("udp.py", "smoke", 1, {"protect": {"methods": ("min",)}}),
        "sd14": _stage("sd14.py", "smoke", 1),
        "bench": _stage(
          "bench.py",
          "smoke",
          1,
          {
            "only": "resnet18_step",
            "scaling": {"batch_sizes": (), "device_counts": ()},
          },
        ),
      }
    )
  else:
    raise ValueError(f"Unknown variant {variant!r}; choose gpu or smoke.")
  return c

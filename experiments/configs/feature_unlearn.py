"""Feature unlearning in a pre-trained GAN or VAE.

Default (`gan`): trains a small convolutional GAN on the embedded MNIST
digits (`mnist5k`), labels 20,000 of its samples with a digit classifier
(feature: the digit "1"), derives the feature's latent direction and
threshold, fine-tunes the generator to stop drawing it, and reports the
share of samples with the feature before and after, how far the samples
without it moved (L1 to the original generator's output for the same
latent), and Fréchet distances in the classifier's feature space:

  python experiments/feature_unlearn.py \
    --config=experiments/configs/feature_unlearn.py --workdir=runs/fu_gan

Variants: `gan` (default), `mlp_gan` (the pretrained MNIST GAN's MLP
architecture, trained here), `vae` (the MLP VAE, trained here),
`thickness` (the VAE, feature: the thickest 10% of strokes),
`pretrained_gan` and `pretrained_vae` (the MNIST models in
../shared/data/models/mnist or ../shared/models/mnist, whichever exists,
labelled by the LeNet-5 that comes with them; point elsewhere with
`--config.generator.weights=` and `--config.eval.pretrained_classifier=`,
or clear the latter to train the digit classifier), `smoke` (a few steps,
for tests).

Your own labels: a run writes the latents it labels to
`labelling/latents.npy` and their images to `labelling/grid.png`; pass a
boolean `.npy` of the same length with `--config.feature.labels=PATH` (same
seed, so the same latents). The feature measure (`feature.kind`) still
scores the samples before and after.

Expected: the share of samples with the feature falls by at least 90%
(relative) while samples without it stay close to the original's.
"""

import os

import ml_collections

from experiments.configs import train_classifier
from experiments.configs.base import base_config

# Where the shared data folder keeps the pretrained MNIST models (either
# layout): relative to the project root, from which the launchers run.
SHARED_MODEL_DIRS = ("../shared/data/models/mnist", "../shared/models/mnist")


def shared_models_dir(root: str = ".") -> str:
  """The first of `SHARED_MODEL_DIRS` under `root` that exists; the
  documented one when neither does (the loaders then name it)."""
  found = [d for d in SHARED_MODEL_DIRS if os.path.isdir(os.path.join(root, d))]
  return os.path.normpath(os.path.join(root, (found or SHARED_MODEL_DIRS)[0]))


def _generator(kind: str, steps: int, learning_rate: float, **extra):
  return ml_collections.ConfigDict(
    {
      "kind": kind,  # conv_gan, mlp_gan or mlp_vae
      "weights": "",  # a pretrained .npz; '' trains the generator here
      "latent_dim": 20 if kind == "mlp_vae" else 64,
      "width": 16,  # conv_gan's channels (16: 0.03 s a step on 2 cores)
      "steps": steps,
      "batch_size": 64,
      "learning_rate": learning_rate,
      "checkpoint_every": 1000,
      "log_every": 100,
      **extra,
    }
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "gan"
  c = base_config(variant)
  c.data.train, c.data.test = "mnist5k:train", "mnist5k:test"
  # 6,000 steps: at 3,000 the GAN's samples were rougher (FD 108.5 against
  # 82.3) and the unlearning missed its target (87.6% against 96.6%).
  c.generator = _generator("conv_gan", 6000, 2e-4)
  c.feature = ml_collections.ConfigDict(
    {
      # "class": the classifier says `target_class` with probability at
      # least `min_probability`; "thickness": the top `fraction` of
      # stroke widths measured from the pixels.
      "kind": "class",
      "target_class": 1,
      "min_probability": 0.5,
      "fraction": 0.1,
      # 20,000: the conv GAN draws a "1" in 1.4-1.9% of samples, and 2,000
      # labelled samples (38 positives) gave the 3,000-step GAN a 74% drop
      # against 88%.
      "num_labelled": 20000,
      "labels": "",  # a boolean .npy for labelling/latents.npy
    }
  )
  c.unlearn = ml_collections.ConfigDict(
    {
      "steps": 3000,
      "batch_size": 64,
      "learning_rate": 2e-4,  # the GAN's own; 1e-3 left its loss flat
      "alpha": 1.0,  # weight of the unlearning and perceptual terms
      # The paper's literal shift z - (proj - t) z_e, not the unit one that
      # lands on t (feature.py): with |z_e| > 1 it overshoots the threshold,
      # and removed more of the feature in both defaults (measured: the VAE
      # 89.2% -> 92.8% relative drop; docs/results/feature_unlearn.md).
      "unit_shift": False,
      "checkpoint_every": 1000,
      "log_every": 100,
    }
  )
  c.eval = ml_collections.ConfigDict(
    {
      "classifier": train_classifier.get_config("mnist5k"),
      # A LeNet-5 .npz (lenet5_classifier.npz) labels and evaluates instead
      # of a classifier trained on `classifier`.
      "pretrained_classifier": "",
      "num_samples": 10000,
      "grid_size": 16,  # latents per row of the before/after grids
      "batch_size": 500,
    }
  )
  # What a run should reach (the report states met or missed).
  c.expected = ml_collections.ConfigDict(
    {
      "source": "the feature-unlearning target",
      "relative_drop_percent": {"at_least": 90.0},
    }
  )

  if variant == "gan":
    pass
  elif variant == "mlp_gan":
    c.generator = _generator("mlp_gan", 6000, 2e-4)
  elif variant in ("vae", "thickness"):
    c.generator = _generator("mlp_vae", 3000, 1e-3)
    c.unlearn.learning_rate = 1e-3
    if variant == "thickness":
      c.feature.kind = "thickness"
  elif variant in ("pretrained_gan", "pretrained_vae"):
    # The models that come together: generator and labelling LeNet-5.
    shared = shared_models_dir()
    c.eval.pretrained_classifier = f"{shared}/lenet5_classifier.npz"
    if variant == "pretrained_gan":
      c.generator = _generator(
        "mlp_gan", 0, 0.0, weights=f"{shared}/gan_mlp_generator.npz"
      )
    else:
      c.generator = _generator(
        "mlp_vae", 0, 0.0, weights=f"{shared}/vae_mlp.npz"
      )
      c.unlearn.learning_rate = 1e-3
  elif variant == "smoke":
    c.generator = _generator("mlp_gan", 20, 2e-4, checkpoint_every=10)
    c.generator.log_every = 10
    c.feature.update(kind="thickness", num_labelled=200)
    c.unlearn.update(steps=20, batch_size=16, checkpoint_every=10, log_every=10)
    c.eval.update(num_samples=200, grid_size=4, batch_size=100)
    c.eval.classifier = train_classifier.get_config("mnist5k_smoke")
  else:
    raise ValueError(
      f"Unknown variant {variant!r}; choose gan, mlp_gan, vae, thickness, "
      "pretrained_gan, pretrained_vae or smoke."
    )
  return c

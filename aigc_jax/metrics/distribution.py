"""Distances between sets of images in a feature space.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to
Inception features; `frechet_distance` takes any features, e.g. the
penultimate layer of a classifier this project trained (the offline stand-in
for Inception). Precision and recall follow Kynkäänniemi et al. (2019).
These run on the host in float64: `sqrtm` of a covariance product is
ill-conditioned in float32 and JAX's sqrtm is CPU-only anyway.
"""

import numpy as np
import scipy.linalg
import scipy.spatial


def _checked(features, name):
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(
      f"{name} must be (N, D) features with N >= 2, got shape {f.shape}."
    )
  return f


def frechet_distance(features_a, features_b) -> float:
  """‖μ_a - μ_b‖² + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½), Heusel et al. Eq. (6)."""
  a, b = _checked(features_a, "features_a"), _checked(features_b, "features_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"Feature sizes differ: {a.shape[1]} vs {b.shape[1]}.")
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean, _ = scipy.linalg.sqrtm(cov_a @ cov_b, disp=False)
  if not np.isfinite(covmean).all():
    # Singular product (few samples): regularise as pytorch-fid does.
    eps = 1e-6 * np.eye(a.shape[1])
    covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
  covmean = covmean.real
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(cov_a + cov_b - 2.0 * covmean))


def _radii(features, k):
  d = scipy.spatial.distance.cdist(features, features)
  return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall, Kynkäänniemi et al. (2019) Eq. (1)-(3).

  Precision: the share of fake samples inside the k-NN balls of the real
  set (quality); recall: the share of real samples inside the fake set's
  balls (coverage of the real distribution).
  """
  real, fake = _checked(real, "real"), _checked(fake, "fake")
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"Need more than k={k} samples in each set.")

  def coverage(ref, query):
    radii = _radii(ref, k)
    d = scipy.spatial.distance.cdist(query, ref)
    return float(np.mean((d <= radii[None, :]).any(axis=1)))

  return coverage(real, fake), coverage(fake, real)

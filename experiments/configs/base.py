"""The fields every experiment config starts from."""

import ml_collections

# The local CIFAR-10 archive (../shared/data/README.md: train_jpeg.npz, the
# 50,000 training images; test_dev.npz, 5,000 lossless test images); on
# another machine point the configs' data paths at a copy.
LOCAL_CIFAR10 = "../shared/data/cifar10/"


def base_config(variant: str) -> ml_collections.ConfigDict:
  """Variant name, seed, devices, and the embedded digits as data."""
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.num_devices = 0  # 0: all local devices
  # The multi-process runtime; AIGC_JAX_DISTRIBUTED=1 turns it on as well
  # (`parallel.maybe_initialize_distributed`).
  c.distributed = False
  c.data = ml_collections.ConfigDict(
    {"train": "digits:train", "test": "digits:test", "data_dir": ""}
  )
  return c

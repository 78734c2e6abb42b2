"""Dataset sources, range conversions, batching and grids."""

import io
import os

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from aigc_jax import data, parallel


@pytest.mark.parametrize(
  ("name", "shape", "n_train", "n_test"),
  [("digits", (8, 8, 1), 1442, 355), ("mnist5k", (28, 28, 1), 4000, 1000)],
)
def test_embedded_datasets(name, shape, n_train, n_test):
  tr, te = data.load_dataset(name, "train"), data.load_dataset(name, "test")
  assert tr.images.shape == (n_train, *shape) and tr.images.dtype == np.uint8
  assert te.images.shape == (n_test, *shape)
  assert tr.labels.dtype == np.int32 and tr.num_classes == 10
  assert tr.images.max() == 255
  # Fixed, disjoint, stratified: every class in both splits.
  assert set(np.unique(te.labels)) == set(range(10))
  assert data.load_dataset(name, "all").num_examples == n_train + n_test
  again = data.load_dataset(name, "test")
  np.testing.assert_array_equal(again.images, te.images)
  # Parsed once per process, but every caller owns its copy.
  again.images[:] = 0
  np.testing.assert_array_equal(
    data.load_dataset(name, "test").images, te.images
  )


def test_unknown_names_and_splits_list_the_choices():
  with pytest.raises(ValueError, match=r"digits.*cifar10"):
    data.load_dataset("imagenet")
  with pytest.raises(ValueError, match="train"):
    data.load_dataset("digits", "validation")


def test_parse_source():
  assert data.parse_source("digits:test") == ("digits", "test")
  assert data.parse_source("cifar10") == ("cifar10", "train")
  assert data.parse_source("tfds:celeb_a:test") == ("tfds:celeb_a", "test")
  assert data.parse_source("/x/train.npz") == ("/x/train.npz", None)


def test_npz_source_and_errors(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), np.uint8)
  path = str(tmp_path / "d.npz")
  np.savez(path, images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
  ds = data.load_dataset(path, None)
  np.testing.assert_array_equal(ds.images, images)
  assert ds.num_classes == 3
  with pytest.raises(ValueError, match="split=None"):
    data.load_dataset(path, "train")
  with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
    data.load_dataset(str(tmp_path / "missing.npz"), None)
  bad = tmp_path / "corrupt.npz"
  bad.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match=r"corrupt\.npz"):
    data.load_dataset(str(bad), None)
  np.savez(str(tmp_path / "keys.npz"), x=images)
  with pytest.raises(ValueError, match="'images' and 'labels'"):
    data.load_dataset(str(tmp_path / "keys.npz"), None)
  np.savez(str(tmp_path / "f.npz"), images=images / 255.0, labels=np.zeros(6))
  with pytest.raises(ValueError, match="uint8"):
    data.load_dataset(str(tmp_path / "f.npz"), None)
  labels = np.array([0, 1, 2, 0, 1, 2])
  for name, imgs, labs, match in (
    ("float_labels", images, labels / 1.0, "integer class indices"),
    ("negative", images, labels - 1, "negative values"),
    ("column", images, labels[:, None], r"shape \(N,\)"),
    ("nchw", np.transpose(images, (0, 3, 1, 2)), labels, "channels-first"),
  ):
    np.savez(str(tmp_path / f"{name}.npz"), images=imgs, labels=labs)
    with pytest.raises(ValueError, match=match):
      data.load_dataset(str(tmp_path / f"{name}.npz"), None)


def _jpeg(img):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return np.frombuffer(buf.getvalue(), np.uint8)


def test_jpeg_archive_source(tmp_path):
  rng = np.random.default_rng(0)
  imgs = [np.full((8, 8, 3), v, np.uint8) for v in (10, 128, 250)]
  blobs = [_jpeg(i) for i in imgs]
  offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
  path = str(tmp_path / "train_jpeg.npz")
  np.savez(
    path,
    jpeg=np.concatenate(blobs),
    offsets=offsets,
    labels=np.array([0, 1, 1]),
  )
  ds = data.load_dataset(path, None)
  assert ds.images.shape == (3, 8, 8, 3)
  np.testing.assert_allclose(
    ds.images.mean(axis=(1, 2, 3)), [10, 128, 250], atol=2
  )
  broken = np.concatenate(blobs)
  broken[offsets[1] : offsets[1] + 20] = rng.integers(0, 256, 20, np.uint8)
  np.savez(path, jpeg=broken, offsets=offsets, labels=np.array([0, 1, 1]))
  with pytest.raises(ValueError, match="image 1"):
    data.load_dataset(path, None)


def test_image_folder_source(tmp_path):
  for cls, value in (("cat", 30), ("dog", 200)):
    os.makedirs(tmp_path / cls)
    for i in range(2):
      Image.fromarray(np.full((5, 5), value + i, np.uint8)).save(
        tmp_path / cls / f"{i}.png"
      )
  ds = data.load_dataset(str(tmp_path), None)
  assert ds.images.shape == (4, 5, 5, 1) and ds.num_classes == 2
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])
  Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "dog" / "big.png")
  with pytest.raises(ValueError, match=r"big\.png"):
    data.load_dataset(str(tmp_path), None)
  (tmp_path / "dog" / "big.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"big\.png"):
    data.load_dataset(str(tmp_path), None)


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(
    num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    ds = data.load_dataset("cifar10", "train")
    assert ds.images.shape == (5, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and ds.labels.shape == (5,)
    mnist = data.load_dataset("tfds:mnist", "test")
    assert mnist.images.shape == (5, 28, 28, 1)


def test_unprepared_tfds_dataset_explains_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data.load_dataset("svhn_cropped", "train", data_dir=str(tmp_path))


@pytest.mark.skipif(
  not os.path.exists(os.path.join(SHARED_DATA, "cifar10", "test_dev.npz")),
  reason="../shared/data is not present on this machine",
)
def test_shared_cifar10_test_set():
  ds = data.load_dataset(
    os.path.join(SHARED_DATA, "cifar10", "test_dev.npz"), None
  )
  assert ds.images.shape == (5000, 32, 32, 3) and ds.num_classes == 10


def test_range_conversions_and_errors():
  u = np.array([[[[0], [128], [255]]]], np.uint8)
  x = data.to_model_range(u)
  np.testing.assert_allclose(x.ravel(), [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
  np.testing.assert_array_equal(data.to_uint8(x), u)
  with pytest.raises(TypeError, match="uint8"):
    data.to_model_range(u.astype(np.float32))
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    data.check_model_images(u.astype(np.float32))
  with pytest.raises(ValueError, match="NHWC"):
    data.check_model_images(np.zeros((3, 3), np.float32))
  with pytest.raises(TypeError, match="float"):
    data.check_model_images(np.zeros((1, 2, 2, 1), np.int32))
  with pytest.raises(ValueError, match="channel axis"):
    data.check_uint8_images(np.zeros((2, 3, 3), np.uint8))
  # A diverged model's NaN must not become black pixels in a sound report.
  with pytest.raises(ValueError, match="1 NaN or infinite"):
    data.to_uint8(np.where(np.arange(3) == 1, np.nan, 0.0).reshape(1, 1, 3, 1))


def test_batches_are_a_function_of_the_step():
  a = [data.batch_indices(0, s, 100, 32) for s in range(6)]
  b = [data.batch_indices(0, s, 100, 32) for s in range(6)]
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  epoch0 = np.concatenate(a[:3])
  assert len(set(epoch0.tolist())) == 96  # no repeats within an epoch
  assert not np.array_equal(a[0], a[3])  # a new permutation next epoch
  assert not np.array_equal(a[0], data.batch_indices(1, 0, 100, 32))
  with pytest.raises(ValueError, match="exceeds"):
    data.batch_indices(0, 0, 10, 32)


def test_batches_gathered_on_the_devices_are_the_hosts():
  rng = np.random.default_rng(0)
  arrays = {
    "images": rng.normal(size=(40, 4, 4, 3)).astype(np.float32),
    "labels": rng.integers(0, 10, size=40),
  }
  mesh = parallel.make_mesh()
  on_host = data.batch_fn(arrays, 3, 8)
  on_device = data.batch_fn(arrays, 3, 8, mesh)
  for step in (0, 4, 5, 12):  # across epochs
    host, held = on_host(step), on_device(step)
    for name, x in host.items():
      assert held[name].sharding.is_equivalent_to(
        parallel.data_sharding(mesh), x.ndim
      )
      np.testing.assert_array_equal(np.asarray(held[name]), x)
    # The training loop places them as they are.
    assert parallel.shard_batch(mesh, held)["images"] is held["images"]
  # Any pytree of arrays.
  pair = (arrays["images"], arrays["labels"])
  images, labels = data.batch_fn(pair, 3, 8, mesh)(5)
  np.testing.assert_array_equal(np.asarray(labels), on_host(5)["labels"])
  np.testing.assert_array_equal(np.asarray(images), on_host(5)["images"])
  # Another trainer's data of the same shapes reuses the program.
  compiled = data.batching._gather._cache_size()
  data.batch_fn({k: v + 1 for k, v in arrays.items()}, 4, 8, mesh)(0)
  assert data.batching._gather._cache_size() == compiled


def test_image_grid(tmp_path):
  imgs = np.zeros((5, 8, 8, 1), np.uint8)
  grid = data.image_grid(imgs, ncol=3, min_size=16)
  assert grid.shape == (2 * 17 + 1, 3 * 17 + 1, 1)
  path = data.save_image_grid(str(tmp_path / "g.png"), imgs)
  assert Image.open(path).size[0] > 0


def test_balanced_subset_takes_every_class_from_a_sorted_file():
  ds = data.load_dataset("digits", "train")
  order = np.argsort(ds.labels, kind="stable")  # class-sorted, like CIFAR's
  sorted_ds = ds.take(order)
  sub = data.balanced_subset(sorted_ds, 100, seed=0)
  counts = np.bincount(sub.labels, minlength=10)
  assert sub.num_examples == 100 and counts.min() == counts.max() == 10
  again = data.balanced_subset(sorted_ds, 100, seed=0)
  np.testing.assert_array_equal(sub.images, again.images)
  # A larger subset contains the smaller one.
  big = data.balanced_subset(sorted_ds, 300, seed=0)
  as_rows = lambda d: {im.tobytes() for im in d.images}
  assert as_rows(sub) <= as_rows(big)
  assert data.balanced_subset(ds, 10**6) is ds
  with pytest.raises(ValueError, match="positive"):
    data.balanced_subset(ds, 0)

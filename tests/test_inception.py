"""The FID Inception-v3: parity with pytorch-fid's network on random weights,
and the loader's errors."""

import importlib

import numpy as np
import pytest

from aigc_jax.models import fid_features, load_fid_inception
from aigc_jax.sd.torchvision_fallback import import_torchvision

torch = pytest.importorskip("torch")


torchvision = import_torchvision()
pytorch_fid_inception = importlib.import_module("pytorch_fid.inception")


def _random_fid_state_dict(seed: int) -> dict:
  """pytorch-fid's network (as its `fid_inception_v3` builds it) with random
  weights and random batch-norm statistics, so the test sees every tensor."""
  torch.manual_seed(seed)
  m = pytorch_fid_inception
  net = torchvision.models.inception_v3(
    num_classes=1008, aux_logits=False, weights=None, init_weights=False
  )
  net.Mixed_5b = m.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = m.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = m.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = m.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = m.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = m.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = m.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = m.FIDInceptionE_1(1280)
  net.Mixed_7c = m.FIDInceptionE_2(2048)
  with torch.no_grad():
    for layer in net.modules():
      if isinstance(layer, torch.nn.BatchNorm2d):
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.2, 0.2)
        layer.running_mean.uniform_(-0.2, 0.2)
        layer.running_var.uniform_(0.5, 2.0)
  return net.state_dict()


def test_fid_features_match_pytorch_fid(tmp_path, monkeypatch):
  state = _random_fid_state_dict(0)
  # pytorch-fid fetches its weights by URL; hand it the random ones instead.
  monkeypatch.setattr(
    pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state
  )
  reference = pytorch_fid_inception.InceptionV3([3]).eval()
  images = np.random.default_rng(0).uniform(size=(2, 24, 20, 3))
  with torch.no_grad():
    (want,) = reference(torch.from_numpy(images.transpose(0, 3, 1, 2)).float())
  want = want[:, :, 0, 0].numpy()

  path = str(tmp_path / "fid_inception.pth")
  torch.save(state, path)
  variables = load_fid_inception(path)
  got = np.asarray(fid_features(variables, 2 * images - 1))

  assert got.shape == (2, 2048)
  scale = np.abs(want).max()
  assert scale > 0
  np.testing.assert_allclose(got, want, atol=1e-4 * scale)
  # Grayscale is read as three equal channels.
  gray = images[..., :1]
  np.testing.assert_allclose(
    np.asarray(fid_features(variables, 2 * gray - 1)),
    np.asarray(fid_features(variables, np.repeat(2 * gray - 1, 3, -1))),
    atol=1e-5 * scale,
  )


def test_load_fid_inception_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    load_fid_inception(str(tmp_path / "missing.pth"))
  wrong = str(tmp_path / "wrong.pth")
  torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), wrong)
  with pytest.raises(ValueError, match="Unexpected entry 'weight'"):
    load_fid_inception(wrong)
  small = str(tmp_path / "small.npz")
  np.savez(small, **{"Conv2d_1a_3x3.conv.weight": np.zeros((1, 3, 3, 3))})
  with pytest.raises(ValueError, match="do not match"):
    load_fid_inception(small)


def test_inception_fid_features_match_the_model(tmp_path):
  from aigc_jax import data, parallel
  from aigc_jax.eval import features as eval_features

  path = str(tmp_path / "fid_inception.pth")
  torch.save(_random_fid_state_dict(1), path)
  images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 1), np.uint8)
  features = eval_features.inception_fid_features(path, parallel.make_mesh(1))(
    images
  )
  np.testing.assert_allclose(
    features,
    fid_features(load_fid_inception(path), data.to_model_range(images)),
    atol=1e-5,
  )

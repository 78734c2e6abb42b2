"""Lets diffusers import next to a torchvision whose compiled ops fail.

With torch installed, importing any diffusers model class (Flax ones too)
imports diffusers' PyTorch models, and through them torchvision. PyPI's
torchvision wheel links the CUDA build of torch, so next to the CPU build
(this project's `[torch]` extra) its C extension fails to load and diffusers
cannot be imported at all. The model code diffusers and pytorch-fid use is
plain Python, so the package is loaded without its ops instead.
"""

import importlib
import importlib.metadata
import importlib.util
import sys
import types


def import_torchvision():
  """torchvision, or its pure-Python part when its compiled ops do not load.

  Returns None when torchvision is not installed (diffusers then skips it).
  """
  if importlib.util.find_spec("torchvision") is None:
    return None
  try:
    import torchvision

    return torchvision
  except (ImportError, OSError, RuntimeError):
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
      del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec  # importlib.util.find_spec reads it
    package.__version__ = importlib.metadata.version("torchvision")
    sys.modules["torchvision"] = package
    importlib.import_module("torchvision.models")
    return package

"""Importing torch-side reference code next to the CPU build of torch."""

import importlib
import importlib.metadata
import importlib.util
import sys
import types


def import_torchvision():
  """torchvision, or its pure-Python part when its compiled ops do not load.

  PyPI's torchvision wheel links the CUDA build of torch, so next to the CPU
  build its C extension fails to load; the model definitions pytorch-fid
  builds on, and that diffusers and transformers import, are plain Python,
  so the package is loaded without the ops.
  """
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

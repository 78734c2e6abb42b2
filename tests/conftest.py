"""Test set-up: 4 forced CPU devices, so sharded code is tested everywhere.

The flag must be set before JAX creates its CPU backend, i.e. before any test
module runs JAX code.
"""

import atexit
import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

# Four device threads share two cores under `pytest -n 2`; XLA:CPU's default
# 40 s limit between devices reaching a collective is too tight there.
os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=4"
  " --xla_cpu_collective_call_terminate_timeout_seconds=3600",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One on-disk compilation cache for this run, shared by the xdist workers
# and the experiments the tests start as subprocesses (they inherit the
# variable): many tests compile programs identical to another test's (the
# same victim step, the same test UNet), and the cache is keyed on the
# program. A fresh directory per run keeps every run's timing that of a
# clean machine. (Measured here: a 3.5 s compilation reloads in 0.1 s.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
    prefix="aigc_jax_test_cache-"
  )
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# The original (non-partitionable) Threefry: XLA:CPU compiles partitionable
# Threefry bits of rank >= 3 in 2 s against 0.25 s (jax 0.10.2), and every
# parameter initialiser and augmentation draws such bits. The two draw
# different numbers from one key, but both are the same function of the key
# whatever the sharding, which is all the tests rely on; the unlearnable
# smoke test took 140 s with the default and 78 s without.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")

import jax
import numpy as np
import pytest

# Tests run tiny models for a few steps, where XLA's compile time dominates:
# skipping most optimisations compiles the test UNet several times faster.
jax.config.update("jax_disable_most_optimizations", True)


def _with_legacy_cpu_emitters(get_compile_options):
  """XLA:CPU's new fusion emitters compile slowly when most optimisations
  are off: without them (jax 0.10.2, 2 cores) 100 normal draws compile in
  7.3 s against 10.9 s, a tiny UNet's eager init runs in 15 s against 27 s
  and its train step compiles in 8.7 s against 16 s, with no slower steps.
  With full optimisation (the end-to-end tests) they compile faster, so
  only unoptimised CPU programs go without them."""

  def patched(*args, env_options_overrides=None, backend=None, **kwargs):
    if (
      _compiler._DISABLE_MOST_OPTIMIZATIONS.value
      and backend is not None
      and backend.platform == "cpu"
    ):
      env_options_overrides = {
        "xla_cpu_use_fusion_emitters": False,
        **(env_options_overrides or {}),
      }
    return get_compile_options(
      *args,
      env_options_overrides=env_options_overrides,
      backend=backend,
      **kwargs,
    )

  return patched


from jax._src import compiler as _compiler  # noqa: E402

_compiler.get_compile_options = _with_legacy_cpu_emitters(
  _compiler.get_compile_options
)


SHARED_DATA = os.path.join(
  os.path.dirname(__file__), os.pardir, os.pardir, "shared", "data"
)


CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def recipe_config(name: str):
  """The config `tests/configs/<name>.json` holds: an experiment's smoke
  config written out, so that the library's config-driven recipes are
  tested without importing `experiments` (test_launchers.py checks the
  files still equal the experiments' configs)."""
  import json

  import ml_collections

  with open(os.path.join(CONFIGS, f"{name}.json")) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def write_torch_state_dict(path, layers) -> dict:
  """An .npz in the layout of the pretrained MNIST models: PyTorch weights
  ((out, in) or OIHW) and biases under state-dict keys with '/', random."""
  rng = np.random.default_rng(0)
  arrays = {}
  for name, shape in layers:
    weight = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
    arrays[f"{name}/weight"] = weight.astype(np.float32)
    arrays[f"{name}/bias"] = rng.normal(size=shape[:1]).astype(np.float32)
  np.savez(path, **arrays)
  return arrays


@pytest.fixture(scope="session", autouse=True)
def _four_devices():
  assert jax.device_count() == 4, (
    "tests expect 4 forced CPU devices; XLA_FLAGS was set elsewhere: "
    + os.environ.get("XLA_FLAGS", "")
  )


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "optimized_xla: compile with XLA's full optimisation, for tests whose "
    "run time, not compile time, dominates",
  )
  config.addinivalue_line(
    "markers", "long: runs for minutes; scheduled before the other tests"
  )


def pytest_collection_modifyitems(items):
  """Tests marked `long` first, longest-first scheduling: a minutes-long
  test that starts last sets the suite's wall time on its own (the
  7-minute chain test, started last, once made the suite 19 min)."""
  items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_xdist_make_scheduler(config, log):
  """xdist's load scheduler handing out one test at a time, in collection
  order. By default it sends each worker a block of consecutive tests up
  front, which would put every `long` test on the first worker."""
  if config.getoption("dist") != "load":
    return None
  from xdist.scheduler import LoadScheduling

  config.option.maxschedchunk = 1
  return LoadScheduling(config, log)


@contextlib.contextmanager
def _full_xla_optimisation():
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True)
def _xla_optimisation(request):
  """Full optimisation for tests marked `optimized_xla`.

  Unoptimised code can run far slower: the JCDP vmap test (LPIPS
  gradients through AlexNet) runs 24 s unoptimised against 0.2 s, and
  the LE smoke run 196 s against 44 s. Where compiling dominates, fast
  compiling wins: measured on the 30 slowest, 388 s with most
  optimisations off against 648 s with all on (pytest -n 2), and the
  unlearnable smoke run alone 37 s against 85 s.
  """
  if request.node.get_closest_marker("optimized_xla") is None:
    yield
  else:
    with _full_xla_optimisation():
      yield


@pytest.fixture
def full_xla_optimisation():
  """A context manager with full optimisation inside, for the part of a
  test whose run time, not compile time, dominates (an experiment's smoke
  run followed by LE's LPIPS-guided purification of its sets)."""
  return _full_xla_optimisation


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Full XLA optimisation (`optimized_xla`, `full_xla_optimisation`) only where
# run time dominates: LE's LPIPS-guided purification runs several times
# slower unoptimised (the LE smoke run alone: 196 s against 44 s), while the
# other smoke runs compile more than they run (unlearnable: 37 s against 85
# s, the text-to-image chain 191 s against 252 s; one process).


def run_experiment(module, config, workdir, *, num_devices=1):
  """Runs an experiment in `workdir`, on one device unless told otherwise.

  One device because four forced CPU devices on two cores make a smoke run
  three times slower; sharded agreement has its own tests, and
  `test_unlearnable_smoke_saves_protections_and_resumes` runs on four.
  """
  from aigc_jax import record

  config.num_devices = num_devices
  workdir = record.prepare_workdir(str(workdir), config.to_json())
  return module.train_and_evaluate(config, workdir), workdir


def le_on_upstream(tmp_path, **upstream):
  """experiments/le.py's smoke variant on another run's sets only."""
  from experiments import le
  from experiments.configs import le as le_configs

  config = le_configs.get_config("smoke")
  config.update(
    protections=(), clean_rows=(), purifiers=("le",), ablations=(), **upstream
  )
  return run_experiment(le, config, tmp_path / "le")


PROMPTS = ["a handwritten digit three", "a handwritten digit eight", ""]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
  """A tiny random Stable Diffusion folder in diffusers' layout (PyTorch
  needed to write it)."""
  pytest.importorskip("torch")
  from aigc_jax.sd import architectures, export

  path = str(tmp_path_factory.mktemp("sd") / "tiny")
  export.save_random_stable_diffusion(path, architectures.TINY, PROMPTS[:2])
  return path


@pytest.fixture(scope="session")
def loaded(tiny_sd):
  """`tiny_sd` loaded through the Flax loaders: (model, params)."""
  from aigc_jax import sd

  return sd.load_stable_diffusion(tiny_sd)


def run_job(args, *, devices=4, **env):
  """`python args...` from the repository root as one process with
  `devices` CPU devices and the extra environment `env`."""
  return subprocess.run(
    [sys.executable, *args],
    env={
      **os.environ,
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      **env,
    },
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


# udp.py's smoke run with one surrogate-training method over two chunks, and
# the fewest checkpoints and metrics lines (30-odd writes): the crash and
# multi-process tests.
UDP_ONE_METHOD = [
  os.path.join(ROOT, "experiments", "udp.py"),
  f"--config={os.path.join(ROOT, 'experiments', 'configs', 'udp.py')}:smoke",
  "--config.protect.methods=('eudp:early',)",
  "--config.eval.robust_method=",
  "--config.eval.classifier.train.checkpoint_every=45",
  "--config.eval.classifier.train.log_every=45",
  "--config.surrogate.train.log_every=4",
  "--config.ddpm.train.log_every=4",
  "--config.ddpm.train.checkpoint_every=4",
  "--config.num_devices=0",  # every device the process sees
]


def run_state(workdir):
  """What a run leaves, less its times and its own path: (arrays, records,
  report). Arrays: every saved `.npz` array as {"path:key": array};
  records: every JSON file and metrics line but `invocations.json`, as
  {path: contents}; report: `report.md` as printed. Times (keys `time` and
  `*seconds`, "... s" in prose, "time (s)" columns and rows) and the
  workdir's own path are left out; Orbax checkpoints are not read."""
  workdir = str(workdir)
  arrays, records = {}, {}
  for path in sorted(glob.glob(f"{workdir}/**/*.npz", recursive=True)):
    with np.load(path) as f:
      for k in f.files:
        if not k.endswith("seconds"):
          arrays[f"{os.path.relpath(path, workdir)}:{k}"] = f[k]
  for path in glob.glob(f"{workdir}/**/*.json*", recursive=True):
    rel = os.path.relpath(path, workdir)
    if os.path.basename(rel) == "invocations.json" or "/ckpt/" in f"/{rel}":
      continue
    with open(path) as f:
      if path.endswith(".jsonl"):
        records[rel] = [_timeless(json.loads(line)) for line in f]
      else:
        records[rel] = _timeless(json.load(f))
  with open(os.path.join(workdir, "report.md")) as f:
    report = _timeless_report(f.read().replace(workdir, "W"))
  return arrays, records, report


def _timeless(tree):
  if isinstance(tree, dict):
    return {
      k: _timeless(v)
      for k, v in tree.items()
      if k != "time" and not k.endswith("seconds")
    }
  if isinstance(tree, list):
    return [_timeless(v) for v in tree]
  return tree


def _timeless_report(report):
  report = re.sub(r"[Tt]otal time [\d.]+ s", "", report)
  report = re.sub(r"\([\d.]+ s\)", "", report)
  lines, time_column = [], None
  for line in report.splitlines():
    cells = line.split(" | ") if line.startswith("| ") else None
    if cells is None:
      time_column = None
    elif time_column is None:  # a table's header
      time_column = next(
        (i for i, c in enumerate(cells) if "time (s)" in c), -1
      )
    if cells and "time (s)" in cells[0]:
      continue  # a row of times
    if cells and time_column >= 0:
      cells[time_column] = ""
      line = " | ".join(cells)
    lines.append(line)
  return "\n".join(lines)

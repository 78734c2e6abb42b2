"""Test set-up: 4 forced CPU devices, so sharded code is tested everywhere.

The flag must be set before JAX creates its CPU backend, i.e. before any test
module runs JAX code.
"""

import os

# Four device threads share two cores under `pytest -n 2`; XLA:CPU's default
# 40 s limit between devices reaching a collective is too tight there.
os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=4"
  " --xla_cpu_collective_call_terminate_timeout_seconds=3600",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No compilation cache on disk (experiments/launch.py sets one), here and in
# the experiments tests start as subprocesses: XLA:CPU rejects its own cached
# executables on reload (jax-ml/jax#38445), so it only adds writes, and two
# suite runs that wrote a cold cache from both xdist workers hung.
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import jax
import pytest

# Tests run tiny models for a few steps, where XLA's compile time dominates:
# skipping most optimisations compiles the test UNet several times faster.
jax.config.update("jax_disable_most_optimizations", True)


SHARED_DATA = os.path.join(
  os.path.dirname(__file__), os.pardir, os.pardir, "shared", "data"
)


@pytest.fixture(scope="session", autouse=True)
def _four_devices():
  assert jax.device_count() == 4, (
    "tests expect 4 forced CPU devices; XLA_FLAGS was set elsewhere: "
    + os.environ.get("XLA_FLAGS", "")
  )

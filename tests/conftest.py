"""Test set-up: 4 forced CPU devices, so sharded code is tested everywhere.

The flag must be set before JAX creates its CPU backend, i.e. before any test
module runs JAX code.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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

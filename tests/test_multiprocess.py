"""Multi-process jobs on one machine: 2 processes x 2 CPU devices on a
loopback coordinator, started as a user starts them (the environment of
`parallel.maybe_initialize_distributed`)."""

import glob
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, UDP_ONE_METHOD, run_job, run_state

# Each process checks what it sees of one global array and of its own.
GATHER = """
import os, sys, time
import numpy as np, jax, jax.numpy as jnp
from aigc_jax import data, parallel, record
assert parallel.maybe_initialize_distributed()
mesh = parallel.make_mesh()
assert mesh.size == 4 and jax.process_count() == 2
rows = parallel.shard_batch(mesh, np.arange(8.0))
assert not rows.is_fully_addressable
np.testing.assert_array_equal(parallel.to_host(rows), np.arange(8.0))
local = jnp.arange(3.0) + jax.process_index()
np.testing.assert_array_equal(
  parallel.to_host(local), np.arange(3.0) + jax.process_index()
)
out = parallel.batched_apply(
  jax.jit(lambda x: 2 * x), np.arange(10.0), batch_size=4, mesh=mesh
)
np.testing.assert_array_equal(out, 2 * np.arange(10.0))
# Batches gathered on the devices are the host's.
arrays = {"x": np.arange(24.0).reshape(12, 2)}
held = data.batch_fn(arrays, 0, 4, mesh)(5)["x"]
np.testing.assert_array_equal(
  parallel.to_host(held), data.batch_fn(arrays, 0, 4)(5)["x"]
)
# Cells without collectives: process 0 computes and writes each at once,
# process 1 comes late; both must still meet at every synchronisation.
if jax.process_index() == 1:
  time.sleep(1)
cells = [
  record.cached_result(os.path.join(sys.argv[1], str(i)), lambda i=i: {"i": i})
  for i in range(3)
]
assert [c["i"] for c in cells] == [0, 1, 2]
print("ok", jax.process_index())
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(args, *, count=2, devices=2, timeout=600):
  """`python args...` as `count` processes of one job, `devices` CPU
  devices each; their (returncode, stdout, stderr)."""
  port = _free_port()
  procs = []
  for i in range(count):
    env = dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      AIGC_JAX_DISTRIBUTED="1",
      AIGC_JAX_COORDINATOR=f"localhost:{port}",
      AIGC_JAX_NUM_PROCESSES=str(count),
      AIGC_JAX_PROCESS_ID=str(i),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return [(p.wait(timeout), p.stdout.read(), p.stderr.read()) for p in procs]


def test_two_processes_gather_global_arrays_and_keep_their_own(tmp_path):
  runs = run_processes(["-c", GATHER, str(tmp_path)])
  for i, (rc, out, err) in enumerate(runs):
    assert rc == 0, err[-2000:]
    assert f"ok {i}" in out


def _smoke(job, *overrides):
  """`experiments/<job>.py` on its `:smoke` variant with `overrides`."""
  config = os.path.join(ROOT, "experiments", "configs", f"{job}.py")
  script = os.path.join(ROOT, "experiments", f"{job}.py")
  return [script, f"--config={config}:smoke", *overrides]


# The launchers with a multi-process test, each cut to a minute or less.
JOBS = {
  "train_ddpm": _smoke("train_ddpm"),
  "udp": UDP_ONE_METHOD,
  "unlearnable": _smoke(
    "unlearnable",
    "--config.protections=('emn_sample',)",
    "--config.countermeasures=('none',)",
  ),
  "le": _smoke(
    "le",
    "--config.protections=('lsp',)",
    "--config.purifiers=('le',)",
    "--config.ablations=()",
  ),
}


@pytest.mark.long
@pytest.mark.parametrize("job", JOBS)
def test_job_as_two_processes_equals_one(job, tmp_path):
  """A launcher as 2 processes x 2 devices writes what 1 process x 4
  writes: every saved image (protected, purified, sampled) bit for bit,
  every result and metrics record, one line per record, the report as
  printed, and no file left half-written by a second writer."""
  for rc, _, err in run_processes([*JOBS[job], f"--workdir={tmp_path}/two"]):
    assert rc == 0, err[-2000:]
  one = run_job([*JOBS[job], f"--workdir={tmp_path}/one"])
  assert one.returncode == 0, one.stderr[-2000:]
  two, one = run_state(tmp_path / "two"), run_state(tmp_path / "one")
  assert two[0].keys() == one[0].keys() and one[0]
  # Images (integers) bit for bit; losses and records up to the order of the
  # cross-process reductions (the last bits of a float32 loss).
  for k, v in one[0].items():
    if np.issubdtype(v.dtype, np.floating):
      np.testing.assert_allclose(two[0][k], v, rtol=1e-6, err_msg=k)
    else:
      np.testing.assert_array_equal(two[0][k], v, err_msg=k)
  got, want = _numbers(two[1]), _numbers(one[1])
  assert got.keys() == want.keys()
  for k, v in want.items():
    assert got[k] == (pytest.approx(v, rel=1e-6) if type(v) is float else v), k
  assert two[2] == one[2]
  assert not glob.glob(f"{tmp_path}/two/**/*.tmp*", recursive=True)


def _numbers(tree, prefix=""):
  """{path: value} of every number in nested dicts and lists."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, list):
    items = enumerate(tree)
  else:
    return {prefix: tree}
  out = {}
  for k, v in items:
    out.update(_numbers(v, f"{prefix}/{k}"))
  return out

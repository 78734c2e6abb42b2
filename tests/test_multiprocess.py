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
from conftest import ROOT, UDP_ONE_METHOD, run_job, udp_run_state

# Each process checks what it sees of one global array and of its own.
GATHER = """
import numpy as np, jax, jax.numpy as jnp
from aigc_jax import parallel
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


def test_two_processes_gather_global_arrays_and_keep_their_own():
  for i, (rc, out, err) in enumerate(run_processes(["-c", GATHER])):
    assert rc == 0, err[-2000:]
    assert f"ok {i}" in out


@pytest.mark.long
def test_train_ddpm_smoke_as_two_processes_equals_one(tmp_path):
  """Two processes x two devices write what one process x four writes:
  the same samples, one report, one metrics line per record."""
  script = os.path.join(ROOT, "experiments", "train_ddpm.py")
  config = os.path.join(ROOT, "experiments", "configs", "train_ddpm.py")
  args = [script, f"--config={config}:smoke"]
  for rc, _, err in run_processes([*args, f"--workdir={tmp_path}/two"]):
    assert rc == 0, err[-2000:]
  one = run_job([*args, f"--workdir={tmp_path}/one"])
  assert one.returncode == 0, one.stderr[-2000:]
  two, one = (
    np.load(tmp_path / name / "samples.npz")["images"]
    for name in ("two", "one")
  )
  np.testing.assert_array_equal(two, one)
  for name in ("metrics.jsonl", "report.md"):
    with open(tmp_path / "two" / name) as a, open(tmp_path / "one" / name) as b:
      assert len(a.readlines()) == len(b.readlines())


@pytest.mark.long
def test_udp_as_two_processes_equals_one(tmp_path):
  """The main job as 2 processes x 2 devices: the protected images, every
  cell's result, every metrics record and the report of 1 process x 4, and
  no file left half-written by a second writer."""
  for rc, _, err in run_processes(
    [*UDP_ONE_METHOD, f"--workdir={tmp_path}/two"]
  ):
    assert rc == 0, err[-2000:]
  one = run_job([*UDP_ONE_METHOD, f"--workdir={tmp_path}/one"])
  assert one.returncode == 0, one.stderr[-2000:]
  two, one = udp_run_state(tmp_path / "two"), udp_run_state(tmp_path / "one")
  for k in one[0]:
    np.testing.assert_array_equal(two[0][k], one[0][k])
  # Results and logged losses: the same records, the same values up to the
  # order of the cross-process reductions (last bits of a float32 loss).
  for got, want in zip(two[1:3], one[1:3], strict=True):
    got, want = _numbers(got), _numbers(want)
    assert got.keys() == want.keys()
    for k, v in want.items():
      assert got[k] == pytest.approx(v, rel=1e-6), k
  assert two[3] == one[3]  # the report, as printed
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

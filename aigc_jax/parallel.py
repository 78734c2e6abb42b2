"""Meshes, shardings and global batches: data parallelism through `jit`.

Parameters are replicated (`P()`), batches are split over the "data" axis
(`P('data')`), and XLA inserts the gradient all-reduce. On a multi-host pod
each process holds the same (small) dataset index, takes its own rows of every
global batch, and `jax.make_array_from_process_local_data` assembles them.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool = False) -> bool:
  """Starts the multi-process runtime (`jax.distributed.initialize`) when
  `enabled` (a config's `distributed`) or AIGC_JAX_DISTRIBUTED=1.

  On TPU pods and under Slurm, JAX finds the cluster itself. On plain
  machines, give every process the coordinator (process 0's host:port),
  the process count and its own id, in the environment:
  AIGC_JAX_COORDINATOR, AIGC_JAX_NUM_PROCESSES, AIGC_JAX_PROCESS_ID
  (docs/guide/experiments.md). Must run before anything touches the
  devices.

  Returns:
    Whether the distributed runtime was initialised.
  """
  enabled = bool(enabled) or os.environ.get("AIGC_JAX_DISTRIBUTED") == "1"
  if not enabled:
    return False
  jax.distributed.initialize(**cluster_from_environment(os.environ))
  return True


def cluster_from_environment(env) -> dict:
  """`jax.distributed.initialize` keywords from AIGC_JAX_COORDINATOR,
  AIGC_JAX_NUM_PROCESSES and AIGC_JAX_PROCESS_ID; none when the first is
  unset (TPU pods and Slurm, where JAX finds the cluster itself)."""
  coordinator = env.get("AIGC_JAX_COORDINATOR", "")
  if not coordinator:
    return {}
  try:
    count = int(env["AIGC_JAX_NUM_PROCESSES"])
    index = int(env["AIGC_JAX_PROCESS_ID"])
  except (KeyError, ValueError):
    raise ValueError(
      f"AIGC_JAX_COORDINATOR={coordinator} needs AIGC_JAX_NUM_PROCESSES (the "
      "process count) and AIGC_JAX_PROCESS_ID (this process's index, 0 to "
      "count - 1) as integers, on every process."
    ) from None
  if not 0 <= index < count:
    raise ValueError(
      f"AIGC_JAX_PROCESS_ID={index} is outside 0..{count - 1} "
      f"(AIGC_JAX_NUM_PROCESSES={count})."
    )
  return dict(
    coordinator_address=coordinator, num_processes=count, process_id=index
  )


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D data-parallel mesh over the first `num_devices` devices (all)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"Asked for {n} devices but {len(devices)} are available.")
  return Mesh(
    np.asarray(devices[:n]), (DATA_AXIS,), axis_types=(AxisType.Auto,)
  )


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (parameters, optimiser state)."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises unless the global batch splits evenly over devices and hosts."""
  if batch_size % mesh.size:
    raise ValueError(
      f"Batch size {batch_size} does not divide over the {mesh.size} devices "
      f"of the mesh; use a multiple of {mesh.size}."
    )
  if batch_size % jax.process_count():
    raise ValueError(
      f"Batch size {batch_size} does not divide over "
      f"{jax.process_count()} processes."
    )


def shard_batch(mesh: Mesh, tree):
  """Turns a global host batch (same on every process) into sharded arrays;
  arrays already split over the mesh pass as they are.

  Each process contributes only its own contiguous rows, so on a pod no host
  transfers data it does not own.
  """
  sharding = data_sharding(mesh)
  count, index = jax.process_count(), jax.process_index()

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(
      sharding, x.ndim
    ):
      return x  # already split over the mesh (gathered on the devices)
    x = np.asarray(x)
    check_batch_size(x.shape[0], mesh)
    rows = x.shape[0] // count
    local = x[index * rows : (index + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, tree)


def replicate(mesh: Mesh, tree):
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def replicated_copy(mesh: Mesh, tree):
  """A copy of a pytree of arrays in new buffers on every device: for
  state that a step will donate while the original is still needed, or
  two leaves that must not share a buffer."""
  return jax.jit(
    lambda t: jax.tree.map(jnp.copy, t), out_shardings=replicated(mesh)
  )(tree)


def batched_apply(fn, inputs, *, batch_size: int, mesh: Mesh):
  """Applies `fn` (a jitted function of a batch pytree) to host arrays in
  chunks of `batch_size`, each split over the mesh; returns host arrays
  (the whole result on every process of a multi-process job).

  The last chunk is padded by repeating its final row, and the padding is
  dropped from the result, so any number of inputs works.
  """
  n = len(jax.tree.leaves(inputs)[0])
  batch_size = min(batch_size, -(-n // mesh.size) * mesh.size)
  batch_size = -(-batch_size // mesh.size) * mesh.size
  outputs = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)

    def chunk(x, start=start, stop=stop):
      x = np.asarray(x[start:stop])
      pad = batch_size - (stop - start)
      return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x

    out = to_host(fn(shard_batch(mesh, jax.tree.map(chunk, inputs))))
    outputs.append(jax.tree.map(lambda y, k=stop - start: y[:k], out))
  return jax.tree.map(lambda *ys: np.concatenate(ys), *outputs)


def sync_processes(tag: str) -> None:
  """Waits until every process of a multi-process job gets here (nothing on
  one process): after process 0 writes a file the others then read or test
  for, so that all of them take the same branch."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(tag)


def to_host(tree):
  """A global array (or pytree of them) as numpy on every process.

  `np.asarray` reads only what this process's devices hold and fails on an
  array that spans other processes; gather those first.
  """
  from jax.experimental import multihost_utils

  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      # Every process calls this together (it is a collective).
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)  # this process holds all of it

  return jax.tree.map(one, tree)


def settle(tree, mesh: Mesh):
  """Waits for `tree` when several CPU devices share the host; returns it.

  XLA:CPU runs every device's collectives on one thread pool of a worker per
  core. With a second program queued behind the first (asynchronous
  dispatch), one device's workers can all block in the next program's
  all-reduce while the other device still needs a worker to finish the
  current one: a deadlock, seen on 2 cores with the REMN and UEraser steps.
  Keeping one program in flight avoids it and costs little on a CPU.
  """
  if mesh.size > 1 and jax.default_backend() == "cpu":
    jax.block_until_ready(tree)
  return tree

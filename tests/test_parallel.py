"""Meshes, batch placement, checkpoints across device counts, pmap."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import checkpoint, diffusion, parallel


def test_mesh_and_batch_checks():
  assert parallel.make_mesh().size == 4
  assert parallel.make_mesh(1).size == 1
  with pytest.raises(ValueError, match="available"):
    parallel.make_mesh(5)
  with pytest.raises(ValueError, match="multiple of 4"):
    parallel.check_batch_size(6, parallel.make_mesh())


def test_shard_batch_splits_rows_over_devices():
  mesh = parallel.make_mesh()
  x = parallel.shard_batch(mesh, np.arange(16.0).reshape(8, 2))
  assert len(x.addressable_shards) == 4
  assert x.addressable_shards[1].data.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(x), np.arange(16.0).reshape(8, 2))


def test_batched_apply_pads_and_trims():
  mesh = parallel.make_mesh()
  out = parallel.batched_apply(
    jax.jit(lambda x: 2 * x), np.arange(10.0), batch_size=4, mesh=mesh
  )
  np.testing.assert_array_equal(out, 2 * np.arange(10.0))


def test_replicated_copy_survives_donating_the_original():
  mesh = parallel.make_mesh()
  tree = {"w": parallel.replicate(mesh, jnp.arange(6.0))}
  copy = parallel.replicated_copy(mesh, tree)
  assert copy["w"].sharding.is_equivalent_to(parallel.replicated(mesh), 1)
  jax.jit(lambda t: t["w"] + 1, donate_argnums=0)(tree)
  assert tree["w"].is_deleted()
  np.testing.assert_array_equal(np.asarray(copy["w"]), np.arange(6.0))


def test_checkpoint_saved_on_four_devices_restores_on_one(tmp_path):
  mesh4, mesh1 = parallel.make_mesh(4), parallel.make_mesh(1)
  state = {"w": jnp.arange(8.0).reshape(4, 2), "step": jnp.array(7)}
  sharded = {
    "w": jax.device_put(state["w"], parallel.data_sharding(mesh4)),
    "step": jax.device_put(state["step"], parallel.replicated(mesh4)),
  }
  saver = checkpoint.Checkpointer(str(tmp_path))
  saver.save(7, sharded)
  saver.close()
  loader = checkpoint.Checkpointer(str(tmp_path))
  assert loader.latest_step() == 7
  out = loader.restore(
    checkpoint.abstract_state(state, parallel.replicated(mesh1))
  )
  np.testing.assert_array_equal(out["w"], state["w"])
  assert out["w"].sharding.mesh.size == 1
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    checkpoint.Checkpointer(str(tmp_path / "empty")).restore(state)
  # Another config's state, or damaged files: the folder and the fix named.
  other = {"w": jnp.zeros((3, 3)), "bias": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"Checkpoint 7 in .* Delete that"):
    checkpoint.Checkpointer(str(tmp_path)).restore(
      checkpoint.abstract_state(other, parallel.replicated(mesh1))
    )
  for root, _, files in os.walk(tmp_path / "7"):
    for name in files:  # every file of the checkpoint truncated
      open(os.path.join(root, name), "w").close()
  with pytest.raises(ValueError, match=r"damaged or was written by another"):
    checkpoint.Checkpointer(str(tmp_path)).restore(
      checkpoint.abstract_state(state, parallel.replicated(mesh1))
    )


def test_pure_purification_step_pmaps_over_devices():
  # Users' pmap-based pod scripts can still pmap library functions.
  s = diffusion.linear_schedule(100)
  eps_fn = lambda x, t: 0.1 * x
  x = jax.random.normal(jax.random.key(0), (4, 2, 4, 4, 1)).clip(-1, 1)
  keys = jax.random.split(jax.random.key(1), 4)
  f = lambda xx, k: diffusion.diffuse_and_denoise(eps_fn, xx, k, s, t_star=5)
  out = jax.pmap(f)(x, keys)
  ref = jnp.stack([f(x[i], keys[i]) for i in range(4)])
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_distributed_start_up_is_off_unless_asked(monkeypatch):
  for name in ("AIGC_JAX_DISTRIBUTED", "AIGC_JAX_COORDINATOR"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  assert parallel.maybe_initialize_distributed(False) is False
  calls = []
  monkeypatch.setattr(
    jax.distributed, "initialize", lambda **kw: calls.append(kw)
  )
  # The environment turns it on even where the config says False.
  monkeypatch.setenv("AIGC_JAX_DISTRIBUTED", "1")
  assert parallel.maybe_initialize_distributed(False) is True
  assert calls == [{}]  # TPU pods and Slurm: JAX finds the cluster
  monkeypatch.setenv("AIGC_JAX_COORDINATOR", "localhost:1234")
  monkeypatch.setenv("AIGC_JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("AIGC_JAX_PROCESS_ID", "1")
  assert parallel.maybe_initialize_distributed(False) is True
  assert calls[-1] == dict(
    coordinator_address="localhost:1234", num_processes=2, process_id=1
  )
  monkeypatch.setenv("AIGC_JAX_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"outside 0\.\.1"):
    parallel.maybe_initialize_distributed(False)
  monkeypatch.delenv("AIGC_JAX_NUM_PROCESSES")
  with pytest.raises(ValueError, match="AIGC_JAX_NUM_PROCESSES"):
    parallel.maybe_initialize_distributed(False)

"""The one place that talks to Orbax.

`Checkpointer` saves pytrees of arrays (NamedTuple train states included) per
step and restores them onto whatever shardings the caller asks for, so a
checkpoint written on 4 devices restores on 1, or on a pod.
"""

import os

import jax
import orbax.checkpoint as ocp

from aigc_jax import faults


def abstract_state(state, sharding):
  """Shape/dtype/sharding of every array leaf: Orbax's restore target.

  Args:
    state: a pytree of arrays (or ShapeDtypeStructs), e.g. from
      `jax.eval_shape` of an initialiser.
    sharding: one sharding for every leaf, or a function of the leaf.
  """
  pick = sharding if callable(sharding) else (lambda _: sharding)
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=pick(x)), state
  )


class Checkpointer:
  """Numbered checkpoints of one pytree in `directory`.

  Args:
    directory: where checkpoints live (created if missing).
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True
      ),
    )

  def latest_step(self) -> int | None:
    """The newest completed checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Saves `state` as checkpoint `step` (asynchronously)."""
    with faults.not_interrupted():
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if faults.active():  # the kill comes after the save, not during it
      self._manager.wait_until_finished()
      faults.wrote(os.path.join(self.directory, str(step)))

  def restore(self, target, step: int | None = None):
    """Restores checkpoint `step` (the latest when None) onto `target`.

    Args:
      target: the abstract state (see `abstract_state`), which fixes the tree
        structure, dtypes and the shardings to restore onto.
      step: which checkpoint.

    Returns:
      The restored pytree.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError, OSError) as e:
      # Orbax's own words ("Must provide args of type Composite", a tree
      # mismatch) name neither the folder nor what to do.
      raise ValueError(
        f"Checkpoint {step} in {self.directory} cannot be restored onto "
        f"this state ({type(e).__name__}: {' '.join(str(e).split())[:300]}): "
        "it is damaged or was written by another config. Delete that "
        "checkpoint folder (or the run's workdir) and run again to retrain "
        "it."
      ) from e

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

"""The alternation engine: model steps on the protected data, alternated with
perturbation steps, over a dataset in chunks; resumable.

Every protection that trains a surrogate on what it protects is this loop
with another objective: UDP's max-min and its readings (`max`, `min`,
`bilevel`; `aigc_jax.protect.udp`), error-minimising noise (EMN, Huang et
al. 2021, arXiv 2101.04898, Alg. 1), robust EMN (REMN, Fu et al. 2022,
arXiv 2203.14533: one round whose model steps find each minibatch's δ
themselves), contrastive poisoning (CP, He et al. 2023, arXiv 2202.11202,
Alg. 1), and, with no model step, AdvDM and the encoder attacks. Per chunk
of images, `rounds` times: `inner_steps` model steps on minibatches of the
protected chunk, then the perturbation step (a few PGD steps) on the whole
chunk or on slices of it; optionally stop when a rule holds (EMN: the
model fits the protected data). The two halves are jitted by the caller
and driven from the host: on XLA:CPU a `lax.scan` over training steps ran
20x slower per step than the same step jitted alone.

δ is sample-wise (one row per image) or class-wise (one row per group,
shared by its images and carried from chunk to chunk, and from slice to
slice). Keys derive from the chunk, round and slice (`fold_in`), minibatches
from (seed, chunk, round, step), so a run is the same on any number of
devices and after any interruption.

Resuming (`workdir`): after chunk c its δ rows, objective trace and the
seconds it took are written atomically to `chunk_<c>.npz`, *then* the
model's state to an Orbax checkpoint numbered c + 1. A training surrogate's
checkpoint is the record of progress: a chunk file without its checkpoint (a
kill between the two) is computed again, from the state it started with,
comes out the same and is written again with the seconds of its first
computation, so the file does not change. `spent_seconds` sums the chunk
files' seconds: every chunk counted once, whichever invocation computed it.
"""

import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from aigc_jax import checkpoint, data, parallel, record
from aigc_jax.protect.pgd import apply_perturbation

# x + δ (or x + δ[groups]) clipped to the image box, as PGD applies it.
_protected = jax.jit(apply_perturbation)

State = Any
# (state, batch) -> (state, metrics): one model step, the state donated.
ModelStep = Callable[[State, Any], tuple[State, Any]]


class Chunk(NamedTuple):
  """What a perturbation step sees of one chunk, placed on the mesh.

  Attributes:
    x: clean images in [-1, 1], (n, H, W, C), padded to the device count.
    conditions: one row per image (e.g. caption embeddings), or None.
    groups: (n,) int32 row of δ for each image (class-wise), or None.
  """

  x: jax.Array
  conditions: jax.Array | None
  groups: jax.Array | None


# (state, chunk, delta, key) -> (delta, trace): the perturbation step, e.g.
# `pgd` of a reading's objective; `trace` is the objective before each step.
PerturbationStep = Callable[
  [State, Chunk, jax.Array, jax.Array], tuple[jax.Array, jax.Array]
]


class Schedule(NamedTuple):
  """How the two halves alternate.

  Attributes:
    rounds: alternations per chunk, at most (0: δ stays at its start, e.g.
      the random control's draw).
    inner_steps: model steps per round (0: a fixed model).
    batch_size: model minibatch, a multiple of the device count (drawn with
      replacement from a smaller chunk).
    chunk_size: images per chunk, at most; chunks are equal in size and do
      not depend on the device count.
    slice_size: the perturbation step sees slices of this many images (the
      last one padded by repeating its final image), one after another, a
      class-wise δ carried through them; 0: the whole chunk at once.
    random_slices: > 0: each round updates δ on this many slices drawn in
      epoch order (`data.batch_indices` of (seed + 1 + chunk, round ·
      random_slices + i)) instead of all consecutive slices (CP-C's
      `noise_batches`).
    epoch_order: model minibatches in standard training order (step s =
      round · inner_steps + m of a chunk is `data.batch_indices(seed +
      chunk, s)`: every image once per epoch) instead of drawn with
      replacement per (seed, chunk, round, step).
  """

  rounds: int
  inner_steps: int
  batch_size: int
  chunk_size: int
  slice_size: int = 0
  random_slices: int = 0
  epoch_order: bool = False


def chunk_bounds(num_images: int, chunk_size: int) -> list[int]:
  """The first index of every chunk and the end: equal chunks of at most
  `chunk_size` (the last possibly shorter), whatever the device count."""
  if num_images < 1 or chunk_size < 1:
    raise ValueError(
      f"Need at least one image and a positive chunk size, got "
      f"{num_images} images and chunk_size={chunk_size}."
    )
  num_chunks = -(-num_images // chunk_size)
  size = -(-num_images // num_chunks)
  return [*range(0, num_images, size), num_images]


def _check_layout(workdir: str, layout: dict) -> None:
  """Records the chunking of a run in `workdir`, refusing another one: a
  resumed run must cut the data as the first one did."""
  path = os.path.join(workdir, "layout.json")
  if os.path.exists(path):
    with open(path) as f:
      held = json.load(f)
    if held != layout:
      raise ValueError(
        f"{workdir} holds a protection cut as {held}, this run would cut it "
        f"as {layout}: resume with the same data and chunk size, or delete "
        "the folder to start over."
      )
  else:
    record.atomic_write(path, lambda f: f.write(json.dumps(layout).encode()))


def alternate(
  x: np.ndarray,
  delta0: Callable[[jax.Array, tuple[int, ...]], jax.Array],
  state: State,
  key: jax.Array,
  *,
  perturbation_step: PerturbationStep,
  model_step: ModelStep | None,
  schedule: Schedule,
  mesh: Mesh,
  seed: int = 0,
  conditions: np.ndarray | None = None,
  groups: np.ndarray | None = None,
  num_groups: int = 0,
  workdir: str | None = None,
  progress: Callable[[int], None] | None = None,
  until: Callable[[State, np.ndarray, np.ndarray | None], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, State]:
  """Protects `x` chunk by chunk, alternating model and perturbation steps.

  Args:
    x: clean images in [-1, 1], (N, H, W, C), on the host (the same on every
      process).
    delta0: `(key, shape) -> δ`, the start of each chunk's δ (zeros, a random
      start, or the random control's draw), in model units.
    state: the model's state (replicated); `model_step` trains it and
      `perturbation_step` reads it. With a `workdir`, checkpointed when it
      trains.
    key: the root key; chunk c uses `fold_in(key, c)`, its round r
      `fold_in(fold_in(key, c), r)`.
    perturbation_step: see `PerturbationStep`; jitted by the caller.
    model_step: one model step on a minibatch of protected images (and their
      conditions: the batch is `(x, conditions)` when conditions are given),
      or None for a fixed model.
    schedule: rounds, inner steps, minibatch and chunk sizes.
    mesh: the devices; chunks and minibatches are sharded over its data axis.
    seed: seeds the minibatch draws.
    conditions: (N, ...) rows that go with the images into both halves.
    groups: (N,) ints in [0, num_groups): class-wise δ, one row per group,
      shared across chunks. None: sample-wise.
    num_groups: the number of δ rows when `groups` is given.
    workdir: where finished chunks and the model's checkpoints are kept; a
      later call with the same arguments resumes there.
    progress: called with 1 after every round (e.g. a progress bar's update).
    until: `(state, protected, conditions) -> bool`, asked after every round
      with the chunk's protected images (host, [-1, 1]) and its conditions:
      True ends the chunk's rounds (EMN's stopping rule).

  Returns:
    δ ((N, ...) sample-wise, (num_groups, ...) class-wise) on the host, the
    objective traces (num_chunks, rounds, steps), averaged over slices, NaN
    for rounds not run, and the final state.
  """
  n = len(x)
  classwise = groups is not None
  if classwise and (groups.shape != (n,) or num_groups < 1):
    raise ValueError(
      f"Class-wise δ needs groups of shape ({n},) and num_groups >= 1, got "
      f"{np.shape(groups)} and {num_groups}."
    )
  if classwise and (groups.min() < 0 or groups.max() >= num_groups):
    raise ValueError(f"groups must lie in [0, {num_groups}).")
  bounds = chunk_bounds(n, schedule.chunk_size)
  trains = model_step is not None and schedule.inner_steps > 0
  if trains:
    parallel.check_batch_size(schedule.batch_size, mesh)
  rep = parallel.replicated(mesh)
  checkpointer, done = None, 0
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    _check_layout(workdir, {"num_images": n, "bounds": bounds})
  if workdir is not None and trains:
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"))
    done = checkpointer.latest_step() or 0
    if done:
      state = checkpointer.restore(checkpoint.abstract_state(state, rep))
  elif workdir is not None:
    while os.path.exists(_chunk_path(workdir, done)):
      done += 1
  state = parallel.replicated_copy(mesh, state)  # the model steps donate it

  shared = None
  if classwise:
    shared = np.asarray(delta0(key, (num_groups, *x.shape[1:])), np.float32)
  deltas, traces = [], []
  for c, (lo, hi) in enumerate(itertools.pairwise(bounds)):
    if c < done:
      saved = record.load_arrays(_chunk_path(workdir, c))
      if classwise:
        shared = saved["delta"]
      else:
        deltas.append(saved["delta"])
      traces.append(saved["trace"])
      if progress is not None:
        for _ in range(schedule.rounds):
          progress(1)
      continue
    start = time.time()
    chunk_key = jax.random.fold_in(key, c)
    shape = (hi - lo, *x.shape[1:])
    delta = shared if classwise else delta0(chunk_key, shape)
    delta, trace, state = _alternate_chunk(
      x[lo:hi],
      None if conditions is None else conditions[lo:hi],
      None if groups is None else groups[lo:hi],
      delta,
      state,
      chunk_key,
      perturbation_step=perturbation_step,
      model_step=model_step if trains else None,
      schedule=schedule,
      mesh=mesh,
      seed=(seed, c),
      progress=progress,
      until=until,
    )
    if classwise:
      shared = delta
    else:
      deltas.append(delta)
    traces.append(trace)
    if workdir is not None:
      # δ first, then the state it leaves: a chunk counts as done once the
      # checkpoint after it exists (see the module docstring).
      path = _chunk_path(workdir, c)
      seconds = round(time.time() - start, 1)
      if os.path.exists(path):  # computed before, its checkpoint lost
        seconds = _chunk_seconds(path)
      record.save_arrays(path, delta=delta, trace=trace, seconds=seconds)
    if checkpointer is not None:
      checkpointer.save(c + 1, state)
  if checkpointer is not None:
    checkpointer.close()
  delta = shared if classwise else np.concatenate(deltas)
  return delta, np.stack(traces), state


def spent_seconds(workdir: str) -> float:
  """The seconds the protection's chunks in `workdir` took, each counted
  once, whichever invocation computed it (0 before the first chunk)."""
  total, c = 0.0, 0
  while os.path.exists(_chunk_path(workdir, c)):
    total += _chunk_seconds(_chunk_path(workdir, c))
    c += 1
  return round(total, 1)


def _chunk_seconds(path: str) -> float:
  with np.load(path) as f:  # reads this one array of the file
    return float(f["seconds"])


def _chunk_path(workdir: str, c: int) -> str:
  return os.path.join(workdir, f"chunk_{c:04d}.npz")


def padded_slices(n: int, size: int) -> list[tuple[np.ndarray, int]]:
  """Consecutive index ranges of `size` covering 0..n, the last padded by
  repeating its final index (one compiled shape), each with its count of
  real indices."""
  out = []
  for lo in range(0, n, size):
    idx = np.arange(lo, min(lo + size, n))
    pad = np.repeat(idx[-1:], size - len(idx))
    out.append((np.concatenate([idx, pad]), len(idx)))
  return out


def _slices(schedule, n, devices, seed, r):
  """(indices, count) of each slice the perturbation step sees in round r,
  its size a multiple of the device count."""
  size = -(-min(schedule.slice_size or n, n) // devices) * devices
  if not schedule.random_slices:
    return padded_slices(n, size)
  first = r * schedule.random_slices
  return [
    (data.batch_indices(seed + 1, first + i, n, size), size)
    for i in range(schedule.random_slices)
  ]


def _minibatch(schedule, seed, n, r, m):
  """The model minibatch of step m of round r (indices into the chunk)."""
  batch = schedule.batch_size
  if schedule.epoch_order:
    return data.batch_indices(sum(seed), r * schedule.inner_steps + m, n, batch)
  rng = np.random.default_rng([*seed, r, m])
  return rng.choice(n, batch, replace=batch > n)


def _alternate_chunk(
  x,
  conditions,
  groups,
  delta,
  state,
  key,
  *,
  perturbation_step,
  model_step,
  schedule,
  mesh,
  seed,
  progress,
  until,
):
  """Up to `schedule.rounds` alternations on one chunk; returns its δ (host,
  the chunk's rows or the shared rows), the trace (rounds, steps; NaN after
  a stop) and the state."""
  n = len(x)
  put = lambda a: None if a is None else parallel.shard_batch(mesh, a)
  take = lambda a, idx: None if a is None else a[idx]
  classwise = groups is not None
  groups = None if groups is None else groups.astype(np.int32)
  d = np.array(delta, np.float32)  # the host's copy, updated slice by slice
  protected = lambda: parallel.to_host(_protected(x, d, groups))
  place = lambda idx: Chunk(
    put(x[idx]), put(take(conditions, idx)), put(take(groups, idx))
  )
  slices_of = lambda r: [
    (idx, count, place(idx))
    for idx, count in _slices(schedule, n, mesh.size, sum(seed), r)
  ]
  # Consecutive slices are the same every round: placed on the mesh once.
  fixed = None if schedule.random_slices else slices_of(0)
  trace = []
  for r in range(schedule.rounds):
    if model_step is not None:
      images = protected()
      for m in range(schedule.inner_steps):
        idx = _minibatch(schedule, seed, n, r, m)
        minibatch = (
          images[idx] if conditions is None else (images[idx], conditions[idx])
        )
        state, _ = parallel.settle(model_step(state, put(minibatch)), mesh)
    slices = fixed or slices_of(r)
    round_key = jax.random.fold_in(key, r)
    steps = []
    for i, (idx, count, chunk) in enumerate(slices):
      k = round_key if len(slices) == 1 else jax.random.fold_in(round_key, i)
      start = parallel.replicate(mesh, d) if classwise else put(d[idx])
      out, objective = perturbation_step(state, chunk, start, k)
      out = parallel.to_host(out)
      if classwise:
        d = np.array(out, np.float32)
      else:
        d[idx[:count]] = out[:count]
      steps.append(parallel.to_host(objective))
    trace.append(np.mean(steps, axis=0))
    if progress is not None:
      progress(1)
    if until is not None and until(state, protected(), conditions):
      break
  trace = np.stack(trace) if trace else np.zeros((0, 0), np.float32)
  if len(trace) < schedule.rounds:  # stopped early: NaN for the rest
    rest = np.full((schedule.rounds - len(trace), *trace.shape[1:]), np.nan)
    trace = np.concatenate([trace, rest.astype(trace.dtype)])
  return d, trace, state

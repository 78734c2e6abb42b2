"""Timing of a JAX function beside its PyTorch twin: `Row` (two
zero-argument calls computing the same thing), `time_row` (medians of
alternating calls after warm-up, retraces counted, XLA's FLOP count and the
device's peak) and `rows_table` (the markdown table of timed rows);
`first_and_median` times one side alone.
"""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from aigc_jax import record

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's data
# sheets, by device kind (the first key found in JAX's device kind wins).
# float32 matrix work runs as TF32 on these GPUs: JAX's default precision,
# and the PyTorch side is set to match (`config.tf32`).
PEAK_TFLOPS = {
  "H100 PCIe": {"float32": 378.0, "bfloat16": 756.0},
  "H100": {"float32": 494.7, "bfloat16": 989.4},
  "H200": {"float32": 494.7, "bfloat16": 989.4},
  "A100": {"float32": 156.0, "bfloat16": 312.0},
}


class Row(NamedTuple):
  """One benchmark row: two zero-argument calls computing the same thing.

  `run_jax` returns JAX arrays (the timer blocks on them); `run_torch`
  returns once PyTorch's work is queued (the timer synchronises the
  device). `jitted` is the jitted function `run_jax` calls and `args` the
  shapes it is called with, for XLA's FLOP count; `items` the images (or
  edits) per call; `precision` the arithmetic of its matrix work
  ("float32" or "bfloat16"), for the device's peak.
  """

  name: str
  what: str
  run_jax: Callable[[], Any]
  run_torch: Callable[[], Any]
  jitted: Any
  args: tuple
  items: int
  precision: str = "float32"


def peak_tflops(precision: str, override: float = 0.0) -> float | None:
  """The device's peak for `precision` ("float32" or "bfloat16"):
  `override` when set, else `PEAK_TFLOPS` for JAX's device kind; None
  where neither knows it (CPUs)."""
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_TFLOPS.items():
    if name in kind:
      return peaks[precision]
  return None


def shapes_of(*args) -> tuple:
  """Shapes, dtypes and shardings of `args`, to lower a function with
  after its buffers have been donated."""
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
    args,
  )


def _flops_of(cost) -> float | None:
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def program_flops(jitted, args: tuple) -> float | None:
  """XLA's FLOP count of `jitted` on `args`, from the program before XLA's
  optimisations (no second compilation); None where XLA gives none.

  GPU backends (PJRT plugins) give no count of the lowered program, and
  the compiled program's count leaves out the cuDNN and cuBLAS calls that
  do most of the work, so there the same function is lowered for the CPU
  (uncommitted shapes, the CPU as default device) and counted.
  """
  flops = _flops_of(jitted.lower(*args).cost_analysis())
  if flops is None and jax.default_backend() != "cpu":
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.default_device(jax.devices("cpu")[0]):
      flops = _flops_of(jitted.lower(*plain).cost_analysis())
  return flops


class _CompileEvents:
  """Counts JAX's tracing and compilation events while active (a retrace
  or recompile of a hot function on same-shaped inputs shows up here)."""

  def __enter__(self):
    self.count = 0

    def listener(name, secs, **kwargs):
      del secs, kwargs
      if name.startswith("/jax/core/compile/"):
        self.count += 1

    self._listener = listener
    jax.monitoring.register_event_duration_secs_listener(listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def time_row(
  row: Row,
  *,
  warmup: int,
  repeats: int,
  sync: Callable[[], Any] = lambda: None,
  peak: float | None = None,
) -> dict:
  """Medians of alternating JAX and PyTorch calls, after warm-up.

  The first JAX call (tracing and compilation) is timed on its own; every
  later call must reuse its program (`jax_retraces` counts JAX's tracing
  and compilation events after it, and is 0 for a hot function). `sync`
  waits for PyTorch's queued work (`torch.cuda.synchronize` on a GPU);
  `peak`, the device's TFLOP/s for the row's precision, gives the share
  of it each side achieves.
  """
  start = time.perf_counter()
  jax.block_until_ready(row.run_jax())
  first = time.perf_counter() - start
  times = {"jax": [], "torch": []}
  with _CompileEvents() as events:
    for _ in range(warmup):
      jax.block_until_ready(row.run_jax())
      row.run_torch()
      sync()
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(row.run_jax())
      times["jax"].append(time.perf_counter() - start)
      start = time.perf_counter()
      row.run_torch()
      sync()
      times["torch"].append(time.perf_counter() - start)
  jax_s, torch_s = (float(np.median(times[k])) for k in ("jax", "torch"))
  out = {
    "row": row.name,
    "what": row.what,
    "jax_s": jax_s,
    "torch_s": torch_s,
    "torch_over_jax": torch_s / jax_s,
    "jax_first_call_s": first,
    "jax_retraces": events.count,
    "items_per_s_jax": row.items / jax_s,
    "items_per_s_torch": row.items / torch_s,
  }
  flops = program_flops(row.jitted, row.args)
  if flops:
    out["gflops"] = flops / 1e9
    out["gflop_per_s_jax"] = flops / jax_s / 1e9
    out["gflop_per_s_torch"] = flops / torch_s / 1e9
    if peak:
      out["peak_tflops"] = peak
      out["jax_peak_share"] = flops / jax_s / (peak * 1e12)
      out["torch_peak_share"] = flops / torch_s / (peak * 1e12)
  return out


def first_and_median(fn: Callable[[], Any], repeats: int) -> dict:
  """Seconds of `fn()`'s first call (tracing and compilation included) and
  the median of `repeats` more ("median_s" None when 0), outputs ready."""

  def seconds():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  first = seconds()
  later = [seconds() for _ in range(repeats)]
  return {
    "first_s": first,
    "median_s": float(np.median(later)) if later else None,
  }


def seconds_text(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def rows_table(rows: list[dict], first: str = "row") -> str:
  """The markdown table of timed rows (`first`: the leading column)."""
  header = [first, "JAX", "PyTorch", "PyTorch / JAX", "JAX items/s"]
  header += ["GFLOP", "JAX GFLOP/s", "PyTorch GFLOP/s"]
  with_peak = any("jax_peak_share" in r for r in rows)
  if with_peak:
    header += ["JAX % of peak", "PyTorch % of peak"]
  header.append("JAX first call")
  body = []
  for r in rows:
    flops = [
      f"{r[k]:.2f}" if k in r else "n/a"
      for k in ("gflops", "gflop_per_s_jax", "gflop_per_s_torch")
    ]
    if with_peak:
      flops += [
        f"{100 * r[k]:.2f}" if k in r else "n/a"
        for k in ("jax_peak_share", "torch_peak_share")
      ]
    body.append(
      [
        r[first],
        seconds_text(r["jax_s"]),
        seconds_text(r["torch_s"]),
        f"{r['torch_over_jax']:.2f}x",
        f"{r['items_per_s_jax']:.1f}",
        *flops,
        seconds_text(r["jax_first_call_s"]),
      ]
    )
  return record.markdown_table(header, body)

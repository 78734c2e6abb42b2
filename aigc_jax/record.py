"""What every run leaves in its workdir: the resolved config, JSON-lines
metrics and a markdown report. Writes happen on process 0 only."""

import hashlib
import itertools
import json
import os
import time
import zipfile

import jax
import numpy as np

from aigc_jax import faults, parallel
from aigc_jax.metrics import share_interval

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.md"
INVOCATIONS_FILE = "invocations.json"
_started: dict[str, float] = {}  # workdir -> when this process prepared it


def prepare_workdir(workdir: str, config_json: str) -> str:
  """Creates `workdir` and records the config, refusing a different one.

  Re-running the same command in the same workdir resumes it; running a
  different config there would mix two runs' checkpoints and metrics.

  Args:
    workdir: the run's directory.
    config_json: the resolved config as JSON (`config.to_json()`).

  Returns:
    The absolute workdir path.
  """
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  wanted = json.loads(config_json)
  if os.path.exists(path):
    with open(path) as f:
      found = json.load(f)
    if found != wanted:
      diff = sorted(_differing_keys(found, wanted))
      raise ValueError(
        f"Workdir {workdir} holds a run with a different config (differs in "
        f"{', '.join(diff[:8])}). Use a new --workdir, or delete this one to "
        "start over."
      )
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    text = json.dumps(wanted, indent=2, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode()))
  _note_invocation(workdir)
  parallel.sync_processes(f"prepare_workdir {workdir}")
  return workdir


def _note_invocation(workdir: str) -> None:
  """Adds this invocation's start to workdir/invocations.json."""
  _started[workdir] = time.time()
  starts = [*_invocation_starts(workdir), _started[workdir]]
  atomic_write(
    os.path.join(workdir, INVOCATIONS_FILE),
    lambda f: f.write(json.dumps(starts).encode()),
    counted=False,  # bookkeeping: a kill just after it is one just before
  )


def _invocation_starts(workdir: str) -> list[float]:
  path = os.path.join(workdir, INVOCATIONS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def run_seconds(workdir: str) -> float:
  """The wall time of every invocation of the run in `workdir`: this one's
  so far, and each earlier one's from its start to the last thing it wrote
  (a file, or a metrics line's time stamp): work a kill cut off was done
  again and counts where it was redone."""
  starts = sorted(_invocation_starts(workdir))
  now = time.time()
  if not starts:
    return 0.0
  stamps = []
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      stamps.append(os.path.getmtime(path))
      if name == METRICS_FILE:
        stamps += _metric_times(path)
  total = now - _started.get(workdir, starts[-1])
  for begin, following in itertools.pairwise(starts):
    ends = [t for t in stamps if begin <= t < following]
    total += max(ends) - begin if ends else 0.0
  return round(total, 1)


def _metric_times(path: str) -> list[float]:
  times = []
  with open(path) as f:
    for line in f:
      try:
        times.append(float(json.loads(line)["time"]))
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        continue  # a line a kill cut short
  return times


def forget_config(workdir: str) -> None:
  """Removes the config `prepare_workdir` recorded in a workdir where
  nothing else was written (a run refused before any work), so that the
  corrected command can use the same workdir."""
  ours = {CONFIG_FILE, INVOCATIONS_FILE}
  if jax.process_index() == 0 and set(os.listdir(workdir)) <= ours:
    for name in os.listdir(workdir):
      os.remove(os.path.join(workdir, name))


def _differing_keys(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".") or "<root>"


def load_config_json(workdir: str) -> dict:
  """The config a finished run in `workdir` was started with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"No {CONFIG_FILE} in {workdir}: is it the workdir of a finished run?"
    )
  with open(path) as f:
    return json.load(f)


class MetricWriter:
  """Appends one JSON object per record to workdir/metrics.jsonl (process 0).

  A record whose step and keys the file already holds is not written again:
  a resumed run retraces the steps after its last checkpoint, and a re-run
  of a finished one reads its cells back, and neither should repeat lines.
  """

  def __init__(self, workdir: str, prefix: str = ""):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.prefix = prefix
    self._written = None  # (step, keys) already in the file, read lazily
    self._lead = ""  # a newline to end a line a kill cut short

  def write(self, step: int, values: dict) -> None:
    if jax.process_index() != 0:
      return
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({self.prefix + k: v for k, v in values.items()})
    if self._written is None:
      self._written = _written_records(self.path)
      self._lead = "\n" if _ends_mid_line(self.path) else ""
    key = _record_key(record)
    if key in self._written:
      return
    self._written.add(key)
    with open(self.path, "a") as f:
      f.write(self._lead + json.dumps(record) + "\n")
    self._lead = ""
    faults.wrote(self.path)


def _record_key(record: dict) -> tuple:
  return record["step"], tuple(sorted(k for k in record if k != "time"))


def _ends_mid_line(path: str) -> bool:
  """Whether a kill cut the file's last line short (no final newline)."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return False
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def _written_records(path: str) -> set:
  """The (step, keys) of every whole line of a metrics file (a line cut
  short by a kill is skipped)."""
  written = set()
  if not os.path.exists(path):
    return written
  with open(path) as f:
    for line in f:
      try:
        written.add(_record_key(json.loads(line)))
      except (json.JSONDecodeError, KeyError, TypeError):
        continue
  return written


def last_metric(workdir: str, key: str):
  """The last value recorded for `key` in workdir/metrics.jsonl."""
  path = os.path.join(workdir, METRICS_FILE)
  value = None
  with open(path) as f:
    for line in f:
      try:
        value = json.loads(line).get(key, value)
      except json.JSONDecodeError:
        continue  # a line a kill cut short
  if value is None:
    raise KeyError(f"No metric {key!r} in {path}: did that run finish?")
  return value


def atomic_write(path: str, write, *, counted: bool = True) -> str:
  """Calls `write(file)` on a temporary file beside `path`, then renames it
  to `path` (on process 0 only): a kill at any instant leaves the old file
  or the new one, never a truncated one that a resumed run would read.
  `counted=False` keeps a bookkeeping file out of `aigc_jax.faults`' count."""
  if jax.process_index() != 0:
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with faults.not_interrupted():  # no half-written .tmp left behind
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    if faults.active() and _same_content(tmp, path):
      os.remove(tmp)  # a resumed run rewriting what it wrote before
      return path
    os.replace(tmp, path)
  if counted:
    faults.wrote(path)
  return path


def _same_content(new: str, old: str) -> bool:
  """Whether two files hold the same: the same arrays for `.npz` (whose zip
  headers carry the time of writing), else the same bytes."""
  if not os.path.exists(old):
    return False
  if old.endswith(".npz"):
    a, b = load_arrays(new), load_arrays(old)
    return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=True)
      for k in a
    )
  with open(new, "rb") as f, open(old, "rb") as g:
    return f.read() == g.read()


def save_arrays(path: str, **arrays) -> str:
  """Writes named arrays as one `.npz`, atomically (`atomic_write`)."""
  return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: str) -> dict:
  """The arrays of an `.npz` written by `save_arrays`; an unreadable file is
  named, with the fix."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(
      f"Cannot read {path}: {e}. Delete it to compute it again."
    ) from e


def cached_arrays(path: str, compute) -> dict:
  """`compute()`'s named arrays once: saved as the `.npz` at `path` (by
  process 0, atomically) and read back on every later call, so a re-run
  skips a finished cell and a killed one never leaves a file that reads as
  finished."""
  if _finished(path):
    return load_arrays(path)
  arrays = compute()
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_arrays(path, **arrays)
  # Every process sees the cell finished from here on (none recomputes it
  # alone, out of step with the others' collectives).
  parallel.sync_processes(f"cached_arrays {path}")
  return arrays


def _finished(path: str) -> bool:
  """Whether a cell's file is there, as every process sees it before
  process 0 can write it: a process that looked after process 0 had
  computed and written the cell would skip it, and with it the
  synchronisation the others wait in (a cell without collectives lets
  process 0 run ahead)."""
  held = os.path.exists(path)
  parallel.sync_processes(f"looked for {path}")
  return held


def slug(name: str) -> str:
  """A method's or set's name as a folder name ("eudp:snr" -> "eudp_snr")."""
  return "".join(ch if ch.isalnum() else "_" for ch in name)


def markdown_table(header: list[str], rows: list[list]) -> str:
  """A GitHub-flavoured markdown table."""
  lines = [header, ["---"] * len(header), *rows]
  return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in lines) + "\n"


def share_text(share: float | None, n: int) -> str:
  """A share of `n` samples as a report gives it, with its count and 95%
  Wilson interval: "15.6 (5/32, 6.9–31.8)" (a share of few samples is
  coarse); "–" where there is none."""
  if share is None or np.isnan(share):
    return "–"
  hits = round(share * n)
  lo, hi = share_interval(hits, n)
  return f"{100 * share:.1f} ({hits}/{n}, {100 * lo:.1f}–{100 * hi:.1f})"


def percent_text(share: float, n: int) -> str:
  """A share of `n` as a table cell, in % with its 95% Wilson interval:
  "98.3 (96.4–99.2)" (the table states n once)."""
  lo, hi = share_interval(round(share * n), n)
  return f"{100 * share:.1f} ({100 * lo:.1f}–{100 * hi:.1f})"


def flat(tree: dict, prefix: str = "") -> dict:
  """A nested dict as one level of "a/b/c" keys, None values left out (a
  metrics line)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    elif v is not None:
      out[f"{prefix}{k}"] = v
  return out


def expectation(expected, key: str, value: float) -> str:
  """`value` against the bound `expected[key]` of a config's `expected`
  block (`{"at_least": x}` or `{"at_most": x}`; the block's `source` says
  where the number comes from): "met (≥ x)" or "missed (≥ x)". Reports
  state targets only through this, so that no report hard-codes one."""
  if key not in expected:
    raise ValueError(
      f"The config's `expected` block has no {key!r} target; add one, e.g. "
      f"expected.{key} = {{'at_least': x}} (or 'at_most'), with its source."
    )
  bound = expected[key]
  if "at_least" in bound:
    target, ok = f"≥ {bound.at_least:g}", value >= bound.at_least
  else:
    target, ok = f"≤ {bound.at_most:g}", value <= bound.at_most
  return f"{'met' if ok else 'missed'} ({key} {target}, {expected.source})"


def plot_curves(
  path, x, curves, *, xlabel, ylabel, reference=None, log_x=True
) -> None:
  """A PNG of one measure against `x` per named curve (matplotlib, written
  by process 0): e.g. concept success against the budget per method.
  `reference`: `(label, value)` drawn as a dashed horizontal line."""
  if jax.process_index() != 0:
    return
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, values in curves.items():
    ax.plot(x, values, marker="o", label=name)
  if reference is not None:
    ax.axhline(reference[1], color="k", linestyle="--", label=reference[0])
  if log_x:
    ax.set_xscale("log", base=2)
  ax.set_xticks(x, [f"{v:g}" for v in x])
  ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 100))
  ax.legend(fontsize=7)
  fig.tight_layout()
  atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
  plt.close(fig)


def write_report(workdir: str, text: str) -> str:
  """Writes workdir/report.md and returns its path."""
  return atomic_write(
    os.path.join(workdir, REPORT_FILE), lambda f: f.write(text.encode())
  )


def array_digest(*arrays) -> str:
  """sha256 of the arrays' dtypes, shapes and bytes: what a cell of an
  experiment was computed from, for `cached_result(inputs=...)`."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def cached_result(workdir: str, compute, inputs: str | None = None) -> dict:
  """`compute()` once for this cell of an experiment, its dict saved as
  `workdir/result.json` (by process 0) and read back on every later call,
  so a re-run skips finished cells.

  `inputs`, a digest of what the cell computes from (`array_digest` of its
  training data), is written to `workdir/inputs.sha256` before `compute`
  starts. A later call with other inputs is refused, whether the cell
  finished or left a checkpoint: a folder copied in from a run with other
  settings would otherwise be read back as if it were this run's. A cell
  from before digests were kept is taken as it is."""
  path = os.path.join(workdir, "result.json")
  if inputs is not None:
    _check_inputs(workdir, inputs)
  if _finished(path):
    with open(path) as f:
      return json.load(f)
  result = compute()
  # Atomic: a kill while writing must not leave a truncated result that a
  # resumed run would read back as finished.
  atomic_write(path, lambda f: f.write(json.dumps(result).encode()))
  parallel.sync_processes(f"cached_result {path}")
  return result


def _check_inputs(workdir: str, inputs: str) -> None:
  path = os.path.join(workdir, "inputs.sha256")
  held = os.path.exists(path)
  # Every process has looked before process 0 writes: all take one branch.
  parallel.sync_processes(f"inputs {path}")
  if held:
    with open(path) as f:
      held = f.read().strip()
    if held != inputs:
      raise ValueError(
        f"{workdir} was computed from other inputs than this run's "
        f"(sha256 {held[:12]}... against {inputs[:12]}...), for instance "
        "copied from a run with other settings; delete the folder to "
        "compute it again."
      )
  else:
    atomic_write(path, lambda f: f.write((inputs + "\n").encode()))

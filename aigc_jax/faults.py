"""What ends a run early on purpose: injected crashes (the resume tests)
and time limits (a suite with a budget).

With `AIGC_JAX_EXIT_AFTER_WRITES=k` in the environment, a process ends right
after its k-th write of run state (every atomic file write, metrics line,
checkpoint save and image grid) through `os._exit`: no clean-up, no flush
of pending asynchronous saves, as a kill would leave it. A resumed run
rewriting a file with the same contents is not counted (`record.atomic_write`
compares them), so running a launcher with k = 1 again and again, resuming
each time, ends each run one write further: a kill lands between every
pair of consecutive writes (tests/test_job_udp.py). A checkpoint counts once
its save has finished. Unset, it does nothing.

`time_limit(seconds)` raises `OutOfTime`, an interrupt, in the main thread
when the time is up; every training loop answers an interrupt by waiting
for its checkpoint saves, so the run resumes from them. Inside
`not_interrupted()` (a checkpoint save being started, an atomic write) the
interrupt waits for the block's end.
"""

import contextlib
import os
import signal
import sys

VARIABLE = "AIGC_JAX_EXIT_AFTER_WRITES"
EXIT_CODE = 75  # neither a crash (1), a kill (137) nor Ctrl-C (130)
_writes = 0


def active() -> bool:
  """Whether crash injection is on."""
  return bool(os.environ.get(VARIABLE))


def wrote(path: str) -> None:
  """Counts one write of `path`; ends the process at the k-th (see above)."""
  global _writes
  limit = os.environ.get(VARIABLE)
  if not limit:
    return
  _writes += 1
  if _writes >= int(limit):
    sys.stderr.write(f"{VARIABLE}: exit after write {_writes}: {path}\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)


class OutOfTime(KeyboardInterrupt):
  """Raised in the main thread when a `time_limit` ends."""


_held = 0  # depth of `not_interrupted` blocks
_pending: str | None = None  # a limit that ended inside one


@contextlib.contextmanager
def time_limit(seconds: float):
  """Raises `OutOfTime` `seconds` from now at the next Python instruction of
  the main thread (a running XLA program finishes first), or at the end of
  the `not_interrupted` block it lands in."""

  def out_of_time(signum, frame):
    global _pending
    message = f"the time limit of {seconds:.0f} s ended"
    if _held:
      _pending = message
    else:
      raise OutOfTime(message)

  previous = signal.signal(signal.SIGALRM, out_of_time)
  signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def not_interrupted():
  """Holds a `time_limit`'s end until the block has run: Orbax starts a save
  in the main thread and finishes it in threads that wait for what the
  main thread sets up, so an interrupt half-way leaves them waiting for
  minutes."""
  global _held, _pending
  _held += 1
  try:
    yield
  finally:
    _held -= 1
    if not _held and _pending is not None:
      message, _pending = _pending, None
      raise OutOfTime(message)

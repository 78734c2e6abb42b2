"""Crash injection for the resume tests.

With `AIGC_JAX_EXIT_AFTER_WRITES=k` in the environment, a process ends right
after its k-th write of run state (every atomic file write, metrics line,
checkpoint save and image grid) through `os._exit`: no clean-up, no flush
of pending asynchronous saves, as a kill would leave it. A resumed run
rewriting a file with the same contents is not counted (`record.atomic_write`
compares them), so running a launcher with k = 1 again and again, resuming
each time, ends each run one write further: a kill lands between every
pair of consecutive writes (tests/test_job_udp.py). A checkpoint counts once
its save has finished. Unset, it does nothing.
"""

import os
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

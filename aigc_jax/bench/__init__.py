"""Benchmarks: the library's hot loops timed beside PyTorch twins that
compute the same functions with the same weights.

  row = bench.ROWS["udp_step_digits"](name, row_config, mesh, "cpu")
  bench.time_row(row, warmup=2, repeats=5)

`torch_twins` needs the `[torch]` extra (and `lpips` for the JCDP row).
"""

from aigc_jax.bench.rows import ROWS, torch_device
from aigc_jax.bench.timing import (
  PEAK_TFLOPS,
  Row,
  first_and_median,
  peak_tflops,
  program_flops,
  rows_table,
  seconds_text,
  shapes_of,
  time_row,
)

__all__ = [
  "PEAK_TFLOPS",
  "ROWS",
  "Row",
  "first_and_median",
  "peak_tflops",
  "program_flops",
  "rows_table",
  "seconds_text",
  "shapes_of",
  "time_row",
  "torch_device",
]

"""Benchmarks every hot loop against its PyTorch twin, side by side.

  python experiments/bench.py --workdir=runs/bench [--config=...:gpu]

Each row (`aigc_jax.bench.ROWS`) times the jitted JAX function, as a user
calls it, and the same computation in PyTorch on the same inputs with the
same weights (`aigc_jax.bench.torch_twins`), in one process: both sides are
warmed up, then called alternately `repeats` times; the table gives the
medians, the PyTorch / JAX ratio (> 1: JAX is faster) and the throughput at
XLA's FLOP count of the JAX program. Then the UDP step's throughput against
batch size (both frameworks) and against the number of forced CPU devices
(JAX, batch sharded over the mesh; one subprocess per count).

The table is printed and written to the workdir (`report.md`,
`metrics.jsonl`, `result.json`).
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable

import jax
import ml_collections

from aigc_jax import bench, launch, parallel, record
from aigc_jax.bench import time_to_accuracy as tta
from aigc_jax.eval import classifiers

CONFIG_FILE = launch.config_path(__file__)


def _row_config(config, name: str, **updates):
  c = config.rows[name].copy_and_resolve_references()
  with c.unlocked():
    c.update(updates)
  return c


def batch_scaling(
  config, mesh, timer: Callable[[bench.Row], dict]
) -> list[dict]:
  """The scaling row's throughput at each of `scaling.batch_sizes`."""
  name = config.scaling.row
  device = bench.torch_device(config.torch_device)
  out = []
  for batch in config.scaling.batch_sizes:
    c = _row_config(config, name, batch=batch)
    out.append(
      {"batch": batch, **timer(bench.ROWS[name](name, c, mesh, device))}
    )
  return out


def device_scaling(config, workdir: str) -> list[dict]:
  """The scaling row's JAX throughput on 1, 2, 4 ... forced CPU devices.

  The device count is fixed when JAX starts, so each count runs in a
  subprocess of this script with only that row and no scaling of its own.
  """
  out = []
  for count in config.scaling.device_counts:
    sub = os.path.join(workdir, f"devices_{count}")
    name = config.scaling.row
    overrides = [
      f"--config.rows.{name}.batch={config.scaling.device_batch}",
      f"--config.num_devices={count}",
      "--config.scaling.batch_sizes=()",
      "--config.scaling.device_counts=()",
      f"--config.only={name}",
      "--config.time_to_accuracy.target=0.0",
    ]
    flags = [
      f
      for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={count}")
    env = dict(os.environ, XLA_FLAGS=" ".join(flags))
    subprocess.run(
      [
        sys.executable,
        os.path.abspath(__file__),
        f"--config={CONFIG_FILE}:{config.variant}",
        *overrides,
        f"--workdir={sub}",
      ],
      check=True,
      env=env,
    )
    with open(os.path.join(sub, "result.json")) as f:
      (row,) = json.load(f)["rows"]
    out.append({"devices": count, **row})
  return out


def bench_report(config, workdir: str, result: dict) -> str:
  devices = jax.devices()
  text = (
    f"# Benchmarks: JAX against PyTorch (`{config.variant}`)\n\n"
    f"{launch.command_line(__file__, config, workdir)}\n\n"
    f"Device: {devices[0].device_kind} ({devices[0].platform}), "
    f"{os.cpu_count()} CPU threads; jax {jax.__version__}, torch "
    f"{result['torch_version']} on {result['torch_device']} "
    f"({result['torch_threads']} threads); JAX on "
    f"{result['jax_devices']} device(s). Medians of {config.repeats} "
    f"alternating calls after {config.warmup} warm-up calls; PyTorch / JAX "
    "> 1 means JAX is faster. GFLOP is XLA's count for the JAX program "
    "(both sides compute the same function). "
    + (
      "float32 matrix products and convolutions run as TF32 on both sides "
      "(JAX's default on GPUs; PyTorch's `allow_tf32` set to match). "
      if result["tf32"]
      else ""
    )
    + (
      "% of peak: of the device's dense tensor-core peak for the row's "
      "precision (`PEAK_TFLOPS` or `--config.peak_tflops`). "
      if any("jax_peak_share" in r for r in result["rows"])
      else ""
    )
    + "No row's JAX function traced "
    "or compiled again after its first call unless its `retraces` says so: "
    + ", ".join(f"{r['row']} {r['jax_retraces']}" for r in result["rows"])
    + ".\n\n"
  )
  for r in result["rows"]:
    text += f"- `{r['row']}`: {r['what']}\n"
  text += "\n" + bench.rows_table(result["rows"])
  if result["batch_scaling"]:
    text += f"\n## `{config.scaling.row}` against batch size\n\n"
    text += bench.rows_table(result["batch_scaling"], "batch")
  if result["device_scaling"]:
    text += (
      f"\n## `{config.scaling.row}` against forced CPU devices "
      f"(batch {config.scaling.device_batch}, JAX data parallel)\n\n"
    )
    body = [
      [
        r["devices"],
        bench.seconds_text(r["jax_s"]),
        f"{r['items_per_s_jax']:.1f}",
      ]
      for r in result["device_scaling"]
    ]
    text += record.markdown_table(["devices", "JAX", "items/s"], body)
  if result["time_to_accuracy"]:
    text += time_to_accuracy_report(config, result["time_to_accuracy"])
  return text


def time_to_accuracy(config, mesh, device: str) -> dict:
  """The victim recipe of `config.time_to_accuracy` to its target, in JAX
  and in PyTorch ({} when the target is 0)."""
  c = config.time_to_accuracy
  if not c.target:
    return {}
  train_set, test_set = classifiers.load_train_test(c)
  return {
    "jax": tta.jax_run(c, train_set, test_set, mesh, c.target),
    "torch": tta.torch_run(c, train_set, test_set, device, c.target),
    "train_examples": train_set.num_examples,
    "test_examples": test_set.num_examples,
  }


def time_to_accuracy_report(config, result: dict) -> str:
  c = config.time_to_accuracy
  rows = [
    [
      side,
      "not reached" if r["seconds"] is None else f"{r['seconds']:.1f} s",
      r["epochs"] or "–",
      f"{100 * r['best_accuracy']:.1f}",
      ", ".join(f"{100 * p['accuracy']:.1f}" for p in r["curve"]),
    ]
    for side, r in (("JAX", result["jax"]), ("PyTorch", result["torch"]))
  ]
  return (
    f"\n## Time to {100 * c.target:g}% test accuracy\n\n"
    f"{c.model.name} (width {c.model.width}, {c.model.dtype}) on "
    f"{c.data.train} ({result['train_examples']} images), batch "
    f"{c.train.batch_size}, {c.train.schedule} schedule for "
    f"{c.train.num_epochs} epochs at most, tested after every epoch on "
    f"{c.data.test} ({result['test_examples']} images); the same batches, "
    "augmentation, loss and rates on both sides. Training time only (the "
    "first step's compilation included), the clock stopped while testing.\n\n"
    + record.markdown_table(
      [
        "side",
        "time to target",
        "epochs",
        "best accuracy (%)",
        "accuracy after each epoch (%)",
      ],
      rows,
    )
  )


def pytorch_side(config) -> tuple[str, bool]:
  """Sets up PyTorch as `config` says; returns its device and whether
  float32 matrix work runs as TF32 on both sides."""
  torch = bench.torch_twins.torch_module()
  if config.torch_threads:
    torch.set_num_threads(config.torch_threads)
  device = bench.torch_device(config.torch_device)
  on_gpu = device.startswith("cuda")
  tf32 = on_gpu and config.tf32
  if on_gpu:
    # JAX computes float32 matrix work as TF32 on these GPUs by default;
    # PyTorch does so for convolutions only unless told.
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if not tf32:
      jax.config.update("jax_default_matmul_precision", "float32")
  return device, tf32


def row_names(config) -> list[str]:
  names = [n for n in config.only.split(",") if n] or list(config.rows)
  unknown = sorted(set(names) - set(bench.ROWS))
  if unknown:
    raise ValueError(
      f"Unknown benchmark rows {unknown}; choose from {sorted(bench.ROWS)}."
    )
  return names


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Times every row, then the scaling rows; writes and prints the table."""
  names = row_names(config)
  device, tf32 = pytorch_side(config)
  torch = bench.torch_twins.torch_module()
  timer = lambda row: bench.time_row(
    row,
    warmup=config.warmup,
    repeats=config.repeats,
    sync=torch.cuda.synchronize if device.startswith("cuda") else lambda: None,
    peak=bench.peak_tflops(row.precision, config.peak_tflops[row.precision]),
  )
  mesh = parallel.make_mesh(config.num_devices or None)
  writer = record.MetricWriter(workdir)
  rows = []
  for name in names:
    rows.append(timer(bench.ROWS[name](name, config.rows[name], mesh, device)))
    writer.write(len(rows), rows[-1])
    print(bench.rows_table(rows[-1:]), flush=True)
  result = {
    "torch_version": torch.__version__,
    "torch_device": device,
    "torch_threads": torch.get_num_threads(),
    "tf32": tf32,
    "jax_devices": mesh.size,
    "rows": rows,
    "batch_scaling": batch_scaling(config, mesh, timer),
    "device_scaling": device_scaling(config, workdir),
    "time_to_accuracy": time_to_accuracy(config, mesh, device),
  }
  record.atomic_write(
    os.path.join(workdir, "result.json"),
    lambda f: f.write(json.dumps(result, indent=2).encode()),
  )
  text = bench_report(config, workdir, result)
  record.write_report(workdir, text)
  print(text)
  return result


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

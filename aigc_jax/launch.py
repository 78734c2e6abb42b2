"""What every launcher shares: absl flags, the workdir record, multi-host
start-up, and the command that reruns a run.

A launcher `<folder>/<name>.py` defines `train_and_evaluate(config, workdir)`
and ends with `launch.main(train_and_evaluate, __file__)`; its configs live in
`<folder>/configs/<name>.py` (`get_config(variant)`), as in big_vision. Import
this module before anything runs JAX code: it sets XLA's CPU flags.
"""

import importlib.util
import os
import shlex
import sys

# XLA's CPU backend runs small convolutions on one core; one CPU device per
# core turns data parallelism into multi-core speed (1.5x for the digits DDPM
# on 2 cores). Must be set before JAX starts; affects only the CPU platform.
if "xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
  ).strip()

# XLA:CPU aborts a program whose devices reach a collective more than 40 s
# apart; with one device per core, a busy machine (or a long unrolled loop
# between collectives) gets there without anything being wrong.
if "xla_cpu_collective_call_terminate" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (
    " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
    " --xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
  )

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from aigc_jax import parallel, record

# Experiments train several identical models (clean vs protected data); the
# persistent cache is keyed on the compiled program, so they compile once.
# A cache the caller has set is kept.
if jax.config.jax_compilation_cache_dir is None:
  jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
      "AIGC_JAX_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "aigc_jax"),
    ),
  )
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def config_path(script: str) -> str:
  """The config file of launcher `script`: `<folder>/configs/<name>.py`."""
  folder, file = os.path.split(os.path.abspath(script))
  return os.path.join(folder, "configs", file)


def main(train_and_evaluate, script: str, per_call: tuple[str, ...] = ()):
  """Parses --config and --workdir, then runs train_and_evaluate.

  `per_call`: top-level config keys that say what one call does (a time
  budget), not what the run is: left out of the workdir's record, so they
  may change between the calls that resume one run."""
  name = os.path.splitext(os.path.basename(script))[0]
  config_flags.DEFINE_config_file(
    "config",
    config_path(script),
    "Config file, with an optional ':variant' suffix.",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", os.path.join("runs", name), "Run directory.")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO
    config = flags.FLAGS.config
    check_counts(config)
    parallel.maybe_initialize_distributed(config.get("distributed", False))
    workdir = flags.FLAGS.workdir
    try:
      run_in_workdir(train_and_evaluate, config, workdir, per_call)
    except KeyboardInterrupt:
      print(
        f"Interrupted; run the same command to resume from {workdir}.",
        file=sys.stderr,
      )
      sys.exit(130)

  app.run(run)


def run_in_workdir(train_and_evaluate, config, workdir: str, per_call=()):
  """`train_and_evaluate(config, workdir)` after recording the config, less
  its `per_call` keys, in the workdir (`record.prepare_workdir`); its
  result."""
  fresh = not os.path.exists(os.path.join(workdir, record.CONFIG_FILE))
  recorded = config
  if per_call:
    recorded = ml_collections.ConfigDict(
      {k: v for k, v in config.to_dict().items() if k not in per_call}
    )
  workdir = record.prepare_workdir(workdir, recorded.to_json())
  try:
    return train_and_evaluate(config, workdir)
  except (ValueError, TypeError, FileNotFoundError):
    # Refused before any work: a corrected command must not meet this
    # config as "a different config" in the workdir.
    if fresh:
      record.forget_config(workdir)
    raise


def run_launcher(script: str, config, workdir: str):
  """Launcher `script` (a path) on `config` in `workdir`, in this process,
  as its command runs it (the distributed runtime, if any, already up):
  its `train_and_evaluate`'s result."""
  module = _module(script, "_launcher_")
  return run_in_workdir(module.train_and_evaluate, config, workdir)


def load_config(script: str, variant: str):
  """Launcher `script`'s config on `variant`, as `--config=...:variant`
  gives it."""
  return _module(config_path(script), "_config_").get_config(variant)


def override(config, values: dict) -> None:
  """Sets nested `values` ({"train": {"num_epochs": 5}}) in `config`, in
  place; a key the config does not have is refused by name."""
  for key, value in values.items():
    if key not in config:
      raise ValueError(
        f"Override {key!r} is not a field of the config (fields: "
        f"{sorted(config)}); fix the key."
      )
    if isinstance(value, dict):
      override(config[key], value)
    else:
      with config.unlocked():
        config[key] = value


# Config fields (by their last key) that count things, and must be positive
# or at least zero: a negative step count would train nothing and report it.
POSITIVE_COUNTS = frozenset(
  {
    "batch_size",
    "eval_batch_size",
    "checkpoint_every",
    "log_every",
    "num_samples",
    "chunk_size",
    "num_epochs",
    "per_class",
    "per_prompt",
    "per_digit",
    "seeds",
    "victim_seeds",
    "repeats",
  }
)
COUNTS = frozenset(
  {
    "num_steps",
    "steps",
    "rounds",
    "inner_steps",
    "pgd_steps",
    "model_steps",
    "later_calls",
  }
)


def check_counts(config) -> None:
  """Fails, naming the field and the fix, on a count out of range (say
  `train.num_steps=-5`, `checkpoint_every=0`)."""
  for path, value in _leaves(config.to_dict()).items():
    key = path.rpartition(".")[2]
    if isinstance(value, bool) or not isinstance(value, int):
      continue
    if key in POSITIVE_COUNTS and value < 1:
      raise ValueError(
        f"--config.{path}={value}: {key} counts things and must be at least "
        "1; set a positive value."
      )
    if key in COUNTS and value < 0:
      raise ValueError(
        f"--config.{path}={value}: {key} must be 0 or more; set a "
        "non-negative value."
      )


def _leaves(tree, prefix: str = "") -> dict:
  """A nested dict's leaves by dotted path."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _shell_word(text: str) -> str:
  """`text` quoted for a shell, in double quotes where that reads better."""
  if shlex.quote(text) == text or any(c in text for c in '"$`\\!'):
    return shlex.quote(text)
  return f'"{text}"'


def _module(path: str, prefix: str):
  """The Python file at `path`, imported as a module (once)."""
  name = prefix + os.path.splitext(os.path.basename(path))[0]
  if name in sys.modules and sys.modules[name].__file__ == path:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def command_line(script: str, config, workdir: str) -> str:
  """The command that reruns `config`, indented as a Markdown code block.

  `script` is the launcher's path (its `__file__`); its config file is
  `config_path(script)`. Every value that differs from the variant's
  defaults is written as a `--config.` override, so a report's command
  reproduces the run it reports, not just its variant. Paths are written
  from the launcher's parent folder (the repository root).
  """
  folder, file = os.path.split(os.path.abspath(script))
  name = os.path.splitext(file)[0]
  module = _module(config_path(script), "_config_")
  defaults = _leaves(module.get_config(config.variant).to_dict())
  overrides = [
    f"--config.{key}={_shell_word(str(value))}"
    for key, value in _leaves(config.to_dict()).items()
    if key not in defaults or defaults[key] != value
  ]
  here = os.path.basename(folder)
  args = [
    f"--config={here}/configs/{name}.py:{config.variant}",
    *overrides,
    f"--workdir={_shell_word(workdir)}",
  ]
  return " \\\n".join(
    [f"    python {here}/{name}.py", *(f"      {a}" for a in args)]
  )

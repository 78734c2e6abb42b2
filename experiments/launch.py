"""What every launcher shares: absl flags, the workdir record, multi-host
start-up. A launcher module defines `train_and_evaluate(config, workdir)` and
ends with `launch.main(train_and_evaluate, __file__)`."""

import os
import sys

# Launchers run as scripts (`python experiments/x.py`); make the repository
# root importable so that configs can import each other as `experiments.*`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from aigc_jax import parallel, record  # noqa: E402


def main(train_and_evaluate, script: str) -> None:
  """Parses --config/--workdir and runs `train_and_evaluate(config, workdir)`."""
  name = os.path.splitext(os.path.basename(script))[0]
  config_flags.DEFINE_config_file(
    "config",
    os.path.join(ROOT, "experiments", "configs", f"{name}.py"),
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
    parallel.maybe_initialize_distributed(config.get("distributed", None))
    workdir = record.prepare_workdir(flags.FLAGS.workdir, config.to_json())
    train_and_evaluate(config, workdir)

  app.run(run)

"""The seed's CIFAR-10 tables at paper scale, stage by stage, within a time
budget: what makes a few minutes of one accelerator count.

  python experiments/paper_scale.py --workdir=runs/paper_scale \
    [--config=experiments/configs/paper_scale.py[:smoke]] \
    [--config.budget_seconds=780] [--config.stages="('victims', 'bench')"]

Stage `<name>` (`config.stage.<name>`) is another launcher, `experiments/
<script>` on one of its variants with the stage's overrides, run in this
process into `<workdir>/<name>/` exactly as that launcher runs alone (its
own `report.md` gives the command that reruns it alone). Stages run in the
order of `config.stages`; one whose `stage.json` is there is finished and
skipped, one that cannot get its `min_seconds` from what is left of the
budget is not started, and one that is still running when the budget ends
is interrupted at its next step (`faults.time_limit`): every launcher saves
what it has on an interrupt, so the same command resumes it. `report.md`
collects every stage's status, time and report.
"""

import json
import os
import time
import traceback

import ml_collections

from aigc_jax import faults, launch, record

HERE = os.path.dirname(os.path.abspath(__file__))
STAGE_FILE = "stage.json"  # in a stage's workdir once it has finished
# What one call does, free to change between the calls that resume a run.
PER_CALL = ("budget_seconds", "stages")


def stage_config(config, name: str, workdir: str) -> ml_collections.ConfigDict:
  """The launcher config of stage `name`: its script's variant, the stage's
  overrides, and the workdirs of the stages it reads (`from_stages`: config
  key -> stage name)."""
  stage = config.stage[name]
  c = launch.load_config(os.path.join(HERE, stage.script), stage.variant)
  launch.override(c, stage.overrides.to_dict())
  launch.override(
    c, {k: os.path.join(workdir, v) for k, v in stage.from_stages.items()}
  )
  launch.check_counts(c)
  return c


def run_stage(config, name: str, workdir: str, deadline: float) -> dict:
  """Runs stage `name` until it finishes or the deadline: its status
  ("done", "stopped", "skipped", "failed") and seconds."""
  sdir = os.path.join(workdir, name)
  finished = os.path.join(sdir, STAGE_FILE)
  if os.path.exists(finished):
    with open(finished) as f:
      return {"status": "done", **json.load(f)}
  left = deadline - time.time()
  if left < config.stage[name].min_seconds:
    return {
      "status": "skipped",
      "why": f"{max(left, 0):.0f} s of the budget left, the stage needs "
      f"{config.stage[name].min_seconds} s to start",
    }
  start = time.time()
  try:
    c = stage_config(config, name, workdir)
    script = os.path.join(HERE, config.stage[name].script)
    with faults.time_limit(left):
      launch.run_launcher(script, c, sdir)
  except faults.OutOfTime:
    return {"status": "stopped", "seconds": round(time.time() - start, 1)}
  except Exception as e:  # one stage's failure must not cost the others
    traceback.print_exc()
    return {
      "status": "failed",
      "seconds": round(time.time() - start, 1),
      "why": "".join(traceback.format_exception_only(e)).strip(),
    }
  done = {"seconds": record.run_seconds(sdir)}
  record.atomic_write(finished, lambda f: f.write(json.dumps(done).encode()))
  return {"status": "done", **done}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  unknown = set(config.stages) - set(config.stage)
  if unknown:
    raise ValueError(
      f"Unknown stages {sorted(unknown)}; choose from {sorted(config.stage)}."
    )
  deadline = time.time() + config.budget_seconds
  outcomes = {}
  for name in config.stages:
    outcomes[name] = run_stage(config, name, workdir, deadline)
  record.write_report(workdir, suite_report(config, workdir, outcomes))
  failed = [n for n, o in outcomes.items() if o["status"] == "failed"]
  if failed:
    raise RuntimeError(
      f"Stages {failed} failed (see {workdir}/report.md); fix them and run "
      "the same command: finished stages are kept."
    )
  return {n: o["status"] for n, o in outcomes.items()}


STATUS = {
  "done": "finished",
  "stopped": "stopped by the budget: run the same command to resume",
  "skipped": "not started",
  "failed": "failed",
}


def suite_report(config, workdir, outcomes) -> str:
  rows = [
    [
      name,
      f"`{config.stage[name].script}:{config.stage[name].variant}`",
      STATUS[o["status"]] + (f" ({o['why']})" if "why" in o else ""),
      o.get("seconds", "–"),
    ]
    for name, o in outcomes.items()
  ]
  parts = [
    f"""# Paper-scale suite (variant `{config.variant}`)

Command:

{launch.command_line(__file__, config, workdir)}

Budget {config.budget_seconds} s; each stage's report follows, as that
stage wrote it (`<stage>/report.md`; its command reruns the stage alone).

{record.markdown_table(["stage", "launcher", "status", "time (s)"], rows)}"""
  ]
  for name, o in outcomes.items():
    path = os.path.join(workdir, name, "report.md")
    if o["status"] == "done" and os.path.exists(path):
      with open(path) as f:
        lines = f.read().strip().splitlines()
      # The stage's headings one level down, under the stage's own.
      body = "\n".join("#" + x if x.startswith("#") else x for x in lines)
      parts.append(f"## Stage `{name}`\n\n{body}")
  return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__, per_call=PER_CALL)

"""Stable Diffusion at its real size: load, parity with PyTorch, edit and
sampling times.

  python experiments/sd14.py --workdir=runs/sd14 \
    [--config=experiments/configs/sd14.py[:smoke]] [--config.model=PATH]

Steps, each kept in the workdir once done (a resumed run skips it):
1. the model: `config.model`, or random weights of `config.architecture`
   saved as a diffusers folder in `<workdir>/model` (PyTorch classes,
   safetensors);
2. loading it through `sd.load_stable_diffusion` (timed on every call);
3. one UNet forward of the Flax model against PyTorch's, in float32;
4. UCE and RECE edits of the cross-attention projections (first call and
   the median of `later_calls` more, text encodings included);
5. a batch of classifier-free-guided DDIM samples for every dtype of
   `config.sample.dtypes`, sharded over the local devices.

See experiments/configs/sd14.py.
"""

import os
import time

import jax
import ml_collections
import numpy as np

from aigc_jax import bench, data, launch, parallel, record, sd
from aigc_jax.sd import architectures, export, parity
from aigc_jax.unlearn import recipes


def prompts(config) -> list[str]:
  """Every concept in every template."""
  return [t.format(c) for c in config.concepts for t in config.templates]


def model_folder(config, workdir: str) -> str:
  """The folder to load: `config.model`, or random weights written once."""
  if config.model:
    return config.model
  folder = os.path.join(workdir, "model")
  export.save_random_stable_diffusion(
    folder,
    architectures.architecture(config.architecture),
    prompts(config),
    seed=config.seed,
  )
  return folder


def parameter_counts(params: dict) -> dict[str, int]:
  return {
    name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    for name, tree in params.items()
  }


def edit_times(config, model, params) -> dict:
  """Seconds of each edit's first call and the median of `later_calls` more."""
  calls = [
    recipes.edited_projections(config, model, params)[1]
    for _ in range(1 + config.later_calls)
  ]
  return {
    method: {
      "first_s": calls[0][method],
      "median_s": float(np.median([c[method] for c in calls[1:]]))
      if config.later_calls
      else None,
    }
    for method in calls[0]
  }


def sampling_inputs(config, model, params, mesh) -> tuple:
  """The UNet's and VAE's parameters on every device, the batch's prompt
  embeddings split over the mesh and the empty prompt's: placed once for
  every dtype."""
  every = prompts(config)
  batch = [every[i % len(every)] for i in range(config.sample.batch_size)]
  return (
    parallel.replicate(mesh, {k: params[k] for k in ("unet", "vae")}),
    parallel.shard_batch(mesh, sd.encode_prompts(model, params, batch)),
    parallel.replicate(mesh, sd.encode_prompts(model, params, [""])),
  )


def sample_times(config, model, inputs, dtype: str, workdir: str) -> dict:
  """Seconds of one guided DDIM batch in `dtype`: the first call and the
  median of `later_calls` more; a model given by path has its grid saved."""
  model = model._replace(
    unet=model.unet.clone(dtype=dtype), vae=model.vae.clone(dtype=dtype)
  )
  s = config.sample
  sample = sd.make_sampler(model, s.num_steps, s.guidance_scale)
  key = jax.random.key(config.seed)
  times = bench.first_and_median(
    lambda: sample(*inputs, key), config.later_calls
  )
  if config.model:
    images = parallel.to_host(sample(*inputs, key))
    path = os.path.join(workdir, "samples", f"{dtype}.png")
    data.save_image_grid(path, data.to_uint8(images), ncol=s.batch_size)
  per_call = times["median_s"] or times["first_s"]
  return {
    **times,
    "images_per_s": s.batch_size / per_call,
    # Each step evaluates the UNet on both halves of the guidance.
    "unet_rows_per_s": 2 * s.batch_size * s.num_steps / per_call,
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  recipes.check_config(config)
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_size(config.sample.batch_size, mesh)
  start = time.time()
  folder = model_folder(config, workdir)
  written_s = time.time() - start
  start = time.time()
  model, params = sd.load_stable_diffusion(folder)
  load_s = time.time() - start

  def cached(part, compute):
    return record.cached_result(os.path.join(workdir, part), compute)

  gap = cached(
    "parity",
    lambda: parity.unet_gap_to_pytorch(
      model, params, folder, batch=config.parity.batch, seed=config.seed
    ),
  )
  edits = cached("edits", lambda: edit_times(config, model, params))
  inputs = sampling_inputs(config, model, params, mesh)
  sampling = {
    dtype: cached(
      f"sample_{dtype}",
      lambda d=dtype: sample_times(config, model, inputs, d, workdir),
    )
    for dtype in config.sample.dtypes
  }
  result = {
    "parameters": parameter_counts(params),
    "this_call": {"folder_s": written_s, "load_s": load_s},
    "parity": gap,
    "edits": edits,
    "sampling": sampling,
    "image_size": sd.pixel_size(model),
    "platform": jax.devices()[0].device_kind,
  }
  record.MetricWriter(workdir, prefix="eval/").write(0, record.flat(result))
  record.write_report(workdir, report(config, workdir, folder, result))
  if gap["relative_error"] > config.parity.tolerance:
    raise RuntimeError(
      f"The Flax UNet differs from PyTorch's by {gap['relative_error']:.2e} "
      f"of the largest output (tolerance {config.parity.tolerance:g}): the "
      "weights did not convert as they should; see "
      f"{workdir}/report.md."
    )
  return result


def _s(seconds) -> str:
  return "–" if seconds is None else bench.seconds_text(seconds)


def report(config, workdir, folder, r) -> str:
  n = r["parameters"]
  p = r["parity"]
  what = (
    f"`{config.model}`"
    if config.model
    else f"random weights of the `{config.architecture}` architecture "
    f"(`{folder}`)"
  )
  later = (
    f"'then': the median of {config.later_calls} calls after the first."
    if config.later_calls
    else "One call of each (`later_calls=0`): compilation included."
  )
  lines = [
    f"# Stable Diffusion at size (variant `{config.variant}`)",
    "",
    "Command:",
    "",
    launch.command_line(__file__, config, workdir),
    "",
    f"Model: {what}; parameters: UNet {n['unet'] / 1e6:.1f}M, VAE "
    f"{n['vae'] / 1e6:.1f}M, text encoder {n['text_encoder'] / 1e6:.1f}M. "
    f"Device: {r['platform']} x {jax.device_count()}. This call: folder "
    f"ready in {r['this_call']['folder_s']:.1f} s, loaded through the Flax "
    f"loaders in {r['this_call']['load_s']:.1f} s.",
    "",
    f"UNet forward, Flax against PyTorch (float32, batch {p['batch']}, "
    f"random latents, timestep and text context): max abs error "
    f"{p['max_abs_error']:.2e}, {p['relative_error']:.2e} of the largest "
    f"output (tolerance {config.parity.tolerance:g}); output RMS "
    f"{p['output_rms']:.3f}. JAX {p['jax_seconds']:.1f} s (compilation "
    f"included), PyTorch on the CPU {p['torch_seconds']:.1f} s.",
    "",
    f"Edits of the cross-attention projections (erase "
    f"{', '.join(config.erase)} toward {config.target!r}; text encodings "
    f"included). {later}",
    "",
    record.markdown_table(
      ["edit", "first call", "then"],
      [[k, _s(v["first_s"]), _s(v["median_s"])] for k, v in r["edits"].items()],
    ),
    f"Guided DDIM, {config.sample.batch_size} images of "
    f"{r['image_size']}x{r['image_size']}, "
    f"{config.sample.num_steps} steps, guidance "
    f"{config.sample.guidance_scale}, VAE decoding included. {later}",
    "",
    record.markdown_table(
      ["dtype", "first call", "then", "images/s", "UNet rows/s"],
      [
        [
          d,
          _s(v["first_s"]),
          _s(v["median_s"]),
          f"{v['images_per_s']:.3g}",
          f"{v['unet_rows_per_s']:.3g}",
        ]
        for d, v in r["sampling"].items()
      ],
    ),
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

"""Benchmarks every hot loop against its PyTorch twin, side by side.

  python experiments/bench.py --workdir=runs/bench [--config=...:gpu]

Each row times the jitted JAX function, as a user calls it, and the same
computation in PyTorch on the same inputs with the same weights
(`experiments/torch_twins.py`), in one process: both sides are warmed up,
then called alternately `repeats` times; the table gives the medians, the
PyTorch / JAX ratio (> 1: JAX is faster) and the throughput at XLA's FLOP
count of the JAX program. Then the UDP step's throughput against batch
size (both frameworks) and against the number of forced CPU devices (JAX,
batch sharded over the mesh; one subprocess per count).

The table is printed and written to the workdir (`report.md`,
`metrics.jsonl`, `result.json`).
"""

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aigc_jax import diffusion, launch, parallel, record, train, unlearn
from aigc_jax.models import ResNet18, load_lpips
from aigc_jax.models.unet import DDPMUNet
from aigc_jax.protect import budget, udp_perturbation
from aigc_jax.purify.jcdp import (
  guidance_weights,
  joint_energy,
  lpips_guidance_distance,
)
from experiments import torch_twins

CONFIG_FILE = launch.config_path(__file__)
# XLA:CPU runs a loop body several times slower than the same ops unrolled
# (see `aigc_jax.protect.pgd`); experiments/udp.py unrolls PGD on a CPU.
UNROLL = True if jax.default_backend() == "cpu" else 1
# The perturbation budget and PGD step of the UDP rows (8/255, 1/255).
EPS_255, STEP_255 = 8.0, 1.0
JCDP_T = 10  # the guided step's timestep (the released t* is 20)


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


def _torch():
  import torch

  return torch


def _nchw(x, device: str) -> Any:
  return (
    _torch()
    .from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    .to(device)
  )


def torch_device(config) -> str:
  """Where the PyTorch side runs: `config.torch_device`, else the GPU when
  JAX runs on one, else the CPU."""
  if config.torch_device:
    return config.torch_device
  on_gpu = jax.default_backend() == "gpu" and _torch().cuda.is_available()
  return "cuda" if on_gpu else "cpu"


def peak_tflops(config, precision: str) -> float | None:
  """The device's peak for `precision` ("float32" or "bfloat16"):
  `config.peak_tflops[precision]` when set, else `PEAK_TFLOPS` for JAX's
  device kind; None where neither knows it (CPUs)."""
  if config.peak_tflops[precision]:
    return float(config.peak_tflops[precision])
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


def _images(c, seed: int) -> np.ndarray:
  """A batch of `c.batch` random images in [-1, 1]."""
  shape = (c.batch, c.size, c.size, c.channels)
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@functools.cache
def _ddpm_model(
  unet_json: str, size: int, channels: int, seed: int, bf16: bool
):
  """A DDPM UNet, its parameters and its PyTorch twin, built once per
  configuration (the batch-scaling rows reuse them). `bf16`: the UNet
  computes in bfloat16 (float32 parameters, the same for both dtypes)."""
  fields = {
    k: tuple(v) if isinstance(v, list) else v
    for k, v in json.loads(unet_json).items()
  }
  unet = DDPMUNet(**fields, dtype=jnp.bfloat16 if bf16 else jnp.float32)
  x = jnp.zeros((1, size, size, channels))
  init = jax.jit(lambda k: unet.init(k, x, jnp.zeros((1,), jnp.int32)))
  params = init(jax.random.key(seed))["params"]
  twin = torch_twins.ddpm_unet_twin(unet, params, size, channels)
  twin.requires_grad_(False)
  return unet, params, twin


def _ddpm_inputs(c, seed: int, device: str):
  """`_ddpm_model` for row config `c` (its twin on `device`), and a batch
  of images."""
  unet, params, twin = _ddpm_model(
    c.unet.to_json(), c.size, c.channels, seed, c.get("bf16", False)
  )
  return unet, params, twin.to(device), _images(c, seed)


def udp_step_row(name: str, c, mesh, device: str) -> Row:
  """One PGD step of UDP / AdvDM: ∇_δ of the denoising loss through the UNet
  (`udp_perturbation` with steps=1), sign step, projection. With `c.bf16`
  the UNet computes in bfloat16 on both sides (PyTorch under autocast)."""
  torch = _torch()
  bf16 = c.get("bf16", False)
  unet, params, model, x = _ddpm_inputs(c, 0, device)
  schedule = diffusion.linear_schedule(1000)
  b = budget(EPS_255)
  step_size = STEP_255 / 127.5

  @jax.jit
  def step(params, x, delta, key):
    eps_fn = lambda xt, t: unet.apply({"params": params}, xt, t)
    return udp_perturbation(
      eps_fn,
      x,
      delta,
      key,
      schedule,
      budget=b,
      steps=1,
      step_size=step_size,
      unroll=UNROLL,  # as experiments/udp.py runs it
    )[0]

  args = parallel.shard_batch(mesh, (x, np.zeros_like(x)))
  params = parallel.replicate(mesh, params)
  key = parallel.replicate(mesh, jax.random.key(1))
  run_jax = lambda: step(params, *args, key)

  abar = torch.tensor(np.asarray(schedule.alphas_cumprod), device=device)
  x_t = _nchw(x, device)
  delta_t = torch.zeros_like(x_t)
  gen = torch.Generator(device).manual_seed(1)
  autocast = functools.partial(
    torch.autocast, device, dtype=torch.bfloat16, enabled=bf16
  )

  def run_torch():
    d = delta_t.clone().requires_grad_(True)
    x_adv = (x_t + d).clamp(-1, 1)
    n = x_t.shape[0]
    t = torch.randint(0, 1000, (n,), generator=gen, device=device)
    noise = torch.randn(x_t.shape, generator=gen, device=device)
    a = abar[t].view(-1, 1, 1, 1)
    with autocast():
      eps = model(a.sqrt() * x_adv + (1 - a).sqrt() * noise, t).sample
    loss = (noise - eps.float()).square().flatten(1).mean(1).sum()
    (grad,) = torch.autograd.grad(loss, d)
    new = (d.detach() + step_size * grad.sign()).clamp(-b.eps, b.eps)
    return (x_t + new).clamp(-1, 1) - x_t

  return Row(
    name,
    f"PGD step through the DDPM UNet ({c.size}x{c.size}x{c.channels}, "
    f"ch {c.unet.ch}, batch {c.batch}{', bfloat16' if bf16 else ''})",
    run_jax,
    run_torch,
    step,
    shapes_of(params, *args, key),
    c.batch,
    "bfloat16" if bf16 else "float32",
  )


def jcdp_step_row(name: str, c, mesh, device: str) -> Row:
  """One JCDP guided reverse step: ε̂ from the UNet, then the posterior mean
  moved by -σ² ∇(λ1 MSE + λ2 LPIPS-alex) toward the diffused reference."""
  torch = _torch()
  unet, params, model, x = _ddpm_inputs(c, 2, device)
  schedule = diffusion.linear_schedule(1000)
  lpips_vars = load_lpips("alex")
  mse_w, lpips_w = guidance_weights(
    schedule, "paper", mse_scale=1000.0, lpips_scale=100.0
  )

  @jax.jit
  def step(params, lpips_vars, protected, x_t, key):
    energy = joint_energy(
      protected,
      schedule,
      mse_w,
      lpips_w,
      lpips_guidance_distance(lpips_vars),
    )
    return diffusion.ddpm_step(
      lambda xt, t: unet.apply({"params": params}, xt, t),
      x_t,
      jnp.asarray(JCDP_T),
      key,
      schedule,
      variance="fixed_large",
      energy_fn=energy,
    )

  x_t = np.clip(x + 0.1, -1, 1)
  args = parallel.shard_batch(mesh, (x, x_t))
  params, lpips_vars = parallel.replicate(mesh, (params, lpips_vars))
  key = parallel.replicate(mesh, jax.random.key(3))
  run_jax = lambda: step(params, lpips_vars, *args, key)

  lpips_net = torch_twins.lpips_twin(lpips_vars).to(device)
  lpips_net.requires_grad_(False)
  s = {
    k: float(np.asarray(v)[JCDP_T])
    for k, v in (
      ("abar", schedule.alphas_cumprod),
      ("abar_prev", schedule.alphas_cumprod_prev),
      ("beta", schedule.step_betas),
      ("var", schedule.betas),
    )
  }
  lam1, lam2 = float(mse_w[JCDP_T]), float(lpips_w[JCDP_T])
  protected, xt0 = _nchw(x, device), _nchw(x_t, device)
  t_vec = torch.full((x.shape[0],), JCDP_T, device=device)
  gen = torch.Generator(device).manual_seed(3)

  def run_torch():
    with torch.no_grad():
      eps = model(xt0, t_vec).sample
      x0 = ((xt0 - (1 - s["abar"]) ** 0.5 * eps) / s["abar"] ** 0.5).clamp(
        -1, 1
      )
      mean = (
        s["beta"] * s["abar_prev"] ** 0.5 / (1 - s["abar"]) * x0
        + (1 - s["abar_prev"]) * (1 - s["beta"]) ** 0.5 / (1 - s["abar"]) * xt0
      )
      noise = torch.randn(protected.shape, generator=gen, device=device)
      reference = s["abar"] ** 0.5 * protected + (1 - s["abar"]) ** 0.5 * noise
    y = xt0.clone().requires_grad_(True)
    energy = lam1 * (y - reference).square().mean((1, 2, 3))
    energy = energy + lam2 * lpips_net(y, reference).flatten()
    (grad,) = torch.autograd.grad(energy.sum(), y)
    mean = mean - s["var"] * grad
    noise = torch.randn(mean.shape, generator=gen, device=device)
    return mean + s["var"] ** 0.5 * noise

  return Row(
    name,
    f"JCDP guided step, UNet + ∇ MSE + ∇ LPIPS-alex ({c.size}x{c.size}, "
    f"ch {c.unet.ch}, batch {c.batch})",
    run_jax,
    run_torch,
    step,
    shapes_of(params, lpips_vars, *args, key),
    c.batch,
  )


def resnet18_step_row(name: str, c, mesh, device: str) -> Row:
  """One SGD step of the CIFAR ResNet-18 (crop, flip, cross-entropy, SGD
  with momentum and weight decay): `train.classifier_train_step`."""
  torch = _torch()
  model = ResNet18(num_classes=10, width=c.width)
  optimizer = train.classifier_optimizer(0.1)
  shape = (c.size, c.size, 3)
  state = jax.jit(
    lambda k: train.init_classifier_state(model, optimizer, k, shape)
  )(jax.random.key(4))
  rng = np.random.default_rng(4)
  images = rng.uniform(-1, 1, (c.batch, *shape)).astype(np.float32)
  labels = rng.integers(0, 10, c.batch).astype(np.int32)
  twin = torch_twins.resnet18_twin(state.params, state.batch_stats)
  twin = twin.to(device).train()

  step = jax.jit(
    functools.partial(
      train.classifier_train_step, model=model, optimizer=optimizer
    ),
    donate_argnums=0,
  )
  state = parallel.replicate(mesh, state)
  batch = parallel.shard_batch(mesh, (images, labels))
  key = parallel.replicate(mesh, jax.random.key(5))
  abstract = shapes_of(state, *batch, key)
  holder = [state]

  def run_jax():
    holder[0], metrics = step(holder[0], *batch, key)
    return metrics

  sgd = torch.optim.SGD(
    twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4
  )
  x_t = _nchw(images, device)
  y_t = torch.from_numpy(labels).long().to(device)
  gen = torch.Generator(device).manual_seed(5)
  n, side = x_t.shape[0], torch.arange(c.size, device=device)
  batch_index = torch.arange(n, device=device)[:, None, None, None]
  channel_index = torch.arange(3, device=device)[None, :, None, None]

  def run_torch():
    # Random crop (pad 4) and flip per image, as the JAX step does: one
    # gather of each image's window, no loop over images.
    padded = torch.nn.functional.pad(x_t, (4, 4, 4, 4))
    offsets = torch.randint(0, 9, (n, 2), generator=gen, device=device)
    flips = torch.rand(n, generator=gen, device=device) < 0.5
    rows = (offsets[:, :1] + side)[:, None, :, None]
    cols = (offsets[:, 1:] + side)[:, None, None, :]
    crops = padded[batch_index, channel_index, rows, cols]
    crops = torch.where(flips[:, None, None, None], crops.flip(-1), crops)
    loss = torch.nn.functional.cross_entropy(twin(crops), y_t)
    sgd.zero_grad(set_to_none=True)
    loss.backward()
    sgd.step()
    return loss

  return Row(
    name,
    f"ResNet-18 SGD step (width {c.width}, {c.size}x{c.size}, batch {c.batch})",
    run_jax,
    run_torch,
    step,
    abstract,
    c.batch,
  )


def uce_row(name: str, c, mesh, device: str) -> Row:
  """UCE's closed-form edit of SD v1.4's 32 cross-attention projections."""
  from aigc_jax import sd  # imports diffusers: only for the rows that use it

  del mesh  # one linear solve: nothing to shard
  torch = _torch()
  rng = np.random.default_rng(6)
  emb = lambda n: rng.normal(size=(n, sd.SD14_TEXT_WIDTH)).astype(np.float32)
  kernels = {k: np.asarray(v) for k, v in sd.sd14_random_projections().items()}
  erase, target = emb(75 * c.concepts), emb(75 * c.concepts)
  preserve = emb(77 * (1 + c.preserve))
  edit = jax.jit(lambda k, e, t, p: unlearn.uce_edit(k, e, t, p, lam=0.5))
  args = jax.device_put((kernels, erase, target, preserve))
  to_t = lambda a: torch.tensor(a, device=device)
  t_args = (
    {k: to_t(v) for k, v in kernels.items()},
    to_t(erase),
    to_t(target),
    to_t(preserve),
  )
  return Row(
    name,
    f"UCE edit, 32 SD v1.4 projections, {c.concepts} concept(s), "
    f"{1 + c.preserve} preserved prompt(s)",
    lambda: edit(*args),
    lambda: torch_twins.uce_edit_twin(*t_args, lam=0.5),
    edit,
    shapes_of(*args),
    1,
  )


def sd_unet_step_row(name: str, c, mesh, device: str) -> Row:
  """One classifier-free-guided DDIM step of an SD-shaped UNet (both
  halves of the guidance in one UNet call, as `sd.guided_eps_fn` does)."""
  from aigc_jax import sd
  from aigc_jax.sd.torchvision_fallback import import_torchvision

  torch = _torch()
  import_torchvision()
  from diffusers import UNet2DConditionModel

  config = c.unet.to_dict()
  twin = UNet2DConditionModel(**config).eval()
  twin.requires_grad_(False)
  unet = sd.load.build_unet(config)
  params = sd.load.convert_diffusers_weights(
    {k: v.numpy() for k, v in twin.state_dict().items()},
    sd.load.abstract_params(unet),
    "unet",
  )
  twin = twin.to(device)
  schedule = diffusion.scaled_linear_schedule()
  rng = np.random.default_rng(7)
  size, ch = config["sample_size"], config["in_channels"]
  latents = rng.normal(size=(c.batch, ch, size, size)).astype(np.float32)
  width = config["cross_attention_dim"]
  cond = rng.normal(size=(c.batch, 77, width)).astype(np.float32)
  uncond = rng.normal(size=(1, 77, width)).astype(np.float32)
  t, t_prev, scale = 501, 481, 7.5

  @jax.jit
  def step(params, x, cond, uncond):
    context = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
    out = unet.apply(
      {"params": params},
      jnp.concatenate([x, x]),
      jnp.full((2 * x.shape[0],), t),
      context,
    ).sample
    eps_u, eps_c = jnp.split(out, 2)
    eps = eps_u + scale * (eps_c - eps_u)
    return diffusion.ddim_update(
      schedule, x, t, t_prev, eps, jnp.zeros_like(x), clip_x0=False
    )

  args = parallel.shard_batch(mesh, (latents, cond))
  params, uncond_j = parallel.replicate(mesh, (params, uncond))
  run_jax = lambda: step(params, args[0], args[1], uncond_j)

  abar = np.asarray(schedule.alphas_cumprod)
  a, a_prev = float(abar[t]), float(abar[t_prev])
  x_t = torch.from_numpy(latents).to(device)
  cond_t = torch.from_numpy(cond).to(device)
  uncond_t = torch.from_numpy(uncond).to(device)
  context_t = torch.cat([uncond_t.expand_as(cond_t), cond_t])
  t_vec = torch.full((2 * c.batch,), t, device=device)

  def run_torch():
    with torch.no_grad():
      out = twin(torch.cat([x_t, x_t]), t_vec, context_t).sample
      eps_u, eps_c = out.chunk(2)
      eps = eps_u + scale * (eps_c - eps_u)
      x0 = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
      return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

  return Row(
    name,
    f"SD-shaped UNet, guided DDIM step (channels "
    f"{tuple(config['block_out_channels'])}, {size}x{size} latents, batch "
    f"{c.batch} x 2)",
    run_jax,
    run_torch,
    step,
    shapes_of(params, args[0], args[1], uncond_j),
    c.batch,
  )


ROWS = {
  "udp_step_digits": udp_step_row,
  "udp_step_cifar10": udp_step_row,
  "udp_step_cifar10_bf16": udp_step_row,
  "jcdp_step_cifar10": jcdp_step_row,
  "resnet18_step": resnet18_step_row,
  "uce_sd14": uce_row,
  "sd_unet_step": sd_unet_step_row,
}


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


def _row_config(config, name: str, **updates):
  c = config.rows[name].copy_and_resolve_references()
  with c.unlocked():
    c.update(updates)
  return c


def batch_scaling(config, mesh, timer: Callable[[Row], dict]) -> list[dict]:
  """The scaling row's throughput at each of `scaling.batch_sizes`."""
  name = config.scaling.row
  device = torch_device(config)
  out = []
  for batch in config.scaling.batch_sizes:
    c = _row_config(config, name, batch=batch)
    out.append({"batch": batch, **timer(ROWS[name](name, c, mesh, device))})
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


def _seconds(s: float) -> str:
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
        _seconds(r["jax_s"]),
        _seconds(r["torch_s"]),
        f"{r['torch_over_jax']:.2f}x",
        f"{r['items_per_s_jax']:.1f}",
        *flops,
        _seconds(r["jax_first_call_s"]),
      ]
    )
  return record.markdown_table(header, body)


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
  text += "\n" + rows_table(result["rows"])
  if result["batch_scaling"]:
    text += f"\n## `{config.scaling.row}` against batch size\n\n"
    text += rows_table(result["batch_scaling"], "batch")
  if result["device_scaling"]:
    text += (
      f"\n## `{config.scaling.row}` against forced CPU devices "
      f"(batch {config.scaling.device_batch}, JAX data parallel)\n\n"
    )
    body = [
      [r["devices"], _seconds(r["jax_s"]), f"{r['items_per_s_jax']:.1f}"]
      for r in result["device_scaling"]
    ]
    text += record.markdown_table(["devices", "JAX", "items/s"], body)
  return text


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Times every row, then the scaling rows; writes and prints the table."""
  torch = _torch()
  if config.torch_threads:
    torch.set_num_threads(config.torch_threads)
  device = torch_device(config)
  on_gpu = device.startswith("cuda")
  tf32 = on_gpu and config.tf32
  if on_gpu:
    # JAX computes float32 matrix work as TF32 on these GPUs by default;
    # PyTorch does so for convolutions only unless told.
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if not tf32:
      jax.config.update("jax_default_matmul_precision", "float32")
  timer = lambda row: time_row(
    row,
    warmup=config.warmup,
    repeats=config.repeats,
    sync=torch.cuda.synchronize if on_gpu else lambda: None,
    peak=peak_tflops(config, row.precision),
  )
  names = [n for n in config.only.split(",") if n] or list(config.rows)
  unknown = sorted(set(names) - set(ROWS))
  if unknown:
    raise ValueError(
      f"Unknown benchmark rows {unknown}; choose from {sorted(ROWS)}."
    )
  mesh = parallel.make_mesh(config.num_devices or None)
  writer = record.MetricWriter(workdir)
  rows = []
  for name in names:
    rows.append(timer(ROWS[name](name, config.rows[name], mesh, device)))
    writer.write(len(rows), rows[-1])
    print(rows_table(rows[-1:]), flush=True)
  result = {
    "torch_version": torch.__version__,
    "torch_device": device,
    "torch_threads": torch.get_num_threads(),
    "tf32": tf32,
    "jax_devices": mesh.size,
    "rows": rows,
    "batch_scaling": batch_scaling(config, mesh, timer),
    "device_scaling": device_scaling(config, workdir),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f, indent=2)
  text = bench_report(config, workdir, result)
  record.write_report(workdir, text)
  print(text)
  return result


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

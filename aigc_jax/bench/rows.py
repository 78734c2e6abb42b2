"""The benchmark's rows: each hot loop of the library as the user calls
it, jitted, beside the same computation in PyTorch with the same weights
(`torch_twins`). A row builder takes (name, row config, mesh, PyTorch
device) and returns a `timing.Row`; `ROWS` names them.
"""

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import diffusion, parallel, train, unlearn
from aigc_jax.bench import torch_twins
from aigc_jax.bench.timing import Row, shapes_of
from aigc_jax.models import ResNet18, load_lpips
from aigc_jax.models.unet import DDPMUNet
from aigc_jax.protect import budget, default_unroll, udp_perturbation
from aigc_jax.protect import step_size as protect_step_size
from aigc_jax.purify.jcdp import (
  guidance_weights,
  joint_energy,
  lpips_guidance_distance,
)

# The perturbation budget and PGD step of the UDP rows (8/255, 1/255).
EPS_255, STEP_255 = 8.0, 1.0
JCDP_T = 10  # the guided step's timestep (the released t* is 20)


def torch_device(override: str = "") -> str:
  """Where the PyTorch side runs: `override` when set, else the GPU when
  JAX runs on one, else the CPU."""
  if override:
    return override
  on_gpu = (
    jax.default_backend() == "gpu"
    and torch_twins.torch_module().cuda.is_available()
  )
  return "cuda" if on_gpu else "cpu"


def _nchw(x, device: str) -> Any:
  return (
    torch_twins.torch_module()
    .from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    .to(device)
  )


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
  torch = torch_twins.torch_module()
  bf16 = c.get("bf16", False)
  unet, params, model, x = _ddpm_inputs(c, 0, device)
  schedule = diffusion.linear_schedule(1000)
  b = budget(EPS_255)
  step_size = protect_step_size(STEP_255)

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
      unroll=default_unroll(),  # as the UDP recipes run it
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
  torch = torch_twins.torch_module()
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
  torch = torch_twins.torch_module()
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
  # Random crop (pad 4) and flip per image, as the JAX step does.
  augment = torch_twins.crop_flip(torch, 4, True, 5, device)

  def run_torch():
    loss = torch.nn.functional.cross_entropy(twin(augment(x_t)), y_t)
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
  torch = torch_twins.torch_module()
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

  torch = torch_twins.torch_module()
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

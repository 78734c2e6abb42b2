"""Benchmarks: each hot loop in JAX beside its PyTorch twin (same weights).

Default (`cpu`): the sizes a 2-core CPU times in minutes:

  python experiments/bench.py --workdir=runs/bench

`:gpu` uses the paper-scale batches for an accelerator, and times the
paper-scale ResNet-18 victim to 93% on CIFAR-10; `:smoke` is tiny shapes and
one repeat, for tests. Each row's shapes can be overridden,
e.g. `--config.rows.resnet18_step.batch=64`.
"""

import ml_collections

from experiments.configs import train_classifier, train_ddpm
from experiments.configs.base import LOCAL_CIFAR10, base_config

# The DDPM UNets the protection and purification rows differentiate.
_DIGITS_UNET = train_ddpm.get_config("digits").model.to_dict()
_CIFAR10_UNET = dict(
  ch=128,
  ch_mult=(1, 2, 2, 2),
  num_res_blocks=2,
  attn_resolutions=(16,),
  dropout=0.0,  # the perturbation's gradient is taken in evaluation mode
  num_groups=32,
)
# A small Stable-Diffusion-shaped UNet: cross-attention down/up blocks, a
# plain bottom block, 77-token text context.
_SD_SMALL_UNET = dict(
  sample_size=16,
  in_channels=4,
  out_channels=4,
  block_out_channels=(64, 128, 128),
  layers_per_block=2,
  down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
  cross_attention_dim=128,
  attention_head_dim=8,
  norm_num_groups=32,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "cpu"
  c = base_config(variant)
  del c["data"]
  # Rows run on every local device, batch sharded over the mesh, as the
  # launchers run them: on a CPU, `launch.py` forces one XLA device per core
  # (one device leaves part of the cores idle on small convolutions).
  # `scaling.device_counts` gives the same row on 1, 2, 4 devices.
  c.num_devices = 0
  c.warmup = 2  # untimed calls of each side after the first (compile) one
  c.repeats = 7  # alternating JAX / PyTorch timed calls; medians reported
  c.torch_threads = 0  # 0: PyTorch's default (one per core)
  c.torch_device = ""  # "": the GPU when JAX runs on one, else the CPU
  # On a GPU: float32 matrix work as TF32 on both sides (JAX's default);
  # False computes it in full float32 on both.
  c.tf32 = True
  # The device's dense peak in TFLOP/s by precision, for "% of peak"; 0:
  # `aigc_jax.bench.PEAK_TFLOPS` by device kind (known GPUs), else none.
  c.peak_tflops = ml_collections.ConfigDict({"float32": 0.0, "bfloat16": 0.0})
  c.only = ""  # comma-separated row names to run; empty: every row
  c.rows = ml_collections.ConfigDict(
    {
      # UDP / AdvDM / EMN inner step: one PGD step, the denoising loss's
      # gradient through the DDPM UNet with respect to the perturbation.
      "udp_step_digits": {
        "unet": _DIGITS_UNET,
        "size": 8,
        "channels": 1,
        "batch": 64,
      },
      "udp_step_cifar10": {
        "unet": _CIFAR10_UNET,
        "size": 32,
        "channels": 3,
        "batch": 8,
      },
      # One JCDP guided reverse step: UNet, then ∇ of MSE + LPIPS-alex.
      "jcdp_step_cifar10": {
        "unet": _CIFAR10_UNET,
        "size": 32,
        "channels": 3,
        "batch": 8,
      },
      # One supervised SGD step of the CIFAR ResNet-18, crop/flip included.
      "resnet18_step": {"width": 64, "size": 32, "batch": 128},
      # UCE at SD v1.4's 32 cross-attention projections, one concept.
      "uce_sd14": {"concepts": 1, "preserve": 1},
      # One classifier-free-guided DDIM step of an SD-shaped UNet.
      "sd_unet_step": {"unet": _SD_SMALL_UNET, "batch": 4},
    }
  )
  # Throughput of the UDP step against batch size (both frameworks) and
  # against forced CPU device counts (JAX, data parallel; one process per
  # count, since the count is fixed when JAX starts).
  c.scaling = ml_collections.ConfigDict(
    {
      "row": "udp_step_digits",
      "batch_sizes": (16, 64, 256),
      "device_counts": (1, 2, 4),
      "device_batch": 256,
    }
  )
  # Time to accuracy (`aigc_jax.bench.time_to_accuracy`): the victim recipe
  # trained to `target` clean test accuracy in JAX and in PyTorch; the
  # default is the digits at width 16 on a CPU; 0 skips it.
  victim = train_classifier.get_config("digits")
  c.time_to_accuracy = ml_collections.ConfigDict(
    {
      "target": 0.9,
      "seed": 0,
      "data": victim.data,
      "model": {"name": "resnet18", "width": 16, "dtype": "float32"},
      "train": victim.train,
      "eval_batch_size": 1000,
    }
  )
  c.time_to_accuracy.train.update(num_epochs=10, batch_size=64, crop_pad=1)
  if variant == "cpu":
    pass
  elif variant == "gpu":
    # The paper-scale victim (train_classifier.FAST_CIFAR10, as
    # experiments/configs/paper_scale.py trains it) on all of the local
    # CIFAR-10 archive.
    fast = train_classifier.FAST_CIFAR10
    c.time_to_accuracy.update(
      target=0.93, eval_batch_size=fast["eval_batch_size"]
    )
    c.time_to_accuracy.data.update(
      train=LOCAL_CIFAR10 + "train_jpeg.npz",
      test=LOCAL_CIFAR10 + "test_dev.npz",
    )
    c.time_to_accuracy.model.update(width=64, **fast["model"])
    c.time_to_accuracy.train = train_classifier.get_config("cifar10").train
    c.time_to_accuracy.train.update(**fast["train"])
    c.rows.udp_step_cifar10.batch = 128
    # The same step with the UNet computing in bfloat16 on both sides.
    c.rows.udp_step_cifar10_bf16 = dict(c.rows.udp_step_cifar10, bf16=True)
    c.rows.jcdp_step_cifar10.batch = 128
    c.rows.sd_unet_step.batch = 16
    c.scaling.update(batch_sizes=(64, 256, 1024), device_counts=())
  elif variant == "smoke":
    c.num_devices = 1  # batches of 1 and 2 divide no larger mesh
    c.warmup, c.repeats = 0, 1
    tiny = dict(_DIGITS_UNET, ch=8, num_groups=4)
    c.rows.udp_step_digits.update(unet=tiny, batch=4)
    c.rows.udp_step_cifar10.update(unet=tiny, size=8, batch=2)
    c.rows.jcdp_step_cifar10.update(unet=tiny, size=32, batch=2)
    c.rows.resnet18_step.update(width=4, size=8, batch=4)
    c.rows.uce_sd14.update(concepts=1, preserve=0)
    c.rows.sd_unet_step.unet.update(
      block_out_channels=(32, 32, 32), cross_attention_dim=32, sample_size=8
    )
    c.rows.sd_unet_step.batch = 1
    c.scaling.update(batch_sizes=(2,), device_counts=(2,), device_batch=4)
    c.time_to_accuracy.target = 0.2
    c.time_to_accuracy.model.width = 4
    c.time_to_accuracy.data.limit = 128
    c.time_to_accuracy.train.update(num_epochs=2, batch_size=32)
  else:
    raise ValueError(f"Unknown variant {variant!r}; choose cpu, gpu or smoke.")
  return c

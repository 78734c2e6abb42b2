"""Times UCE and RECE at Stable Diffusion v1.4's real shapes (random weights).

SD v1.4 has 16 cross-attention blocks (down 0-2: 2 each, mid: 1, up 1-3:
3 each) whose to_k/to_v map 768-wide text embeddings to 320, 640 or 1280:
32 kernels. The edit erases `--concepts` prompts (75 token rows each, the
last word and the padding after it, as UCE's code takes them) toward " " and
preserves the empty prompt (77 rows) and `--preserve` more prompts.

  python experiments/time_closed_form.py [--concepts 1] [--preserve 0]

Prints the first call (compile + run) and the median of `--repeats` runs.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import sd, unlearn


def _time(fn, *args, repeats: int):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - start)
  return first, float(np.median(runs))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--concepts", type=int, default=1)
  parser.add_argument("--preserve", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(1)
  emb = lambda n: jnp.asarray(
    rng.normal(size=(n, sd.SD14_TEXT_WIDTH)), jnp.float32
  )
  kernels = sd.sd14_random_projections()
  erase, target = emb(75 * args.concepts), emb(75 * args.concepts)
  preserve = emb(77 * (1 + args.preserve))
  uce = jax.jit(
    lambda k, e, t, p: unlearn.uce_edit(
      k, e, t, p, lam=0.5, preserve_scale=max(0.1, 1 / (1 + args.preserve))
    )
  )
  first, median = _time(
    uce, kernels, erase, target, preserve, repeats=args.repeats
  )
  print(
    f"UCE, 32 kernels 768 -> 320/640/1280, {args.concepts} concept(s), "
    f"{1 + args.preserve} preserved prompt(s): first call {first:.2f} s, "
    f"then {median:.3f} s ({jax.devices()[0].platform}, "
    f"{os.cpu_count()} CPU threads)"
  )
  edited = uce(kernels, erase, target, preserve)
  concept = emb(77 * args.concepts).reshape(
    args.concepts, 77, sd.SD14_TEXT_WIDTH
  )
  derive = jax.jit(
    lambda e, o, c: unlearn.adversarial_embedding(e, o, c, lam=0.1)
  )
  first, median = _time(derive, edited, kernels, concept, repeats=args.repeats)
  print(
    f"RECE adversarial embedding ({args.concepts} x 77 tokens): first call "
    f"{first:.2f} s, then {median:.3f} s"
  )


if __name__ == "__main__":
  main()

"""Config-driven recipes of the protections against classifiers, with their
registry (`PROTECTIONS`: label, citation, generator, budget).

Each generator reads an experiment config's `protect` block (budget `eps`,
the generator's `model`, `learning_rate`, `grad_clip`, batch sizes, and one
block per method: `emn`, `remn`, `lsp`, `random`), `train` (the epochs and
augmentation of the generator's own training) and `seed`; see
`experiments/configs/unlearnable.py`. EMN runs on the alternation engine
(`protect.alternate`); REMN trains its generator adversarially with a fresh
δ per step, then protects every image with the final generator; LSP and
the random controls optimise nothing. CP (`generate_cp`) poisons a
contrastive learner's data (`experiments/configs/cp.py`). `protected_set`
computes a set once
and keeps it (uint8 images, labels, δ) in a workdir. Import it as
`from aigc_jax.protect import recipes` (it builds on `aigc_jax.eval`).
"""

import functools
import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from aigc_jax import data, parallel, protect, record, train
from aigc_jax.eval import classifiers, contrastive
from aigc_jax.metrics import accuracy


def _generator_config(config) -> ml_collections.ConfigDict:
  """A classifier config for the generator's own model (EMN, REMN)."""
  c = ml_collections.ConfigDict(
    {"model": config.protect.model, "train": config.train}
  )
  with c.unlocked():
    c.train = config.train.copy_and_resolve_references()
    c.train.learning_rate = config.protect.learning_rate
    c.train.grad_clip = config.protect.grad_clip
  return c


def _generator(config, train_set, mesh, salt: int, num_steps=None):
  """The generator of EMN and REMN: its model, optimiser (the config's
  `protect.model` at `protect.learning_rate`), initial state, and the keys
  of its steps and of δ's, all from (seed, salt)."""
  model, optimizer = classifiers.build_classifier(
    _generator_config(config), train_set.num_classes, num_steps
  )
  key = jax.random.fold_in(jax.random.key(config.seed), salt)
  init_key, model_key, noise_key = jax.random.split(key, 3)
  state = train.init_or_restore(
    functools.partial(
      train.init_classifier_state,
      model,
      optimizer,
      init_key,
      train_set.images.shape[1:],
    ),
    mesh,
    None,
  )
  return model, optimizer, state, model_key, noise_key


def _logits_fn(model, params, batch_stats):
  return lambda x: train.classifier_logits(model, params, batch_stats, x)


def generator_accuracy(model, state, images, labels, mesh, batch) -> float:
  """The generator's accuracy on the protected images (EMN's stopping
  rule)."""
  classifier = classifiers.Classifier(model, state.params, state.batch_stats)
  logits = classifiers.predict_logits(classifier, images, batch, mesh)
  return float(accuracy(logits, labels))


def generate_emn(config, train_set, mesh, *, classwise: bool):
  """Error-minimising noise (Huang et al. 2021, arXiv 2101.04898, Alg. 1):
  on the alternation engine, the whole set as one chunk, `model_steps`
  generator steps in training order, then `pgd_steps` descent steps of δ
  on every slice of `noise_batch_size` images, until the generator fits
  x + δ (`stop_accuracy`).

  Returns:
    δ per example in model units, and {"rounds", "train_accuracy"}.
  """
  p, e = config.protect, config.protect.emn
  x = data.to_model_range(train_set.images)
  labels = train_set.labels
  n, num_classes = len(x), train_set.num_classes
  model, optimizer, state, model_key, noise_key = _generator(
    config, train_set, mesh, 11 + classwise
  )
  b = protect.budget(p.eps)
  rep = parallel.replicated(mesh)
  # The generation loader has no augmentation (the original's).
  model_step = jax.jit(
    lambda s, batch: train.classifier_train_step(
      s,
      *batch,
      model_key,
      model=model,
      optimizer=optimizer,
      crop_pad=0,
      flip=False,
    ),
    out_shardings=(rep, rep),
    donate_argnums=0,
  )

  @jax.jit
  def perturbation_step(s, chunk, delta, k):
    logits_fn = lambda im: train.classifier_logits(
      model, s.params, s.batch_stats, im
    )
    return protect.pgd(
      protect.cross_entropy_objective(logits_fn, chunk.conditions),
      chunk.x,
      delta,
      k,
      budget=b,
      steps=e.class_pgd_steps if classwise else e.pgd_steps,
      step_size=protect.step_size(e.step_size),
      ascent=False,
      groups=chunk.groups,
      unroll=protect.default_unroll(),
    )

  fits = []
  nb = -(-min(p.noise_batch_size, n) // mesh.size) * mesh.size

  def fitted(s, protected, y):
    fits.append(generator_accuracy(model, s, protected, y, mesh, nb))
    bar.set_postfix(train_accuracy=f"{fits[-1]:.3f}")
    return fits[-1] > e.stop_accuracy

  bar = tqdm(total=e.max_rounds, desc="emn_class" if classwise else "emn")
  delta, *_ = protect.alternate(
    x,
    lambda k, shape: np.zeros(shape, np.float32),
    state,
    noise_key,
    perturbation_step=perturbation_step,
    model_step=model_step,
    schedule=protect.Schedule(
      rounds=e.max_rounds,
      inner_steps=e.model_steps,
      batch_size=p.model_batch_size,
      chunk_size=n,
      slice_size=p.noise_batch_size,
      epoch_order=True,
    ),
    mesh=mesh,
    seed=config.seed,
    conditions=labels,
    groups=labels if classwise else None,
    num_groups=num_classes,
    progress=bar.update,
    until=fitted,
  )
  bar.close()
  per_example = delta[labels] if classwise else delta
  return per_example, {"rounds": len(fits), "train_accuracy": fits[-1]}


def generate_remn(config, train_set, mesh):
  """Robust error-minimising noise (Fu et al. 2022, arXiv 2203.14533) on the
  alternation engine: one round of `model_steps` generator steps, each of
  which first finds its minibatch's δ from a random start (descent on the
  loss after a random augmentation and a PGD attack of radius
  `attack_eps`) and then takes an adversarial-training step on the
  protected minibatch; then the perturbation step finds δ for every example
  from the final generator, slice by slice.

  Returns:
    δ per example in model units, and {"rounds", "train_accuracy"}.
  """
  p, rm = config.protect, config.protect.remn
  x = data.to_model_range(train_set.images)
  labels = train_set.labels
  model, optimizer, state, model_key, noise_key = _generator(
    config, train_set, mesh, 13, rm.model_steps
  )
  b = protect.budget(p.eps)
  attack = dict(
    budget=protect.budget(rm.attack_eps),
    steps=rm.attack_steps,
    step_size=protect.step_size(rm.attack_step_size),
    unroll=protect.default_unroll(),
  )
  crop_pad, flip = config.train.crop_pad, config.train.flip

  def robust_noise(s, xb, yb, k):
    """A fresh δ for (xb, yb) against the generator `s`."""
    objective = protect.robust_objective(
      _logits_fn(model, s.params, s.batch_stats),
      yb,
      augment=lambda kk, im: train.random_crop_flip(
        kk, im, pad=crop_pad, flip=flip
      ),
      attack_budget=attack["budget"],
      attack_steps=attack["steps"],
      attack_step_size=attack["step_size"],
      num_augmentations=rm.num_augmentations,
      unroll=attack["unroll"],
    )
    start_key, pgd_key = jax.random.split(k)
    start = protect.init_perturbation(start_key, xb.shape, b, random_start=True)
    return protect.pgd(
      objective,
      xb,
      start,
      pgd_key,
      budget=b,
      steps=rm.pgd_steps,
      step_size=protect.step_size(rm.step_size),
      ascent=False,
      unroll=protect.default_unroll(),
    )

  def model_step(s, batch):
    xb, yb = batch
    # Step s's noise key, as the original draws one per generator step.
    delta, _ = robust_noise(s, xb, yb, jax.random.fold_in(noise_key, s.step))
    return train.classifier_train_step(
      s,
      protect.apply_perturbation(xb, delta),
      yb,
      model_key,
      model=model,
      optimizer=optimizer,
      crop_pad=crop_pad,
      flip=flip,
      attack=train.pgd_attack(**attack),
    )

  rep = parallel.replicated(mesh)
  bar = tqdm(total=1, desc="remn")
  delta, _, state = protect.alternate(
    x,
    lambda k, shape: np.zeros(shape, np.float32),
    state,
    noise_key,
    perturbation_step=jax.jit(
      lambda s, chunk, d, k: robust_noise(s, chunk.x, chunk.conditions, k)
    ),
    model_step=jax.jit(model_step, out_shardings=(rep, rep), donate_argnums=0),
    schedule=protect.Schedule(
      rounds=1,
      inner_steps=rm.model_steps,
      batch_size=p.model_batch_size,
      chunk_size=len(x),
      slice_size=p.noise_batch_size,
      epoch_order=True,
    ),
    mesh=mesh,
    seed=config.seed,
    conditions=labels,
    progress=bar.update,
  )
  bar.close()
  nb = -(-min(p.noise_batch_size, len(x)) // mesh.size) * mesh.size
  protected = np.clip(x + delta, -1.0, 1.0)
  acc = generator_accuracy(model, state, protected, labels, mesh, nb)
  return delta, {"rounds": rm.model_steps, "train_accuracy": acc}


def lsp_l2(config, image_shape) -> float:
  """LSP's L2 radius in [0, 255] units: config.protect.lsp.l2, or (0) ISS's
  L2 = 1.0 for 32x32x3 in [0, 1] units at the same RMS per value."""
  if config.protect.lsp.l2:
    return float(config.protect.lsp.l2)
  return 255.0 * float(np.sqrt(np.prod(image_shape) / 3072.0))


def generate_lsp(config, train_set):
  b = protect.budget(lsp_l2(config, train_set.images.shape[1:]), "l2")
  delta = protect.lsp_perturbations(
    jax.random.fold_in(jax.random.key(config.seed), 17),
    train_set.labels,
    train_set.num_classes,
    train_set.images.shape[1:],
    b,
    patch=config.protect.lsp.patch,
  )
  return np.asarray(delta), {"rounds": 0}


def generate_random(config, train_set, *, classwise: bool):
  """The controls of Huang et al.'s Table 1: noise that knows no model, ±ε
  per block of `protect.random.patch` pixels (the budget's largest
  perturbation), one per example or (`classwise`) one per class. Class-wise,
  it is the crudest shortcut of that size (the same ±ε pattern on every
  example of a class): it shows whether the victim takes any such shortcut
  over the data's own features."""
  h, w, c = train_set.images.shape[1:]
  patch = config.protect.random.patch
  count = train_set.num_classes if classwise else len(train_set.images)
  blocks = protect.random_perturbation(
    jax.random.fold_in(jax.random.key(config.seed), 19 + classwise),
    (count, -(-h // patch), -(-w // patch), c),
    protect.budget(config.protect.eps),
  )
  delta = jnp.repeat(jnp.repeat(blocks, patch, 1), patch, 2)[:, :h, :w]
  if classwise:
    delta = delta[train_set.labels]
  return np.asarray(delta), {"rounds": 0}


def protected_set(workdir, name, train_set, budget, generate):
  """The protected uint8 images of `name`, from `generate() -> (δ, info)`
  once and then read from `protections/<name>.npz`; and the generation's
  record (with the measured perturbation sizes)."""
  path = os.path.join(workdir, "protections", f"{name}.npz")
  meta_path = path.replace(".npz", ".json")
  if os.path.exists(path) and os.path.exists(meta_path):
    with open(meta_path) as m:
      return record.load_arrays(path)["images"], json.load(m)
  start = time.time()
  delta, info = generate()
  images = protect.quantize_protected(train_set.images, delta, budget)
  sizes = protect.perturbation_sizes(train_set.images, images, budget.norm)
  info = {
    **info,
    "seconds": round(time.time() - start, 1),
    "norm": budget.norm,
    "eps_255": budget.eps_255,
    "max_size_255": float(sizes.max()),
    "linf_255": float(
      protect.perturbation_sizes(train_set.images, images, "linf").max()
    ),
  }
  if jax.process_index() == 0:
    # The images first, the record of them last: a kill between the two
    # computes the protection again.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record.save_arrays(
      path,
      images=images,
      labels=train_set.labels,
      delta=images.astype(np.int16) - train_set.images,
    )
    data.noise_grid(
      path.replace(".npz", "_grid.png"),
      train_set.images,
      images,
      max(info["linf_255"], 1.0),
    )
    record.atomic_write(meta_path, lambda f: f.write(json.dumps(info).encode()))
  return images, info


def protected_sets(config, source, train_set, mesh, log=None):
  """Every protection of `config.protections` (a `PROTECTIONS` name) on
  `train_set`, each generated once into `source/protections/` and read back
  after (`protected_set`): the sets and their records, by name. `log(name,
  record)` is called for each."""
  sets, infos = {}, {}
  for name in config.protections:
    recipe = PROTECTIONS[name]
    sets[name], infos[name] = protected_set(
      source,
      name,
      train_set,
      recipe.budget(config, train_set.images.shape[1:]),
      functools.partial(recipe.generate, config, train_set, mesh),
    )
    if sets[name].shape != train_set.images.shape:
      raise ValueError(
        f"{source}/protections/{name}.npz holds images of shape "
        f"{sets[name].shape}, but the training set {config.data.train!r} "
        f"has {train_set.images.shape}: it was made from other data."
      )
    if log is not None:
      log(name, infos[name])
  return sets, infos


def generate_cp(config, train_set, mesh, *, classwise, init=None):
  """CP's min-min alternation (He et al. 2023, arXiv 2202.11202, Alg. 1) on
  the alternation engine: each round, encoder steps on views of x + δ in
  training order, then descent steps on δ through the augmentation, on
  `noise_batches` slices drawn in epoch order (0: every slice).

  Args:
    config: the experiment config (`protect`, `contrastive`, `attacker`).
    train_set: the data to poison.
    mesh: the device mesh.
    classwise: one δ per class (CP-C) or per example (CP-S).
    init: the starting δ per example (CP-S from CP-C); None: uniform in
      the budget (the original's U(−ε, ε)).

  Returns:
    δ per example in model units, and {"rounds", "final_loss"}: the mean
    objective before the last PGD step of the last round.
  """
  p = config.protect
  g = p.cp_class if classwise else p.cp_sample
  x = data.to_model_range(train_set.images)
  labels = train_set.labels
  n, num_classes = len(x), train_set.num_classes
  model, optimizer, settings = contrastive.build_learner(
    config, config.attacker, p.learning_rate
  )
  augment = contrastive.augmenter(config)
  key = jax.random.fold_in(jax.random.key(config.seed), 19 + classwise)
  init_key, model_key, noise_key, start_key = jax.random.split(key, 4)
  state = train.init_or_restore(
    contrastive.learner_init(
      config, model, optimizer, config.attacker, init_key, x.shape[1:]
    ),
    mesh,
    None,
  )
  b = protect.budget(p.eps)
  rep = parallel.replicated(mesh)
  model_step = jax.jit(
    contrastive.learner_step(config, model, optimizer, settings, model_key),
    out_shardings=(rep, rep),
    donate_argnums=0,
  )

  @jax.jit
  def perturbation_step(s, chunk, delta, k):
    objective = protect.contrastive_objective(
      lambda v1, v2: train.contrastive_losses(
        model, s, s.params, v1, v2, **settings
      )[0],
      augment,
    )
    return protect.pgd(
      objective,
      chunk.x,
      delta,
      k,
      budget=b,
      steps=g.pgd_steps,
      step_size=protect.step_size(g.step_size),
      ascent=False,
      groups=chunk.groups,
      unroll=protect.default_unroll(),
    )

  shape = (num_classes, *x.shape[1:]) if classwise else x.shape
  if init is not None:
    start = np.array(init, np.float32)
  else:
    start = np.array(
      protect.init_perturbation(start_key, shape, b, random_start=True)
    )
  bs = -(-min(p.batch_size, n) // mesh.size) * mesh.size
  bar = tqdm(total=g.rounds, desc="cp_class" if classwise else "cp_sample")
  delta, traces, _ = protect.alternate(
    x,
    lambda k, shape: start,
    state,
    noise_key,
    perturbation_step=perturbation_step,
    model_step=model_step,
    schedule=protect.Schedule(
      rounds=g.rounds,
      inner_steps=g.model_steps or data.steps_per_epoch(n, bs),
      batch_size=bs,
      chunk_size=n,
      slice_size=bs,
      random_slices=g.noise_batches,
      epoch_order=True,
    ),
    mesh=mesh,
    seed=config.seed,
    groups=labels if classwise else None,
    num_groups=num_classes,
    progress=bar.update,
  )
  bar.close()
  per_example = delta[labels] if classwise else delta
  return per_example, {
    "rounds": g.rounds,
    "final_loss": float(traces[0, -1, -1]),
  }


class Protection(NamedTuple):
  """A protection of the classifier family.

  Attributes:
    label: its name in reports.
    citation: the paper it implements.
    generate: `(config, train_set, mesh) -> (δ per example in model units,
      record)`.
    budget: `(config, image_shape) -> Budget` it is held to.
  """

  label: str
  citation: str
  generate: Callable
  budget: Callable


def _linf(config, image_shape) -> protect.Budget:
  del image_shape
  return protect.budget(config.protect.eps)


def _lsp_budget(config, image_shape) -> protect.Budget:
  return protect.budget(lsp_l2(config, image_shape), "l2")


PROTECTIONS: dict[str, Protection] = {
  "emn_sample": Protection(
    "EMN",
    "Huang et al. 2021, arXiv 2101.04898",
    functools.partial(generate_emn, classwise=False),
    _linf,
  ),
  "emn_class": Protection(
    "EMN (C)",
    "Huang et al. 2021, arXiv 2101.04898",
    functools.partial(generate_emn, classwise=True),
    _linf,
  ),
  "remn": Protection(
    "REMN", "Fu et al. 2022, arXiv 2203.14533", generate_remn, _linf
  ),
  "lsp": Protection(
    "LSP",
    "Yu et al. 2022, arXiv 2111.00898",
    lambda config, train_set, mesh: generate_lsp(config, train_set),
    _lsp_budget,
  ),
  "random_sample": Protection(
    "random",
    "Huang et al. 2021, Table 1's random noise",
    lambda config, train_set, mesh: generate_random(
      config, train_set, classwise=False
    ),
    _linf,
  ),
  "random_class": Protection(
    "random (C)",
    "Huang et al. 2021, Table 1's random noise",
    lambda config, train_set, mesh: generate_random(
      config, train_set, classwise=True
    ),
    _linf,
  ),
}
# The names of contrastive poisoning's sets (experiments/cp.py).
CP_LABELS = {"cp_class": "CP-C", "cp_sample": "CP-S"}


def label(name: str, clean: str = "clean data") -> str:
  """A set's name in reports: `clean` for "clean", a protection's label."""
  if name == "clean":
    return clean
  if name in PROTECTIONS:
    return PROTECTIONS[name].label
  return CP_LABELS[name]


def check_config(config, mesh) -> None:
  """Fails on protections not in `PROTECTIONS`, a bad budget, or batches the
  mesh does not divide, before any work."""
  for name in config.protections:
    if name not in PROTECTIONS:
      raise ValueError(
        f"Unknown protection {name!r}; choose from {tuple(PROTECTIONS)}."
      )
  protect.budget(config.protect.eps)
  for batch in (config.train.batch_size, config.protect.model_batch_size):
    parallel.check_batch_size(batch, mesh)

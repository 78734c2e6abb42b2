"""Concept erasure with UCE, RECE and MACE, scored on generated digits.

Loads a diffusers-layout folder (by default the embedded digits model in
`checkpoints/`), edits the cross-attention key/value projections with the
configured methods, samples every concept prompt from the original and each
edited model with the same noise, and scores the samples with a digit
classifier trained on real MNIST:

- Acc_e: accuracy on the erased concepts' prompts (the training captions'
  templates; lower is better);
- Acc_s: accuracy on the kept concepts' prompts, and on the look-alikes
  (erase "three", keep "eight") on their own;
- Acc_g: accuracy on held-out paraphrases of the erased concepts;
- H_o = 3 / (1/(1 − Acc_e) + 1/Acc_s + 1/(1 − Acc_g)) (MACE §5.1);
- RECE's attack success: the share of samples classified as the erased
  digit when the prompt embedding is replaced by the closed-form adversarial
  embedding derived against the edited model.

See experiments/configs/erase.py.
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aigc_jax import data, launch, parallel, record, sd
from aigc_jax.eval import classifiers
from aigc_jax.metrics import share_interval
from aigc_jax.unlearn import closed_form, mace, rece


def prompt_sets(config) -> dict[str, list[tuple[str, str]]]:
  """{"captions" | "paraphrases": [(concept, prompt), ...]}."""
  return {
    name: [(c, t.format(c)) for c in config.concepts for t in templates]
    for name, templates in (
      ("captions", config.templates),
      ("paraphrases", config.paraphrases),
    )
  }


def concept_prompts(config, concept: str) -> list[str]:
  return [t.format(concept) for t in config.templates]


def kept_prompts(config) -> list[str]:
  return [
    p
    for c in config.concepts
    if c not in config.erase
    for p in concept_prompts(config, c)
  ]


def harmonic_mean(acc_e: float, acc_s: float, acc_g: float) -> float:
  """MACE's H_o: 3 / (1/(1 − Acc_e) + 1/Acc_s + 1/(1 − Acc_g))."""
  terms = (1.0 - acc_e, acc_s, 1.0 - acc_g)
  if min(terms) <= 0:
    return 0.0
  return 3.0 / sum(1.0 / x for x in terms)


# The edits: each maps the original projections to edited ones.


def uce(config, model, params, original):
  preserve = kept_prompts(config) if config.preserve_kept else []
  prompts = [p for c in config.erase for p in concept_prompts(config, c)]
  erase_keys, target_keys, preserve_keys, scale = closed_form.uce_keys(
    model, params, prompts, [config.target] * len(prompts), preserve
  )
  if config.uce.preserve_scale >= 0:
    scale = config.uce.preserve_scale
  return closed_form.uce_edit(
    original,
    erase_keys,
    target_keys,
    preserve_keys,
    lam=config.uce.lam,
    erase_scale=config.uce.erase_scale,
    preserve_scale=scale,
  )


def preserve_rows(config, model, params) -> jax.Array:
  """All 77 rows of the empty prompt, and of the kept prompts if asked."""
  prompts = ["", *(kept_prompts(config) if config.preserve_kept else [])]
  d = model.text_encoder.config.hidden_size
  return sd.encode_prompts(model, params, prompts).reshape(-1, d)


def erased_embeddings(config, model, params) -> jax.Array:
  prompts = [p for c in config.erase for p in concept_prompts(config, c)]
  return sd.encode_prompts(model, params, prompts)


def rece_epochs(config, model, params, original, uce_kernels):
  guide = sd.encode_prompts(model, params, [config.target])[0]
  return rece.rece_edit(
    uce_kernels,
    original,
    erased_embeddings(config, model, params),
    guide,
    preserve_rows(config, model, params),
    epochs=config.rece.epochs,
    derive_lam=config.rece.derive_lam,
    edit_lam=config.rece.edit_lam,
    erase_scale=config.rece.erase_scale,
    preserve_scale=config.rece.preserve_scale,
  )


def concept_training_set(config, model, params, concept, key):
  """MACE's stage-2 data: images the original model draws for the concept
  (its latents) and masks of the concept at latent resolution."""
  n = config.mace.images_per_concept
  cond = sd.encode_prompts(
    model, params, [config.templates[0].format(concept)] * n
  )
  uncond = sd.encode_prompts(model, params, [""])
  latents = jax.jit(
    lambda unet, cond, uncond, key: sd.sample_latents(
      model,
      unet,
      cond,
      uncond,
      key,
      num_steps=config.sample.num_steps,
      guidance_scale=config.sample.guidance_scale,
    )
  )(params["unet"], cond, uncond, key)
  if config.mace.masks == "none":
    return latents, None
  if config.mace.masks != "strokes":
    raise ValueError(
      f"Unknown mask source {config.mace.masks!r}; choose strokes or none."
    )
  # A digit is its bright strokes on black: the mask is every latent cell
  # that holds a stroke pixel (a segmenter's job for real photographs).
  images = sd.decode_latents(model, params["vae"], latents)
  strokes = jnp.mean(images, axis=-1) > 0.0
  h = latents.shape[-1]
  f = strokes.shape[1] // h
  masks = strokes.reshape(n, h, f, h, f).any(axis=(2, 4))
  return latents, masks.astype(jnp.float32)


def mace_edit(config, model, params, original, key):
  """Refinement, a LoRA per concept, fusion. Returns (refined, fused,
  per-concept final LoRA losses)."""
  c = config.mace
  prompts = [p for w in config.erase for p in concept_prompts(config, w)]
  mapped = [
    t.format(c.mapping).strip() for w in config.erase for t in config.templates
  ]
  keys, mapped_keys = mace.refinement_keys(model, params, prompts, mapped)
  preserve_gram = closed_form.gram(preserve_rows(config, model, params))
  refined = mace.refine(
    original,
    jnp.asarray(keys),
    jnp.asarray(mapped_keys),
    lam=c.refine_lam,
    preserve_gram=preserve_gram,
    preserve_scale=c.preserve_scale,
  )
  refined_unet = sd.write_projections(params["unet"], refined)
  d = model.text_encoder.config.hidden_size
  tuned, concept_keys, losses = [], [], {}
  for i, word in enumerate(config.erase):
    data_key, train_key = jax.random.split(jax.random.fold_in(key, i))
    latents, masks = concept_training_set(config, model, params, word, data_key)
    word_prompts = concept_prompts(config, word)
    contexts = sd.encode_prompts(model, params, word_prompts)
    token_masks = np.stack(
      [mace.concept_token_mask(model.tokenizer, p, word) for p in word_prompts]
    )
    lora, trace = mace.train_concept_lora(
      model,
      refined_unet,
      latents,
      masks,
      contexts,
      jnp.asarray(token_masks),
      train_key,
      steps=c.lora_steps,
      learning_rate=c.lora_learning_rate,
      rank=c.lora_rank,
    )
    tuned.append(mace.merge_lora(refined, lora))
    concept_keys.append(contexts.reshape(-1, d))
    losses[word] = (float(trace[0]), float(trace[-1]))
  fused = mace.fuse(
    refined,
    tuned,
    concept_keys,
    lam=c.fuse_lam,
    original=original,
    preserve_gram=preserve_gram,
    preserve_scale=c.preserve_scale,
  )
  return refined, fused, losses


def timed(fn, *args):
  """fn(*args) and the seconds it took, outputs ready."""
  start = time.time()
  out = jax.block_until_ready(fn(*args))
  return out, time.time() - start


# Scoring.


def score_samples(config, predicted, pairs, class_of) -> dict[str, float]:
  """Per-set accuracies from predicted digits of `per_prompt` samples of
  every (concept, prompt) pair, each with its sample count (`n/<set>`)."""
  n = config.sample.per_prompt
  concepts = np.repeat([c for c, _ in pairs], n)
  correct = predicted == np.asarray([class_of[c] for c in concepts])
  kept = [c for c in config.concepts if c not in config.erase]
  sets = {
    "erased": config.erase,
    "kept": kept,
    **{f"lookalike/{c}": [c] for c in config.lookalikes},
  }
  scores = {}
  for name, members in sets.items():
    picked = np.isin(concepts, list(members))
    scores[name] = float(correct[picked].mean()) if picked.any() else np.nan
    scores[f"n/{name}"] = int(picked.sum())
  return scores


def evaluate(config, workdir, name, images, pairs, classifier, mesh, class_of):
  """Saves the grid of `images` and returns their scores (empty without a
  classifier)."""
  n = config.sample.per_prompt
  path = os.path.join(workdir, "samples", f"{name.replace(' ', '_')}.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data.save_image_grid(path, data.to_uint8(images), ncol=n)
  if classifier is None:
    return {}
  predicted = classifiers.predicted_labels(classifier, images, mesh)
  return score_samples(config, predicted, pairs, class_of)


def attack_success(config, predicted, class_of) -> dict:
  """Share of the adversarial-embedding samples classified as the erased
  concept they were derived from, and the number of samples."""
  n = config.sample.per_prompt * len(config.templates)
  wanted = np.repeat([class_of[c] for c in config.erase], n)
  return {"share": float((predicted == wanted).mean()), "n": len(wanted)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  unknown = set(config.methods) - {"uce", "rece", "mace"}
  if unknown:
    raise ValueError(
      f"Unknown methods {sorted(unknown)}; choose from uce, rece, mace."
    )
  if "rece" in config.methods and "uce" not in config.methods:
    raise ValueError("RECE starts from the UCE edit: add 'uce' to methods.")
  missing = set(config.erase) - set(config.concepts)
  if missing:
    raise ValueError(f"Erased concepts {sorted(missing)} are not in concepts.")
  model, params = sd.load_model(config.model)
  mesh = parallel.make_mesh(config.num_devices or None)
  classifier = None
  if config.eval.classifier is not None:
    classifier = classifiers.trained_classifier(
      config.eval.classifier, os.path.join(workdir, "classifier")
    )
  class_of = {c: i for i, c in enumerate(config.concepts)}

  original = sd.read_projections(params["unet"])
  edits = {"original": original}
  seconds = {}
  if "uce" in config.methods:
    edits["uce"], seconds["uce"] = timed(uce, config, model, params, original)
  if "rece" in config.methods:
    history, seconds["rece"] = timed(
      rece_epochs, config, model, params, original, edits["uce"]
    )
    for i, kernels in enumerate(history):
      edits[f"rece epoch {i + 1}"] = kernels
  if "mace" in config.methods:
    (refined, fused, lora_losses), seconds["mace"] = timed(
      mace_edit, config, model, params, original, jax.random.key(config.seed)
    )
    edits["mace refinement only"] = refined
    edits["mace"] = fused

  sample = sd.make_sampler(
    model, config.sample.num_steps, config.sample.guidance_scale
  )
  uncond = sd.encode_prompts(model, params, [""])
  key = jax.random.key(config.seed + 1)  # the same noise for every model
  n = config.sample.per_prompt

  def draw(kernels, cond):
    unet = sd.write_projections(params["unet"], kernels)
    return np.asarray(sample({**params, "unet": unet}, cond, uncond, key))

  scores = {}
  sets = prompt_sets(config)
  for set_name, pairs in sets.items():
    prompts = [p for _, p in pairs for _ in range(n)]
    cond = sd.encode_prompts(model, params, prompts)
    for name, kernels in edits.items():
      start = time.time()
      images = draw(kernels, cond)
      s = evaluate(
        config,
        workdir,
        f"{name} {set_name}",
        images,
        pairs,
        classifier,
        mesh,
        class_of,
      )
      scores.setdefault(name, {}).update(
        {f"{set_name}/{k}": v for k, v in s.items()}
      )
      seconds[f"sample {name} {set_name}"] = time.time() - start

  attacks = {}
  if "rece" in config.methods:
    concept = jnp.repeat(erased_embeddings(config, model, params), n, axis=0)
    derived = {
      name: rece.adversarial_embedding(
        edits[name], original, concept, lam=config.rece.derive_lam
      )
      for name in edits
      if name == "uce" or name.startswith("rece")
    }
    targets = [("uce", "uce")] + [
      (name, src)
      for name in edits
      if name.startswith("rece")
      for src in ("uce", name)
    ]
    for name, src in targets:
      images = draw(edits[name], derived[src])
      label = f"{name} attacked (derived against {src})"
      path = os.path.join(workdir, "samples", f"{label.replace(' ', '_')}.png")
      data.save_image_grid(path, data.to_uint8(images), ncol=n)
      if classifier is not None:
        predicted = classifiers.predicted_labels(classifier, images, mesh)
        attacks[label] = attack_success(config, predicted, class_of)

  result = {
    "scores": scores,
    "attack_success": attacks,
    "seconds": {k: round(v, 3) for k, v in seconds.items()},
    "classifier_test_accuracy": classifier and classifier.test_accuracy,
  }
  if "mace" in config.methods:
    result["mace_lora_loss_first_last"] = lora_losses
  for s in scores.values():
    if "captions/erased" in s:
      s["H_o"] = harmonic_mean(
        s["captions/erased"], s["captions/kept"], s["paraphrases/erased"]
      )
  record.MetricWriter(workdir, prefix="eval/").write(0, _flat(result))
  record.write_report(workdir, report(config, workdir, result))
  return result


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    elif v is not None:
      out[f"{prefix}{k}"] = v
  return out


def _pct(x) -> str:
  return "–" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def _share(x, n: int) -> str:
  """A share of n samples with its count and 95% Wilson interval: "15.6
  (5/32, 6.9–31.8)"; a share of few samples is coarse."""
  if x is None or np.isnan(x):
    return "–"
  hits = round(x * n)
  lo, hi = share_interval(hits, n)
  return f"{100 * x:.1f} ({hits}/{n}, {100 * lo:.1f}–{100 * hi:.1f})"


def report(config, workdir, r) -> str:
  erase = ", ".join(f'"{c}"' for c in config.erase)
  lines = [
    f"# Concept erasure (variant `{config.variant}`)",
    "",
    "Command:",
    "",
    launch.command_line(__file__, config, workdir),
    "",
    f"Model: `{config.model}`. Erased: {erase}, toward "
    f'"{config.target}". Methods: {", ".join(config.methods)}.',
    f"Samples: {config.sample.per_prompt} per prompt, DDIM "
    f"{config.sample.num_steps} steps, guidance "
    f"{config.sample.guidance_scale}, the same noise for every model.",
    "",
  ]
  if r["classifier_test_accuracy"] is None:
    lines.append(
      "No classifier for this model's concepts is available offline, so "
      "there are no accuracies; compare the sample grids in `samples/`."
    )
  else:
    look = [f"lookalike/{c}" for c in config.lookalikes]
    header = ["model", "Acc_e ↓", "Acc_s ↑", "Acc_g ↓", "H_o ↑"]
    header += [f'"{c}" (kept look-alike)' for c in config.lookalikes]
    header += ["paraphrases, kept"]
    rows = []
    for name, s in r["scores"].items():
      # "captions/erased" was scored on s["captions/n/erased"] samples.
      cell = lambda key, s=s: _share(s[key], s[key.replace("/", "/n/", 1)])
      rows.append(
        [
          name,
          cell("captions/erased"),
          cell("captions/kept"),
          cell("paraphrases/erased"),
          _pct(s["H_o"]),
          *[cell(f"captions/{k}") for k in look],
          cell("paraphrases/kept"),
        ]
      )
    lines += [
      "Accuracy (%) of a CNN trained on real MNIST "
      f"(test accuracy {100 * r['classifier_test_accuracy']:.1f}%) on the "
      "samples: Acc_e on the erased concepts' caption prompts, Acc_s on the "
      "kept concepts', Acc_g on the erased concepts' held-out paraphrases; "
      "H_o = 3 / (1/(1 − Acc_e) + 1/Acc_s + 1/(1 − Acc_g)). Each share "
      "with (correct/samples, 95% Wilson interval).",
      "",
      record.markdown_table(header, rows),
    ]
    if r["attack_success"]:
      rows = [
        [k, _share(v["share"], v["n"])] for k, v in r["attack_success"].items()
      ]
      lines += [
        "Attack success (%) of RECE's closed-form adversarial embeddings "
        "(the erased prompts' embeddings c' = argmin Σ‖c' K_edited − c "
        "K_original‖² + λ‖c'‖²): the share of their samples classified as "
        "the erased digit. The original model's Acc_e is the baseline.",
        "",
        record.markdown_table(["model", "attack success"], rows),
      ]
  rows = [[k, f"{v:.3f}"] for k, v in r["seconds"].items()]
  lines += [
    "Seconds (edits include the text encodings they need):",
    "",
    record.markdown_table(["step", "seconds"], rows),
  ]
  if "mace_lora_loss_first_last" in r:
    rows = [
      [k, f"{a:.4g}", f"{b:.4g}"]
      for k, (a, b) in r["mace_lora_loss_first_last"].items()
    ]
    lines += [
      "MACE stage 2, attention-suppression loss at the first and last step:",
      "",
      record.markdown_table(["concept", "first", "last"], rows),
    ]
  return "\n".join(lines)


if __name__ == "__main__":
  launch.main(train_and_evaluate, __file__)

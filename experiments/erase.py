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
from aigc_jax.unlearn import rece, recipes


def prompt_sets(config) -> dict[str, list[tuple[str, str]]]:
  """{"captions" | "paraphrases": [(concept, prompt), ...]}."""
  return {
    name: [(c, t.format(c)) for c in config.concepts for t in templates]
    for name, templates in (
      ("captions", config.templates),
      ("paraphrases", config.paraphrases),
    )
  }


def harmonic_mean(acc_e: float, acc_s: float, acc_g: float) -> float:
  """MACE's H_o: 3 / (1/(1 − Acc_e) + 1/Acc_s + 1/(1 − Acc_g))."""
  terms = (1.0 - acc_e, acc_s, 1.0 - acc_g)
  if min(terms) <= 0:
    return 0.0
  return 3.0 / sum(1.0 / x for x in terms)


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


def attack_success(config, predicted) -> dict:
  """Share of the adversarial-embedding samples classified as the erased
  concept they were derived from, and the number of samples."""
  n = config.sample.per_prompt * len(config.templates)
  class_of = {c: i for i, c in enumerate(config.concepts)}
  wanted = np.repeat([class_of[c] for c in config.erase], n)
  return {"share": float((predicted == wanted).mean()), "n": len(wanted)}


def sampler_of(config, model, params):
  """`draw(kernels, cond) -> images`: samples of the model with the
  projections `kernels`, the same noise for every model."""
  sample = sd.make_sampler(
    model, config.sample.num_steps, config.sample.guidance_scale
  )
  uncond = sd.encode_prompts(model, params, [""])
  key = jax.random.key(config.seed + 1)

  def draw(kernels, cond):
    unet = sd.write_projections(params["unet"], kernels)
    return np.asarray(sample({**params, "unet": unet}, cond, uncond, key))

  return draw


def score_edits(config, model, params, edits, draw, score, seconds):
  """Every edit's samples of every prompt set, scored by `score(name,
  images, pairs)`: {edit: {"<set>/<score>": value}}; sampling times go
  into `seconds`."""
  scores = {}
  n = config.sample.per_prompt
  for set_name, pairs in prompt_sets(config).items():
    prompts = [p for _, p in pairs for _ in range(n)]
    cond = sd.encode_prompts(model, params, prompts)
    for name, kernels in edits.items():
      start = time.time()
      s = score(f"{name} {set_name}", draw(kernels, cond), pairs)
      scores.setdefault(name, {}).update(
        {f"{set_name}/{k}": v for k, v in s.items()}
      )
      seconds[f"sample {name} {set_name}"] = time.time() - start
  for s in scores.values():
    if "captions/erased" in s:
      s["H_o"] = harmonic_mean(
        s["captions/erased"], s["captions/kept"], s["paraphrases/erased"]
      )
  return scores


def rece_attacks(config, workdir, model, params, edits, draw, predict):
  """RECE's closed-form adversarial embeddings, derived against UCE and
  each RECE epoch, drawn from those models: {label: attack_success}."""
  n = config.sample.per_prompt
  concept = jnp.repeat(
    recipes.erased_embeddings(config, model, params), n, axis=0
  )
  original = edits["original"]
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
  attacks = {}
  for name, src in targets:
    images = draw(edits[name], derived[src])
    label = f"{name} attacked (derived against {src})"
    path = os.path.join(workdir, "samples", f"{label.replace(' ', '_')}.png")
    data.save_image_grid(path, data.to_uint8(images), ncol=n)
    if predict is not None:
      attacks[label] = attack_success(config, predict(images))
  return attacks


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  recipes.check_config(config)
  model, params = sd.load_model(config.model)
  mesh = parallel.make_mesh(config.num_devices or None)
  classifier = predict = None
  if config.eval.classifier is not None:
    classifier = classifiers.trained_classifier(
      config.eval.classifier, os.path.join(workdir, "classifier")
    )
    predict = lambda x: classifiers.predicted_labels(classifier, x, mesh)
  class_of = {c: i for i, c in enumerate(config.concepts)}
  edits, seconds, lora_losses = recipes.edited_projections(
    config, model, params
  )
  draw = sampler_of(config, model, params)

  def score(name, images, pairs):
    path = os.path.join(workdir, "samples", f"{name.replace(' ', '_')}.png")
    data.save_image_grid(
      path, data.to_uint8(images), ncol=config.sample.per_prompt
    )
    if predict is None:
      return {}
    return score_samples(config, predict(images), pairs, class_of)

  scores = score_edits(config, model, params, edits, draw, score, seconds)
  attacks = {}
  if "rece" in config.methods:
    attacks = rece_attacks(config, workdir, model, params, edits, draw, predict)
  result = {
    "scores": scores,
    "attack_success": attacks,
    "seconds": {k: round(v, 3) for k, v in seconds.items()},
    "classifier_test_accuracy": classifier and classifier.test_accuracy,
  }
  if "mace" in config.methods:
    result["mace_lora_loss_first_last"] = lora_losses
  record.MetricWriter(workdir, prefix="eval/").write(0, record.flat(result))
  record.write_report(workdir, report(config, workdir, result))
  return result


def _pct(x) -> str:
  return "–" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def accuracy_section(config, r) -> list[str]:
  """The erasure table (Acc_e, Acc_s, Acc_g, H_o, look-alikes) and RECE's
  attack success, each share with its count and 95% interval."""
  look = [f"lookalike/{c}" for c in config.lookalikes]
  header = ["model", "Acc_e ↓", "Acc_s ↑", "Acc_g ↓", "H_o ↑"]
  header += [f'"{c}" (kept look-alike)' for c in config.lookalikes]
  header += ["paraphrases, kept"]
  rows = []
  for name, s in r["scores"].items():
    # "captions/erased" was scored on s["captions/n/erased"] samples.
    cell = lambda key, s=s: record.share_text(
      s[key], s[key.replace("/", "/n/", 1)]
    )
    rows.append(
      [name, cell("captions/erased"), cell("captions/kept")]
      + [cell("paraphrases/erased"), _pct(s["H_o"])]
      + [cell(f"captions/{k}") for k in look]
      + [cell("paraphrases/kept")]
    )
  lines = [
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
      [k, record.share_text(v["share"], v["n"])]
      for k, v in r["attack_success"].items()
    ]
    lines += [
      "Attack success (%) of RECE's closed-form adversarial embeddings "
      "(the erased prompts' embeddings c' = argmin Σ‖c' K_edited − c "
      "K_original‖² + λ‖c'‖²): the share of their samples classified as "
      "the erased digit. The original model's Acc_e is the baseline.",
      "",
      record.markdown_table(["model", "attack success"], rows),
    ]
  return lines


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
    lines += accuracy_section(config, r)
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

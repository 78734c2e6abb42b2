"""Closed-form concept editing: UCE's ridge solve and RECE's derivation, on
random kernels shaped like a small UNet's cross-attention projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PROMPTS

from aigc_jax import parallel, sd, unlearn

D = 32  # text-embedding width


def random_projections(seed: int = 0, widths=(64, 64, 128, 128, 64)):
  """{name: K (D, out)}: to_k and to_v of a few cross-attention layers."""
  rng = np.random.default_rng(seed)
  return {
    f"block_{i}/attn2/{kv}": jnp.asarray(
      rng.normal(size=(D, w)) / np.sqrt(D), jnp.float32
    )
    for i, w in enumerate(widths)
    for kv in ("to_k", "to_v")
  }


def rows(seed: int, n: int) -> jax.Array:
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=(n, D)), jnp.float32
  )


def test_uce_without_concepts_returns_the_original_kernels():
  kernels = random_projections()
  empty = jnp.zeros((0, D))
  edited = unlearn.uce_edit(
    kernels, empty, empty, rows(1, 20), lam=0.5, preserve_scale=0.1
  )
  for name, k in kernels.items():
    np.testing.assert_allclose(edited[name], k, atol=1e-5)


def test_uce_sends_each_erased_embedding_to_its_target():
  with jax.enable_x64(True):
    kernels = jax.tree.map(
      lambda k: k.astype(jnp.float64), random_projections()
    )
    erase = rows(1, 5).astype(jnp.float64)
    target = rows(2, 5).astype(jnp.float64)
    preserve = rows(3, 8).astype(jnp.float64)
    edited = unlearn.uce_edit(
      kernels, erase, target, preserve, lam=1e-9, preserve_scale=1.0
    )
    for name, k in kernels.items():
      # Erased rows land on their targets, preserved rows stay put: with
      # λ → 0 and 13 ≤ D independent rows both hold to solver precision.
      np.testing.assert_allclose(erase @ edited[name], target @ k, atol=1e-6)
      np.testing.assert_allclose(
        preserve @ edited[name], preserve @ k, atol=1e-6
      )
  # With the default λ, the edit moves erased outputs most of the way.
  kernels = random_projections()
  erase, target = rows(1, 5), rows(2, 5)
  edited = unlearn.uce_edit(kernels, erase, target, lam=0.5)
  for name, k in kernels.items():
    before = jnp.linalg.norm(erase @ k - target @ k)
    after = jnp.linalg.norm(erase @ edited[name] - target @ k)
    assert after < 0.3 * before


def test_uce_composes_with_vmap_over_lambdas_and_jit():
  kernels = random_projections()
  erase, target, preserve = rows(1, 4), rows(2, 4), rows(3, 10)
  edit = lambda lam, s_p: unlearn.uce_edit(
    kernels, erase, target, preserve, lam=lam, preserve_scale=s_p
  )
  lams = jnp.array([0.1, 0.5, 10.0])
  batched = jax.jit(jax.vmap(edit, in_axes=(0, None)))(lams, 0.1)
  for i, lam in enumerate(lams):
    one = edit(lam, 0.1)
    for name in kernels:  # batched and single solves round differently
      np.testing.assert_allclose(batched[name][i], one[name], atol=1e-4)
  # A larger λ stays closer to the original kernels.
  moved = [
    sum(float(jnp.linalg.norm(batched[n][i] - kernels[n])) for n in kernels)
    for i in range(3)
  ]
  assert moved[0] > moved[1] > moved[2]


def test_uce_is_the_same_sharded_and_on_one_device():
  kernels = random_projections()
  erase, target, preserve = rows(1, 8), rows(2, 8), rows(3, 16)
  edit = jax.jit(
    lambda k, e, t, p: unlearn.uce_edit(k, e, t, p, lam=0.5, preserve_scale=0.1)
  )
  single = edit(kernels, erase, target, preserve)
  mesh = parallel.make_mesh()
  sharded = edit(
    parallel.replicate(mesh, kernels),
    parallel.shard_batch(mesh, erase),
    parallel.shard_batch(mesh, target),
    parallel.shard_batch(mesh, preserve),
  )
  for name in kernels:
    np.testing.assert_allclose(sharded[name], single[name], atol=1e-5)


# Stable Diffusion v1.4's cross-attention: to_k and to_v of 16 layers, each
# mapping 768-wide CLIP rows to its block's width.
SD14_WIDTHS = [w for w in (320,) * 5 + (640,) * 5 + (1280,) * 6 for _ in "kv"]


def clip_like_rows(rng, n: int, d: int = 768) -> np.ndarray:
  """Rows like CLIP's last layer: norm 28, a large direction every token
  shares, and a fast-decaying spectrum around it (what makes the normal
  equations ill-conditioned at SD's shapes)."""
  shared = rng.normal(size=d)
  basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
  spread = rng.normal(size=(n, d)) * np.exp(-np.arange(d) / 60.0)
  x = 20 * shared / np.linalg.norm(shared) + spread @ basis.T
  return 28 * x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ridge_edit_in_float32_is_within_1e_4_of_the_exact_edit_at_sd_shapes():
  rng = np.random.default_rng(0)
  erase, target = clip_like_rows(rng, 40), clip_like_rows(rng, 40)
  preserve = clip_like_rows(rng, 600)
  kernels = rng.normal(size=(768, sum(SD14_WIDTHS))) / np.sqrt(768)
  lam, s_p = 0.5, 1.0
  lhs = lam * np.eye(768) + erase.T @ erase + s_p * preserve.T @ preserve
  assert np.linalg.cond(lhs) > 1e5  # the case the stacked rows are for
  # The float64 normal equations: the exact edit to float64's precision.
  exact = np.linalg.solve(
    lhs,
    lam * kernels
    + erase.T @ (target @ kernels)
    + s_p * preserve.T @ (preserve @ kernels),
  )
  split = np.cumsum(SD14_WIDTHS)[:-1]
  names = [str(i) for i in range(len(SD14_WIDTHS))]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  edited = unlearn.uce_edit(
    dict(zip(names, map(f32, np.split(kernels, split, axis=1)), strict=True)),
    f32(erase),
    f32(target),
    f32(preserve),
    lam=lam,
    preserve_scale=s_p,
  )
  got = np.concatenate([np.asarray(edited[n], np.float64) for n in names], 1)
  error = np.linalg.norm(got - exact) / np.linalg.norm(exact)
  assert error < 1e-4, error


def test_ridge_edit_from_a_gram_solves_the_same_problem():
  with jax.enable_x64(True):
    kernels = jax.tree.map(
      lambda k: k.astype(jnp.float64), random_projections()
    )
    erase, target = rows(1, 5).astype(jnp.float64), rows(2, 5)
    preserve = rows(3, 12).astype(jnp.float64)
    from_rows = unlearn.uce_edit(
      kernels,
      erase,
      target.astype(jnp.float64),
      preserve,
      lam=0.5,
      preserve_scale=0.3,
    )
    from_gram = unlearn.uce_edit(
      kernels,
      erase,
      target.astype(jnp.float64),
      lam=0.5,
      preserve_scale=0.3,
      preserve_gram=preserve.T @ preserve,
    )
    for n in kernels:
      np.testing.assert_allclose(from_gram[n], from_rows[n], rtol=1e-10)


def test_uce_refuses_unpaired_rows():
  with pytest.raises(ValueError, match="pair row by row"):
    unlearn.uce_edit(random_projections(), rows(1, 3), rows(2, 4))


def test_uce_token_blocks_align_at_the_last_word():
  old = jnp.arange(77 * 2, dtype=jnp.float32).reshape(77, 2)
  new = -old
  erase, target = unlearn.uce_token_blocks(old, 4, new, 0)
  assert erase.shape == target.shape == (73, 2)
  np.testing.assert_array_equal(erase[0], old[4])  # last word ↔ BOS
  np.testing.assert_array_equal(target[0], new[0])
  np.testing.assert_array_equal(erase[-1], old[76])


def test_rece_embedding_regenerates_the_erased_output():
  original = random_projections()
  concept = rows(1, 6).reshape(2, 3, D)  # two prompts, three tokens each
  guide = rows(2, 3)
  edited = unlearn.uce_edit(
    original,
    concept.reshape(-1, D),
    jnp.tile(guide, (2, 1)),
    rows(3, 10),
    lam=0.5,
  )
  derived = unlearn.adversarial_embedding(edited, original, concept, lam=1e-3)
  assert derived.shape == concept.shape
  gap = lambda emb: float(unlearn.output_gap(edited, emb, original, concept))
  # The erased concept no longer reaches its old outputs; c' does.
  assert gap(derived) < 0.1 * gap(concept)
  assert float(unlearn.output_gap(original, concept, original, concept)) == 0.0
  # RECE's re-erasure closes that door again, epoch after epoch.
  history = unlearn.rece_edit(
    edited, original, concept, guide, rows(3, 10), epochs=2, derive_lam=1e-3
  )
  assert len(history) == 2
  for after in history:
    again = unlearn.adversarial_embedding(after, original, concept, lam=1e-3)
    assert float(
      unlearn.output_gap(after, derived, original, concept)
    ) > 2 * gap(derived)
    assert again.shape == concept.shape


def test_mace_pairs_the_co_existing_tokens_and_the_padding():
  from aigc_jax.unlearn import mace

  # BOS a photo of [bill gates] EOS  vs  BOS a photo of [man] EOS
  old, new = mace.matching_token_positions(
    [0, 1, 2, 3, 7, 8, 9], [0, 1, 2, 3, 10, 9]
  )
  assert list(old[:5]) == [0, 1, 2, 3, 6] and list(new[:5]) == [0, 1, 2, 3, 5]
  assert list(old[5:]) == list(range(7, 77))
  assert list(new[5:]) == list(range(6, 76))


def test_mace_refinement_and_fusion_hit_their_targets():
  from aigc_jax.unlearn import mace

  with jax.enable_x64(True):
    f64 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float64), tree)
    original = f64(random_projections())
    keys, mapped = f64(rows(1, 6)), f64(rows(2, 6))
    refined = mace.refine(original, keys, mapped, lam=1e-9)
    for n, k in original.items():
      np.testing.assert_allclose(keys @ refined[n], mapped @ k, atol=1e-6)
    # Fusion keeps each concept's tuned outputs on its own prompts only.
    tuned = [f64(random_projections(seed)) for seed in (5, 6)]
    concept_keys = [f64(rows(3, 4)), f64(rows(4, 4))]
    fused = mace.fuse(refined, tuned, concept_keys, lam=1e-9)
    for n in original:
      for k, t in zip(concept_keys, tuned, strict=True):
        np.testing.assert_allclose(k @ fused[n], k @ t[n], atol=1e-6)
  # One concept whose LoRA changed nothing: fusion leaves K' as it is.
  refined = random_projections()
  fused = mace.fuse(
    refined,
    [refined],
    [rows(3, 10)],
    lam=1.0,
    preserve_gram=gram_of(rows(5, 40)),
  )
  for n, k in refined.items():
    np.testing.assert_allclose(fused[n], k, atol=1e-5)
  with pytest.raises(ValueError, match="one of each per concept"):
    mace.fuse(refined, [refined], [rows(3, 4), rows(4, 4)])
  with pytest.raises(ValueError, match="not both"):
    unlearn.ridge_edit(
      refined,
      rows(1, 2),
      {n: rows(2, 2) @ k for n, k in refined.items()},
      lam=1.0,
      preserve_keys=rows(3, 4),
      preserve_gram=gram_of(rows(3, 4)),
    )


def test_mace_refinement_weighs_preservation_as_the_original_code():
  from aigc_jax.unlearn import mace

  s = 1e-2
  assert mace.refine_preserve_weight(s, 3) == pytest.approx(s**2)
  assert mace.refine_preserve_weight(s, 3, convention="paper") == s
  assert mace.refine_preserve_weight(s, 1001) == s  # the >max_memory branch
  with pytest.raises(ValueError, match=r"original .* or paper"):
    mace.refine_preserve_weight(s, 3, convention="eq1")
  with jax.enable_x64(True):
    original = jax.tree.map(
      lambda x: x.astype(jnp.float64), random_projections()
    )
    keys, mapped = rows(1, 6).astype(float), rows(2, 6).astype(float)
    preserve = rows(3, 50).astype(float) * 30  # a large cached sum
    refined = mace.refine(
      original,
      keys,
      mapped,
      lam=0.5,
      preserve_keys=preserve,
      preserve_scale=mace.refine_preserve_weight(s, 1),
    )
    # `closed_form_refinement` in PyTorch's orientation (W = Kᵀ), with the
    # cache built as s·Σ W p pᵀ and scaled by s again inside.
    c, g, p = (np.asarray(a) for a in (keys, mapped, preserve))
    for n, k in original.items():
      w = np.asarray(k).T
      cache1, cache2 = s * (w @ p.T @ p), s * (p.T @ p)
      mat1 = 0.5 * w + (w @ g.T) @ c + s * cache1
      mat2 = 0.5 * np.eye(D) + c.T @ c + s * cache2
      np.testing.assert_allclose(
        refined[n], (mat1 @ np.linalg.inv(mat2)).T, rtol=1e-8, atol=1e-12
      )


def gram_of(x: jax.Array) -> jax.Array:
  return unlearn.gram(x)


def test_erasure_recipes_refuse_bad_configs_before_any_work():
  import ml_collections

  from aigc_jax.unlearn import recipes

  config = ml_collections.ConfigDict(
    {"methods": ("uce",), "erase": ("three",), "concepts": ("three", "eight")}
  )
  recipes.check_config(config)
  config.methods = ("uce", "esd")
  with pytest.raises(ValueError, match=r"Unknown methods.*uce, rece, mace"):
    recipes.check_config(config)
  config.methods = ("rece",)
  with pytest.raises(ValueError, match="starts from the UCE edit"):
    recipes.check_config(config)
  config.methods, config.erase = ("uce",), ("eleven",)
  with pytest.raises(ValueError, match="not in concepts"):
    recipes.check_config(config)
  config.methods, config.erase = ("uce", "mace"), ("three",)
  config.mace = {"refine_weight": "squared"}
  with pytest.raises(ValueError, match="refinement weight convention"):
    recipes.check_config(config)


# Through a (tiny, random) Stable Diffusion model: `loaded` from conftest.


def test_uce_keys_follow_the_original_code_and_edit_the_unet(loaded):
  from aigc_jax import unlearn

  model, params = loaded
  erase, target, keep, s_p = unlearn.uce_keys(
    model, params, [PROMPTS[0]], [" "], preserve=[PROMPTS[1]]
  )
  # "three" is token 4: rows 4..76 of the concept, rows 0..72 of " ".
  assert erase.shape == target.shape == (73, 32)
  concept = sd.encode_prompts(model, params, [PROMPTS[0], " "])
  np.testing.assert_allclose(erase, concept[0, 4:], atol=1e-5)
  np.testing.assert_allclose(target, concept[1, :73], atol=1e-5)
  assert keep.shape == (2 * 77, 32) and s_p == 0.5  # "" and the kept prompt
  kernels = sd.read_projections(params["unet"])
  edited = unlearn.uce_edit(
    kernels, erase, target, keep, lam=0.5, preserve_scale=s_p
  )
  unet = sd.write_projections(params["unet"], edited)
  for name, k in sd.read_projections(unet).items():
    before = jnp.linalg.norm(erase @ kernels[name] - target @ kernels[name])
    assert jnp.linalg.norm(erase @ k - target @ kernels[name]) < before
  with pytest.raises(ValueError, match="one target per erased prompt"):
    unlearn.uce_keys(model, params, [PROMPTS[0]], [" ", "art"])


def test_mace_lora_suppresses_the_concept_and_fuses(loaded):
  from aigc_jax.unlearn import mace

  model, params = loaded
  prompts = [PROMPTS[0], "a handwritten three"]
  contexts = sd.encode_prompts(model, params, prompts)
  token_masks = jnp.asarray(
    np.stack(
      [mace.concept_token_mask(model.tokenizer, p, "three") for p in prompts]
    )
  )
  assert token_masks[0, 4] == 1 and token_masks[0, 3] == 0
  assert token_masks[0, 5:].all()  # EOS and padding (use_pooler)
  latents = jax.random.normal(jax.random.key(1), (3, 4, 8, 8))
  lora, losses = jax.jit(
    lambda k: mace.train_concept_lora(
      model,
      params["unet"],
      latents,
      None,  # no segmenter: all-ones masks
      contexts,
      token_masks,
      k,
      steps=40,
      learning_rate=0.1,
      policy=None,
    )
  )(jax.random.key(2))
  assert losses.shape == (40,)
  assert float(losses[-5:].mean()) < 0.8 * float(losses[:5].mean())
  base = sd.read_projections(params["unet"])
  tuned = mace.merge_lora(base, lora)
  # Stage 1 on the co-existing words, then the fusion of this one LoRA.
  keys, mapped = mace.refinement_keys(
    model, params, [PROMPTS[0]], ["a handwritten digit"]
  )
  # BOS a handwritten digit … EOS (5 rows), then 77 - 6 padding rows.
  assert keys.shape == mapped.shape and keys.shape[0] == 5 + 71
  refined = mace.refine(base, keys, mapped, lam=1.0)
  fused = mace.fuse(refined, [tuned], [contexts.reshape(-1, 32)], lam=0.1)
  assert set(fused) == set(base)
  with pytest.raises(ValueError, match="does not contain the concept"):
    mace.concept_token_mask(model.tokenizer, PROMPTS[1], "three")

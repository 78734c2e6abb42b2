"""The Stable Diffusion bridge: PyTorch parity of the loaded models on a tiny
random checkpoint saved in diffusers' layout, the Orbax cache, the refusals,
the cross-attention projections and the sampler."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PROMPTS

from aigc_jax import parallel, sd
from aigc_jax.sd.torchvision_fallback import import_torchvision

torch = pytest.importorskip("torch")
import_torchvision()  # for diffusers' PyTorch reference models


def test_loaded_models_match_pytorch(tiny_sd, loaded):
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextModel

  model, params = loaded
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
  ctx = rng.normal(size=(2, 77, 32)).astype(np.float32)
  t = np.array([10, 500])
  unet = UNet2DConditionModel.from_pretrained(f"{tiny_sd}/unet").eval()
  with torch.no_grad():
    ref = unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample
  out = model.unet.apply({"params": params["unet"]}, x, jnp.asarray(t), ctx)
  np.testing.assert_allclose(out.sample, ref.numpy(), atol=1e-4)

  ids = sd.tokenize(model.tokenizer, PROMPTS)
  assert (
    ids.shape == (3, 77) and (ids[:, 0] == model.tokenizer.bos_token_id).all()
  )
  encoder = CLIPTextModel.from_pretrained(f"{tiny_sd}/text_encoder").eval()
  with torch.no_grad():
    ref = encoder(torch.tensor(ids, dtype=torch.long)).last_hidden_state
  out = sd.encode_prompts(model, params, PROMPTS)
  np.testing.assert_allclose(out, ref.numpy(), atol=1e-4)
  # Three prompts run padded to four (jitted), and four reuse that program.
  assert out.shape == (3, 77, 32)
  eager = sd.encode_ids(model.text_encoder, params["text_encoder"], ids)
  np.testing.assert_allclose(out, eager, atol=1e-6)
  compiled = sd.text._jitted_encode_ids._cache_size()
  sd.encode_prompts(model, params, [*PROMPTS, "a fourth prompt"])
  assert sd.text._jitted_encode_ids._cache_size() == compiled
  assert list(sd.last_word_index(model.tokenizer, PROMPTS)) == [4, 4, 0]

  vae = AutoencoderKL.from_pretrained(f"{tiny_sd}/vae").eval()
  images = rng.uniform(-1, 1, size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    mean = vae.encode(torch.tensor(images)).latent_dist.mean
    decoded = vae.decode(mean).sample.numpy()
  latents = sd.encode_images(
    model, params["vae"], np.transpose(images, (0, 2, 3, 1))
  )
  np.testing.assert_allclose(
    latents / model.scaling_factor, mean.numpy(), atol=1e-4
  )
  out = sd.decode_latents(model, params["vae"], latents)
  np.testing.assert_allclose(
    out, np.clip(np.transpose(decoded, (0, 2, 3, 1)), -1, 1), atol=1e-4
  )


def test_bin_weights_and_the_orbax_cache(tiny_sd, loaded, tmp_path):
  from diffusers import UNet2DConditionModel

  _, params = loaded
  folder = str(tmp_path / "bin")
  shutil.copytree(tiny_sd, folder)
  unet_dir = os.path.join(folder, "unet")
  unet = UNet2DConditionModel.from_pretrained(unet_dir)
  os.remove(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
  unet.save_pretrained(unet_dir, safe_serialization=False)  # a .bin pickle
  cache = str(tmp_path / "cache")
  _, from_bin = sd.load_stable_diffusion(folder, cache_dir=cache)
  _assert_trees_equal(from_bin, params)
  # A folder of configs only (what a pod ships) restores from the cache,
  # onto the sharding asked for.
  for component in ("unet", "vae", "text_encoder"):
    for name in os.listdir(os.path.join(folder, component)):
      if not name.endswith(".json"):
        os.remove(os.path.join(folder, component, name))
  mesh = parallel.make_mesh()
  _, restored = sd.load_stable_diffusion(
    folder, cache_dir=cache, sharding=parallel.replicated(mesh)
  )
  _assert_trees_equal(restored, params)
  leaf = jax.tree.leaves(restored)[0]
  assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
  with pytest.raises(FileNotFoundError, match="No weights"):
    sd.load_stable_diffusion(folder)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_configs_the_flax_unet_gets_wrong_are_refused(tmp_path):
  with pytest.raises(ValueError, match="norm_num_groups"):
    sd.check_unet_config({"norm_num_groups": 8, "act_fn": "silu"})
  sd.check_unet_config({"norm_num_groups": 32, "cross_attention_dim": 768})
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    sd.load_stable_diffusion(str(tmp_path / "no_such_model"))


def test_weights_of_another_architecture_are_refused(tiny_sd, tmp_path):
  folder = str(tmp_path / "wide")
  shutil.copytree(tiny_sd, folder)
  config_file = os.path.join(folder, "unet", "config.json")
  with open(config_file) as f:
    config = json.load(f)
  config["cross_attention_dim"] = 48
  with open(config_file, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"do not fit its config\.json"):
    sd.load_stable_diffusion(folder)


def test_projections_are_listed_read_and_written(loaded):
  _, params = loaded
  names = sd.projection_names(params["unet"])
  # Cross-attention in down block 0 (1), the mid block (1), up block 1 (2).
  assert len(names) == 8 and names[0].startswith("down_blocks_0/")
  assert names[2].startswith("mid_block/") and names[-1].endswith("to_v")
  kernels = sd.read_projections(params["unet"])
  assert all(k.shape[0] == 32 for k in kernels.values())
  doubled = {n: 2 * k for n, k in kernels.items()}
  edited = sd.write_projections(params["unet"], doubled)
  for n, k in sd.read_projections(edited).items():
    np.testing.assert_array_equal(k, doubled[n])
  # Pure: the input tree is untouched; the other parameters are shared.
  for n, k in sd.read_projections(params["unet"]).items():
    np.testing.assert_array_equal(k, kernels[n])
  with pytest.raises(KeyError, match="not a cross-attention projection"):
    sd.write_projections(params["unet"], {"conv_in": jnp.zeros((3, 3))})
  with pytest.raises(ValueError, match="pass the UNet's params"):
    sd.projection_names(params)


def test_text_to_image_is_jittable_and_the_same_sharded(loaded):
  model, params = loaded
  cond = sd.encode_prompts(model, params, PROMPTS[:2] * 2)
  uncond = sd.encode_prompts(model, params, [""])
  sample = jax.jit(
    lambda p, c, k: sd.text_to_image(model, p, c, uncond, k, num_steps=3)
  )
  key = jax.random.key(0)
  images = sample(params, cond, key)
  assert images.shape == (4, 16, 16, 3)
  assert float(jnp.abs(images).max()) <= 1.0
  mesh = parallel.make_mesh()
  sharded = sample(
    parallel.replicate(mesh, params), parallel.shard_batch(mesh, cond), key
  )
  np.testing.assert_allclose(sharded, images, atol=1e-5)
  # Guidance scale 1 is the conditional model alone.
  x = jax.random.normal(key, (4, 4, 8, 8))
  t = jnp.full((4,), 10)
  guided = jax.jit(
    lambda unet: sd.guided_eps_fn(model, unet, cond, uncond, 1.0)(x, t)
  )
  plain = jax.jit(
    lambda unet: model.unet.apply({"params": unet}, x, t, cond).sample
  )
  np.testing.assert_allclose(
    guided(params["unet"]), plain(params["unet"]), atol=1e-5
  )


def test_cross_attention_maps_are_distributions_with_gradients(loaded):
  model, params = loaded
  context = sd.encode_prompts(model, params, PROMPTS[:2])
  x = jax.random.normal(jax.random.key(0), (2, 4, 8, 8))
  t = jnp.array([100, 300])
  # Jitted: the UNet run op by op compiles every primitive on its own.
  attention_maps = jax.jit(
    lambda unet: sd.cross_attention_maps(model, unet, x, t, context)
  )
  maps = attention_maps(params["unet"])
  assert len(maps) == 4  # attn2 blocks: down 0, mid, up 1 (2)
  for a in maps.values():
    assert a.shape[0] == 2 and a.shape[1] == 8 and a.shape[3] == 77
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
  name = sd.projection_names(params["unet"])[0]  # down block 0's to_k

  def first_token_attention(kernel):
    unet = sd.write_projections(params["unet"], {name: kernel})
    maps = sd.cross_attention_maps(model, unet, x, t, context)
    return sum(a[..., 1].sum() for a in maps.values())

  grad = jax.jit(jax.grad(first_token_attention))(
    sd.read_projections(params["unet"])[name]
  )
  assert float(jnp.abs(grad).max()) > 0


def test_saved_parameters_load_back_unchanged(tiny_sd, loaded, tmp_path):
  from transformers import CLIPTextConfig

  from aigc_jax.sd.export import save_stable_diffusion
  from aigc_jax.sd.load import read_config, read_scheduler_config

  model, params = loaded
  # A visible change, so that the test cannot pass by re-reading tiny_sd.
  params = jax.tree.map(lambda x: x + 0.5, params)
  out = str(tmp_path / "saved")
  save_stable_diffusion(
    out,
    params,
    unet_config=read_config(f"{tiny_sd}/unet"),
    vae_config=read_config(f"{tiny_sd}/vae"),
    text_encoder_config=CLIPTextConfig.from_pretrained(
      f"{tiny_sd}/text_encoder"
    ),
    tokenizer=model.tokenizer,
    scheduler_config=read_scheduler_config(f"{tiny_sd}/scheduler"),
  )
  again, reloaded = sd.load_stable_diffusion(out)
  _assert_trees_equal(reloaded, params)
  assert again.tokenizer.get_vocab() == model.tokenizer.get_vocab()
  assert again.steps_offset == model.steps_offset


def test_udp_through_the_vae_raises_the_latent_denoising_loss(loaded):
  from aigc_jax import protect

  model, params = loaded
  context = sd.encode_prompts(model, params, [PROMPTS[0]] * 2)
  eps_fn = lambda z, t: (
    model.unet.apply({"params": params["unet"]}, z, t, context).sample
  )
  encode = lambda x: sd.encode_images(model, params["vae"], x)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1)
  b = protect.budget(8)
  delta = jax.jit(
    lambda x: protect.udp_perturbation(
      eps_fn,
      x,
      jnp.zeros_like(x),
      jax.random.key(1),
      model.schedule,
      budget=b,
      steps=4,
      step_size=b.eps / 2,
      num_draws=4,
      encode=encode,
    )[0]
  )(x)
  assert delta.shape == x.shape and float(jnp.abs(delta).max()) <= b.eps + 1e-6
  # The gradient reaches the pixels through the encoder and ascends the
  # latent loss (fixed draws of t and ε; the random UNet is nearly flat, so
  # the check is first order rather than "PGD beats no PGD").
  objective = protect.denoising_objective(
    eps_fn, model.schedule, num_draws=8, encode=encode
  )
  # One program for both points: value_and_grad (its gradient unused at
  # the second) compiles once where a loss and a grad compile twice.
  loss_and_grad = jax.jit(
    jax.value_and_grad(lambda x: objective(x, jax.random.key(9)).sum())
  )
  loss, grad = loss_and_grad(x)
  assert float(jnp.abs(grad).max()) > 0
  assert float(loss_and_grad(x + 1e-3 * jnp.sign(grad))[0]) > float(loss)


def test_the_embedded_digits_model_loads_and_samples():
  """checkpoints/t2i_digits/model, what erase.py and udp.py:sd use, loads as
  any Stable Diffusion folder does and draws images."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  folder = os.path.join(root, "checkpoints", "t2i_digits", "model")
  model, params = sd.load_stable_diffusion(folder)
  assert len(sd.projection_names(params["unet"])) == 4 * 2
  for word in ("three", "eight"):  # each caption word is one token
    assert len(model.tokenizer(word, add_special_tokens=False).input_ids) == 1
  prompts = ["a handwritten digit three", "the digit eight"]
  cond = sd.encode_prompts(model, params, prompts)
  uncond = sd.encode_prompts(model, params, [""])
  images = jax.jit(
    lambda p, c: sd.text_to_image(
      model, p, c, uncond, jax.random.key(0), num_steps=2
    )
  )(params, cond)
  assert images.shape == (2, 32, 32, 1)
  assert np.isfinite(np.asarray(images)).all()

"""Prompts -> CLIP token ids -> the text embeddings the UNet attends to.

SD v1.x conditions on the text encoder's `last_hidden_state` (after the
final layer norm) over all 77 positions, computed without an attention mask:
padding positions carry the pad id (`<|endoftext|>` for SD v1.x) and get
distinct causal embeddings, which the closed-form edits use.
"""

import jax
import numpy as np


def tokenize(tokenizer, prompts: list[str] | tuple[str, ...]) -> np.ndarray:
  """Token ids (n, model_max_length), padded to full length as SD does."""
  return np.asarray(
    tokenizer(
      list(prompts),
      padding="max_length",
      max_length=tokenizer.model_max_length,
      truncation=True,
      return_tensors="np",
    ).input_ids,
    np.int32,
  )


def last_word_index(tokenizer, prompts: list[str] | tuple[str, ...]):
  """Index of each prompt's last word token; 0 (BOS) for an empty prompt.

  UCE's `attention_mask.sum() - 2`: the unpadded length minus BOS and EOS.
  """
  lengths = [len(tokenizer(p).input_ids) for p in prompts]
  return np.asarray([n - 2 for n in lengths], np.int32)


def encode_ids(text_encoder, params, ids: jax.Array) -> jax.Array:
  """`last_hidden_state` (n, 77, width) of token ids; pure, jittable."""
  return text_encoder(ids, params=params).last_hidden_state


_jitted_encode_ids = jax.jit(encode_ids, static_argnums=0)


def encode_prompts(model, params: dict, prompts) -> jax.Array:
  """Text embeddings (n, 77, width) of prompts with a loaded Stable Diffusion.

  Jitted, with the prompts padded to a power-of-two count: run op by op,
  the encoder compiled each of its operations for every new prompt count
  (hundreds of small compilations, about 30 s of the text-to-image ->
  erase -> udp test); this way a run compiles it once per bucket. Rows do
  not attend to each other, so the padding rows change no result.

  Args:
    model: a `StableDiffusion` from `load_stable_diffusion`.
    params: its parameters (the "text_encoder" entry is used).
    prompts: strings.
  """
  ids = tokenize(model.tokenizer, prompts)
  n = len(ids)
  bucket = 1 << max(n - 1, 0).bit_length()
  padded = np.concatenate([ids, np.repeat(ids[:1], bucket - n, axis=0)])
  out = _jitted_encode_ids(model.text_encoder, params["text_encoder"], padded)
  return out[:n]

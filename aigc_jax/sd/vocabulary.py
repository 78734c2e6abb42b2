"""A CLIP tokenizer for a small caption vocabulary, saved in SD's layout.

CLIP's tokenizer is byte-level BPE over lower-cased words with `</w>` ending
each word, `<|startoftext|>` and `<|endoftext|>` around the text and (SD
v1.x) `<|endoftext|>` as padding. The vocabulary here is learned by BPE on a
caption corpus until every word of it is a single token, so a small text
encoder sees whole words; any other text still tokenizes, byte by byte.
"""

import json
import os
import shutil

import jax

from aigc_jax import parallel

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def write_clip_tokenizer(
  corpus: list[str], directory: str, *, model_max_length: int = 77
):
  """Learns a BPE vocabulary on `corpus` and saves a `CLIPTokenizer` there.

  Args:
    corpus: captions; every word in them becomes one token.
    directory: the `tokenizer/` folder to write (vocab.json, merges.txt,
      tokenizer_config.json, special_tokens_map.json); written whole by
      process 0 of a multi-process job, read by every process.
    model_max_length: the padded length (77 in SD).

  Returns:
    The `CLIPTokenizer` read back from `directory`. A folder written before
    (a resumed run) is read as it is: the BPE trainer breaks ties between
    equally frequent pairs differently from process to process, and a text
    encoder trained with one vocabulary must keep it. Token ids are
    assigned in sorted order of the tokens, so two fresh runs agree on
    every id; the order of tied merges, which can only change how text
    outside the corpus splits, may still differ.
  """
  from transformers import CLIPTokenizer

  held = os.path.exists(os.path.join(directory, "tokenizer_config.json"))
  # Every process has looked before process 0 writes: all take one branch.
  parallel.sync_processes(f"tokenizer held {directory}")
  if not held:
    # Process 0 learns it into a temporary folder and moves that into
    # place; the other processes of a job read what it wrote.
    if jax.process_index() == 0:
      tmp = f"{directory}.tmp{os.getpid()}"
      shutil.rmtree(tmp, ignore_errors=True)
      _learn_tokenizer(corpus, tmp, model_max_length)
      shutil.rmtree(directory, ignore_errors=True)
      os.replace(tmp, directory)
    parallel.sync_processes(f"tokenizer {directory}")
  return CLIPTokenizer.from_pretrained(directory)


def _learn_tokenizer(corpus, directory, model_max_length) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import CLIPTokenizer
  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  alphabet = list(bytes_to_unicode().values())
  bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  bpe.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(
    vocab_size=1_000_000,  # merge until no pair is left: whole words
    min_frequency=1,
    initial_alphabet=alphabet,
    end_of_word_suffix="</w>",
    show_progress=False,
  )
  bpe.train_from_iterator([c.lower() for c in corpus], trainer)
  os.makedirs(directory)
  vocab_file, merges_file = bpe.model.save(directory)
  with open(vocab_file) as f:
    vocab = json.load(f)
  # Every byte, also as a word end, so that any text has a tokenization.
  for token in [*alphabet, *(a + "</w>" for a in alphabet), BOS, EOS]:
    vocab.setdefault(token, len(vocab))
  vocab = {token: i for i, token in enumerate(sorted(vocab))}
  with open(vocab_file, "w") as f:
    json.dump(vocab, f)
  tokenizer = CLIPTokenizer(
    vocab_file,
    merges_file,
    pad_token=EOS,
    model_max_length=model_max_length,
  )
  tokenizer.save_pretrained(directory)

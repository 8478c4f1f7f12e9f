"""Tokenizers: raw bytes (vocabulary 256) or a byte-level BPE trained locally on the corpus.

The BPE is GPT-2 style: ``ByteLevel`` pre-tokenization (the GPT-2 regex split on whitespace and
letter / digit / punctuation runs, each byte mapped to one printable character), no normalizer and
no special tokens, with all 256 bytes in the initial alphabet, so any Unicode text round-trips
exactly. Because the split keeps a leading space with the word after it, ``encode(a) + encode(" "
+ b) == encode(a + " " + b)`` when ``a`` ends in a non-space and ``b`` starts with a word.

A BPE is trained once per (corpus key, settings) and cached as ``tokenizers`` JSON under
``${PMEM_CACHE:-~/.cache/pmem}/tokenizers/`` (:func:`pmem.data.corpus.cached`: an entry for other
settings, or a damaged one, is retrained with one warning).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from pmem.core.registry import suggest
from pmem.data.corpus import cache_dir, cached

KINDS = ("byte", "bpe")
BPE_RECIPE = "byte-level-bpe/1"  # bump when the training recipe changes (invalidates caches)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  kind: str = "byte"  # "byte" (vocabulary 256, id = byte value) | "bpe"
  vocab_size: int = 8192  # bpe only


class Tokenizer(Protocol):
  vocab_size: int
  fingerprint: str  # identifies the mapping (keys caches of token ids)
  token_bytes: np.ndarray  # int32 [vocab_size]: UTF-8 bytes of each token (for bits per byte)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """int32 token ids of each text."""

  def decode(self, ids) -> str:
    """The text of token ids (invalid UTF-8 replaced)."""

  def token_strings(self) -> list[str]:
    """The raw vocabulary string of each id (byte-level characters, as the BPE vocabulary spells them)."""


class ByteTokenizer:
  """Token id = UTF-8 byte value."""

  vocab_size = 256
  fingerprint = "byte"

  def __init__(self):
    self.token_bytes = np.ones(256, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in texts]

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.uint8)).decode("utf-8", errors="replace")

  def token_strings(self) -> list[str]:
    # GPT-2's byte -> printable character map (the ByteLevel alphabet), in byte order
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


class BPETokenizer:
  """A byte-level BPE ``tokenizers.Tokenizer``."""

  def __init__(self, tok: tokenizers.Tokenizer):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size()
    self.fingerprint = "bpe-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    # ByteLevel writes each byte as one character of its alphabet, so a token's length in
    # characters is its length in bytes.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    self.token_bytes = np.zeros(self.vocab_size, np.int32)
    for token, i in tok.get_vocab().items():
      if not set(token) <= alphabet:
        raise ValueError(f"token {token!r} is not byte-level")
      self.token_bytes[i] = len(token)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch_fast(texts)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids])

  def token_strings(self) -> list[str]:
    return [self.tok.id_to_token(i) for i in range(self.vocab_size)]


def train_bpe(texts, vocab_size: int) -> tokenizers.Tokenizer:
  """A byte-level BPE with ``vocab_size`` tokens (at most) trained on the strings ``texts``."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def build(cfg: TokenizerConfig, texts: Callable[[], list[str]], key: str) -> Tokenizer:
  """The tokenizer of ``cfg``. A BPE is loaded from the cache by (``key``, settings), or trained
  on ``texts()`` (called only then) and cached; ``key`` identifies the texts (corpus checksum)."""
  if cfg.kind == "byte":
    return ByteTokenizer()
  if cfg.kind != "bpe":
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}{suggest(cfg.kind, KINDS)} "
                     f"(known: {', '.join(KINDS)})")
  if cfg.vocab_size < 256:
    raise ValueError(f"a byte-level BPE needs vocab_size >= 256, got {cfg.vocab_size}")
  settings = f"{key}\n{BPE_RECIPE} vocab_size={cfg.vocab_size}"
  path = cache_dir() / "tokenizers" / f"{hashlib.sha256(settings.encode()).hexdigest()[:16]}.cache"
  return cached(path, settings, lambda: train_bpe(texts(), cfg.vocab_size).to_str().encode(),
                lambda b: BPETokenizer(tokenizers.Tokenizer.from_str(b.decode())))

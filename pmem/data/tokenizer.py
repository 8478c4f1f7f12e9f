"""Tokenizers: raw bytes (vocabulary 256), a byte-level BPE trained locally on the corpus, or a
Hugging Face ``tokenizer.json`` file (kind ``hf``, e.g. an imported model's: ``experiments.convert``).

The BPE is GPT-2 style: ``ByteLevel`` pre-tokenization (the GPT-2 regex split on whitespace and
letter / digit / punctuation runs, each byte mapped to one printable character), no normalizer and
no special tokens, with all 256 bytes in the initial alphabet, so any Unicode text round-trips
exactly. Because the split keeps a leading space with the word after it, ``encode(a) + encode(" "
+ b) == encode(a + " " + b)`` when ``a`` ends in a non-space and ``b`` starts with a word.

A BPE is trained once per (corpus key, settings) and cached as ``tokenizers`` JSON under
``${PMEM_CACHE:-~/.cache/pmem}/tokenizers/`` (:func:`pmem.data.corpus.cached`: an entry for other
settings, or a damaged one, is retrained with one warning).

A ``tokenizer.json`` is loaded through ``tokenizers`` as it is (its normalizer, pre-tokenizer,
post-processor: a BOS a template adds is in every encoded document); its fingerprint is the file's
content hash. Bits per byte count each token's UTF-8 bytes: a byte-level vocabulary (a ``ByteLevel``
decoder) one byte per character, else the token's text with ``▁`` as a space and ``<0xNN>`` one
byte; special tokens none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from typing import Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from pmem.core.registry import suggest
from pmem.data.corpus import cache_dir, cached

KINDS = ("byte", "bpe", "hf")
BPE_RECIPE = "byte-level-bpe/1"  # bump when the training recipe changes (invalidates caches)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  kind: str = "byte"  # "byte" (vocabulary 256, id = byte value) | "bpe" | "hf"
  vocab_size: int = 8192  # bpe only
  path: str | None = None  # hf only: a tokenizer.json


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


def token_bytes(tok: tokenizers.Tokenizer) -> np.ndarray:
  """int32 [vocab]: the UTF-8 bytes of each token's text (module docstring)."""
  byte_level = '"ByteLevel"' in json.dumps(json.loads(tok.to_str()).get("decoder"))
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
  out = np.zeros(tok.get_vocab_size(), np.int32)
  for token, i in tok.get_vocab().items():
    if token in special:
      continue
    if byte_level:
      if not set(token) <= alphabet:
        raise ValueError(f"token {token!r} is not byte-level")
      out[i] = len(token)  # ByteLevel writes each byte as one character of its alphabet
    else:
      out[i] = 1 if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) else len(token.replace("\u2581", " ").encode())
  return out


class BPETokenizer:
  """A ``tokenizers.Tokenizer``: a byte-level BPE trained here, or a loaded ``tokenizer.json``
  (``fingerprint`` given: its content hash)."""

  def __init__(self, tok: tokenizers.Tokenizer, fingerprint: str | None = None):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size()
    self.fingerprint = fingerprint or "bpe-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    self.token_bytes = token_bytes(tok)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch_fast(texts)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids])

  def token_strings(self) -> list[str]:
    return [self.tok.id_to_token(i) for i in range(self.vocab_size)]


def load_json(path: str) -> BPETokenizer:
  """A Hugging Face ``tokenizer.json``, fingerprinted by its contents."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise FileNotFoundError(f"cannot read the tokenizer {path} ({e.strerror})") from None
  try:
    tok = tokenizers.Tokenizer.from_str(data.decode())
  except Exception as e:  # tokenizers raises its own Exception type
    raise ValueError(f"{path} is not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from None
  return BPETokenizer(tok, "hf-" + hashlib.sha256(data).hexdigest()[:16])


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
  if cfg.kind == "hf":
    if not cfg.path:
      raise ValueError("data.tokenizer.kind='hf' needs data.tokenizer.path (a tokenizer.json)")
    return load_json(cfg.path)
  if cfg.kind != "bpe":
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}{suggest(cfg.kind, KINDS)} "
                     f"(known: {', '.join(KINDS)})")
  if cfg.vocab_size < 256:
    raise ValueError(f"a byte-level BPE needs vocab_size >= 256, got {cfg.vocab_size}")
  settings = f"{key}\n{BPE_RECIPE} vocab_size={cfg.vocab_size}"
  path = cache_dir() / "tokenizers" / f"{hashlib.sha256(settings.encode()).hexdigest()[:16]}.cache"
  return cached(path, settings, lambda: train_bpe(texts(), cfg.vocab_size).to_str().encode(),
                lambda b: BPETokenizer(tokenizers.Tokenizer.from_str(b.decode())))

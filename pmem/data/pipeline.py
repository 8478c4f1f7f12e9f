"""The Grain input pipeline: token documents -> packed ``[T + 1]`` windows -> weighted mixture -> rows.

Every source is an endless sequence of *epochs*; epoch ``e`` is a list of token documents
(tokens, target mask) in an order drawn from ``(seed, source, e)``. Packed sources concatenate an
epoch's documents and cut it into windows of ``T + 1`` tokens (stride ``T``, so every token is a
target once), visited in a shuffled order; unpacked sources (MQAR, passkey) put one document per
row, padded. Windows carry ``segment_ids`` (one per document piece, from 1; padding is 0) and
``positions`` restarting at 0, so attention, n-gram hashing and convolutions never cross
documents; ``loss_mask`` keeps targets inside their document that the source marks for the loss.

Sources are random-access ``grain.MapDataset``s mixed by ``MapDataset.mix``; global example
``step * B + r`` is row ``r`` of step ``step``, so a batch depends only on (config, seed, step) and
each process builds only the rows its devices hold. The per-process stream of steps is a Grain
``DatasetIterator`` whose state is saved in checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import sys
import threading
from collections.abc import Callable, Sequence

import grain
import numpy as np

from pmem.data import corpus as corpus_lib, tokenizer as tok_lib
from pmem.data.tasks import bios as bios_lib, mqar as mqar_lib, passkey as passkey_lib

Doc = tuple[np.ndarray, np.ndarray]  # (tokens int32 [L], target mask bool [L]: tokens[i] is in the loss)
FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpus: str | None = "english"  # pmem.data.corpus.CORPORA, or None for tasks only
  corpus_weight: float = 1.0  # 0: the corpus is held out only (valid bpb, e.g. forgetting while fine-tuning)
  tokenizer: tok_lib.TokenizerConfig = tok_lib.TokenizerConfig()
  bios: bios_lib.BiosConfig | None = None
  mqar: mqar_lib.MqarConfig | None = None
  passkey: passkey_lib.PasskeyConfig | None = None
  prefetch: int = 2  # batches built ahead by Grain threads


def has_text(cfg: DataConfig) -> bool:
  """Whether the data holds text (the corpus or a text task), so a tokenizer."""
  return cfg.corpus is not None or cfg.bios is not None or cfg.passkey is not None


def _rng(seed: int, *keys) -> np.random.Generator:
  tag = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little") if isinstance(k, str) else k
         for k in keys]
  return np.random.default_rng([seed, *tag])


# ----------------------------------------------------------------------------------- documents


def encode_segments(tok: tok_lib.Tokenizer, docs: Sequence[Sequence[tuple[str, bool]]]) -> list[Doc]:
  """Token documents from text documents given as (text, in_loss) segments (one batch encode)."""
  flat = [text for d in docs for text, _ in d]
  ids = tok.encode_batch(flat) if flat else []
  out, i = [], 0
  for d in docs:
    parts = ids[i:i + len(d)]
    i += len(d)
    out.append((np.concatenate(parts).astype(np.int32),
                np.concatenate([np.full(len(p), m, bool) for p, (_, m) in zip(parts, d)])))
  return out


class CorpusDocs:
  """The corpus split's documents, tokenized once and cached on disk by (corpus, tokenizer)
  (:func:`pmem.data.corpus.cached`: verified on every read, rebuilt when damaged)."""

  def __init__(self, name: str, split: str, tok: tok_lib.Tokenizer):
    def encode() -> bytes:
      ids = tok.encode_batch([d.text for d in corpus_lib.documents(name, split)])
      out = io.BytesIO()
      np.savez(out, tokens=np.concatenate(ids).astype(np.int32), lengths=np.array([len(x) for x in ids], np.int64))
      return out.getvalue()

    def load(b: bytes) -> tuple[np.ndarray, np.ndarray]:
      z = np.load(io.BytesIO(b))
      return z["tokens"], z["lengths"]

    key = f"{name}|{split}|{corpus_lib.checksum(name, split)}|{tok.fingerprint}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = corpus_lib.cache_dir() / "tokens" / f"{name}-{split}-{digest}.cache"
    flat, lengths = corpus_lib.cached(path, key, encode, load)
    self.docs = [(x, np.ones(len(x), bool)) for x in np.split(flat, np.cumsum(lengths)[:-1])]

  def __call__(self, epoch: int) -> list[Doc]:
    return self.docs


def task_docs(task, split: str, tok: tok_lib.Tokenizer | None) -> Callable[[int], list[Doc]]:
  """Epoch -> this split's documents of a generated task (re-rendered every epoch)."""
  if tok is None:  # token-level task (MQAR): a fixed example set, revisited every epoch
    n = task.num_examples(split)
    fixed = functools.cache(lambda: [(x["tokens"], x["mask"]) for x in map(functools.partial(task.example, split), range(n))])
    return lambda epoch: fixed()
  n = task.num_documents(split)
  return lambda epoch: encode_segments(tok, [task.document(split, i, epoch) for i in range(n)])


# -------------------------------------------------------------------------------------- windows


def window_fields(tokens: np.ndarray, doc: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """Model inputs from ``[N, T + 1]`` tokens, document ids (< 0 = padding) and target masks."""
  n, t1 = tokens.shape
  pad = doc < 0
  seg = 1 + np.cumsum(np.diff(doc, axis=1, prepend=doc[:, :1]) != 0, axis=1).astype(np.int32)
  seg[pad] = 0
  idx = np.broadcast_to(np.arange(t1), (n, t1))
  first = np.maximum.accumulate(np.where(np.diff(seg, axis=1, prepend=-1) != 0, idx, 0), axis=1)
  same = (seg[:, 1:] == seg[:, :-1]) & ~pad[:, 1:]
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1],
          "positions": (idx - first)[:, :-1].astype(np.int32),
          "loss_mask": (same & mask[:, 1:]).astype(np.float32)}


def pad_rows(docs: Sequence[Doc], t1: int, name: str):
  """One document per row, padded to ``t1`` tokens: (tokens, document id or -1, target mask)."""
  long = max(len(x) for x, _ in docs)
  if long > t1:
    raise ValueError(f"{name!r} has a {long}-token document but rows hold train.seq_len + 1 = {t1} "
                     "tokens; raise train.seq_len or shorten the task")
  tok = np.zeros((len(docs), t1), np.int32)
  doc = np.full((len(docs), t1), -1, np.int32)
  mask = np.zeros((len(docs), t1), bool)
  for i, (x, m) in enumerate(docs):
    tok[i, :len(x)], doc[i, :len(x)], mask[i, :len(x)] = x, i, m
  return tok, doc, mask


class Windows(Sequence):
  """Random-access windows of an endless (``epochs=None``) or one-epoch source.

  Item ``i`` lies in the epoch whose cumulative window count passes ``i``; epochs are built lazily
  (documents ordered by ``(seed, name, e)``, windows visited in a shuffled order unless
  ``shuffle=False``) and the two most recent are kept. Thread-safe for Grain's reader threads.
  """

  def __init__(self, docs: Callable[[int], list[Doc]], seq_len: int, seed: int, name: str, *,
               pack: bool, shuffle: bool = True, epochs: int | None = None):
    self.docs, self.t, self.seed, self.name = docs, seq_len, seed, name
    self.pack, self.shuffle, self.epochs = pack, shuffle, epochs
    self.counts: list[int] = []  # windows per epoch, built in order
    self.lock = threading.Lock()
    self._epoch = functools.lru_cache(maxsize=2)(self._build)

  def _build(self, e: int):
    docs = self.docs(e)
    order = _rng(self.seed, self.name, "docs", e).permutation(len(docs)) if self.shuffle else range(len(docs))
    docs = [docs[i] for i in order]
    t1 = self.t + 1
    if not self.pack:
      return pad_rows(docs, t1, self.name), np.arange(len(docs))
    tok = np.concatenate([x for x, _ in docs])
    doc = np.repeat(np.arange(len(docs), dtype=np.int32), [len(x) for x, _ in docs])
    mask = np.concatenate([m for _, m in docs])
    n = (len(tok) - 1) // self.t
    if n < 1:
      raise ValueError(f"data source {self.name!r} has {len(tok)} tokens per epoch, fewer than seq_len + 1")
    order = _rng(self.seed, self.name, "windows", e).permutation(n) if self.shuffle else np.arange(n)
    return (tok, doc, mask), order

  def _count(self, e: int) -> int:
    while len(self.counts) <= e:
      self.counts.append(len(self._epoch(len(self.counts))[1]))
    return self.counts[e]

  def __len__(self) -> int:
    return sys.maxsize if self.epochs is None else sum(self._count(e) for e in range(self.epochs))

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return self.rows([i])

  def rows(self, items: Sequence[int]) -> dict[str, np.ndarray]:
    with self.lock:
      out = [self._row(int(i)) for i in items]
    return window_fields(*(np.stack(z) for z in zip(*out)))

  def _row(self, i: int):
    e = 0
    while i >= self._count(e):
      i -= self.counts[e]
      e += 1
      if self.epochs is not None and e >= self.epochs:
        raise IndexError(f"window index past the end of {self.name!r}")
    (tok, doc, mask), order = self._epoch(e)
    w = int(order[i])
    if not self.pack:
      return tok[w], doc[w], mask[w]
    s = slice(w * self.t, w * self.t + self.t + 1)
    return tok[s], doc[s], mask[s]


# ------------------------------------------------------------------------------------- pipeline


class Pipeline:
  """The configured mixture for one run: tokenizer, training rows by step, held-out sources."""

  def __init__(self, cfg: DataConfig, seq_len: int, batch_size: int, seed: int):
    self.cfg, self.t, self.b, self.seed = cfg, seq_len, batch_size, seed
    self.tasks = {k: cls(c) for k, cls, c in (("bios", bios_lib.Bios, cfg.bios), ("mqar", mqar_lib.Mqar, cfg.mqar),
                                               ("passkey", passkey_lib.Passkey, cfg.passkey)) if c is not None}
    if (cfg.corpus is None or cfg.corpus_weight == 0) and not self.tasks:
      raise ValueError("data has no training source: set data.corpus (with data.corpus_weight > 0) or configure "
                       "a task (data.bios/mqar/passkey)")
    self.tokenizer = tok_lib.build(cfg.tokenizer, self._tokenizer_texts, self._tokenizer_key()) \
        if has_text(cfg) else None
    self.vocab = max(([self.tokenizer.vocab_size] if self.tokenizer else []) +
                     ([cfg.mqar.vocab_size] if cfg.mqar else []))
    parts, weights = [], []
    if cfg.corpus is not None and cfg.corpus_weight > 0:
      parts.append(Windows(CorpusDocs(cfg.corpus, "train", self.tokenizer), seq_len, seed, "corpus", pack=True))
      weights.append(cfg.corpus_weight)
    for k, task in self.tasks.items():
      tok = None if k == "mqar" else self.tokenizer
      parts.append(Windows(task_docs(task, "train", tok), seq_len, seed, k, pack=k == "bios"))
      weights.append(getattr(cfg, k).weight)
    if min(weights) <= 0:
      raise ValueError(f"data source weights must be > 0, got {weights}")
    srcs = [grain.MapDataset.source(p) for p in parts]
    self.examples = srcs[0] if len(srcs) == 1 else grain.MapDataset.mix(srcs, weights)

  def _tokenizer_key(self) -> str:
    c = self.cfg
    text_tasks = {k: dataclasses.asdict(getattr(c, k)) for k in ("bios", "passkey") if getattr(c, k)}
    corpus = corpus_lib.checksum(c.corpus, "train") if c.corpus else ""
    return hashlib.sha256(f"{corpus}|{sorted(text_tasks.items())}".encode()).hexdigest()

  def _tokenizer_texts(self) -> list[str]:
    """What the BPE is trained on: the corpus train split and each text task's epoch-0 train text."""
    texts = [d.text for d in corpus_lib.documents(self.cfg.corpus, "train")] if self.cfg.corpus else []
    for k, task in self.tasks.items():
      if k != "mqar":
        texts += ["".join(s for s, _ in task.document("train", i, 0)) for i in range(task.num_documents("train"))]
    return texts

  def rows(self, step: int, rows: Sequence[int]) -> dict[str, np.ndarray]:
    """Rows ``rows`` of the global batch of ``step``."""
    ex = [self.examples[step * self.b + int(r)] for r in rows]
    return {k: np.concatenate([e[k] for e in ex]) for k in FIELDS}

  def iterator(self, rows: Sequence[int], steps: int,
               transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None) -> grain.DatasetIterator:
    """This process's rows of steps ``0..steps-1`` as a checkpointable Grain iterator (prefetched
    by threads); ``transform`` (e.g. the model's host-computed fields) runs in those threads;
    restore a position with ``it.set_state(state)``."""
    rows = list(rows)
    ds = grain.MapDataset.range(steps).map(lambda s: self.rows(s, rows))
    if transform is not None:
      ds = ds.map(transform)
    opts = grain.ReadOptions(num_threads=max(self.cfg.prefetch, 0), prefetch_buffer_size=max(self.cfg.prefetch, 0))
    return iter(ds.to_iter_dataset(opts))

  def valid_windows(self) -> Windows:
    """The corpus's held-out documents, packed in order, one pass."""
    docs = CorpusDocs(self.cfg.corpus, "valid", self.tokenizer)
    return Windows(docs, self.t, self.seed, "valid", pack=True, shuffle=False, epochs=1)

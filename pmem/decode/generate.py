"""Generation: a jitted prefill, then decoding over the decoder's cache on the device or one call per token.

**Batches.** Prompts of different lengths are *left*-padded to the longest, rounded up to a
multiple of ``PAD_TO`` where ``max_len`` allows (``P``, so prompts of similar lengths share one
compiled prefill): every row's
last prompt token sits in column ``P − 1``, so one scalar cache index serves all rows. Padding
has ``segment_ids = 0`` (no mixer lets it reach a real token, ``pmem.core.mixer``) and every row's
positions start at 0 at its first real token, so a row's logits do not depend on the others.
The cache holds ``max_len`` tokens per row (``P + max_new_tokens <= max_len``, checked before
anything runs); a model with a sliding window keeps a ring of ``window`` slots instead.

**Decoding model.** The generator decodes with :func:`pmem.models.decoder.unstack`'s copy of the
model (scanned layers as separate blocks, sliced once per :meth:`Generator.set_model`): the same
function, without a layer scan slicing every layer's weights and cache at each token. Its variables
(``nnx.state`` of that copy: parameters and tables) are the generator's ``params``; ``state`` is a
mixer's decode state, ``cache`` the decoder's pytree of them.

**The decode loop.** Decode calls have fixed shapes (``[B, 1]`` tokens) and are compiled once per
``(B, P, max_len)`` before the clock starts; the cache is donated on accelerators only (on XLA:CPU
donation made the demo's step 3x slower, 9.6 vs 3.1 ms). Where the model has neither host features
nor host tables, the loop runs **on the device** (:meth:`Generator._run`): a ``lax.while_loop`` of
up to ``DEVICE_STEPS`` steps per call, each feeding its sampled token to the next and stopping once
every row has sampled ``eos_id``; the host reads the tokens between calls. Otherwise there is **one
call per token**: the host reads the sampled token, computes the next token's host features
(Engram's hashes, from the last ``host_history`` tokens: the training-time function, so the ids
are the training ones bit for bit) and, for **host-resident tables**, stages the rows of that
token for every layer at once (``pmem.core.variables.stage_rows``: one gather per table, all
stacked layers). The step reads them through the same staged lookups as training
(``pmem.memory.lookup.Tap``), so host-table decode equals device-table decode (one call per
token) bit for bit. The rows of token ``t + 1`` depend on the token step ``t`` samples, so their
gather runs between steps (it cannot be issued earlier without guessing the token); what
overlaps the device is the host's bookkeeping of step ``t`` (stop flags, outputs). Both loops run
the same step function and draw token ``n`` with ``fold_in(key(seed), n)``: they give the same
tokens, and log-probabilities equal to float32 rounding (``tests/test_decode.py``).

**Stopping.** A row stops at ``eos_id`` (kept in its output) or after ``max_new_tokens``; the loop
ends when every row has stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from pmem.core import mixer, rules, variables
from pmem.core.mixer import TokenContext
from pmem.decode.sample import Sampling, sample
from pmem.layers.embed import trusted_ids
from pmem.memory import lookup
from pmem.models.decoder import unstack


PAD_TO = 16  # prompts are left-padded to a multiple of this (where max_len allows): one prefill per bucket
DEVICE_STEPS = 32  # decode steps per device call when the loop runs on the device


@dataclasses.dataclass
class Generation:
  """Per row: the new tokens (``eos_id`` included when reached) and their log-probabilities; decode
  throughput (new tokens of all rows per second of the decode loop) and the prefill's seconds."""
  tokens: list[np.ndarray]
  logprobs: list[np.ndarray]
  tokens_per_s: float
  prefill_s: float
  decode_steps: int


def to_host(params: nnx.State, select=lambda name, v: v.get_metadata().get("index") is not None
            ) -> tuple[nnx.State, dict[str, np.ndarray]]:
  """``(params, tables)``: the token-indexed tables ``select`` picks moved to host NumPy arrays,
  each leaving a one-row placeholder ``[..., 1, D]`` in ``params`` (as host-resident training)."""
  tables = variables.tables_of(params, select)
  arrays = {n: np.asarray(jax.device_get(v.get_value())) for n, (_, v) in tables.items()}
  holders = {n: jnp.zeros((*a.shape[:-2], 1, a.shape[-1]), a.dtype) for n, a in arrays.items()}
  return nnx.merge_state(params, variables.with_values(tables, holders)), arrays


class Generator:
  """Generation with ``model`` (a :class:`pmem.models.decoder.Decoder`); ``tokenizer``: the one the
  model's host features need (Engram) and :meth:`text` decodes with; ``host_tables``: tables that
  live in host memory (their variables in ``model`` hold placeholders, :func:`to_host`); ``mesh``:
  shard parameters, batch and cache by the logical-axis rules table; ``device_loop``: run the
  decode loop on the device (default: when the model has neither host features nor host tables,
  whose inputs the host computes per token; ``False``: one device call per token)."""

  def __init__(self, model: nnx.Module, tokenizer=None, *, max_len: int,
               host_tables: Mapping[str, np.ndarray] | None = None, mesh: jax.sharding.Mesh | None = None,
               device_loop: bool | None = None):
    self.cfg, self.max_len, self.tokenizer, self.mesh = model.cfg, max_len, tokenizer, mesh
    self.features = mixer.batch_features(model, tokenizer)
    self.history = mixer.feature_history(model)
    self.source = nnx.graphdef(model)
    self.host = host_tables if host_tables is not None else {}  # not copied: a trainer's tables as they train
    tables = variables.tables_of(nnx.state(model), lambda name, v: name in self.host)
    if set(tables) != set(self.host):
      raise ValueError(f"host_tables {sorted(set(self.host) - set(tables))} are not MemoryTables of the model")
    self.index = {n: v.get_metadata().get("index") for n, (_, v) in tables.items()}
    if None in self.index.values():
      raise ValueError("a host table needs index= metadata (the batch field it is read with)")
    per_token = self.features is not None or bool(self.host)
    if device_loop and per_token:
      raise ValueError("device_loop=True needs a model without host features (Engram) or host tables: "
                       "the host computes their inputs per token")
    self.device_loop = not per_token if device_loop is None else device_loop
    decoding, sources = unstack(model)
    self.graphdef = nnx.graphdef(decoding)
    # the decoding model's host tables: (the host table, its layer if stacked)
    self.taps = {name: src for name, src in sources.items() if src[0] in self.host}
    self._compiled: dict = {}
    self._set(decoding)

  def set_model(self, model: nnx.Module) -> None:
    """Generate with ``model``'s current variables (same structure as the model given at
    construction: the compiled steps are kept; host-table contents are read at every step)."""
    if nnx.graphdef(model) != self.source:
      raise ValueError("set_model needs a model of the structure this Generator was built for")
    self._set(unstack(model)[0])

  def _set(self, decoding: nnx.Module) -> None:
    params = nnx.state(decoding)
    if self.mesh is not None:  # rows need not divide the mesh: jit places uneven shards
      params = jax.jit(lambda p: p, out_shardings=rules.param_shardings(self.mesh, params))(params)
    self.params = params

  # ------------------------------------------------------------------------------- device

  def _step(self, sampling: Sampling, params, staged, ids, pos, seg, feats, cache, key, n):
    """Logits of the last column → (token, logprob, cache); draws with ``fold_in(key, n)``."""
    if staged:
      tables = variables.tables_of(params, lambda name, v: name in self.taps)
      taps = {}
      for name, (host, j) in self.taps.items():
        r = staged[host] if j is None else jax.tree.map(lambda a: a[j], staged[host])
        taps[name] = lookup.Tap(r["rows"], r["slots"], (), name, self.host[host].shape[-2], r["rows"].ndim - 2)
      params = nnx.merge_state(params, variables.with_values(tables, taps))
    model = nnx.merge(self.graphdef, params)
    with trusted_ids(), lookup.reads(record=True):  # ids checked on the host; staged reads, no probes
      logits, cache = model(ids, TokenContext(ids, pos, seg, feats), cache=cache)
    tok, lp = sample(logits[:, -1], jax.random.fold_in(key, n), sampling)
    return tok, lp, cache

  def _run(self, sampling: Sampling, params, tok, pos, done, cache, key, n, count, eos):
    """Up to ``count <= DEVICE_STEPS`` decode steps on the device, each fed the token the one before
    sampled (``tok``, at positions ``pos``: ``[B, 1]``, token ``n`` first), stopping once every row
    is ``done`` (has sampled ``eos``; -1: none) → (tokens, logprobs ``[B, DEVICE_STEPS]``, steps run,
    done, cache)."""
    seg = jnp.ones_like(tok)

    def body(c):
      i, tok, done, cache, toks, lps = c
      t, lp, cache = self._step(sampling, params, {}, tok, pos + i, seg, {}, cache, key, n + i)
      return i + 1, t[:, None], done | (t[:, None] == eos), cache, toks.at[:, i].set(t), lps.at[:, i].set(lp)

    b = tok.shape[0]
    out = jnp.zeros((b, DEVICE_STEPS), jnp.int32), jnp.zeros((b, DEVICE_STEPS), jnp.float32)
    i, _, done, cache, toks, lps = jax.lax.while_loop(lambda c: (c[0] < count) & ~c[2].all(), body,
                                                      (jnp.int32(0), tok, done, cache, *out))
    return toks, lps, i, done, cache

  def _fn(self, kind: str, sampling: Sampling, args):
    """The compiled ``kind`` ("init", "step", "run") for these arguments' shapes (a new seed reuses it:
    the key is an argument)."""
    sampling = dataclasses.replace(sampling, seed=0)
    leaves, tree = jax.tree.flatten(args)
    key = (kind, sampling, tree, tuple((a.shape, a.dtype) if hasattr(a, "dtype") else a for a in leaves))
    if key not in self._compiled:
      if kind == "init":
        fn = jax.jit(lambda: nnx.merge(self.graphdef, self.params).init_cache(*args))
        self._compiled[key] = fn.lower().compile()
      else:
        # the cache is donated on accelerators; on XLA:CPU donation made the demo's step 3x slower
        # (9.6 vs 3.1 ms, docs/results.md), and a new cache per step costs less there
        f, cache = (self._step, 6) if kind == "step" else (self._run, 4)
        donate = (cache,) if jax.default_backend() != "cpu" else ()
        fn = jax.jit(functools.partial(f, sampling), donate_argnums=donate)
        self._compiled[key] = fn.lower(self.params, *args).compile()
    return self._compiled[key]

  def _put(self, tree):
    """The batch's arrays on the device(s) in one transfer (sharded over ``batch`` with a mesh)."""
    if self.mesh is None:
      return jax.device_put(tree)
    sh = lambda x: NamedSharding(self.mesh, rules.logical_to_spec(("batch", "length", *(None,) * x.ndim)[:x.ndim]))  # noqa: E731
    return jax.device_put(tree, jax.tree.map(sh, tree))

  # --------------------------------------------------------------------------------- host

  def host_features(self, ids: np.ndarray, pos: np.ndarray, seg: np.ndarray, cols: int) -> dict[str, np.ndarray]:
    """The host features of the last ``cols`` columns of the token history ``ids``/``pos``/``seg``
    ``[B, t]``, from its last ``host_history + cols`` columns (pmem.core.mixer)."""
    if not self.features:
      return {}
    w = self.history + cols
    window = {"inputs": ids[:, -w:], "positions": pos[:, -w:], "segment_ids": seg[:, -w:]}
    return {k: v[:, -cols:] for k, v in self.features(window).items()}

  def _inputs(self, ids: np.ndarray, pos: np.ndarray, seg: np.ndarray, cols: int):
    """Device inputs for the last ``cols`` columns of the token history, host-table rows staged."""
    feats = self.host_features(ids, pos, seg, cols)
    batch = {"inputs": ids[:, -cols:], **feats}
    staged = {n: variables.stage_rows(n, t, batch[self.index[n]], batch[self.index[n]].size)
              for n, t in self.host.items()}
    return (jax.device_put(staged), *self._put((ids[:, -cols:], pos[:, -cols:], seg[:, -cols:], feats)))

  def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """The one-line errors for bad input, raised before anything runs."""
    if not prompts:
      raise ValueError("no prompts given")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} has no tokens")
      if len(p) + max_new_tokens > self.max_len:
        raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                         f"max_len={self.max_len}")
      lo, hi = min(p), max(p)
      if lo < 0 or hi >= self.cfg.vocab:
        raise ValueError(f"prompt {i} has token ids in [{lo}, {hi}], outside [0, vocab={self.cfg.vocab})")

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               eos_id: int | None = None) -> Generation:
    """New tokens for each prompt (a list of token ids); see the module docstring."""
    self.check(prompts, max_new_tokens)
    b, p = len(prompts), max(len(x) for x in prompts)
    p = max(p, min(-(-p // PAD_TO) * PAD_TO, self.max_len - max_new_tokens))  # fewer prefill shapes
    ids, pos, seg = (np.zeros((b, p), np.int32) for _ in range(3))
    for r, x in enumerate(prompts):
      ids[r, p - len(x):], pos[r, p - len(x):], seg[r, p - len(x):] = x, np.arange(len(x)), 1
    lengths = np.array([len(x) for x in prompts], np.int32)
    root = jax.random.key(sampling.seed)
    with jax.set_mesh(self.mesh) if self.mesh is not None else _null():
      cache = self._fn("init", sampling, (b, self.max_len))()
      args = self._inputs(ids, pos, seg, p)
      prefill = self._fn("step", sampling, (*args, cache, root, np.int32(0)))
      eos = np.int32(-1 if eos_id is None else eos_id)
      if self.device_loop:  # compiled before the clock starts (shapes only)
        decode = self._fn("run", sampling, (*self._put((ids[:, -1:], pos[:, -1:], seg[:, -1:] > 0)), cache, root,
                                            np.int32(0), np.int32(0), eos))
      else:
        one = lambda a: np.concatenate([a, a[:, -1:]], 1)  # noqa: E731 (shapes of a decode step's inputs)
        decode = self._fn("step", sampling, (*self._inputs(one(ids), one(pos), one(seg), 1), cache, root, np.int32(0)))
      t0 = time.perf_counter()
      tok, lp, cache = prefill(self.params, *args, cache, root, np.int32(0))
      tok, lp = np.asarray(tok), np.asarray(lp)
      prefill_s = time.perf_counter() - t0
      done = tok == eos
      t1 = time.perf_counter()
      if self.device_loop:
        out_t, out_lp = self._decode_on_device(decode, tok, lp, lengths, done, cache, root, max_new_tokens, eos)
      else:
        out_t, out_lp = self._decode_per_token(decode, tok, lp, (ids, pos, seg), lengths, done, cache, root,
                                               max_new_tokens, eos)
      decode_s, steps = time.perf_counter() - t1, out_t.shape[1] - 1
    keep = [_until(out_t[r], eos_id) for r in range(b)]
    return Generation([out_t[r, :k] for r, k in enumerate(keep)], [out_lp[r, :k] for r, k in enumerate(keep)],
                      b * steps / decode_s if steps else float("nan"), prefill_s, steps)

  def _decode_per_token(self, step, tok, lp, history, lengths, done, cache, root, max_new_tokens, eos):
    """Tokens and logprobs ``[B, n]`` after the prefill's: one device call per token, the host
    computing each token's features and staging its rows (module docstring)."""
    ids, pos, seg = history
    b, out_t, out_lp = len(tok), [tok], [lp]
    for n in range(1, max_new_tokens):
      if done.all():
        break
      ids = np.concatenate([ids, tok[:, None]], 1)
      pos = np.concatenate([pos, (lengths + n - 1)[:, None]], 1)
      seg = np.concatenate([seg, np.ones((b, 1), np.int32)], 1)
      args = self._inputs(ids, pos, seg, 1)
      tok, lp, cache = step(self.params, *args, cache, root, np.int32(n))
      tok, lp = np.asarray(tok), np.asarray(lp)
      out_t.append(tok)
      out_lp.append(lp)
      done = done | (tok == eos)
    return np.stack(out_t, 1), np.stack(out_lp, 1)

  def _decode_on_device(self, run, tok, lp, lengths, done, cache, root, max_new_tokens, eos):
    """Tokens and logprobs ``[B, n]`` after the prefill's: ``DEVICE_STEPS`` tokens per device call
    (:meth:`_run`), the host reading them between calls."""
    out_t, out_lp, n = [tok[:, None]], [lp[:, None]], 1
    while n < max_new_tokens and not done.all():
      inputs = self._put((tok[:, None], (lengths + n - 1)[:, None], done[:, None]))
      toks, lps, k, done, cache = run(self.params, *inputs, cache, root, np.int32(n),
                                      np.int32(min(max_new_tokens - n, DEVICE_STEPS)), eos)
      k, done = int(k), np.asarray(done)[:, 0]
      out_t.append(np.asarray(toks)[:, :k])
      out_lp.append(np.asarray(lps)[:, :k])
      tok, n = out_t[-1][:, -1], n + k
    return np.concatenate(out_t, 1), np.concatenate(out_lp, 1)

  def text(self, tokens: np.ndarray) -> str:
    if self.tokenizer is None:
      raise ValueError("this Generator has no tokenizer to decode with")
    return self.tokenizer.decode([int(t) for t in tokens])


def _until(tokens: np.ndarray, eos_id: int | None) -> int:
  """How many of a row's tokens to keep: through its first ``eos_id``."""
  if eos_id is None:
    return len(tokens)
  hits = np.nonzero(tokens == eos_id)[0]
  return int(hits[0]) + 1 if hits.size else len(tokens)


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

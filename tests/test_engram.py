"""M1 Engram (arXiv 2601.07372): hashing bit-exact with an independent NumPy transcription of the
published algorithm (compression, document-bounded n-grams, multipliers, distinct primes), the
forward equal to float64 NumPy of the paper's equations, zero-init conv, gradients on exactly the
looked-up rows, the capacity-1 control, costs, configs and training through the Trainer."""

import re
import unicodedata

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from tests.conftest import read_losses
from pmem.core.variables import MemoryTable
from pmem.data import tokenizer as tok_lib
from pmem.memory import diagnostics
from pmem.core.mixer import TokenContext, batch_features
from pmem.memory.engram import Engram, compression
from pmem.models import Decoder
from pmem.train.loop import Trainer
from tests.test_stem_move import apply, f64, initialized, params_of, randomized, silu, sigmoid, table_grad, touched_rows

B, T, D = 2, 24, 32
INT64_MAX = 2 ** 63 - 1
BYTES = tok_lib.ByteTokenizer()
# f32 module vs float64 NumPy: the one-order bound n·u·Σ|x| (tests/tolerances.py) for reductions of
# n ≲ 100 terms of O(1) (the d_mem = 24 projections, the norms and the gate's dot over D = 32, the
# 4-tap conv): 100·u·2 ≈ 1e-5 abs + rel
RTOL, ATOL = 1e-5, 1e-5


# ------------------------------------------------------------------------------ NumPy references


def canonical_np(texts, raws):
  """modules.md §2(a)1, with unicodedata: the canonical id of each token and |V'|."""
  keys, out = {}, []
  for text, raw in zip(texts, raws):
    if "\ufffd" in text:
      key = raw
    else:
      s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
      s = "".join(c for c in s if unicodedata.category(c) != "Mn").lower()
      s = re.sub(r"[ \t\r\n]+", " ", s)
      key = (s if s == " " else s.strip()) or text
    out.append(keys.setdefault(key, len(keys)))
  return np.array(out), len(keys)


def canonical_of(tok):
  return canonical_np([tok.decode([i]) for i in range(tok.vocab_size)], tok.token_strings())


def prime_np(n):
  return n >= 2 and all(n % q for q in range(2, int(n ** 0.5) + 1))


def primes_np(table_sizes, heads, layers):
  """§2(a)3: per (layer, order) a running start from size − 1; one seen-set over the model."""
  seen, out = set(), {}
  for layer in layers:
    out[layer] = []
    for size in table_sizes:
      start, row = size - 1, []
      for _ in range(heads):
        c = start + 1
        while not prime_np(c) or c in seen:
          c += 1
        seen.add(c)
        row.append(c)
        start = c
      out[layer].append(row)
  return out


def multipliers_np(seed, layer, n_max, v_c):
  half = max(1, (INT64_MAX // v_c) // 2)
  u = np.random.default_rng(seed + 10007 * layer).integers(0, half, size=n_max, dtype=np.int64)
  return [2 * int(x) + 1 for x in u]


def hashes_np(x, positions, pad, r, primes):
  """z_{t,n,k} with Python integers, token by token; token t−j only within the document."""
  b, t = x.shape
  out = []
  for bi in range(b):
    for ti in range(t):
      z = []
      for n in range(2, len(primes) + 2):
        s = 0
        for j in range(n):
          s ^= (int(x[bi, ti - j]) if positions[bi, ti] >= j else pad) * r[j]
        assert 0 <= s <= INT64_MAX  # every product and the XOR fit in int64
        z += [s % p for p in primes[n - 2]]
      out.append(z)
  return np.array(out).reshape(b, t, -1)


def rms_np(x, eps=1e-6):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def engram_np(h, rows, positions, p, gate, conv, n_max, m_br):
  """§2(a)4-6 with M branches over one hidden state, averaged: (y, α [B, T, M])."""
  b, t, d = h.shape
  e = p["table"][rows].reshape(b, t, -1)
  v = e @ p["w_v"] + p["b_v"]
  ys, alphas = [], []
  for m in range(m_br):
    if gate == "none":
      a = np.ones((b, t))
    else:
      k = e @ p["w_k"][:, m] + p["b_k"][m]
      s = (rms_np(k) * p["scale_k"][m] * rms_np(h) * p["scale_h"][m]).sum(-1) / np.sqrt(d)
      if gate == "sqrt":
        s = np.sign(s) * np.sqrt(np.maximum(np.abs(s), 1e-6))
      a = sigmoid(s)
    y = a[..., None] * v
    if conv:
      u, c = rms_np(y) * p["scale_c"][m], np.zeros_like(y)
      for bi in range(b):
        for ti in range(t):
          for j in range(4):  # kernel 4, dilation N, within the document
            if positions[bi, ti] >= j * n_max:
              c[bi, ti] += p["w_conv"][j, m] * u[bi, ti - j * n_max]
      y = y + silu(c)
    ys.append(y)
    alphas.append(a)
  return np.mean(ys, 0), np.stack(alphas, -1)


# ------------------------------------------------------------------------------ helpers


def doc_positions(rng, t, docs):
  """Positions restarting at each document start; row r holds docs[r] documents."""
  pos = np.zeros((len(docs), t), np.int32)
  for r, n in enumerate(docs):
    starts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, t), n - 1, replace=False))])
    pos[r] = np.arange(t) - starts[np.searchsorted(starts, np.arange(t), side="right") - 1]
  return pos


def flat_sizes(rows):
  return [p for row in rows for p in row]


def engram(**kw):
  args = dict(layer=1, layers=(1,), d_mem=24, table_sizes=(40, 60), heads=2) | kw
  return lambda: Engram(D, **args, rngs=nnx.Rngs(0))


def context_of(m, ids, pos, tok=BYTES):
  """The TokenContext a batch gets in training: host features from ``m.host_features``."""
  seg = np.cumsum(pos == 0, axis=1).astype(np.int32)
  feats = m.host_features(tok)({"inputs": ids, "positions": pos, "segment_ids": seg})
  ctx = TokenContext(jnp.asarray(ids, jnp.int32), jnp.asarray(pos), jnp.asarray(seg),
                     {k: jnp.asarray(v) for k, v in feats.items()})
  return ctx, feats[f"engram/{m.layer}"]


def params_np(m):
  return {name: f64(getattr(m, name)) for name in ("table", "w_v", "b_v", "w_k", "b_k", "scale_k", "scale_h",
                                                   "scale_c", "w_conv") if hasattr(m, name)}


class ListTokenizer:
  """A tokenizer given by each token's decoded text and raw vocabulary string."""

  def __init__(self, texts, raws):
    self.texts, self.raws, self.vocab_size = texts, raws, len(texts)

  def decode(self, ids):
    return "".join(self.texts[i] for i in ids)

  def token_strings(self):
    return list(self.raws)


# ------------------------------------------------------------------------------ hashing


@pytest.mark.parametrize("compress, max_order, heads, pad_id", [(True, 3, 3, 0), (False, 4, 2, 7)])
def test_hashing_is_bit_exact_with_the_published_algorithm(compress, max_order, heads, pad_id):
  rng = np.random.default_rng(0)
  layers, sizes, seed = (1, 4, 6), (30, 31, 500)[: max_order - 1], 11
  mods = {i: nnx.eval_shape(lambda i=i: Engram(D, i, layers, 6 * (max_order - 1) * heads, sizes,
                                               max_order=max_order, heads=heads, compress=compress, seed=seed,
                                               pad_id=pad_id, rngs=nnx.Rngs(0))) for i in layers}
  primes = primes_np(sizes, heads, layers)
  flat = [p for layer in layers for row in primes[layer] for p in row]
  assert len(set(flat)) == len(flat) and all(prime_np(p) for p in flat)  # distinct primes model-wide
  canon, v_c = canonical_of(BYTES) if compress else (np.arange(256), 256)
  ids = rng.integers(0, 256, (3, 40)).astype(np.int32)
  ids[0, :6] = [ord(c) for c in "aAa aA"]  # compression merges cases: equal n-grams, equal hashes
  pos = doc_positions(rng, 40, (1, 3, 6))
  for layer, m in mods.items():
    assert [list(r) for r in m.sizes] == primes[layer]
    r = multipliers_np(seed, layer, max_order, v_c)
    m_max = INT64_MAX // v_c
    assert all(x % 2 == 1 and 1 <= x <= m_max and x * (v_c - 1) <= INT64_MAX for x in r)
    _, got = context_of(m, ids, pos)
    assert got.dtype == np.int32 and got.shape == (3, 40, (max_order - 1) * heads)
    offsets = np.cumsum([0] + flat_sizes(primes[layer])[:-1])
    want = hashes_np(canon[ids], pos, int(canon[pad_id]), r, primes[layer]) + offsets
    np.testing.assert_array_equal(got, want)
    assert got.max() < m.num_rows == sum(flat_sizes(primes[layer]))
  # bigrams (a, A) at t=1 and (A, a) at t=2 share their rows only through the compression
  assert np.array_equal(got[0, 1, :heads], got[0, 2, :heads]) == compress


def test_document_start_pads_the_ngram():
  """The first token of a document hashes as if the sequence started there."""
  m = nnx.eval_shape(engram())
  ids = np.array([[5, 9, 70, 71, 72, 70, 71, 72]], np.int32)
  _, a = context_of(m, ids, np.array([[0, 1, 2, 3, 4, 5, 6, 7]], np.int32))
  _, b = context_of(m, ids, np.array([[0, 1, 0, 1, 2, 0, 1, 2]], np.int32))
  np.testing.assert_array_equal(b[0, 2:5], b[0, 5:8])  # two documents "70 71 72": same rows
  _, c = context_of(m, ids[:, 2:], np.arange(6, dtype=np.int32)[None])
  np.testing.assert_array_equal(b[0, 2:5], c[0, :3])
  assert not np.array_equal(a[0, 2], b[0, 2])  # without the boundary the n-gram sees 5, 9


# ------------------------------------------------------------------------------ compression


def test_compression_special_cases():
  texts = ["a", "A", " ", "  \t\n", " Hello ", "hello", "Café", "cafe", "ab\ufffd", "ab\ufffd", "\u0301", "",
           "\ufb01", "FI", "\uff21", "\x0b"]
  raws = [f"raw{i}" for i in range(len(texts))]
  p, n = compression(ListTokenizer(texts, raws))
  # case folded; a lone space kept (the sentinel) and whitespace runs collapse onto it; stripped;
  # accents removed; U+FFFD keys on the raw string (two partial tokens stay apart); an empty
  # normalisation (a lone combining mark, "", a vertical tab) keys on the text; NFKC folds ﬁ and Ａ
  assert p.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 8, 0, 9] and n == 10
  want, n_np = canonical_np(texts, raws)
  assert p.tolist() == want.tolist() and n == n_np


def test_compression_of_the_byte_tokenizer():
  p, n = compression(BYTES)
  want, n_np = canonical_np([BYTES.decode([i]) for i in range(256)], BYTES.token_strings())
  np.testing.assert_array_equal(p, want)
  assert n == n_np == 256 - 26 - 3  # A-Z onto a-z; \t \n \r onto " "
  assert p[ord("Q")] == p[ord("q")] and len({p[ord(c)] for c in " \t\n\r"}) == 1
  assert len(set(p[128:].tolist())) == 128 and not set(p[128:].tolist()) & set(p[:128].tolist())  # raw keys


def test_compression_of_a_small_bpe():
  text = ("The café. THE CAFÉ. the résumé, Naïve naive RESUME Café cafe\n\n\t the 日本語 the — "
          "ﬁne “quotes” ")
  tok = tok_lib.BPETokenizer(tok_lib.train_bpe([text * 20], 330))
  p, n = compression(tok)
  want, n_np = canonical_of(tok)
  np.testing.assert_array_equal(p, want)
  assert n == n_np < tok.vocab_size
  ids = {s: tok.tok.token_to_id(s) for s in ("the", "Ġthe", "The", "ĠThe", "ĠTHE", "Ã©", "e")}
  assert None not in ids.values(), ids
  assert p[ids["the"]] == p[ids["Ġthe"]] == p[ids["The"]] == p[ids["ĠThe"]] == p[ids["ĠTHE"]]
  assert p[ids["Ã©"]] == p[ids["e"]]  # é -> e


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("gate, conv, branches, compress", [("paper", True, 1, True), ("sqrt", True, 2, True),
                                                            ("none", False, 1, False)])
def test_forward_matches_numpy(gate, conv, branches, compress):
  rng = np.random.default_rng(1)
  m = randomized(engram(gate=gate, conv=conv, branches=branches, compress=compress), 1)
  p = params_np(m)
  assert ("w_conv" in p) == conv and ("w_k" in p) == (gate != "none")
  assert not conv or np.abs(p["w_conv"]).min() > 0  # a non-zero conv
  ids = rng.integers(0, 256, (B, T)).astype(np.int32)
  pos = doc_positions(rng, T, (1, 3))
  ctx, rows = context_of(m, ids, pos)
  h = rng.normal(size=(B, T, D))
  y = apply(m, jnp.asarray(h, jnp.float32), ctx)
  want, alpha = engram_np(h, rows, pos, p, gate, conv, 3, branches)
  np.testing.assert_allclose(np.asarray(y), want, rtol=RTOL, atol=ATOL)
  with diagnostics.collect() as got:  # inspection: the gate and the rows read
    m(jnp.asarray(h, jnp.float32), ctx)
  (g,), ((used, total),) = got.stats["engram/gate"], got.usage["engram"]
  np.testing.assert_allclose(np.asarray(g), alpha, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(used), rows)
  assert total == m.num_rows == p["table"].shape[0]


def test_zero_init_conv_gives_exactly_gated_value():
  rng = np.random.default_rng(2)
  m, plain = initialized(engram(conv=True)), initialized(engram(conv=False))
  assert not np.any(f64(m.w_conv)) and not np.any(f64(m.b_v)) and not np.any(f64(m.b_k))
  ids = rng.integers(0, 256, (B, T)).astype(np.int32)
  ctx, rows = context_of(m, ids, doc_positions(rng, T, (2, 2)))
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  y = np.asarray(apply(m, h, ctx))
  np.testing.assert_array_equal(y, np.asarray(apply(plain, h, ctx)))  # same draws, no conv: α·v
  want, _ = engram_np(np.asarray(h, np.float64), rows, ctx.positions, params_np(plain), "paper", False, 3, 1)
  np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


def test_gradients_reach_exactly_the_looked_up_rows():
  rng = np.random.default_rng(3)
  m = randomized(engram(branches=2), 3)
  ids = rng.choice([10, 20, 65, 97], size=(B, 16)).astype(np.int32)
  ctx, rows = context_of(m, ids, doc_positions(rng, 16, (1, 2)))
  (grad,) = table_grad(m, jnp.asarray(rng.normal(size=(B, 16, D)), jnp.float32), ctx).values()
  assert grad.shape == (m.num_rows, m.d_head)
  assert touched_rows(grad) == set(rows.ravel().tolist()) and len(set(rows.ravel().tolist())) < m.num_rows / 2


def test_capacity_one_control_maps_every_id_to_the_single_row():
  rng = np.random.default_rng(4)
  m = randomized(engram(capacity_one=True), 4)
  assert m.num_rows == 4 and m.table.shape == (4, 6)  # (N − 1)·K one-row tables
  ids = rng.integers(0, 256, (B, T)).astype(np.int32)
  ctx, rows = context_of(m, ids, doc_positions(rng, T, (1, 3)))
  np.testing.assert_array_equal(rows, np.broadcast_to(np.arange(4), (B, T, 4)))
  (grad,) = table_grad(m, jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32), ctx).values()
  assert touched_rows(grad) == {0, 1, 2, 3}


@pytest.mark.parametrize("kw", [dict(), dict(gate="none", conv=False), dict(branches=3, capacity_one=True)])
def test_cost_counts_every_parameter(kw):
  m = nnx.eval_shape(engram(**kw))
  c, gated, conv, br = m.cost(T), kw.get("gate", "paper") != "none", kw.get("conv", True), kw.get("branches", 1)
  assert c.params == params_of(m)
  assert c.active_params == c.params - (m.num_rows - 4) * m.d_head  # 4 = (N − 1)·K rows per token
  assert c.flops == 2 * 24 * D * (1 + br * gated) + 2 * br * D * gated + 2 * 4 * br * D * conv
  assert c.bytes_read == 4 * c.active_params


def test_bad_arguments_raise():
  for kw, match in [(dict(gate="sigmoid"), "gate"), (dict(d_mem=25), "d_mem"), (dict(table_sizes=(40,)), "table_sizes"),
                    (dict(layer=3), "layers"), (dict(max_order=1), "max_order"), (dict(branches=0), "branches")]:
    with pytest.raises(ValueError, match=match):
      nnx.eval_shape(engram(**kw))
  m = nnx.eval_shape(engram(pad_id=300))
  with pytest.raises(ValueError, match="pad_id"):
    m.host_features(BYTES)
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(KeyError, match="engram/1"):
    m.row_ids(TokenContext(ids, ids, ids))
  with pytest.raises(TypeError, match="token_strings"):
    compression(object())


# ------------------------------------------------------------------------------ configs and training


def test_configs_place_engram_before_attention_with_distinct_primes():
  cfg = cli.build_config(["config:tiny", "fiddler:engram(layers=(2, 0), heads=2, table_size=500)",
                          "fiddler:engram_ablation(kind='sqrt_gate')", "fiddler:engram_shape(max_order=2)"])
  (over,) = cfg.model.overrides  # one factory; each layer takes its index from the decoder
  assert over.layers == (0, 2)
  assert over.pre[0].layers == (0, 2) and over.pre[0].gate == "sqrt" and over.pre[0].table_sizes == (500,)
  t = cfg.train.optim.tables
  assert (t.optimizer, t.lr_mult, t.weight_decay) == ("adam", 5.0, 0.0)
  model = nnx.eval_shape(lambda: Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0)))
  mods = [m for _, m in nnx.iter_graph(model) if isinstance(m, Engram)]
  assert [m.layer for m in mods] == [0, 2]
  sizes = [p for m in mods for p in flat_sizes(m.sizes)]
  assert len(set(sizes)) == len(sizes) == 4
  with pytest.raises(ValueError, match="kind"):
    cli.build_config(["config:engram_tiny", "fiddler:engram_ablation(kind='no_gates')"])
  with pytest.raises(ValueError, match="Engram layers"):
    cli.build_config(["config:tiny", "fiddler:engram_shape(heads=2)"])


def test_engram_tiny_decoder_features_and_cost():
  exp = fdl.build(cli.build_config(["config:engram_tiny"]))
  model = nnx.eval_shape(lambda: Decoder(exp.model, rngs=nnx.Rngs(0)))
  (m,) = [m for _, m in nnx.iter_graph(model) if isinstance(m, Engram)]
  assert m.layer == 1 and 8 * 3000 < m.num_rows < 8 * 3200 and m.table.get_metadata()["index"] == "engram/1"
  counted = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert model.cost(exp.train.seq_len).params == counted
  ids = np.random.default_rng(5).integers(0, 256, (2, 16)).astype(np.int32)
  pos = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
  feats = batch_features(model, BYTES)({"inputs": ids, "positions": pos, "segment_ids": np.ones_like(ids)})
  assert set(feats) == {"engram/1"} and feats["engram/1"].shape == (2, 16, 8)
  ctx = TokenContext(jnp.asarray(ids), jnp.asarray(pos), jnp.ones((2, 16), jnp.int32),
                     {k: jnp.asarray(v) for k, v in feats.items()})
  assert jax.eval_shape(lambda: Decoder(exp.model, rngs=nnx.Rngs(0))(jnp.asarray(ids), ctx)).shape == (2, 16, 256)


def engram_trainer(*sets, workdir=None) -> Trainer:
  cfg = cli.build_config(["config:engram_tiny", "set:train.progress=False", "set:eval.valid_batches=0",
                          "set:train.log_every=1", *sets])
  return Trainer(fdl.build(cfg), workdir)


def engram_table(t: Trainer) -> np.ndarray:
  (v,) = [v for p, v in nnx.to_flat_state(t.train_state["params"]) if isinstance(v, MemoryTable)]
  return np.asarray(v.get_value())


@pytest.mark.slow  # ~150 s here (three Trainers)
def test_engram_tables_train_row_sparse_and_from_the_host():
  """Row-sparse SGD == dense SGD; host-resident rows (staged from the batch's engram/1 field) ==
  device-resident, bitwise."""
  small = ("set:train.steps=3", "set:model.n_layers=2", "set:model.d_model=32", "set:train.seq_len=32",
           "set:train.batch_size=4", "set:train.optim.tables.optimizer='sgd'")
  dense = engram_trainer(*small, "set:train.optim.tables.update='dense'")
  before = engram_table(dense)
  dense.run()
  rows = engram_trainer(*small, "set:train.optim.tables.update='row_sparse'")
  rows.run()
  got, want = engram_table(rows), engram_table(dense)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the same gradient sums; Adam on the rest, last bits
  changed = np.any(want != before, axis=-1)
  assert 0 < changed.sum() < changed.size / 2  # only looked-up rows move
  host = engram_trainer(*small, "set:train.optim.tables.update='row_sparse'",  # B·T·(N−1)·K ids per batch
                        "set:train.optim.tables.device_budget_bytes=0", "set:train.optim.tables.max_unique=1024")
  (name,) = host.host.tables
  host.run()
  np.testing.assert_array_equal(host.host.tables[name], got)


@pytest.mark.slow
def test_engram_tiny_trains(tmp_path):
  t = engram_trainer("set:train.steps=20", workdir=str(tmp_path))
  t.run()
  losses = read_losses(tmp_path)
  assert len(losses) == 20 and np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < losses[0] - 0.5

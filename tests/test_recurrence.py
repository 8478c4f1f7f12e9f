"""The linear-recurrence core (pmem.layers.recurrence) and its mixers: chunked == naive == one
token at a time, outputs, final states and gradients, with packed documents, T not a multiple of
the chunk and an initial state; the chunked form's gradient saves no per-chunk state; every mixer's
prefill + decode == its whole-document call (padding included); each new config trains on the
2x2x2 mesh with the losses of one device. (fla oracles: tests/test_recurrence_oracle.py; the
decoder-level prefill + decode: tests/test_decode.py.)"""

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.core.mixer import TokenContext
from pmem.core import mixer as mixer_lib
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.layers import recurrence
from pmem.layers.attention import Attention
from pmem.models import Decoder
from pmem.train.loop import Trainer
from tests import coverage
from tests.conftest import LOSS_TOL, needs_devices, read_losses
from tests.tolerances import assert_close

# from the registries (tests/coverage.py): the sequence mixers with a recurrent state, the configs built only of them
RECURRENT = sorted(n for n, c in SEQUENCE_MIXERS.items() if callable(getattr(c, "init_state", None))
                   and not issubclass(c, Attention))
RECURRENT_CONFIGS = [n for n in coverage.registered() if coverage.state_kinds(n)
                     and not any(isinstance(k, type) and issubclass(k, Attention) for k in coverage.state_kinds(n))]
STATEFUL_CONFIGS = [n for n in coverage.registered() if coverage.state_kinds(n) - {Attention}]  # more than a KV cache
KINDS = ["gated_head", "gated_key", "delta", "gated_delta"]
B, T, H, K, V = 2, 37, 3, 8, 5


def inputs(kind: str, seed: int = 0, t: int = T):
  """Random (q, k, v, a, beta, reset, S0): unit keys, β in (0, 1), moderate decays, three
  documents in row 0 and two (one of a single token) in row 1."""
  r = np.random.default_rng(seed)
  q, k = r.normal(size=(2, B, t, H, K)).astype(np.float32)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = r.normal(size=(B, t, H, V)).astype(np.float32)
  a = -0.3 * np.abs(r.normal(size=(B, t, H, K) if kind == "gated_key" else (B, t, H))).astype(np.float32)
  if kind == "delta":
    a = np.zeros_like(a)
  beta = (1 / (1 + np.exp(-r.normal(size=(B, t, H))))).astype(np.float32) if "delta" in kind else None
  reset = np.zeros((B, t), bool)
  reset[:, 0] = reset[0, 11] = reset[0, 30] = reset[1, 16] = reset[1, 17] = True
  S0 = r.normal(size=(B, H, K, V)).astype(np.float32)
  return q, k, v, a, beta, reset, S0


def steps(q, k, v, a, beta, reset, S0):
  """One :func:`recurrence.step` per token in a Python loop (the decode path)."""
  S, out = jnp.asarray(S0), []
  for t in range(q.shape[1]):
    S, o = recurrence.step(S, q[:, t], k[:, t], v[:, t], a[:, t], None if beta is None else beta[:, t], reset[:, t])
    out.append(o)
  return jnp.stack(out, 1), S


def close(x, y, terms):
  assert_close(np.asarray(x), np.asarray(y), terms=terms)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_naive_equals_steps(kind):
  args = inputs(kind)
  o, S = recurrence.naive(*args)
  o1, S1 = steps(*args)
  close(o1, o, terms=4)  # the same operations, outside a scan
  close(S1, S, terms=4)
  for c in (1, 4, 16, 64):  # T = 37: a partial last chunk (and one chunk longer than T)
    oc, Sc = recurrence.chunked(*args, chunk=c)
    close(oc, o, terms=T + K + c)  # sums of up to T decayed terms of K-dot products, the C-row solve
    close(Sc, S, terms=T + K + c)


@pytest.mark.parametrize("kind", KINDS)
def test_documents_do_not_see_each_other(kind):
  """A document's outputs are those of the document alone from a zero state."""
  q, k, v, a, beta, reset, S0 = inputs(kind)
  o, _ = recurrence.chunked(q, k, v, a, beta, reset, S0, chunk=8)
  sl = slice(11, 30)  # row 0's second document
  alone, _ = recurrence.naive(*(None if x is None else x[:1, sl] for x in (q, k, v, a, beta, reset)))
  close(o[:1, sl], alone, terms=T + K + 8)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_gradients_equal_the_naive_ones(kind):
  q, k, v, a, beta, reset, S0 = inputs(kind, seed=1)
  r = np.random.default_rng(2)
  wo, ws = r.normal(size=(B, T, H, V)).astype(np.float32), r.normal(size=S0.shape).astype(np.float32)

  def loss(fn, *x):
    o, S = fn(*x[:4], x[4], reset, x[5])
    return jnp.sum(o * wo) + jnp.sum(S * ws)

  diff = (0, 1, 2, 3, 5) + ((4,) if beta is not None else ())
  x = (q, k, v, a, beta, S0)
  ref = jax.grad(lambda *x: loss(recurrence.naive, *x), diff)(*x)
  for c in (4, 16):
    got = jax.grad(lambda *x: loss(lambda *y, **_: recurrence.chunked(*y, chunk=c), *x), diff)(*x)
    for g, e in zip(got, ref):
      close(g, e, terms=2 * (T + K + c))  # the backward's sums run over the same tokens, both ways


def test_chunked_gradient_keeps_no_state_per_chunk():
  """With ``remat`` the residuals kept for the backward (the leaves of ``jax.vjp``'s function) are
  about the inputs; without it the scan also keeps the f32 state of every chunk."""
  q, k, v, a, beta, reset, S0 = (jnp.asarray(x) for x in inputs("gated_delta", t=256))
  saved = {}
  for remat in (True, False):
    _, back = jax.vjp(lambda *x: recurrence.chunked(*x[:5], reset, x[5], chunk=16, remat=remat)[0], q, k, v, a, beta, S0)
    saved[remat] = sum(x.nbytes for x in jax.tree.leaves(back))
  per_chunk_states = 256 // 16 * S0.nbytes
  inputs_bytes = sum(x.nbytes for x in (q, k, v, a, beta, S0, reset))
  assert saved[True] <= 2 * inputs_bytes, saved
  assert saved[False] >= saved[True] + per_chunk_states, saved


def mixer(name: str, d: int):
  """The registered mixer ``name`` at width ``d``: 2 heads where it takes ``n_heads`` (Mamba2: heads of 8), chunk 4."""
  cls = SEQUENCE_MIXERS[name]
  kw = {"n_heads": 2} if mixer_lib.takes(cls, "n_heads") else {"head_dim": 8}
  return cls(d, **kw, chunk=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", RECURRENT)
def test_mixer_prefill_then_decode_equals_whole_documents(name):
  """Left padding in row 1, two packed documents in row 0; chunk 4 over a prompt of 7."""
  d, t, p = 32, 21, 7
  m = mixer(name, d)
  leaves, tree = jax.tree.flatten(nnx.state(m, nnx.Param))  # random gates and convs, not their inits
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(m, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(kk, x.shape) for x, kk in zip(leaves, keys)]))
  x = jax.random.normal(jax.random.key(2), (2, t, d))
  pos = np.tile(np.arange(t, dtype=np.int32), (2, 1))
  seg = np.ones((2, t), np.int32)
  pos[0, 9:], seg[0, 9:] = np.arange(t - 9), 2
  pos[1, :3], seg[1, :3], pos[1, 3:] = 0, 0, np.arange(t - 3)
  ctx = lambda a, b: TokenContext(None, jnp.asarray(pos[:, a:b]), jnp.asarray(seg[:, a:b]), {})  # noqa: E731
  whole = m(x, ctx(0, t))
  y, state = m(x[:, :p], ctx(0, p), m.init_state(2, 64))
  out = [y]
  for i in range(p, t):
    y, state = m(x[:, i:i + 1], ctx(i, i + 1), state)
    out.append(y)
  real = seg > 0
  inc = np.asarray(jnp.concatenate(out, 1))
  close(inc[real], np.asarray(whole)[real], terms=t + d)
  leaves = jax.tree.leaves(state)  # per-row arrays (a composite's state may hold a scalar counter: a KV cache's end)
  assert all(s.shape[0] == 2 for s in leaves if s.ndim) and all(np.isfinite(np.asarray(s)).all() for s in leaves)


@pytest.mark.parametrize("name", ["gdn", "mamba2"])
def test_trailing_padding_keeps_the_state(name):
  """Padding (segment 0, position 0) after a document leaves the recurrent state as it was."""
  m = mixer(name, 32)
  x, n = jax.random.normal(jax.random.key(3), (1, 13, 32)), 9
  pos, seg = np.where(np.arange(13) < n, np.arange(13), 0)[None], (np.arange(13) < n).astype(np.int32)[None]
  _, padded = m(x, TokenContext(None, jnp.asarray(pos), jnp.asarray(seg), {}), m.init_state(1, 64))
  _, real = m(x[:, :n], TokenContext(None, jnp.asarray(pos[:, :n]), jnp.asarray(seg[:, :n]), {}), m.init_state(1, 64))
  assert float(jnp.abs(real["S"]).max()) > 0
  close(padded["S"], real["S"], terms=13 + 32)


def test_decode_state_does_not_grow_with_max_len():
  for name in RECURRENT_CONFIGS:
    model = Decoder(fdl.build(cli.build_config([f"config:{name}"]).model), rngs=nnx.Rngs(0))
    assert model.state_bytes(64) == model.state_bytes(4096), name
  attn = Decoder(fdl.build(cli.build_config(["config:tiny"]).model), rngs=nnx.Rngs(0))
  # K and V: 4 layers x 2 kv heads x 16 dims x 4 bytes per token, plus the slots' position and segment
  assert attn.state_bytes(128) - attn.state_bytes(64) == 64 * 4 * (2 * 2 * 16 * 4 + 2 * 4)


def test_hybrid_pattern_repeats_over_the_stack():
  """GGWA over 8 layers: one stage scanning 2 repetitions of the 4-layer period; unrolled, runs."""
  args = ["config:tiny", "set:model.n_layers=8", "fiddler:hybrid(pattern='GGWA', G='mamba2')"]
  want = [("Mamba2", None)] * 2 + [("Attention", 16), ("Attention", None)]
  model = Decoder(fdl.build(cli.build_config(args).model), rngs=nnx.Rngs(0))
  (stage,) = model.stages
  assert (stage.scan, stage.period, stage.n) == (True, 4, 2)
  assert [(type(b.seq).__name__, getattr(b.seq, "window", None)) for b in stage.blocks.blocks] == want
  assert stage.blocks.blocks[0].seq.w_in.shape[0] == 2  # each period position stacked over the repetitions
  flat = Decoder(fdl.build(cli.build_config(args + ["set:model.scan_layers=False"]).model), rngs=nnx.Rngs(0))
  assert [(s.start, s.n, type(s.blocks[0].seq).__name__) for s in flat.stages] == [
      (0, 2, "Mamba2"), (2, 1, "Attention"), (3, 1, "Attention"), (4, 2, "Mamba2"), (6, 1, "Attention"),
      (7, 1, "Attention")]
  with pytest.raises(ValueError, match="use the letters G, A, W"):
    cli.build_config(["config:tiny", "fiddler:hybrid(pattern='GX')"])


@needs_devices(8)  # `make test` trains the first registered config (2 x ~60 s of 8-device compiles); the rest: `make test-slow`
@pytest.mark.parametrize("name", coverage.cases(coverage.first_per(lambda n: 0, RECURRENT_CONFIGS), STATEFUL_CONFIGS))
def test_stateful_configs_train_on_a_mesh_as_on_one_device(tmp_path, name):
  def losses(*mesh):
    cfg = cli.build_config([f"config:{name}", "set:train.steps=4", "set:train.progress=False",
                            "set:eval.valid_batches=0"] + [f"set:mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh)])
    work = tmp_path / "".join(map(str, mesh))
    Trainer(fdl.build(cfg), str(work)).run()
    return read_losses(work)
  one, mesh = losses(1, 1, 1), losses(2, 2, 2)
  np.testing.assert_allclose(mesh, one, **LOSS_TOL)
  assert one[-1] < one[0]

"""MemoryTable reads inside a module's own loops (lax.scan, fori_loop, vmap) under the row-sparse
train step: rows staged before the loop get the dense gradient; a tapped read in a loop that does
not slice its probe (closed over, broadcast, carried, ids computed in the loop) raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmem.core.variables import MemoryTable
from pmem.memory import lookup
from pmem.train import sparse
from tests.tolerances import assert_close

V, D, T, B = 16, 4, 5, 3
IDS = jnp.asarray(np.random.default_rng(0).integers(0, V, (T, B)))  # [time, batch]: repeats across steps
RAISES = "stage the rows before the loop with pmem.memory.lookup.stage"


class Table(nnx.Module):
  """A table ``[*lead, V, D]`` and a Param ``w`` the loops mix it with."""

  def __init__(self, lead=()):
    self.t = MemoryTable(jax.random.normal(jax.random.key(0), (*lead, V, D)), axes=("table_rows", "embed"))
    self.w = nnx.Param(jnp.linspace(0.5, 1.5, D))


def grads(f, lead=()):
  """``(rows, dense)``: the compact row gradient of table ``t`` under ``sparse.value_and_grad`` and
  the dense ``jax.grad`` of the same ``f(module) -> scalar`` reading the plain table."""
  graphdef, params = nnx.split(Table(lead), nnx.Param)
  loss = lambda p: f(nnx.merge(graphdef, p))  # noqa: E731
  _, g = jax.jit(lambda p: sparse.value_and_grad(lambda q: (loss(q), {}), p, lambda name, v: name == "t"))(params)
  return g["t"].get_value(), jax.grad(loss)(params)["t"][...]


def scattered(rows: sparse.Rows) -> jax.Array:
  return jnp.zeros((V + 1, D)).at[rows.ids].add(rows.rows)[:V]


def recur(w, h, x):
  return jnp.tanh(h * w + x)


# ------------------------------------------------------------------------------ supported


def staged_scan(m):
  """A recurrence over time on rows staged before the scan (scanned as inputs)."""
  h, _ = jax.lax.scan(lambda h, x: (recur(m.w[...], h, x), None), jnp.zeros((B, D)), lookup.stage(m.t, IDS))
  return jnp.sin(h).sum()


def staged_scan_indexed(m):
  """The same recurrence, the body indexing the staged rows by step."""
  rows = lookup.stage(m.t, IDS)
  h = jax.lax.fori_loop(0, T, lambda i, h: recur(m.w[...], h, rows[i]), jnp.zeros((B, D)))
  return jnp.sin(h).sum()


def staged_vmap(m):
  """Per batch row, a cumulative mix over time of rows staged before the vmap."""
  rows = lookup.stage(m.t, IDS.T)  # [B, T, D]
  return jax.vmap(lambda r: jnp.sin(jnp.cumsum(r * m.w[...], 0)).sum())(rows).sum()


def staged_nnx_scan(m):
  """nnx.scan over the staged rows, broadcasting the module (its tapped table unread in the body)."""
  @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=nnx.Carry)
  def step(m, h, x):
    return recur(m.w[...], h, x)
  return jnp.sin(step(m, jnp.zeros((B, D)), lookup.stage(m.t, IDS))).sum()


@pytest.mark.parametrize("f", [staged_scan, staged_scan_indexed, staged_vmap, staged_nnx_scan], ids=lambda f: f.__name__)
def test_rows_staged_before_a_loop_get_the_dense_gradient(f):
  rows, dense = grads(f)
  np.testing.assert_array_equal(rows.ids[:len(np.unique(IDS))], np.unique(IDS))
  assert_close(scattered(rows), dense, terms=IDS.size)  # a row's gradient: ≤ T·B occurrences, summed in another order


def test_layer_scan_slicing_stacked_tables_stages_per_layer():
  """A layer scan over a stacked [2, V, D] table (the Tap sliced per layer), each layer staging its
  rows before its own time scan; a vmap over the layers; a layer scan whose body reads under a
  jax.checkpoint closing over the slice (not a loop): per-layer compact rows, dense values."""
  def layers(m):
    gd, st = nnx.split(m.t)

    def layer(h, s):
      rows = lookup.stage(nnx.merge(gd, s), IDS)
      return jax.lax.scan(lambda h, x: (recur(m.w[...], h, x), None), h, rows)[0], None
    return jnp.sin(jax.lax.scan(layer, jnp.zeros((B, D)), st)[0]).sum()

  def mapped(m):
    gd, st = nnx.split(m.t)
    return jax.vmap(lambda s: jnp.sin(lookup.gather(nnx.merge(gd, s), IDS) * m.w[...]).sum())(st).sum()

  def remat(m):
    gd, st = nnx.split(m.t)

    def layer(h, s):
      t = nnx.merge(gd, s)
      return jax.checkpoint(lambda h: recur(m.w[...], h, lookup.gather(t, IDS).sum(0)))(h), None
    return jnp.sin(jax.lax.scan(layer, jnp.zeros((B, D)), st)[0]).sum()

  for f in (layers, mapped, remat):
    rows, dense = grads(f, lead=(2,))
    assert rows.ids.shape == (2, min(IDS.size, V))
    assert_close(jax.vmap(scattered)(rows), dense, terms=IDS.size)


# ------------------------------------------------------------------------------ unsupported


def closed_over_scan(m):
  h, _ = jax.lax.scan(lambda h, i: (recur(m.w[...], h, lookup.gather(m.t, i)), None), jnp.zeros((B, D)), IDS)
  return jnp.sin(h).sum()


def closed_over_fori(m):
  h = jax.lax.fori_loop(0, T, lambda i, h: recur(m.w[...], h, lookup.gather(m.t, IDS[i])), jnp.zeros((B, D)))
  return jnp.sin(h).sum()


def closed_over_vmap(m):
  return jax.vmap(lambda i: jnp.sin(lookup.gather(m.t, i) * m.w[...]).sum())(IDS).sum()


def carried_scan(m):
  """The table's variable state passed through the scan as part of the carry."""
  gd, st = nnx.split(m.t)

  def body(c, i):
    h, s = c
    return (recur(m.w[...], h, lookup.gather(nnx.merge(gd, s), i)), s), None
  return jnp.sin(jax.lax.scan(body, (jnp.zeros((B, D)), st), IDS)[0][0]).sum()


def nnx_scan_broadcast(m):
  """nnx.scan broadcasting the module (flax passes broadcasts through the scan's carry)."""
  @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=nnx.Carry)
  def step(m, h, i):
    return recur(m.w[...], h, lookup.gather(m.t, i))
  return jnp.sin(step(m, jnp.zeros((B, D)), IDS)).sum()


def computed_ids_in_scan(m):
  """Ids computed inside the loop (a top-k of the state), read as a bag: nothing to stage."""
  keys = jnp.linspace(-1.0, 1.0, D * V).reshape(D, V)

  def body(h, _):
    scores, ids = jax.lax.top_k(h @ keys, 2)
    return recur(m.w[...], h, lookup.bag(m.t, ids, jax.nn.softmax(scores, -1)) + 1.0), None
  return jnp.sin(jax.lax.scan(body, jnp.ones((B, D)), None, length=T)[0]).sum()


@pytest.mark.parametrize("f", [closed_over_scan, closed_over_fori, closed_over_vmap, carried_scan, nnx_scan_broadcast,
                               computed_ids_in_scan], ids=lambda f: f.__name__)
def test_a_tapped_read_in_a_loop_that_does_not_slice_it_raises(f):
  graphdef, params = nnx.split(Table(), nnx.Param)
  jax.grad(lambda p: f(nnx.merge(graphdef, p)))(params)  # a plain table: an ordinary gather in the loop
  with pytest.raises(ValueError, match=f"MemoryTable 't' is read inside .* {RAISES}"):
    grads(f)


def test_a_tapped_read_in_a_loop_inside_the_layer_scan_raises():
  """The layer scan slices the stacked table once; a time scan inside it that closes over the slice
  (or carries it) is one loop too many."""
  def closed(m):
    gd, st = nnx.split(m.t)

    def layer(h, s):
      t = nnx.merge(gd, s)
      return jax.lax.scan(lambda h, i: (recur(m.w[...], h, lookup.gather(t, i)), None), h, IDS)[0], None
    return jnp.sin(jax.lax.scan(layer, jnp.zeros((B, D)), st)[0]).sum()

  def carried(m):
    gd, st = nnx.split(m.t)

    def layer(h, s):
      body = lambda c, i: ((recur(m.w[...], c[0], lookup.gather(nnx.merge(gd, c[1]), i)), c[1]), None)  # noqa: E731
      return jax.lax.scan(body, (h, s), IDS)[0][0], None
    return jnp.sin(jax.lax.scan(layer, jnp.zeros((B, D)), st)[0]).sum()

  for f in (closed, carried):
    with pytest.raises(ValueError, match=RAISES):
      grads(f, lead=(2,))


@pytest.mark.parametrize("f", [closed_over_scan, closed_over_vmap], ids=lambda f: f.__name__)
def test_without_the_check_a_read_in_a_loop_corrupts_silently(f, monkeypatch):
  """What the check prevents: the probe's cotangents summed over iterations give wrong rows."""
  monkeypatch.setattr(lookup, "_check_loops", lambda *_: None)
  rows, dense = grads(f)
  assert not np.allclose(scattered(rows), dense, atol=1e-3)

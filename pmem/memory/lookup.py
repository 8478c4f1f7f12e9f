"""The one way a memory module reads a :class:`MemoryTable`: :func:`gather`, :func:`bag` and, for
loops, :func:`stage`.

Outside the train step (eval, init, dense-updated tables) a read is an ordinary gather whose
gradient is the dense scatter-add (``kernels.embedding``). Inside the train step a row-sparse
table's variable holds a :class:`Tap` instead of its array (``pmem.train.sparse`` puts it there):
the rows to read from (the table itself, or the rows a host stage shipped with the batch) and one
zero *probe* per read. A read returns the rows unchanged; its backward pass gives the probe the
looked-up ids and what the table gradient is made of: for a gather the cotangent of every
looked-up row (``[N, D]``, ``N = ids.size``, static); for a bag ``[S, k]`` the cotangent of every
output ``[S, D]`` and the weights ``[S, k]`` (row ``ids[s, j]`` gets ``w[s, j] · g[s]``; nothing
``[S·k, D]`` is formed, and the bag runs its kernel). So the step obtains the row gradients and
their ids without a table-sized gradient, with ids known before the forward (token / n-gram
tables) or computed inside it (product-key top-k), and from inside the decoder's layer scan, whose
body returns nothing but the hidden states (sown intermediates would not get out of it;
cotangents of scanned inputs do).

The ids travel as the probe's cotangent: ``id + 1`` split into two float32 halves of 16 bits, both
exact; a read whose output does not reach the loss gets a zero cotangent, which decodes to "no
id" (``-1``) and is dropped. Modules stay pure functions of (variables, inputs); the only state is
a trace-time counter of reads per table (:func:`reads`), which maps the i-th read of a table in
one forward to its i-th probe.

A module must read every ``MemoryTable`` through these functions: indexing a tapped table
(``table[...]``, ``jnp.take(table.value, ...)``) raises a TypeError naming the table.

Loops: a probe belongs to one read, so a tapped read inside a ``lax.scan`` / ``fori_loop`` body or a
``vmap`` would have its probe's cotangent summed over the iterations (the row gradients of different
iterations added position by position, the float-coded ids garbled) unless the loop slices the probe:
the decoder's layer scan over stacked tables ``[L, V, D]`` gives each layer its own slice of the
Tap. A module that loops over time reads its rows before the loop with :func:`stage` (ids known
before the loop: token / n-gram tables) and the body indexes the plain array; the gradient reaches
the staged rows through ordinary autodiff across the loop, and the probe is filled once, outside.
Every other tapped read in a loop raises a ValueError (checked at trace time, against the traces the
read runs under: a loop between the probe's trace and the read means the probe was closed over or
broadcast; more loops between the read scope and the probe than the Tap has stacked dims means one
carried it), so ids computed inside a loop (product-key top-k) cannot be read there. Not detected: a
Tap sliced by hand (``a[i]``) and then carried through a loop. Reads of plain arrays (eval, init)
are ordinary gathers, in loops or not.

Ids: concrete ids outside the table raise a ValueError. Traced ids are trusted by default: modules
compute them in range (hashes reduced modulo the rows, product-key top-k slots) or read token ids
the decoder has checked (``pmem.layers.embed.check_ids``); an out-of-range traced id reads a zero
row and gets no gradient. ``ids_check="error"`` checks traced ids too, for ids from outside.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax._src.interpreters.batching import BatchTrace
from jax.extend.core import find_top_trace
from jaxtyping import Array, Float, Int

from kernels import embedding_bag, embedding_gather
from pmem.layers.embed import check_ids

_HALF = 1 << 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Probe:
  """Zeros whose cotangents describe one read's table gradient: a gather's row gradients
  ``grads [..., N, D]`` and ids ``[..., N, 2]``; a bag's output cotangents ``grads [..., S, D]``, ids
  ``[..., S, k, 2]`` and weights ``[..., S, k]`` (``implementation``: the bag's kernel)."""
  grads: jax.Array
  ids: jax.Array
  weights: jax.Array | None = None
  implementation: str = dataclasses.field(default="auto", metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tap:
  """What a row-sparse table's variable holds inside the train step.

  ``rows``: the table ``[..., V, D]``, or (host placement) the staged rows ``[..., U, D]`` of the
  sorted ids ``slots [..., U]`` (padded with ``num_rows``). ``probes``: one per read (empty while the
  step discovers the reads). Leading dims are stacked layers; the layer scan slices them.
  ``stacked``: how many leading dims the variable has (the loops that may slice the Tap)."""
  rows: jax.Array
  slots: jax.Array | None
  probes: tuple[Probe, ...]
  name: str = dataclasses.field(metadata=dict(static=True))
  num_rows: int = dataclasses.field(metadata=dict(static=True))
  stacked: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.rows.shape[:-2], self.num_rows, self.rows.shape[-1])

  @property
  def dtype(self):
    return self.rows.dtype

  @property
  def ndim(self) -> int:
    return self.rows.ndim

  def _plain(self, *_, **__):
    raise TypeError(f"MemoryTable {self.name!r} is updated row-sparse: read it with "
                    "pmem.memory.lookup.gather/bag, not by indexing or jnp ops on its value")

  __getitem__ = __jax_array__ = __array__ = _plain


class _Reads:
  """Reads per table in one trace of the forward; with ``record`` reads are plain (no probes) and
  ``probes`` records the shape of each one's probe (a :class:`Probe` of ShapeDtypeStructs).
  ``trace``: the trace the scope was opened in (where the Taps are made)."""

  def __init__(self, record: bool):
    self.record, self.count, self.probes = record, {}, {}
    self.trace = find_top_trace(())

  def next(self, name: str, probe: Probe) -> int:
    i = self.count.get(name, 0)
    self.count[name] = i + 1
    if self.record:
      self.probes.setdefault(name, []).append(probe)
    return i


_READS: contextvars.ContextVar[_Reads | None] = contextvars.ContextVar("pmem_lookup_reads", default=None)


@contextlib.contextmanager
def reads(record: bool = False) -> Iterator[_Reads]:
  """Scope of one forward trace whose tapped reads are counted; ``record``: read without probes
  and record their probes' shapes (the train step's discovery pass, or an eval of staged rows)."""
  token = _READS.set(_Reads(record))
  try:
    yield _READS.get()
  finally:
    _READS.reset(token)


def _value(table) -> Any:
  return table.get_value() if hasattr(table, "get_value") else table


def _encode(ids: jax.Array) -> jax.Array:
  i = ids.astype(jnp.int32) + 1
  return jnp.stack([i // _HALF, i % _HALF], -1).astype(jnp.float32)


def decode(code: Float[Array, "... 2"]) -> Int[Array, "..."]:
  """The ids a probe's id cotangent carries; ``-1`` where the read did not reach the loss."""
  c = code.astype(jnp.int32)
  return c[..., 0] * _HALF + c[..., 1] - 1


@jax.custom_vjp
def _tap(rows, grads, codes, ids):
  del grads, codes, ids
  return rows


def _tap_fwd(rows, grads, codes, ids):
  del grads, codes
  return rows, ids


def _tap_bwd(ids, g):
  return g, g, _encode(ids), None


_tap.defvjp(_tap_fwd, _tap_bwd)


def _positions(t: Tap, ids: jax.Array) -> jax.Array:
  """Row of ``t.rows`` of each id: the id itself, or (host-staged rows) its position among the sorted
  staged ids; ``t.rows.shape[0]`` (reads zeros) for an id that is not there."""
  idx = ids.astype(jnp.int32)
  if t.slots is None:
    return idx
  pos = jnp.searchsorted(t.slots, idx).astype(jnp.int32)
  return jnp.where(t.slots[jnp.minimum(pos, t.slots.shape[0] - 1)] == idx, pos, t.rows.shape[0])


_LOOPS = ("scan", "fori_loop", "while_body", "while_cond")  # DebugInfo.traced_for of loop bodies


def _is_loop(trace) -> bool:
  """Whether ``trace`` is a vmap's or the body of a scan / fori / while loop."""
  dbg = getattr(getattr(trace, "frame", None), "debug_info", None)
  return isinstance(trace, BatchTrace) or getattr(dbg, "traced_for", None) in _LOOPS


def _check_loops(t: Tap, probe: Probe, scope) -> None:
  """Raise unless every loop between the read scope's trace ``scope`` and the read slices the probe
  (see the module docstring). Walks the traces from the read's up to ``scope``: a loop below the
  probe's trace closed over or broadcast the probe; the loops from it up must each have sliced one
  stacked dim off the Tap (one that did not carried it)."""
  trace, own = find_top_trace(()), getattr(probe.grads, "_trace", None)
  closed = sliced = 0
  while trace is not None and trace is not scope:
    own = None if trace is own else own  # None from the probe's trace up
    if _is_loop(trace):
      closed, sliced = (closed, sliced + 1) if own is None else (closed + 1, sliced)
    trace = getattr(trace, "parent_trace", None)
  if closed or sliced > t.stacked:
    raise ValueError(f"MemoryTable {t.name!r} is read inside a lax.scan / fori_loop / vmap body that does not "
                     "slice it, which would sum its row gradients over the iterations: stage the rows before the "
                     "loop with pmem.memory.lookup.stage (ids computed inside a loop cannot be read there)")


def _probe(t: Tap, spec: Probe) -> Probe | None:
  """This read's probe (None while reads are recorded); ``spec``: its shapes."""
  if t.rows.ndim != 2:
    raise ValueError(f"MemoryTable {t.name!r}: a read sees a [rows, width] table, got {t.rows.shape}")
  ctx = _READS.get()
  if ctx is None:
    raise RuntimeError(f"MemoryTable {t.name!r} holds a Tap outside the train step's read scope")
  i = ctx.next(t.name, spec)
  if ctx.record:
    return None
  if i >= len(t.probes):
    raise RuntimeError(f"MemoryTable {t.name!r} is read more often than when its reads were discovered")
  p = t.probes[i]
  got = jax.tree.map(lambda a: (a.shape, a.dtype), p)
  if got != jax.tree.map(lambda a: (a.shape, a.dtype), spec):
    raise RuntimeError(f"MemoryTable {t.name!r} read {i}: probe {got} for a read of {spec}")
  _check_loops(t, p, ctx.trace)
  return p


def _sds(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _tapped(t: Tap, ids: jax.Array) -> jax.Array:
  """Flat rows ``[N, D]`` of ``ids`` whose backward fills this read's probe."""
  flat = ids.reshape(-1)
  n, d = flat.shape[0], t.rows.shape[-1]
  p = _probe(t, Probe(_sds(n, d, dtype=t.rows.dtype), _sds(n, 2)))
  rows = jnp.take(jax.lax.stop_gradient(t.rows), _positions(t, flat), axis=0, mode="fill", fill_value=0)
  return rows if p is None else _tap(rows, p.grads, p.ids, flat)


@jax.custom_vjp
def _bag_tap(out, grads, codes, weights, ids, w):
  del grads, codes, weights, ids, w
  return out


def _bag_tap_fwd(out, grads, codes, weights, ids, w):
  del grads, codes, weights
  return out, (ids, w)


def _bag_tap_bwd(res, g):
  ids, w = res
  return g, g, _encode(ids), w, None, None


_bag_tap.defvjp(_bag_tap_fwd, _bag_tap_bwd)


def _tapped_bag(t: Tap, ids: Int[Array, "S k"], w: Float[Array, "S k"], implementation: str) -> jax.Array:
  """The bag ``[S, D]`` of a tapped table (its kernel, no gradient to the rows) whose backward fills
  this read's probe with the output cotangents, the ids and the weights."""
  (s, k), d = ids.shape, t.rows.shape[-1]
  p = _probe(t, Probe(_sds(s, d, dtype=t.rows.dtype), _sds(s, k, 2), _sds(s, k), implementation))
  out = embedding_bag(jax.lax.stop_gradient(t.rows), _positions(t, ids), w, implementation=implementation)
  if p is None:
    return out
  return _bag_tap(out, p.grads, p.ids, p.weights, ids, jax.lax.stop_gradient(w.astype(jnp.float32)))


def _checked(t, ids: jax.Array, ids_check: str) -> None:
  check_ids(ids, t.num_rows if isinstance(t, Tap) else t.shape[0], ids_check, what="table ids")


def gather(table, ids: Int[Array, "..."], *, ids_check: str = "trusted") -> Float[Array, "... D"]:
  """``table[ids]`` for a MemoryTable (variable or array) of shape ``[V, D]``; ``ids_check``: see
  the module docstring."""
  t = _value(table)
  _checked(t, ids, ids_check)
  if isinstance(t, Tap):
    return _tapped(t, ids).reshape(*ids.shape, t.rows.shape[-1])
  return embedding_gather(t, ids)


def stage(table, ids: Int[Array, "..."], *, ids_check: str = "trusted") -> Float[Array, "... D"]:
  """The rows ``[*ids.shape, D]`` of every id a loop (``lax.scan``, ``fori_loop``, ``vmap``) will use,
  read before the loop: the body indexes them (or scans them as inputs), their gradient flows back
  across the loop by ordinary autodiff, and this one read fills the probe. A :func:`gather`, named
  for the loop rule of the module docstring."""
  return gather(table, ids, ids_check=ids_check)


def bag(table, ids: Int[Array, "... k"], weights: Float[Array, "... k"], *,
        implementation: str = "auto", ids_check: str = "trusted") -> Float[Array, "... D"]:
  """``sum_j weights[..., j] * table[ids[..., j]]`` (an embedding bag, PKM / Memory+ reads);
  differentiable in ``weights``. ``implementation``: the kernel (``kernels.IMPLEMENTATIONS``);
  ``ids_check``: see the module docstring."""
  t = _value(table)
  _checked(t, ids, ids_check)
  if not isinstance(t, Tap):
    return embedding_bag(t, ids, weights, implementation=implementation)
  if ids.shape != weights.shape:
    raise ValueError(f"ids {ids.shape} and weights {weights.shape} must have the same shape")
  k = ids.shape[-1]
  out = _tapped_bag(t, ids.reshape(-1, k), weights.reshape(-1, k), implementation)
  return out.reshape(*ids.shape[:-1], t.rows.shape[-1])

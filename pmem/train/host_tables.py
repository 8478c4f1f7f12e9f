"""Host-resident MemoryTables: the table and its optimizer state in NumPy, rows shipped per batch.

For each batch a host stage takes the table's ids from the batch (``index=`` metadata of the
MemoryTable: the batch field the module reads it with, e.g. ``"inputs"`` for a token-indexed
table), deduplicates them (``variables.unique``), gathers those rows ``[..., U, D]`` and ships them
with the batch (``batch["tables"]``, padded to ``max_unique`` rows; more unique ids than that is an
error). The device step reads the staged rows through the same tapped lookups as a device
table (``pmem.train.sparse``) and returns the compact row gradients, the learning rate and the
clip norm; :meth:`HostTables.apply` runs the device's row update on the host in place: where the
device's is the native lazy Adam (CPU, adam / adamw), one native pass over the touched rows of
the NumPy table and its state (``kernels.native.host_row_adam``: the same per-row arithmetic, no
gathered copies, the GIL released), else :func:`sparse.update_rows` jitted on the gathered rows,
scattered back. Staging of batch ``s + 1`` (unique + gather) runs in a background thread while
step ``s`` computes; after step ``s``'s rows are written back, the staged rows of ``s + 1`` that
step ``s`` changed are gathered again, so training equals device-resident row-sparse training
(bitwise on CPU, tested).

Only tables whose ids are known before the forward can live on the host (token / n-gram
indexed). Tables whose ids are computed in the forward (product-key top-k) have no ``index=``
and are refused. Single-process only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kernels import native
from pmem.core import variables
from pmem.train import optim, sparse


def state_bytes(tx: optim.Optimizer, v) -> int:
  """Bytes of a table and its row-sparse optimizer state."""
  shapes = sparse.state_shapes(tx.cfg.tables.optimizer, v.shape).values()
  return int(np.prod(v.shape)) * v.dtype.itemsize + sum(int(np.prod(s)) * np.dtype(dt).itemsize for s, dt in shapes)


def placement(tx: optim.Optimizer, params: nnx.State) -> dict[str, int]:
  """``{name: rows}`` of the row-sparse tables that go to the host so that the rest (bytes with
  optimizer state) fits ``tables.device_budget_bytes``: the largest host-eligible ones first."""
  budget = tx.cfg.tables.device_budget_bytes
  if budget is None:
    return {}
  tables = sparse.tables_of(params, tx.row_sparse)
  need = {name: state_bytes(tx, v) for name, (_, v) in tables.items()}
  eligible = [name for name, (_, v) in tables.items() if v.get_metadata().get("index") is not None]
  host, on_device = {}, sum(need.values())
  for name in sorted(eligible, key=lambda n: -need[n]):
    if on_device <= budget:
      break
    _, v = tables[name]
    host[name], on_device = v.shape[sparse.row_axis(v)], on_device - need[name]
  if on_device > budget:
    stuck = [f"{n} ({need[n]:,} bytes)" for n in tables if n not in host]
    raise ValueError(f"MemoryTables {', '.join(stuck)} do not fit train.optim.tables.device_budget_bytes="
                     f"{budget:,} and cannot live on the host: their ids are computed in the forward (no index= "
                     "metadata naming the batch field they are read with); raise the budget or shard them")
  return host


@dataclasses.dataclass
class _Item:
  """One batch of the prefetched stream: the inner iterator state before it, and its staging."""
  state: object
  batch: dict[str, np.ndarray]
  staged: concurrent.futures.Future


class HostTables:
  """The host tables of a run, their optimizer state, and the stage / apply around the step."""

  def __init__(self, tx: optim.Optimizer, tables: Mapping[str, np.ndarray], index: Mapping[str, str],
               max_unique: int):
    if jax.process_count() > 1:
      raise NotImplementedError("host-resident tables are single-process")
    self.tables = {name: np.ascontiguousarray(x) for name, x in tables.items()}  # the native update's layout
    self.tx, self.index, self.max_unique = tx, dict(index), max_unique
    t = tx.cfg.tables
    self.state = {name: sparse.init_state(t, x.shape, np) for name, x in self.tables.items()}
    self.bc = np.zeros((0, 2), np.float32)  # Adam's bias corrections by step count (native update)
    self.pending: collections.deque[_Item] = collections.deque()  # yielded, not yet stepped (<= 1)
    self.ahead: _Item | None = None  # pulled and being staged, not yet yielded
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pmem-host-tables")
    self.cpu = jax.devices("cpu")[0]
    self._update = jax.jit(functools.partial(_update_rows, t, tx.cfg.eps))
    _no_copy_numpy_saves()

  @classmethod
  def create(cls, tx: optim.Optimizer, abs_params: nnx.State, init_params: Callable[[], nnx.State],
             batch_ids: Mapping[str, int]) -> tuple[optim.Optimizer, HostTables | None]:
    """(optimizer knowing the host tables, their store or None): places tables by the device budget
    and initializes the host ones on the CPU from ``init_params`` (the model's own initializers).
    ``batch_ids``: ids per batch in each batch field, the staging bound unless ``tables.max_unique``."""
    host = placement(tx, abs_params)
    if not host:
      return tx, None
    tx = tx.with_host(host)
    tables = sparse.tables_of(abs_params, lambda name, v: name in host)
    with jax.default_device(jax.devices("cpu")[0]):
      values = jax.jit(lambda: {n: v.get_value() for n, (_, v) in sparse.tables_of(init_params(),
                                                                                    lambda n, v: n in host).items()})()
    arrays = {}
    for name in host:
      arrays[name] = np.array(values.pop(name))  # a writable copy; the jax buffer is freed
    index = {n: v.get_metadata()["index"] for n, (_, v) in tables.items()}
    max_unique = tx.cfg.tables.max_unique or max(batch_ids[f] for f in index.values())
    return tx, cls(tx, arrays, index, max_unique)

  def placeholders(self, params: nnx.State) -> nnx.State:
    """``params`` with each host table replaced by a one-row ``[..., 1, D]`` placeholder (it keeps
    the variable's metadata; Orbax does not save empty arrays)."""
    tables = sparse.tables_of(params, lambda name, v: name in self.tables)
    empty = lambda v: jax.numpy.zeros((*v.shape[:-2], 1, v.shape[-1]), v.dtype)  # noqa: E731
    return nnx.merge_state(params, sparse.with_values(tables, {n: empty(v) for n, (_, v) in tables.items()}))

  # ------------------------------------------------------------------------------- staging

  def stage(self, batch: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``{name: {rows [..., U, D], slots [..., U]}}`` for a batch: its unique ids (padding = V) and rows."""
    return {name: variables.stage_rows(name, table, batch[self.index[name]], self.max_unique)
            for name, table in self.tables.items()}

  def _refresh(self, staged: dict, written: Mapping[str, np.ndarray]) -> dict:
    """Gathers again the staged rows that were written (sorted ``written`` ids) after they were staged."""
    for name, ids in written.items():
      slots, table = staged[name]["slots"].reshape(-1, self.max_unique)[0], self.tables[name]  # sorted, then V
      j = np.minimum(np.searchsorted(slots, ids), slots.size - 1)
      pos = j[slots[j] == ids]
      staged[name]["rows"][..., pos, :] = table[..., slots[pos], :]
    return staged

  def prefetch(self, it) -> _Prefetch:
    """``it`` (numpy batches, Grain-checkpointable) with each next batch staged in the background."""
    return _Prefetch(self, it)

  # ------------------------------------------------------------------------------- updates

  def apply(self, out: Mapping) -> dict[str, np.ndarray]:
    """Applies a step's host output (compact gradients, lr, clip norm); returns the written ids."""
    out = jax.device_get(out)
    written = {}
    for name, g in out["grads"].items():
      v = self.tables[name].shape[-2]
      if (g.ids[..., self.max_unique:] < v).any():
        raise RuntimeError(f"host table {name!r}: more unique ids came back than were staged")
      ids = g.ids[..., :self.max_unique]
      if sparse.implementation(self.tx.cfg.tables, self.tables[name].dtype) == "native":
        self._native(name, g, ids.shape[-1], out["lr"], out["norm"])
      else:
        self._gathered(name, ids, g.rows[..., :self.max_unique, :], out["lr"], out["norm"])
      written[name] = variables.unique(ids[ids < v])
    return written

  def _native(self, name: str, g: sparse.Rows, m: int, lr, norm) -> None:
    """Lazy Adam of the first ``m`` slots' rows in place, in one native pass (``pmem_row_adam``'s
    arithmetic row by row: it equals :meth:`_gathered` bitwise); the bias corrections come from a table
    by step count, grown when a count outgrows it."""
    t, s = self.tx.cfg.tables, self.state[name]
    k = np.array([lr, norm, t.clip_norm or 0.0, t.weight_decay, t.b1, t.b2, 1 - t.b1, 1 - t.b2, self.tx.cfg.eps],
                 np.float32)
    while native.host_row_adam(self.tables[name], s["mu"], s["nu"], s["count"], g.ids, g.rows, m, self.bc, k,
                               2 if t.optimizer == "adamw" else 1) is None:
      with jax.default_device(self.cpu):
        c = np.arange(max(2 * len(self.bc), 4096), dtype=np.int32)
        self.bc = np.asarray(jax.jit(functools.partial(sparse.bias_corrections, t))(c))

  def _gathered(self, name: str, ids: np.ndarray, rows: np.ndarray, lr, norm) -> None:
    """The row update of other optimizers and backends: the touched rows and their state gathered,
    :func:`sparse.update_rows` on them (jitted, on the CPU), scattered back."""
    table, state = self.tables[name], self.state[name]
    n, v = table.ndim - 2, table.shape[-2]
    valid = ids < v
    idx = np.where(valid, ids, 0)
    take = lambda x: np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - n - 1)), axis=n)  # noqa: E731
    with jax.default_device(self.cpu):
      new, s_new = jax.device_get(self._update(take(table), {k: take(x) for k, x in state.items()}, rows, lr, norm))
    for i in np.ndindex(table.shape[:n]):  # per stacked layer
      keep = valid[i]
      table[i][ids[i][keep]] = new[i][keep]
      for k, x in state.items():
        x[i][ids[i][keep]] = s_new[k][i][keep]

  def train_step(self, step: Callable) -> Callable:
    """``step(train_state, batch) -> (train_state, metrics)`` around the jitted device step (3 outputs): ships
    the staged rows of this batch, applies the row gradients here, refreshes the next staging."""

    def run(train_state, batch):
      item = self.pending.popleft()
      train_state, metrics, out = step(train_state, {**batch, "tables": item.staged.result()})
      written = self.apply(out)
      if self.ahead is not None:
        staged = self.ahead.staged.result()
        self.ahead.staged = _done(self._refresh(staged, written))
      return train_state, metrics

    return run

  def score_step(self, score: Callable) -> Callable:
    """``score(train_state, batch)`` with the batch's rows staged (synchronously; eval reads only)."""
    return lambda train_state, batch: score(train_state, {**batch, "tables": self.stage(jax.device_get(batch))})

  # ---------------------------------------------------------------------------- checkpoints

  def arrays(self) -> dict:
    """The tables and their state for a checkpoint (saved without a copy: the caller lets the
    save finish before the next :meth:`apply`)."""
    return {name: {"table": t, **self.state[name]} for name, t in self.tables.items()}

  def abstract(self) -> dict:
    """Restore targets (empty arrays of each dtype; Orbax reads into fresh arrays)."""
    return {name: {"table": np.empty(0, t.dtype), **{k: np.empty(0, x.dtype) for k, x in self.state[name].items()}}
            for name, t in self.tables.items()}

  def restore(self, arrays: Mapping) -> None:
    for name in self.tables:
      self.tables[name] = np.ascontiguousarray(arrays[name]["table"])
      self.state[name] = {k: np.ascontiguousarray(arrays[name][k]) for k in self.state[name]}
    self.pending.clear()
    self.ahead = None


def _update_rows(cfg, eps, p, s, g, lr, norm):
  """The staged rows' new values and state: :func:`sparse.update_rows` (the device's row update) on
  the rows ``[..., U, D]`` as a table."""
  ids = np.broadcast_to(np.arange(p.shape[-2], dtype=np.int32), p.shape[:-1])
  written, s = sparse.update_rows(cfg, eps, p, s, sparse.Rows(ids, g), lr, norm)
  return written.table, s


def _done(value) -> concurrent.futures.Future:
  f = concurrent.futures.Future()
  f.set_result(value)
  return f


class _Prefetch:
  """The batch stream with the next batch's rows staged in a background thread; ``get_state``
  is the position of the next batch to yield (the one staged ahead is pulled again on resume)."""

  def __init__(self, host: HostTables, it):
    self.host, self.it = host, it

  def __iter__(self) -> Iterator:
    return self

  def _pull(self, background: bool) -> _Item | None:
    state = self.it.get_state() if hasattr(self.it, "get_state") else None  # plain iterators: no resume
    try:
      batch = next(self.it)
    except StopIteration:
      return None
    staged = self.host.pool.submit(self.host.stage, batch) if background else _done(self.host.stage(batch))
    return _Item(state, batch, staged)

  def __next__(self) -> dict[str, np.ndarray]:
    h = self.host
    item = h.ahead if h.ahead is not None else self._pull(background=False)
    if item is None:
      raise StopIteration
    h.pending.append(item)
    h.ahead = self._pull(background=True)  # overlaps the step of ``item``
    return item.batch

  def get_state(self):
    return self.host.ahead.state if self.host.ahead is not None else self.it.get_state()

  def set_state(self, state) -> None:
    self.it.set_state(state)
    self.host.pending.clear()
    self.host.ahead = None


_NO_COPY = []


def _no_copy_numpy_saves() -> None:
  """Orbax deep-copies NumPy arrays before saving them (a second copy of a host table); save them
  without the copy (the Trainer waits for a save of host tables to finish before the next step)."""
  if not _NO_COPY:
    ocp.type_handlers.register_type_handler(np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False),
                                            override=True)
    _NO_COPY.append(True)

"""AdamW with warmup + cosine and global-norm clipping, routed by variable type; row-sparse tables.

Ordinary parameters and :class:`MemoryTable` variables are separate groups, so tables get their
own optimizer, learning-rate multiplier, weight decay, betas and clipping norm (STEM and Engram
clip their tables separately from the backbone). A table is updated either densely (optax on a
table-sized gradient, the ablation) or row-sparse (``pmem.train.sparse``: only the rows a batch
touches, cost independent of the table size); ``tables.update="auto"`` picks row-sparse from
``sparse_min_rows`` rows (dense unique/sort/scatter overheads win below ~2^15 rows on CPU).
Row-sparse tables are clipped jointly among themselves, dense tables among themselves.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pmem.core.variables import MemoryTable, is_variable, name_of
from pmem.train import sparse

UPDATES = ("auto", "dense", "row_sparse")


@dataclasses.dataclass(frozen=True)
class TableOptimConfig:
  update: str = "auto"  # UPDATES
  optimizer: str = "adamw"  # sparse.OPTIMIZERS
  sparse_min_rows: int = 32768  # "auto": row-sparse from this many rows
  lr_mult: float = 1.0
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  b1: float = 0.9
  b2: float = 0.95
  adagrad_init: float = 0.0  # initial sum of squares
  device_budget_bytes: int | None = None  # row-sparse tables (+ state) past this budget live on the host
  max_unique: int | None = None  # host tables: staged rows per batch (None: every id of the batch)
  implementation: str = "auto"  # row-sparse update: sparse.ROW_IMPLEMENTATIONS (native: fused CPU Adam)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-3
  warmup_steps: int = 10
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0
  tables: TableOptimConfig = TableOptimConfig()


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _clip(norm: float | None) -> optax.GradientTransformation:
  """Global-norm clipping; with no norm an infinite one (the updates pass through bit for bit), so
  the optimizer state has one structure whether clipping is on or off and a run may resume with
  either (the NaN stop's remedy)."""
  return optax.clip_by_global_norm(norm if norm else float("inf"))


def _adamw(lr, b1, b2, eps, wd, clip, decay_mask) -> optax.GradientTransformation:
  return optax.chain(_clip(clip), optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask))


def _scale_by_rowwise_rss(init: float, eps: float) -> optax.GradientTransformation:
  """Row-wise Adagrad: one accumulated mean square per row of a [..., V, D] table."""

  def init_fn(params):
    return jax.tree.map(lambda p: jnp.full(p.shape[:-1], init, jnp.float32), params)

  def update_fn(updates, acc, params=None):
    del params
    acc = jax.tree.map(lambda g, a: jnp.mean(g * g, -1) + a, updates, acc)
    scale = lambda a: jnp.where(a > 0, jax.lax.rsqrt(a + eps), 0.0)[..., None]
    return jax.tree.map(lambda g, a: scale(a) * g, updates, acc), acc

  return optax.GradientTransformation(init_fn, update_fn)


def _dense_table_tx(t: TableOptimConfig, lr, eps: float) -> optax.GradientTransformation:
  """The dense ablation of the row-sparse table optimizers (same formulas on every row)."""
  direction = {"sgd": optax.identity(), "adagrad": optax.scale_by_rss(t.adagrad_init, eps),
               "adagrad_rowwise": _scale_by_rowwise_rss(t.adagrad_init, eps),
               "adam": optax.scale_by_adam(t.b1, t.b2, eps), "adamw": optax.scale_by_adam(t.b1, t.b2, eps)}
  decay = [optax.add_decayed_weights(t.weight_decay)] if t.weight_decay else []
  parts = [_clip(t.clip_norm)]
  parts += ([direction[t.optimizer]] + decay) if t.optimizer == "adamw" else (decay + [direction[t.optimizer]])
  return optax.chain(*parts, optax.scale_by_learning_rate(lambda s: t.lr_mult * lr(s)))


def trainable(params: nnx.State, patterns: Sequence[str]) -> tuple[nnx.State, nnx.State]:
  """(the parameters whose path, ``/``-joined, matches a glob of ``patterns`` (fnmatch: ``*`` crosses ``/``);
  the frozen rest).
  Only the first part is differentiated and has optimizer state; the rest passes through a step
  bit for bit. A scanned stage's variable stacks its layers, so it is trained or frozen whole."""
  return nnx.split_state(params, lambda path, v: any(fnmatch.fnmatchcase(name_of(path), q) for q in patterns), ...)


def check_trainable(params: nnx.State, patterns: Sequence[str]) -> None:
  """One-line errors for a pattern that matches no parameter and for a selection that trains nothing."""
  names = [name_of(p) for p, _ in nnx.to_flat_state(params)]
  for q in patterns:
    if not any(fnmatch.fnmatchcase(n, q) for n in names):
      raise ValueError(f"train.trainable pattern {q!r} matches no parameter; the parameters: {', '.join(names)}")
  if not patterns:
    raise ValueError("train.trainable is empty: nothing would be trained (the default ('*',) trains everything)")


def labels(params: nnx.State) -> nnx.State:
  return jax.tree.map(lambda v: "table" if isinstance(v, MemoryTable) else "dense", params,
                      is_leaf=is_variable)


def table_rows(v) -> int:
  """Rows of a table variable: the size of its ``table_rows`` dim (after stacked-layer dims)."""
  return v.shape[v.ndim - len(v.get_metadata().get("axes", (None,)))]


def _is_rows(v) -> bool:
  return isinstance(v.get_value(), (sparse.Rows, sparse.Written))


class Optimizer:
  """optax-style ``init`` / ``update`` over the whole parameter tree.

  Ordinary parameters and dense-updated tables go through optax. Row-sparse tables take
  :class:`sparse.Rows` gradients (from :func:`sparse.value_and_grad`); :meth:`update` writes their
  touched rows in place and returns the new tables (:class:`sparse.Written`), which
  :meth:`apply_updates` puts in the parameters. ``host`` maps host-resident tables to their
  rows (placeholders in ``params``; updated by ``pmem.train.host_tables``, not here)."""

  def __init__(self, cfg: OptimConfig, total_steps: int, host: dict[str, int] | None = None):
    t = cfg.tables
    if t.update not in UPDATES:
      raise ValueError(f"train.optim.tables.update must be one of {UPDATES}, got {t.update!r}")
    if t.optimizer not in sparse.OPTIMIZERS:
      raise ValueError(f"train.optim.tables.optimizer must be one of {sparse.OPTIMIZERS}, got {t.optimizer!r}")
    if t.implementation not in sparse.ROW_IMPLEMENTATIONS:
      raise ValueError(f"train.optim.tables.implementation must be one of {sparse.ROW_IMPLEMENTATIONS}, "
                       f"got {t.implementation!r}")
    self.cfg, self.total_steps, self.host = cfg, total_steps, dict(host or {})
    self.lr = schedule(cfg, total_steps)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # no decay on norm scales
    self.dense = optax.partition({
        "dense": _adamw(self.lr, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.clip_norm, decay_mask),
        "table": _dense_table_tx(t, self.lr, cfg.eps),
    }, labels)

  def with_host(self, host: dict[str, int]) -> Optimizer:
    return Optimizer(self.cfg, self.total_steps, host)

  def table_lr(self, step: jax.Array) -> jax.Array:
    return self.cfg.tables.lr_mult * self.lr(step)

  def row_sparse(self, name: str, v) -> bool:
    """Whether table ``name`` (a MemoryTable variable) is updated row-sparse."""
    t = self.cfg.tables
    return name in self.host or t.update == "row_sparse" or (
        t.update == "auto" and table_rows(v) >= t.sparse_min_rows)

  def _split(self, tree: nnx.State, pred) -> tuple[nnx.State, nnx.State]:
    """(variables ``pred(name, variable)`` picks, the rest)."""
    return nnx.split_state(tree, lambda path, v: pred(sparse.name_of(path), v), ...)

  def _sparse(self, name: str, v) -> bool:
    return isinstance(v, MemoryTable) and self.row_sparse(name, v)

  def _tables(self, params: nnx.State) -> dict[str, tuple[tuple, nnx.Variable]]:
    return sparse.tables_of(params, lambda name, v: self.row_sparse(name, v) and name not in self.host)

  def init(self, params: nnx.State) -> dict:
    dense = self._split(params, self._sparse)[1]
    tables = self._tables(params)
    keys = sparse.state_shapes(self.cfg.tables.optimizer, ())
    states = {name: sparse.init_state(self.cfg.tables, v.shape) for name, (_, v) in tables.items()}
    rows = {k: sparse.with_values(tables, {n: s[k] for n, s in states.items()}) for k in keys}
    return {"dense": self.dense.init(dense), "rows": rows, "count": jnp.zeros((), jnp.int32)}

  def row_state_shardings(self, opt_sh: dict, param_sh: nnx.State) -> dict:
    """``opt_sh`` (from ``loop.shardings_like``, which matches state to parameters by shape) with
    the per-row state ``[..., V]`` (counts, row-wise sums) sharded like its table's rows."""
    by_name = {sparse.name_of(p): sh for p, sh in nnx.to_flat_state(param_sh)}
    rows = dict(opt_sh["rows"])
    for k, (shape, _) in sparse.state_shapes(self.cfg.tables.optimizer, (1, 1)).items():
      if len(shape) == 1:
        rows[k] = nnx.from_flat_state([
            (p, v.replace(NamedSharding(by_name[sparse.name_of(p)].mesh, P(*by_name[sparse.name_of(p)].spec[:-1]))))
            for p, v in nnx.to_flat_state(rows[k])])
    return {**opt_sh, "rows": rows}

  def update(self, grads: nnx.State, state: dict, params: nnx.State, *,
             host_norm_sq: jax.Array | float = 0.0) -> tuple[nnx.State, dict]:
    """(updates, state); the row-sparse state is updated in place for the touched rows. The clip
    norm of row-sparse tables includes the host tables' squared norm ``host_norm_sq``."""
    dense_g, row_g = self._rows(grads)
    updates, dense_s = self.dense.update(dense_g, state["dense"], self._split(params, self._sparse)[1])
    norm, lr = jnp.sqrt(sparse.norm_sq(row_g) + host_norm_sq), self.table_lr(state["count"])
    rows_s, new = {k: dict(nnx.to_flat_state(s)) for k, s in state["rows"].items()}, {}
    tables = self._tables(params)
    for name, (path, v) in tables.items():
      st = {k: s[path].get_value() for k, s in rows_s.items()}
      new[name], st = sparse.update_rows(self.cfg.tables, self.cfg.eps, v.get_value(), st, row_g[name], lr, norm)
      for k, s in rows_s.items():
        s[path] = s[path].replace(st[k])
    rows_s = {k: nnx.from_flat_state(list(s.items())) for k, s in rows_s.items()}
    return (nnx.merge_state(updates, sparse.with_values(tables, new)),
            {"dense": dense_s, "rows": rows_s, "count": state["count"] + 1})

  def apply_updates(self, params: nnx.State, updates: nnx.State) -> nnx.State:
    """optax.apply_updates for dense leaves; the row-sparse tables :meth:`update` wrote."""
    dense_u, written = self._rows(updates)
    tables = sparse.tables_of(params, lambda name, v: name in written)
    kept, dense_p = self._split(params, self._sparse)
    kept = self._split(kept, lambda name, v: name not in written)[0]  # host placeholders
    new = {name: written[name].table for name in tables}
    return nnx.merge_state(optax.apply_updates(dense_p, dense_u), kept, sparse.with_values(tables, new))

  def pop_host(self, grads: nnx.State) -> tuple[nnx.State, dict[str, sparse.Rows]]:
    """(grads without the host tables, {name: Rows} of the host tables)."""
    host, rest = self._split(grads, lambda name, v: name in self.host)
    return rest, {sparse.name_of(p): v.get_value() for p, v in nnx.to_flat_state(host)}

  def _rows(self, tree: nnx.State) -> tuple[nnx.State, dict]:
    """(the dense part of a gradient / update tree, ``{name: Rows / Written}`` of its row-sparse tables)."""
    rows, rest = self._split(tree, lambda name, v: _is_rows(v))
    return rest, {sparse.name_of(p): v.get_value() for p, v in nnx.to_flat_state(rows)}

  def table_norm(self, grads: nnx.State, host: dict[str, sparse.Rows]) -> jax.Array:
    """Global norm of the row-sparse tables' gradients (device and host), their clip norm."""
    return jnp.sqrt(sparse.norm_sq(self._rows(grads)[1]) + sparse.norm_sq(host))

  def grad_norm(self, grads: nnx.State, host: dict[str, sparse.Rows]) -> jax.Array:
    dense, rows = self._rows(grads)
    return jnp.sqrt(optax.tree.norm(dense, squared=True) + sparse.norm_sq(rows) + sparse.norm_sq(host))

  def param_norm(self, params: nnx.State, updates: nnx.State) -> jax.Array:
    """Norm of the dense parameters and of the rows row-sparse tables wrote this step (a norm
    of whole tables would cost a pass over them every step)."""
    dense = self._split(params, self._sparse)[1]
    written = sum((w.norm_sq for w in self._rows(updates)[1].values()), jnp.zeros((), jnp.float32))
    return jnp.sqrt(optax.tree.norm(dense, squared=True) + written)


def build(cfg: OptimConfig, total_steps: int) -> tuple[Optimizer, optax.Schedule]:
  tx = Optimizer(cfg, total_steps)
  return tx, tx.lr

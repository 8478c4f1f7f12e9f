"""Row-sparse training of :class:`MemoryTable` variables: cost per step grows with rows touched.

1. :func:`value_and_grad` replaces each row-sparse table's value by a :class:`lookup.Tap`, traces
   the forward once abstractly to discover its reads (gathers of ``N`` ids, bags of ``[S, k]``),
   then differentiates with respect to the dense parameters and one zero probe per read. The
   probes' cotangents are a gather's per-occurrence row gradients ``[N, D]`` and ids, or a bag's
   output cotangents ``[S, D]``, ids and weights (``pmem.memory.lookup``); no table-sized gradient
   exists. The tables themselves are not differentiated.
2. :func:`compact` sorts a gather's ids (stable) and sums each id's rows in occurrence order; a
   bag's ids are compacted by its kernel (``kernels.embedding_bag_table_grad``, no ``[S·k, D]``
   rows): :class:`Rows` (sorted unique ids padded with ``V``, summed rows; ``min(N, V)`` slots).
   A table read several times sums the parts' rows.
3. :func:`update_rows` writes the touched rows of the table and of its optimizer state in place
   (the train step donates its state, otherwise every write copies the table): XLA gathers them,
   applies :func:`row_step` and scatters them back (``unique_indices``; leading stacked-layer dims
   vmapped); on CPU, Adam's rows are updated by one fused native pass (``pmem_row_adam``, see
   :func:`implementation`), within float32 rounding of XLA's (XLA:CPU contracts multiply-adds
   into FMAs differently for each expression shape; the kernel fuses them as XLA does without
   clipping or decay).

Optimizers (``TableOptimConfig.optimizer``), all on touched rows only, in optax's formulas:
``sgd``; ``adagrad`` (element-wise sum of squares, ``optax.scale_by_rss``); ``adagrad_rowwise``
(one sum of the row's mean square per row, FBGEMM's row-wise Adagrad); ``adam`` / ``adamw``
(``optax.scale_by_adam``) with *lazy* semantics: a row's moments decay and its bias correction
advances only on steps that touch it (per-row step count ``count [..., V]``). Dense Adam also
decays untouched rows' moments and keeps moving rows with non-zero momentum; the two agree when
every row is touched every step. Weight decay touches only updated rows: coupled (added to the
gradient) for sgd/adagrad/adam, decoupled (added to the direction) for adamw. For SGD and Adagrad
without weight decay lazy and dense updates are the same. State per table:

=================  =======================================================
sgd                none
adagrad            ``acc [..., V, D]``
adagrad_rowwise    ``acc [..., V]``
adam, adamw        ``mu, nu [..., V, D]``, ``count [..., V]`` (int32)
=================  =======================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from kernels import common, embedding_bag_table_grad, native
from pmem.core.variables import MemoryTable, name_of, tables_of, with_values  # noqa: F401 (re-exported)
from pmem.memory import lookup

OPTIMIZERS = ("sgd", "adagrad", "adagrad_rowwise", "adam", "adamw")
ROW_IMPLEMENTATIONS = ("auto", "xla", "native")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
  """Rows of a ``[..., V, D]`` table by sorted unique ``ids [..., N]`` (padding slots hold ``V``
  and are dropped on scatter): a compact gradient, or the new values of those rows."""
  ids: Int[Array, "... N"]
  rows: Float[Array, "... N D"]


def row_axis(v) -> int:
  """Index of the ``table_rows`` dim (leading dims before it are stacked layers)."""
  axes = v.get_metadata().get("axes", ())
  if len(axes) != 2 or axes[0] != "table_rows":
    raise ValueError(f"a row-sparse MemoryTable needs axes ('table_rows', <width>), got {axes}")
  return v.ndim - 2


def compact(ids: Int[Array, " N"], grads: Float[Array, "N D"], num_rows: int) -> Rows:
  """Sorted unique ids (padding ``num_rows``) and each id's rows summed in float32 in occurrence
  order (each row is added straight into its id's run: no gather of ``grads`` into sorted order);
  ids outside ``[0, num_rows)`` (unread probes decode to -1) are dropped. At most ``num_rows`` ids
  are distinct, so the result has ``min(N, num_rows)`` slots (a bag of many reads into a small
  table updates no more rows than the table has)."""
  n, m = ids.shape[0], min(ids.shape[0], num_rows)
  ids = jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows).astype(jnp.int32)
  order = jnp.argsort(ids, stable=True)
  sid = ids[order]
  seg = jnp.cumsum(jnp.concatenate([jnp.ones((1,), bool), sid[1:] != sid[:-1]]), dtype=jnp.int32) - 1
  # the out-of-range run (id num_rows, sorted last) can be run m: dropped from both
  uniq = jnp.full((m,), num_rows, jnp.int32).at[seg].set(sid, mode="drop")
  run = jnp.zeros((n,), jnp.int32).at[order].set(seg, unique_indices=True)  # the run of each occurrence
  rows = jax.ops.segment_sum(grads.astype(jnp.float32), run, m, mode="drop")
  return Rows(uniq, jnp.where((uniq < num_rows)[:, None], rows, 0))


def over_lead(f: Callable, n: int) -> Callable:
  """``f`` vmapped over ``n`` leading (stacked-layer) dims of every argument."""
  for _ in range(n):
    f = jax.vmap(f)
  return f


# ----------------------------------------------------------------------------- differentiation


Staged = Mapping[str, tuple[jax.Array, jax.Array, int]]  # name -> (rows [..., U, D], slots [..., U], V)


def _sources(tables, staged: Staged) -> dict[str, tuple[jax.Array, jax.Array | None, int]]:
  return {name: staged[name] if name in staged else (v.get_value(), None, v.shape[row_axis(v)])
          for name, (_, v) in tables.items()}


def tapped(params: nnx.State, select: Callable, staged: Staged | None = None,
           probes: Mapping[str, tuple[lookup.Probe, ...]] | None = None) -> nnx.State:
  """``params`` with the selected tables holding :class:`lookup.Tap` values (read them under
  ``lookup.reads``). ``staged[name] = (rows [..., U, D], slots [..., U], V)``: a host-resident table
  (a placeholder in ``params``) read from the rows a host stage shipped with the batch."""
  tables = tables_of(params, select)
  src, probes = _sources(tables, staged or {}), probes or {}
  taps = {name: lookup.Tap(rows, slots, probes.get(name, ()), name, n, rows.ndim - 2)
          for name, (rows, slots, n) in src.items()}
  return nnx.merge_state(params, with_values(tables, taps))


def value_and_grad(f: Callable, params: nnx.State, select: Callable, staged: Staged | None = None):
  """``((loss, aux), grads)`` of ``f(params) -> (loss, aux)``; in ``grads`` the tables that
  ``select(name, variable)`` picks hold compact :class:`Rows` instead of a dense gradient (see
  :func:`tapped` for ``staged``)."""
  tables = tables_of(params, select)
  if not tables:
    return jax.value_and_grad(f, has_aux=True)(params)
  src = _sources(tables, staged or {})
  dense, fixed = nnx.split_state(params, lambda path, v: name_of(path) not in tables, ...)
  with lookup.reads(record=True) as found:
    jax.eval_shape(lambda p: f(tapped(p, select, staged)), params)  # Variables of this trace, for nnx transforms in f
  zeros = lambda lead: lambda a: jnp.zeros((*lead, *a.shape), a.dtype)  # noqa: E731
  probes = {name: tuple(jax.tree.map(zeros(rows.shape[:-2]), p) for p in found.probes[name])
            for name, (rows, _, _) in src.items() if name in found.probes}

  def loss(d, probes):
    with lookup.reads() as r:
      out = f(tapped(nnx.merge_state(d, fixed), select, staged, probes))
    if r.count != found.count:
      raise RuntimeError(f"MemoryTable reads changed between traces of the forward: {found.count} -> {r.count}")
    return out

  (value, aux), (g, gp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(dense, probes)
  # The row updates then wait for the whole backward: a read of a table whose result only the dense
  # gradients need (a bag's weight gradient) is otherwise unordered with the in-place row scatter,
  # and XLA copies the table twice per step to keep both (seen with the native bag kernels).
  g, gp = jax.lax.optimization_barrier((g, gp))
  rows = {name: table_grad(gp.get(name, ()), src_rows.shape, num_rows) for name, (src_rows, _, num_rows) in src.items()}
  return (value, aux), nnx.merge_state(g, with_values(tables, rows))


def _bag_rows(p: lookup.Probe, num_rows: int) -> Rows:
  c = embedding_bag_table_grad(lookup.decode(p.ids), p.weights, p.grads, num_rows, implementation=p.implementation)
  return Rows(c.ids, c.rows)


def table_grad(probes: tuple[lookup.Probe, ...], shape: tuple[int, ...], num_rows: int) -> Rows:
  """The compact gradient of a table ``shape = [..., rows, D]`` from its reads' probe cotangents:
  gathers' rows compacted together, each bag by its kernel; several parts merged by :func:`compact`."""
  lead, d = shape[:-2], shape[-1]
  gathers, bags = [p for p in probes if p.weights is None], [p for p in probes if p.weights is not None]
  parts = [over_lead(lambda p: _bag_rows(p, num_rows), len(lead))(p) for p in bags]
  if gathers or not parts:  # a table no read reached gets all-padding Rows
    ids = jnp.concatenate([jnp.zeros((*lead, 0), jnp.int32), *(lookup.decode(p.ids) for p in gathers)], -1)
    gr = jnp.concatenate([jnp.zeros((*lead, 0, d), jnp.float32), *(p.grads for p in gathers)], -2)
    parts.append(over_lead(lambda i, x: compact(i, x, num_rows), len(lead))(ids, gr))
  if len(parts) == 1:
    return parts[0]
  ids, gr = jnp.concatenate([r.ids for r in parts], -1), jnp.concatenate([r.rows for r in parts], -2)
  return over_lead(lambda i, x: compact(i, x, num_rows), len(lead))(ids, gr)


# ----------------------------------------------------------------------------- row optimizers


def state_shapes(optimizer: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], object]]:
  """Optimizer state of a table ``[..., V, D]``: ``{key: (shape, dtype)}`` (per-row keys drop D)."""
  elem, row = shape, shape[:-1]
  return {"sgd": {}, "adagrad": {"acc": (elem, jnp.float32)}, "adagrad_rowwise": {"acc": (row, jnp.float32)},
          "adam": {"mu": (elem, jnp.float32), "nu": (elem, jnp.float32), "count": (row, jnp.int32)},
          "adamw": {"mu": (elem, jnp.float32), "nu": (elem, jnp.float32), "count": (row, jnp.int32)},
          }[optimizer]


def init_state(cfg, shape: tuple[int, ...], xp=jnp) -> dict[str, jax.Array]:
  """Initial state of a table ``shape`` (``xp=np`` for a host table)."""
  fill = {"acc": cfg.adagrad_init}
  return {k: xp.full(s, fill.get(k, 0), dt) for k, (s, dt) in state_shapes(cfg.optimizer, shape).items()}


def row_step(cfg, eps: float, p: Float[Array, "N D"], s: dict[str, jax.Array], g: Float[Array, "N D"],
             lr: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """New values of rows ``p`` and of their state rows ``s`` for summed (clipped) gradient ``g``;
  learning rate ``lr`` (schedule x multiplier). Padding rows (zero g, p, s) stay zero."""
  wd, opt = cfg.weight_decay, cfg.optimizer
  if wd and opt != "adamw":  # coupled: L2 added to the gradient (optax.add_decayed_weights before the direction)
    g = g + wd * p
  s = dict(s)
  if opt == "sgd":
    u = g
  elif opt in ("adagrad", "adagrad_rowwise"):  # optax.scale_by_rss, per element or per row
    sq = g * g if opt == "adagrad" else jnp.mean(g * g, -1)
    s["acc"] = sq + s["acc"]
    inv = jnp.where(s["acc"] > 0, jax.lax.rsqrt(s["acc"] + eps), 0.0)
    u = (inv if opt == "adagrad" else inv[:, None]) * g
  else:  # optax.scale_by_adam with a per-row count (lazy)
    b1, b2 = cfg.b1, cfg.b2
    s["mu"] = (1 - b1) * g + b1 * s["mu"]
    s["nu"] = (1 - b2) * (g * g) + b2 * s["nu"]
    s["count"] = s["count"] + 1
    c = s["count"][:, None]
    mu_hat = s["mu"] / (1 - b1 ** c).astype(g.dtype)
    nu_hat = s["nu"] / (1 - b2 ** c).astype(g.dtype)
    u = mu_hat / (jnp.sqrt(nu_hat) + eps)
    if wd and opt == "adamw":  # decoupled
      u = u + wd * p
  return p + jnp.asarray(-lr, u.dtype) * u, s


def clip(g: jax.Array, norm: jax.Array, max_norm: float | None) -> jax.Array:
  """optax.clip_by_global_norm's formula for one gradient given the global ``norm``."""
  if not max_norm:
    return g
  return jax.lax.select(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm)


def norm_sq(rows: Mapping[str, Rows]) -> jax.Array:
  return sum((jnp.sum(jnp.square(r.rows.astype(jnp.float32))) for r in rows.values()), jnp.zeros((), jnp.float32))


def clipped_step(cfg, eps: float, p, s, g, lr, norm) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`row_step` after clipping by the global ``norm``, fenced by optimization barriers so it
  compiles to the same element-wise code inside the train step and alone (the host tables' update):
  host and device training stay bitwise equal."""
  p, s, g = jax.lax.optimization_barrier((p, s, g))
  return jax.lax.optimization_barrier(row_step(cfg, eps, p, s, clip(g, norm, cfg.clip_norm), lr))


def implementation(cfg, dtype) -> str:
  """The row update ``cfg.implementation`` names for a table of ``dtype``: ``"native"`` (the fused
  in-place lazy Adam ``pmem_row_adam``: CPU, adam/adamw, float32, no multi-device mesh in context;
  ``"auto"`` picks it there) or ``"xla"`` (gather, :func:`clipped_step`, scatter; SPMD-partitioned
  by rows). Naming ``"native"`` where it cannot run raises. (Outside a mesh context a native call
  on a sharded table runs replicated.)"""
  name = cfg.implementation
  if name == "xla":
    return name
  mesh = jax.sharding.get_abstract_mesh()
  why = (f"optimizer {cfg.optimizer!r} (native: adam, adamw)" if cfg.optimizer not in ("adam", "adamw") else
         f"{jnp.dtype(dtype).name} tables (native: float32)" if jnp.dtype(dtype) != jnp.float32 else
         f"the {common.platform()} backend (native: cpu)" if common.platform() != "cpu" else
         f"a mesh of {mesh.size} devices (native: one; XLA's update is partitioned by rows)"
         if not mesh.empty and mesh.size > 1 else native.available())
  if why is None:
    return "native"
  if name == "native":
    raise common.Unavailable(f"the native row update cannot run: {why}")
  return "xla"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Written:
  """A row-sparse table after its update: the new table (touched rows written in place) and the
  squared norm of the rows written."""
  table: jax.Array
  norm_sq: jax.Array


def update_rows(cfg, eps: float, table: jax.Array, state: dict[str, jax.Array], grad: Rows, lr: jax.Array,
                norm: jax.Array) -> tuple[Written, dict[str, jax.Array]]:
  """``table`` and its state with the rows ``grad`` touches updated in place (both donated by the
  train step), for gradients clipped by the tables' global ``norm``; leading (stacked) dims are
  vmapped (XLA) or flattened into rows (native)."""
  if implementation(cfg, table.dtype) == "native":
    return _native_adam(cfg, eps, table, state, grad, lr, norm)

  def one(t, st, ids, g):
    take = lambda x: x.at[ids].get(mode="fill", fill_value=0)
    put = lambda x, r: x.at[ids].set(r.astype(x.dtype), mode="drop", unique_indices=True, indices_are_sorted=True)
    new, s_new = clipped_step(cfg, eps, take(t), {k: take(v) for k, v in st.items()}, g, lr, norm)
    new = jnp.where((ids < t.shape[0])[:, None], new, 0)
    return put(t, new), {k: put(v, s_new[k]) for k, v in st.items()}, jnp.sum(jnp.square(new.astype(jnp.float32)))

  table, state, sq = over_lead(one, table.ndim - 2)(table, state, grad.ids, grad.rows)
  return Written(table, jnp.sum(sq)), state


def bias_corrections(cfg, c: Int[Array, "..."]) -> Float[Array, "... 2"]:
  """Adam's ``(1 - b1^c, 1 - b2^c)`` for step counts ``c`` as the native row update reads them."""
  return jnp.stack([1 - cfg.b1 ** c, 1 - cfg.b2 ** c], -1).astype(jnp.float32)


def _native_adam(cfg, eps: float, table, state, grad: Rows, lr, norm) -> tuple[Written, dict[str, jax.Array]]:
  """:func:`update_rows` by ``pmem_row_adam``: stacked tables as one of ``L·V`` rows; the per-row
  counts and bias corrections ``1 - b^c`` (XLA's ``pow``) stay in XLA."""
  *lead, v, d = table.shape
  n = math.prod(lead) * v
  offset = (jnp.arange(math.prod(lead), dtype=jnp.int32) * v).reshape(*lead, 1)
  ids = jnp.where(grad.ids < v, grad.ids + offset, n).reshape(-1)
  flat = lambda x: x.reshape(n, *x.shape[len(lead) + 1:])  # noqa: E731
  count = flat(state["count"])
  c = count.at[ids].get(mode="fill", fill_value=0) + 1
  bc = bias_corrections(cfg, c)
  scal = jnp.stack([jnp.asarray(x, jnp.float32) for x in (lr, norm, cfg.clip_norm or 0.0, cfg.weight_decay)])
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  t, mu, nu, sq = native.call(
      "pmem_row_adam", (f32((n, d)), f32((n, d)), f32((n, d)), f32(ids.shape)), flat(table), flat(state["mu"]),
      flat(state["nu"]), ids, grad.rows.reshape(-1, d).astype(jnp.float32), bc, scal, aliases={0: 0, 1: 1, 2: 2},
      b1=np.float32(cfg.b1), b2=np.float32(cfg.b2), one_minus_b1=np.float32(1 - cfg.b1),
      one_minus_b2=np.float32(1 - cfg.b2), eps=np.float32(eps),
      decay=np.int64(2 if cfg.optimizer == "adamw" else 1))
  count = count.at[ids].set(c, mode="drop", unique_indices=True)
  shaped = lambda x: x.reshape(table.shape)  # noqa: E731
  state = {"mu": shaped(mu), "nu": shaped(nu), "count": count.reshape(state["count"].shape)}
  return Written(shaped(t), jnp.sum(sq)), state

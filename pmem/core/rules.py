"""The one logical-axis rules table: logical dimension names -> mesh axes.

Parameters and activations are annotated with logical names only (``axes=(...)`` metadata on
variables, :func:`constrain` on activations). A name may appear in several rules; they are
tried in order and a candidate is skipped when one of its mesh axes already shards another
dimension of the same array (so activations put ``batch`` on ``data``+``fsdp`` and then
``embed`` falls back to unsharded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("table_rows", ("fsdp", "tensor")),
    ("table_rows", "fsdp"),
)


def logical_to_spec(axes: Sequence[str | None], ndim: int | None = None,
                    rules: Sequence[tuple[str, MeshAxes]] = RULES, shape: Sequence[int] | None = None,
                    mesh=None) -> P:
  """Resolves logical names to a PartitionSpec. Extra leading dims (stacked layers) stay unsharded.
  With ``shape`` and ``mesh``, a candidate that does not divide its dim is skipped (a prime-sized
  Engram table falls back to the next ``table_rows`` rule, or stays unsharded)."""
  used: set[str] = set()
  out: list[MeshAxes] = []
  lead = 0 if shape is None else len(shape) - len(axes)
  for i, name in enumerate(axes):
    chosen: MeshAxes = None
    for rule_name, mesh_axes in rules:
      if rule_name != name or mesh_axes is None:
        continue
      cand = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      if shape is not None and shape[lead + i] % math.prod(mesh.shape[a] for a in cand):
        continue
      if used.isdisjoint(cand):
        chosen = mesh_axes
        used.update(cand)
        break
    out.append(chosen)
  if ndim is not None:
    if ndim < len(out):
      raise ValueError(f"logical axes {tuple(axes)} name more dims than the array has ({ndim})")
    out = [None] * (ndim - len(out)) + out
  return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op when no mesh is set (eager / unit tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.ndim))


def param_shardings(mesh, abstract_state):
  """NamedSharding per variable of an nnx State from its logical ``axes`` metadata (replicated if
  none), each mesh axis only where it divides the dim."""
  def one(v):
    return NamedSharding(mesh, logical_to_spec(v.get_metadata().get("axes", ()), v.ndim, shape=v.shape, mesh=mesh))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))

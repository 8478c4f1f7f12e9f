"""The one logical-axis rules table: logical dimension names -> mesh axes.

Parameters and activations are annotated with logical names only (``axes=(...)`` metadata on
variables, :func:`constrain` on activations). A name may appear in several rules; they are
tried in order and a candidate is skipped when one of its mesh axes already shards another
dimension of the same array (so activations put ``batch`` on ``data``+``fsdp`` and then
``embed`` falls back to unsharded).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec as P

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
                    rules: Sequence[tuple[str, MeshAxes]] = RULES) -> P:
  """Resolves logical names to a PartitionSpec. Extra leading dims (stacked layers) stay unsharded."""
  used: set[str] = set()
  out: list[MeshAxes] = []
  for name in axes:
    chosen: MeshAxes = None
    for rule_name, mesh_axes in rules:
      if rule_name != name or mesh_axes is None:
        continue
      cand = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
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

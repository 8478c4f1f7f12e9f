"""The memory-module protocol shared by every channel mixer.

A channel mixer is built as ``Factory(d_model=..., rngs=...)`` and called as
``mixer(x, ctx) -> y`` with ``x: f32[B, T, D]`` the normed hidden states and ``ctx`` the
token context below. It is a pure function of its variables and inputs. Large tables are
declared as :class:`pmem.core.variables.MemoryTable`. ``cost(seq_len)`` reports params,
active params, FLOPs and bytes read per token (:mod:`pmem.core.accounting`).

Ids a module can compute from the tokens alone (Engram's hashed n-grams) are computed on the
host, in the input pipeline: such a module defines ``host_features(tokenizer) -> fn`` where
``fn(batch) -> {field: int32 [B, T, ...]}`` reads the host batch (``inputs``, ``positions``,
``segment_ids``). The trainer applies every module's ``fn`` to each train and eval batch
(:func:`batch_features`); the new fields reach the forward as ``ctx.features[field]`` and may be
a ``MemoryTable``'s ``index=`` (so its rows can be staged from the host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from pmem.core.accounting import Cost


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenContext:
  """What a mixer may know about the tokens besides their hidden states."""
  ids: Int[Array, "B T"]
  positions: Int[Array, "B T"]
  segment_ids: Int[Array, "B T"]  # 0 = padding; packed documents have distinct ids
  features: dict[str, Any] = dataclasses.field(default_factory=dict)  # host-side features


class ChannelMixer(Protocol):

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext) -> Float[Array, "B T D"]:
    ...

  def cost(self, seq_len: int) -> Cost:
    ...


HostFeatures = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def batch_features(model: nnx.Module, tokenizer) -> HostFeatures | None:
  """The host-side feature function of every module of ``model`` that has one, merged; None if none."""
  fns = [m.host_features(tokenizer) for _, m in nnx.iter_graph(model)
         if isinstance(m, nnx.Module) and callable(getattr(m, "host_features", None))]
  if not fns:
    return None

  def features(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for fn in fns:
      new = fn(batch)
      clash = (set(new) & set(out)) | (set(new) & set(batch))
      if clash:
        raise ValueError(f"host feature fields {sorted(clash)} are produced twice; give each module its own names")
      out.update(new)
    return out

  return features

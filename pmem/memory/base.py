"""The memory-module protocol shared by every channel mixer.

A channel mixer is built as ``Factory(d_model=..., rngs=...)`` and called as
``mixer(x, ctx) -> y`` with ``x: f32[B, T, D]`` the normed hidden states and ``ctx`` the
token context below. It is a pure function of its variables and inputs. Large tables are
declared as :class:`pmem.core.variables.MemoryTable`. ``cost(seq_len)`` reports params,
active params, FLOPs and bytes read per token (:mod:`pmem.core.accounting`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
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

"""The op's contract over a library flash-attention kernel that takes one kv head per query head and masks by
segment equality and causality alone: kv heads repeated for their groups (the repetition's gradient sums
them back), and a padding query (segment 0) given the op's output, the mean of ``v`` over all ``T`` keys,
which passes no gradient to q or k (the kernel's own output for that row, which attends to the padding
keys before it, is discarded). Windows are not expressible: the modules' ``check`` refuses them."""

from __future__ import annotations

import jax.numpy as jnp

from kernels.common import Unavailable


def check(shape: tuple[int, ...], window: int | None, name: str, max_head_dim: int) -> None:
  """Refuses what the library kernels cannot run: a window, T not a multiple of 128, a wide head."""
  t, h = shape[1], shape[3]
  if window is not None:
    raise Unavailable(f"{name} attention has no sliding window (window={window})")
  if t % 128:
    raise Unavailable(f"{name} attention needs T divisible by 128, got {t}")
  if h > max_head_dim and h % 128:
    raise Unavailable(f"{name} attention needs head_dim <= {max_head_dim} or a multiple of 128, got {h}")


def attention(call, q, k, v, seg):
  """``call(q, k, v, seg)`` (all ``[B, T, N, H]``) under the op's GQA and padding rules (module docstring)."""
  g = q.shape[2] // k.shape[2]
  o = call(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), seg)
  mean = jnp.repeat(v.astype(jnp.float32).mean(1, keepdims=True), g, axis=2).astype(o.dtype)  # [B, 1, N, H]
  return jnp.where((seg == 0)[:, :, None, None], mean, o)

"""AdamW with warmup + cosine and global-norm clipping, routed by variable type.

Ordinary parameters and :class:`MemoryTable` variables are separate optax partitions, so a
table gets its own learning-rate multiplier, weight decay, betas and its own clipping norm
(STEM and Engram clip their tables separately from the backbone)."""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx

from pmem.core.variables import MemoryTable, is_variable


@dataclasses.dataclass(frozen=True)
class TableOptimConfig:
  lr_mult: float = 1.0
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  b1: float = 0.9
  b2: float = 0.95


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


def _adamw(lr, b1, b2, eps, wd, clip, decay_mask) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(clip)] if clip else []
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask))
  return optax.chain(*parts)


def labels(params: nnx.State) -> nnx.State:
  return jax.tree.map(lambda v: "table" if isinstance(v, MemoryTable) else "dense", params,
                      is_leaf=is_variable)


def build(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(cfg, total_steps)
  t = cfg.tables
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # no decay on norm scales
  tx = optax.partition({
      "dense": _adamw(lr, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.clip_norm, decay_mask),
      "table": _adamw(lambda s: t.lr_mult * lr(s), t.b1, t.b2, cfg.eps, t.weight_decay, t.clip_norm, None),
  }, labels)
  return tx, lr

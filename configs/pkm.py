"""Product-key memories (modules.md §4): ``pkm_tiny``, ``memory_plus_tiny`` and the fiddlers
``pkm(...)`` (Lample 2019: the memory's output replaces the FFN) and ``memory_plus(...)`` (Berges 2024:
W_out(o ⊙ SiLU(W_in x)), optionally gated).

Knobs: ``layers`` (default: the middle layer ``n_layers // 2``), ``n_keys`` (√N sub-keys per half),
``heads``, ``k``, ``d_k``, ``shared_values`` (one value table for every memory layer, Meta's
``mem_share_values``: a ``PKMValues`` in ``model.shared``; memory layers take their index from the
decoder, so they are never stacked into one scanned stage), ``query_norm``, ``gated`` and
``value_lr``. The values get the reference's optimizer (Meta's ``fixed_lr``): AdamW at ``value_lr``
(1e-3) under the backbone's schedule, with its weight decay, betas and clip norm
(``train.optim.tables.*``; ``lr_mult = value_lr / train.optim.lr``, so a later ``set:train.optim.lr``
changes the values' rate too)."""

from __future__ import annotations

import fiddle as fdl

from configs import config, fiddler
from configs.base import experiment
from pmem.memory.pkm import PKM, VALUES_FEATURE, MemoryPlus, PKMValues, middle_layer
from pmem.models import LayerOverride


def _memory_overrides(cfg: fdl.Config) -> list:
  return [o for o in cfg.model.overrides
          if isinstance(o, fdl.Buildable) and isinstance(o.channel_mixer, fdl.Buildable)
          and issubclass(fdl.get_callable(o.channel_mixer), PKM)]


def value_optimizer(cfg: fdl.Config, value_lr: float = 1e-3) -> None:
  """Values: AdamW at ``value_lr`` under the backbone's schedule, weight decay, betas and clip norm."""
  o, t = cfg.train.optim, cfg.train.optim.tables
  t.optimizer, t.lr_mult = "adamw", value_lr / o.lr
  t.weight_decay, t.clip_norm, t.b1, t.b2 = o.weight_decay, o.clip_norm, o.b1, o.b2


def _place(cfg: fdl.Config, cls: type, layers, n_keys: int, heads: int, k: int, d_k: int, shared_values: bool,
           query_norm: str, gated: bool, value_lr: float) -> None:
  if _memory_overrides(cfg):
    raise ValueError("the config already has product-key memory layers (config:pkm_tiny / memory_plus_tiny or "
                     "an earlier fiddler:pkm / memory_plus)")
  n_layers = cfg.model.n_layers
  if layers is None:  # the middle layer of whatever n_layers the model ends up with
    layers = fdl.Partial(middle_layer)
  else:
    layers = tuple(sorted({int(i) for i in layers}))
    if not layers or any(not 0 <= i < n_layers for i in layers):
      raise ValueError(f"memory layers {layers} must be a non-empty subset of 0..{n_layers - 1}")
  mixer = fdl.Partial(cls, n_keys=n_keys, heads=heads, k=k, d_k=d_k, query_norm=query_norm, gated=gated)
  if shared_values:
    cfg.model.shared = (*cfg.model.shared, (VALUES_FEATURE, fdl.Partial(PKMValues, n_keys=n_keys)))
    mixer.values = VALUES_FEATURE
  cfg.model.overrides = (*cfg.model.overrides, fdl.Config(LayerOverride, layers=layers, channel_mixer=mixer))
  value_optimizer(cfg, value_lr)


@fiddler("pkm", "replace FFNs by product-key memories (Lample 2019): pkm(layers=None (middle), n_keys=32, "
                "heads=4, k=8, d_k=32, shared_values=False, query_norm='layernorm'|'rmsnorm'|'none', "
                "gated=False, value_lr=1e-3)")
def pkm(cfg: fdl.Config, layers=None, n_keys: int = 32, heads: int = 4, k: int = 8, d_k: int = 32,
        shared_values: bool = False, query_norm: str = "layernorm", gated: bool = False,
        value_lr: float = 1e-3) -> None:
  _place(cfg, PKM, layers, n_keys, heads, k, d_k, shared_values, query_norm, gated, value_lr)


@fiddler("memory_plus", "replace FFNs by Memory+ layers (Berges 2024: W_out(o ⊙ SiLU(W_in x))): "
                        "memory_plus(layers=None, n_keys=32, heads=4, k=8, d_k=32, shared_values=False, "
                        "query_norm='layernorm', gated=False, value_lr=1e-3)")
def memory_plus(cfg: fdl.Config, layers=None, n_keys: int = 32, heads: int = 4, k: int = 8, d_k: int = 32,
                shared_values: bool = False, query_norm: str = "layernorm", gated: bool = False,
                value_lr: float = 1e-3) -> None:
  _place(cfg, MemoryPlus, layers, n_keys, heads, k, d_k, shared_values, query_norm, gated, value_lr)


@config("pkm_tiny", "tiny with a product-key memory (1024 slots, 4 heads, top-8, d_k 32) replacing layer 2's FFN")
def pkm_tiny() -> fdl.Config:
  cfg = experiment()
  pkm(cfg)
  return cfg


@config("memory_plus_tiny", "tiny with a Memory+ layer (1024 slots, 4 heads, top-8, d_k 32) replacing layer 2's FFN")
def memory_plus_tiny() -> fdl.Config:
  cfg = experiment()
  memory_plus(cfg)
  return cfg

"""Engram (arXiv 2601.07372): ``engram_tiny`` and the fiddlers ``engram(layers=(1,), ...)``,
``engram_ablation(kind=...)`` and ``engram_shape(max_order=..., heads=...)``.

One factory serves every Engram layer, placed before the layers' attention by
``LayerOverride(layers=layers, pre=(factory,))``; each layer takes its index from the decoder (its
multipliers and table primes depend on it) and the factory names ``layers``, all Engram layers of
the model, so table sizes are distinct primes across the model. Tables: Adam at 5x the base learning rate, no weight decay (paper v2, modules.md §2(a)).
The paper puts Engram early (layer 2 is its best single layer; the demo uses [1, 15])."""

from __future__ import annotations

from collections.abc import Sequence

import fiddle as fdl

from configs import config, fiddler
from configs.base import experiment
from pmem.core.registry import suggest
from pmem.memory.engram import Engram
from pmem.models import LayerOverride

ABLATIONS = {  # kind -> (Engram argument, value)
    "no_compress": ("compress", False),
    "no_gate": ("gate", "none"),
    "sqrt_gate": ("gate", "sqrt"),
    "no_conv": ("conv", False),
    "capacity_one": ("capacity_one", True),
}


def _engram_factories(cfg: fdl.Config, fiddler_name: str | None = None) -> list[fdl.Partial]:
  found = [f for o in cfg.model.overrides if isinstance(o, fdl.Buildable) for f in (o.pre or ())
           if isinstance(f, fdl.Buildable) and fdl.get_callable(f) is Engram]
  if fiddler_name and not found:
    raise ValueError(f"fiddler:{fiddler_name} needs Engram layers; start from config:engram_tiny or apply "
                     "fiddler:engram first")
  return found


@fiddler("engram", "Engram before attention of chosen layers: engram(layers=(1,), max_order=3, heads=8, "
                   "table_size=5*vocab, d_mem=d_model, branches=1, gate='paper'|'sqrt'|'none', conv=True, "
                   "compress=True, capacity_one=False, seed=0, pad_id=0); tables on Adam at 5x lr, no decay")
def engram(cfg: fdl.Config, layers: Sequence[int] = (1,), max_order: int = 3, heads: int = 8,
           table_size: int | None = None, d_mem: int | None = None, branches: int = 1, gate: str = "paper",
           conv: bool = True, compress: bool = True, capacity_one: bool = False, seed: int = 0,
           pad_id: int = 0) -> None:
  if _engram_factories(cfg):
    raise ValueError("the config already has Engram layers; use fiddler:engram_ablation / fiddler:engram_shape")
  layers = tuple(sorted({int(i) for i in layers}))
  if not layers or not all(0 <= i < cfg.model.n_layers for i in layers):
    raise ValueError(f"fiddler:engram layers={layers} must be a non-empty subset of 0..{cfg.model.n_layers - 1}")
  # d_mem (default d_model) and table_size (default 5 x vocab, the demo's) follow the model unless given
  f = fdl.Partial(Engram, layers=layers, max_order=max_order, heads=heads, compress=compress, gate=gate,
                  conv=conv, capacity_one=capacity_one, branches=branches, seed=seed, pad_id=pad_id)
  if d_mem is not None:
    f.d_mem = d_mem
  if table_size is not None:
    f.table_sizes = (table_size,) * (max_order - 1)
  cfg.model.overrides = (*cfg.model.overrides, fdl.Config(LayerOverride, layers=layers, pre=(f,)))
  t = cfg.train.optim.tables
  t.optimizer, t.lr_mult, t.weight_decay = "adam", 5.0, 0.0


@fiddler("engram_ablation", "Engram ablation on every Engram layer: "
                            f"engram_ablation(kind={'|'.join(map(repr, ABLATIONS))})")
def engram_ablation(cfg: fdl.Config, kind: str) -> None:
  if kind not in ABLATIONS:
    raise ValueError(f"engram_ablation kind must be one of {tuple(ABLATIONS)}, got {kind!r}{suggest(kind, ABLATIONS)}")
  name, value = ABLATIONS[kind]
  for f in _engram_factories(cfg, "engram_ablation"):
    setattr(f, name, value)


@fiddler("engram_shape", "Engram n-gram orders and hash heads on every Engram layer: "
                         "engram_shape(max_order=2 for bigrams only, heads=K)")
def engram_shape(cfg: fdl.Config, max_order: int | None = None, heads: int | None = None) -> None:
  for f in _engram_factories(cfg, "engram_shape"):
    if max_order is not None:
      if getattr(f, "table_sizes", None) is not None:
        f.table_sizes = (f.table_sizes[0],) * (max_order - 1)
      f.max_order = max_order
    if heads is not None:
      f.heads = heads


@config("engram_tiny", "tiny with Engram at layer 1 (orders 2-3, 4 heads, ~3k rows per head table, d_mem=64), V=256")
def engram_tiny() -> fdl.Config:
  cfg = experiment()
  engram(cfg, layers=(1,), heads=4, table_size=3000)
  return cfg

"""STEM (arXiv 2601.10639): ``stem_tiny`` and fiddlers for the placement, variants and layer
schedules (``fiddler:stem``, ``fiddler:stem_variant(variant=...)``, ``fiddler:stem_layers(schedule=...)``).

The tables get the reference's optimizer settings: a separate AdamW with the backbone's learning
rate, betas and weight decay, clipped separately at the backbone's clip norm
(``train.optim.tables.*``; modules.md §1 "Optimizer")."""

from __future__ import annotations

import fiddle as fdl

from configs import config, fiddler
from configs.base import experiment
from pmem.memory.stem import STEM, stem_layers as _schedule
from pmem.models import LayerOverride


def _stem_overrides(cfg: fdl.Config) -> list:
  return [o for o in cfg.model.overrides
          if isinstance(o, fdl.Buildable) and isinstance(o.channel_mixer, fdl.Buildable)
          and fdl.get_callable(o.channel_mixer) is STEM]


def _only_stem_override(cfg: fdl.Config, fiddler_name: str):
  found = _stem_overrides(cfg)
  if len(found) != 1:
    raise ValueError(f"fiddler:{fiddler_name} needs one STEM override, found {len(found)}; "
                     "start from config:stem_tiny or apply fiddler:stem first")
  return found[0]


def _layers(cfg: fdl.Config, schedule) -> fdl.Partial:
  """The schedule as a function of ``n_layers`` (resolved by the decoder, so it follows a later
  ``set:model.n_layers``), checked against the current model."""
  _schedule(cfg.model.n_layers, schedule)
  return fdl.Partial(_schedule, schedule=schedule)


def stem_table_optimizer(cfg: fdl.Config) -> None:
  """Tables: AdamW with the backbone's lr, betas and weight decay, clipped separately at its clip norm."""
  o, t = cfg.train.optim, cfg.train.optim.tables
  t.optimizer, t.lr_mult = "adamw", 1.0
  t.weight_decay, t.clip_norm, t.b1, t.b2 = o.weight_decay, o.clip_norm, o.b1, o.b2


@fiddler("stem", "replace FFNs by STEM: stem(schedule='all_but_first'|'third'|'half'|'all'|(i, ...), "
                 "variant='stem'|'replace_gate'|'additive'); vocab, d_ff and the layers follow the model; "
                 "table optimizer as the reference")
def stem(cfg: fdl.Config, schedule="all_but_first", variant: str = "stem") -> None:
  if _stem_overrides(cfg):
    raise ValueError("the config already has STEM layers; use fiddler:stem_layers / fiddler:stem_variant")
  over = fdl.Config(LayerOverride, layers=_layers(cfg, schedule), channel_mixer=fdl.Partial(STEM, variant=variant))
  cfg.model.overrides = (*cfg.model.overrides, over)
  stem_table_optimizer(cfg)


@fiddler("stem_variant", "STEM ablation: stem_variant(variant='stem'|'replace_gate'|'additive')")
def stem_variant(cfg: fdl.Config, variant: str = "stem") -> None:
  _only_stem_override(cfg, "stem_variant").channel_mixer.variant = variant


@fiddler("stem_layers", "STEM layers: stem_layers(schedule='all_but_first'|'third'|'half'|'all'|(i, ...)) "
                        "of model.n_layers")
def stem_layers(cfg: fdl.Config, schedule="all_but_first") -> None:
  _only_stem_override(cfg, "stem_layers").layers = _layers(cfg, schedule)


@config("stem_tiny", "tiny with STEM FFNs on layers 1-3 (the reference's all-but-first), V=256 byte tables")
def stem_tiny() -> fdl.Config:
  cfg = experiment()
  stem(cfg)
  return cfg

"""MoVE (arXiv 2601.22887) and the LaVE baseline (nanochat value embeddings): ``move_tiny``,
``lave_tiny`` and the fiddlers ``move(n_slots=...)``, ``lave(gate_channels=..., gate_scale=...)``.

MoVE's bank is one global table looked up once per token (``model.shared``) and read by every
MoVE attention layer (``bank="shared"``); ``move(shared=False)`` gives each layer its own bank.
Value-embedding tables use the default table optimizer (``train.optim.tables.*``)."""

from __future__ import annotations

import fiddle as fdl

from configs import config, fiddler
from configs.base import experiment
from pmem.layers.attention import Attention
from pmem.memory.move import MOVE_FEATURE, LaveAttention, MoveAttention, MoveBank, lave_layers
from pmem.models import LayerOverride


def _attention_args(cfg: fdl.Config) -> dict:
  base = cfg.model.sequence_mixer
  if not isinstance(base, fdl.Buildable) or fdl.get_callable(base) is not Attention:
    raise ValueError("MoVE / LaVE start from a config whose sequence mixer is plain attention")
  return fdl.ordered_arguments(base)


@fiddler("move", "MoVE values in every attention layer: move(n_slots=2, shared=True) — one global bank "
                  "(paper) or, shared=False, one per layer")
def move(cfg: fdl.Config, n_slots: int = 2, shared: bool = True) -> None:
  args = _attention_args(cfg)
  cfg.model.sequence_mixer = fdl.Partial(MoveAttention, **args, n_slots=n_slots, bank="shared" if shared else "layer")
  if shared:  # the bank's value width is the attention's (vocab and d_model come from the decoder)
    heads = {k: v for k, v in args.items() if k in ("n_heads", "n_kv_heads", "head_dim")}
    cfg.model.shared = (*cfg.model.shared, (MOVE_FEATURE, fdl.Partial(MoveBank, n_slots=n_slots, **heads)))


@fiddler("lave", "LaVE value embeddings on alternating layers (last included): lave(gate_channels=32, gate_scale=2.0)")
def lave(cfg: fdl.Config, gate_channels: int = 32, gate_scale: float = 2.0) -> None:
  mixer = fdl.Partial(LaveAttention, **_attention_args(cfg), gate_channels=gate_channels, gate_scale=gate_scale)
  over = fdl.Config(LayerOverride, layers=fdl.Partial(lave_layers), sequence_mixer=mixer)  # follows n_layers
  cfg.model.overrides = (*cfg.model.overrides, over)


@config("move_tiny", "tiny with MoVE attention in all 4 layers (M=2 value slots, one shared bank), V=256")
def move_tiny() -> fdl.Config:
  cfg = experiment()
  move(cfg)
  return cfg


@config("lave_tiny", "tiny with LaVE value embeddings on layers 1 and 3 (nanochat gate C=32, c=2), V=256")
def lave_tiny() -> fdl.Config:
  cfg = experiment()
  lave(cfg)
  return cfg

"""Fiddlers ``lora`` and ``dora``: adapters on chosen projections of every layer, the rest frozen
(pmem.layers.adapters; Hu et al. 2021, Liu et al. 2024)."""

from __future__ import annotations

import fiddle as fdl

from configs import fiddler
from pmem.layers.adapters import AdapterConfig

ADAPTED = ("*/adapters/*",)  # train.trainable: the adapters' factors (and DoRA's magnitudes) only


def _adapt(cfg: fdl.Config, kind: str, rank: int, alpha: float | None, targets: tuple[str, ...], init: str) -> None:
  cfg.model.adapter = fdl.Config(AdapterConfig, kind=kind, rank=rank, alpha=2.0 * rank if alpha is None else alpha,
                                 targets=tuple(targets), init=init)
  cfg.train.trainable = ADAPTED


@fiddler("lora", "LoRA on projections, the rest frozen: lora(rank=8, alpha=2*rank, targets=('wq','wv'), init='kaiming')")
def lora(cfg: fdl.Config, rank: int = 8, alpha: float | None = None, targets: tuple[str, ...] = ("wq", "wv"),
         init: str = "kaiming") -> None:
  _adapt(cfg, "lora", rank, alpha, targets, init)


@fiddler("dora", "DoRA (magnitude + LoRA direction), the rest frozen: dora(rank=8, alpha=2*rank, targets=('wq','wv'))")
def dora(cfg: fdl.Config, rank: int = 8, alpha: float | None = None, targets: tuple[str, ...] = ("wq", "wv"),
         init: str = "kaiming") -> None:
  _adapt(cfg, "dora", rank, alpha, targets, init)

"""Fiddlers ``lora`` and ``dora``: adapters on chosen projections of every layer, the rest frozen
(pmem.layers.adapters; Hu et al. 2021, Liu et al. 2024); ``bios_finetune``: fine-tuning data that
holds the pretraining corpus out, so its valid bpb measures forgetting."""

from __future__ import annotations

import fiddle as fdl

from configs import fiddler
from pmem.data.tasks.bios import BiosConfig
from pmem.layers.adapters import AdapterConfig

ADAPTED = ("*/adapters/*",)  # train.trainable: the adapters' factors (and DoRA's magnitudes) only


def _adapt(cfg: fdl.Config, kind: str, rank: int, alpha: float | None, targets: tuple[str, ...], init: str,
           dropout: float) -> None:
  cfg.model.adapter = fdl.Config(AdapterConfig, kind=kind, rank=rank, alpha=2.0 * rank if alpha is None else alpha,
                                 targets=tuple(targets), init=init, dropout=dropout)
  cfg.train.trainable = ADAPTED


@fiddler("lora", "LoRA on projections, the rest frozen: "
                 "lora(rank=8, alpha=2*rank, targets=('wq','wv'), init='kaiming', dropout=0.0)")
def lora(cfg: fdl.Config, rank: int = 8, alpha: float | None = None, targets: tuple[str, ...] = ("wq", "wv"),
         init: str = "kaiming", dropout: float = 0.0) -> None:
  _adapt(cfg, "lora", rank, alpha, targets, init, dropout)


@fiddler("dora", "DoRA (magnitude + LoRA direction), the rest frozen: "
                 "dora(rank=8, alpha=2*rank, targets=('wq','wv'), dropout=0.0)")
def dora(cfg: fdl.Config, rank: int = 8, alpha: float | None = None, targets: tuple[str, ...] = ("wq", "wv"),
         init: str = "kaiming", dropout: float = 0.0) -> None:
  _adapt(cfg, "dora", rank, alpha, targets, init, dropout)


@fiddler("bios_finetune", "train on bioS alone, the corpus held out (data.corpus_weight=0: its valid bpb measures "
                          "forgetting), every person probed: bios_finetune(n_people=60)")
def bios_finetune(cfg: fdl.Config, n_people: int = 60) -> None:
  cfg.data.bios = fdl.Config(BiosConfig, n_people=n_people)
  cfg.data.corpus_weight = 0.0
  cfg.eval.bios_people = None

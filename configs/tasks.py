"""One small config per generated task: ``bios_small`` (knowledge capacity), ``mqar_small``
(associative recall), ``passkey_small`` (retrieval by length and depth)."""

from __future__ import annotations

import fiddle as fdl

from configs import config
from configs.base import experiment
from pmem.data.tasks.bios import BiosConfig
from pmem.data.tasks.mqar import MqarConfig
from pmem.data.tasks.passkey import PasskeyConfig


def _task_only(cfg: fdl.Config, **task) -> fdl.Config:
  cfg.data.corpus = None
  for k, v in task.items():
    setattr(cfg.data, k, v)
  cfg.train.log_every = 25
  return cfg


@config("bios_small", "bioS biographies of 400 people (~100 exposures each), BPE-2048 fitted to them, "
                      "2-layer d=128 model; reports per-attribute accuracy and knowledge bits per parameter")
def bios_small() -> fdl.Config:
  cfg = experiment(vocab=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512, steps=1500,
                   batch_size=16, seq_len=128, lr=3e-3)
  cfg.data.tokenizer.kind, cfg.data.tokenizer.vocab_size = "bpe", 2048
  cfg.eval.bios_people = None
  cfg.eval.every = 500
  return _task_only(cfg, bios=fdl.Config(BiosConfig, n_people=400))


@config("mqar_small", "Zoology MQAR (V=512, T=64, 4 key-value pairs), 2-layer d=64 attention model")
def mqar_small() -> fdl.Config:
  cfg = experiment(vocab=512, d_model=64, n_layers=2, n_heads=1, n_kv_heads=1, d_ff=128, steps=1000,
                   batch_size=64, seq_len=64, lr=3e-3)
  return _task_only(cfg, mqar=fdl.Config(MqarConfig, vocab_size=512, seq_len=64, num_kv_pairs=4))


@config("passkey_small", "passkey retrieval in 4-24 filler sentences at 5 depths, BPE-512, 2-layer d=128")
def passkey_small() -> fdl.Config:
  cfg = experiment(vocab=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, steps=600,
                   batch_size=16, seq_len=256, lr=3e-3)
  cfg.data.tokenizer.kind, cfg.data.tokenizer.vocab_size = "bpe", 512
  return _task_only(cfg, passkey=fdl.Config(PasskeyConfig, lengths=(4, 12, 24)))

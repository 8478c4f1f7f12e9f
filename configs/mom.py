"""Mixture-of-Memories (issue S2, pmem/layers/mom.py): config ``mom_tiny``; the fiddler
``mixer(name='mom')`` (configs/sequence.py) puts it in any config, its knobs through ``set:``
(``model.sequence_mixer.n_memories``, ``topk``, ``shared``, ``balance``)."""

from __future__ import annotations

import fiddle as fdl

from configs import config
from configs.base import experiment
from configs.sequence import mixer


@config("mom_tiny", "tiny with Mixture-of-Memories (4 gated-delta memories, top-2, + shared) in all 4 layers")
def mom_tiny() -> fdl.Config:
  cfg = experiment()
  mixer(cfg, "mom")
  return cfg

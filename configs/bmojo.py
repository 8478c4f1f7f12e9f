"""B'MOJO (issue S2, pmem/layers/bmojo.py): config ``bmojo_tiny``; the fiddler ``mixer(name='bmojo')``
(configs/sequence.py) puts it in any config, its knobs through ``set:`` (``model.sequence_mixer.window``, ``store``,
``ssm``, ``threshold``)."""

from __future__ import annotations

import fiddle as fdl

from configs import config
from configs.base import experiment
from configs.sequence import mixer

WINDOW, STORE = 8, 8  # below the decode tests' 16 tokens, so tokens leave the window and the store is read


@config("bmojo_tiny", f"tiny with B'MOJO (window-{WINDOW} attention + Gated DeltaNet fading token + {STORE}-slot "
                      "innovation store) in all 4 layers")
def bmojo_tiny() -> fdl.Config:
  cfg = experiment()
  kv = fdl.ordered_arguments(cfg.model.sequence_mixer)["n_kv_heads"]
  mixer(cfg, "bmojo")
  cfg.model.sequence_mixer.n_kv_heads, cfg.model.sequence_mixer.window, cfg.model.sequence_mixer.store = kv, WINDOW, STORE
  return cfg

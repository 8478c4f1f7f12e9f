"""Titans (Behrouz et al. 2025): ``titans_lmm_tiny`` (the neural long-term memory in every layer),
``titans_mag_tiny`` (memory as a gate beside sliding-window attention in every layer), ``titans_mal_tiny``
(memory as a layer: LMM and sliding-window attention layers alternating), ``titans_mac_tiny`` (memory as context:
attention over each segment with the LMM's reads, in every layer), and the fiddler ``titans`` for the paper's
ablations (pmem/memory/titans.py)."""

from __future__ import annotations

import fiddle as fdl

from configs import config, fiddler
from configs.base import experiment
from configs.sequence import SWA_WINDOW, hybrid, mixer
from pmem.memory.titans import MemoryAsContext, MemoryAsGate, NeuralMemory


@fiddler("titans", "ablate every Titans memory of the config: titans(momentum=True, decay=True, depth=2, chunk=16, "
                   "persistent=4) (persistent: MAG's / MAC's persistent memory pairs; chunk: MAC's segment too)")
def titans(cfg: fdl.Config, momentum: bool = True, decay: bool = True, depth: int = 2, chunk: int = 16,
           persistent: int = 4) -> None:
  found = False
  for b in [cfg.model.sequence_mixer, *(o.sequence_mixer for o in cfg.model.overrides)]:
    wraps = fdl.get_callable(b) in (MemoryAsGate, MemoryAsContext)  # attention + an LMM built by `memory`
    if wraps:
      b.persistent, b.chunk = persistent, chunk
    target = b.memory if wraps else b
    if isinstance(target, fdl.Buildable) and fdl.get_callable(target) is NeuralMemory:
      target.momentum, target.decay, target.depth, found = momentum, decay, depth, True
      if target is b:
        target.chunk = chunk
  if not found:
    raise ValueError("fiddler:titans: the config has no Titans memory (start from config:titans_*_tiny)")


@config("titans_lmm_tiny", "tiny with Titans' neural long-term memory (depth-2 MLP, chunk 16) in all 4 layers")
def titans_lmm_tiny() -> fdl.Config:
  cfg = experiment()
  mixer(cfg, "titans")
  return cfg


@config("titans_mag_tiny", f"tiny with Titans memory-as-a-gate (window-{SWA_WINDOW} attention gated by the LMM) "
                           "in all 4 layers")
def titans_mag_tiny() -> fdl.Config:
  cfg = experiment()
  mixer(cfg, "titans_mag")
  cfg.model.sequence_mixer.memory = fdl.Partial(NeuralMemory)
  return cfg


@config("titans_mal_tiny", f"tiny with Titans memory-as-a-layer: LMM, window-{SWA_WINDOW} attention, alternating")
def titans_mal_tiny() -> fdl.Config:
  cfg = experiment()
  hybrid(cfg, pattern="GW", G="titans", window=SWA_WINDOW)
  return cfg


MAC_SEGMENT = 8  # tiny's 64-token rows: 8 segments; the registry's 16-token decode checks cross a segment start


@config("titans_mac_tiny", f"tiny with Titans memory-as-context (segments of {MAC_SEGMENT}: attention over the "
                           "persistent pairs, the LMM's reads and the segment) in all 4 layers")
def titans_mac_tiny() -> fdl.Config:
  cfg = experiment()
  mixer(cfg, "titans_mac")
  cfg.model.sequence_mixer.chunk = MAC_SEGMENT
  cfg.model.sequence_mixer.memory = fdl.Partial(NeuralMemory)
  return cfg

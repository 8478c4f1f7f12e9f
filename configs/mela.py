"""Mela (MusubiAI 2026, pmem/memory/mela.py): ``mela_tiny``, the Hierarchical Memory Module with MemStack, and
``mela_one_tiny``, its one-frequency ablation. MemStack is the layer schedule of :func:`memstack`: layer 0 the
slow (gist) level alone, layer 1 the fast (detail) level alone, the later layers the mixed HMM. The knobs through
``set:`` (``model.sequence_mixer.chunk``, ``ratio``, ``memory.depth``, ...) reach the HMM layers."""

from __future__ import annotations

import fiddle as fdl

from configs import config
from configs.base import experiment
from configs.sequence import mixer
from pmem.memory.titans import NeuralMemory
from pmem.models import LayerOverride


def memstack(cfg: fdl.Config, levels: int = 2, chunk: int = 4, ratio: int = 8) -> None:
  """Every layer's sequence mixer the HMM (``levels``, fast ``chunk``, slow ``chunk · ratio``), and with two levels
  MemStack: layer 0 a NeuralMemory of the slow chunk, layer 1 one of the fast chunk."""
  mixer(cfg, "mela")
  hmm, heads = cfg.model.sequence_mixer, cfg.model.sequence_mixer.n_heads
  hmm.levels, hmm.chunk, hmm.ratio, hmm.memory = levels, chunk, ratio, fdl.Partial(NeuralMemory)
  if levels == 2:
    cfg.model.overrides = (*cfg.model.overrides, *(
        fdl.Config(LayerOverride, layers=(i,), sequence_mixer=fdl.Partial(NeuralMemory, n_heads=heads, chunk=c))
        for i, c in enumerate((chunk * ratio, chunk))))


@config("mela_tiny", "tiny with Mela: MemStack (layer 0 the slow memory, chunk 32; layer 1 the fast one, chunk 4), "
                     "layers 2-3 the hierarchical memory (both, mixed per channel)")
def mela_tiny() -> fdl.Config:
  cfg = experiment()
  memstack(cfg)
  return cfg


@config("mela_one_tiny", "mela_tiny's one-frequency ablation: one Titans memory of chunk 4 in all 4 layers "
                         "(no slow level, no mix, no MemStack)")
def mela_one_tiny() -> fdl.Config:
  cfg = experiment()
  memstack(cfg, levels=1)
  return cfg

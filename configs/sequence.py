"""Sequence mixers beyond full attention (issue S1): the linear-recurrence family, sliding-window
attention and hybrids. Configs ``linear_attn_tiny``, ``gla_tiny``, ``mamba2_tiny``,
``deltanet_tiny``, ``gdn_tiny``, ``swa_tiny``, ``hybrid_tiny``; fiddlers ``mixer(name=...)``
(every layer) and ``hybrid(pattern=..., G=..., window=...)``. The mixers take ``d_model`` from the
decoder and the attention's ``n_heads`` where they have heads."""

from __future__ import annotations

import fiddle as fdl

from configs import config, fiddler
from configs.base import experiment
from pmem.core import mixer as mixer_lib
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.layers.attention import Attention
from pmem.models import LayerOverride

SWA_WINDOW = 16  # tiny's sequences are 64 tokens


def _heads(cfg: fdl.Config) -> int:
  base = cfg.model.sequence_mixer
  if not isinstance(base, fdl.Buildable) or fdl.get_callable(base) is not Attention:
    raise ValueError("the sequence-mixer fiddlers start from a config whose sequence mixer is plain attention")
  return fdl.ordered_arguments(base)["n_heads"]


def recurrent(name: str, n_heads: int, **kw) -> fdl.Partial:
  """The registered sequence mixer ``name``, given ``n_heads`` if it takes them (Mamba2 has its own)."""
  cls = SEQUENCE_MIXERS[name]
  return fdl.Partial(cls, **({"n_heads": n_heads} if mixer_lib.takes(cls, "n_heads") else {}), **kw)


@fiddler("mixer", "every layer's sequence mixer a registered one: mixer(name='gdn') (linear_attn, gla, "
                  "deltanet, gdn, mamba2, ...)")
def mixer(cfg: fdl.Config, name: str = "gdn") -> None:
  cfg.model.sequence_mixer = recurrent(name, _heads(cfg))


@fiddler("swa", "sliding-window attention in every layer: swa(window=16)")
def swa(cfg: fdl.Config, window: int = SWA_WINDOW) -> None:
  _heads(cfg)
  cfg.model.sequence_mixer.window = window


@fiddler("hybrid", "repeat a layer pattern over the stack: hybrid(pattern='GGGA', G='gdn', window=16) "
                   "(G: the recurrent mixer G names, A: full attention, W: attention with the window)")
def hybrid(cfg: fdl.Config, pattern: str = "GGGA", G: str = "gdn", window: int = SWA_WINDOW) -> None:
  if not pattern or set(pattern) - set("GAW"):
    raise ValueError(f"hybrid pattern {pattern!r}: use the letters G, A, W")
  base = cfg.model.sequence_mixer
  heads = _heads(cfg)
  by = {"G": recurrent(G, heads), "W": fdl.Partial(Attention, **{**fdl.ordered_arguments(base), "window": window})}
  for letter, mixer_ in by.items():
    layers = fdl.Partial(_every, pattern=pattern, letter=letter)
    if letter in pattern:
      cfg.model.overrides = (*cfg.model.overrides, fdl.Config(LayerOverride, layers=layers, sequence_mixer=mixer_))


def _every(n_layers: int, pattern: str, letter: str) -> tuple[int, ...]:
  """The layers whose letter in ``pattern`` (repeated over ``n_layers``) is ``letter``."""
  return tuple(i for i in range(n_layers) if pattern[i % len(pattern)] == letter)


def _tiny(name: str):
  def make() -> fdl.Config:
    cfg = experiment()
    mixer(cfg, name)
    return cfg
  return make


for _name, _doc in (("linear_attn", "linear attention (elu+1 features)"), ("gla", "gated linear attention"),
                    ("mamba2", "Mamba2 (SSD)"), ("deltanet", "DeltaNet"), ("gdn", "Gated DeltaNet")):
  config(f"{_name}_tiny", f"tiny with {_doc} in all 4 layers")(_tiny(_name))


@config("swa_tiny", f"tiny with sliding-window attention (window {SWA_WINDOW}) in all 4 layers")
def swa_tiny() -> fdl.Config:
  cfg = experiment()
  swa(cfg)
  return cfg


@config("hybrid_tiny", "tiny as Gated DeltaNet, Gated DeltaNet, Gated DeltaNet, attention (hybrid GGGA)")
def hybrid_tiny() -> fdl.Config:
  cfg = experiment()
  hybrid(cfg)
  return cfg

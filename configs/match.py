"""Iso-FLOP baselines: the dense model rescaled to a memory model's active FLOPs per token.

``fiddler:match_flops(like='stem')`` applies fiddler ``like`` (with ``kwargs``) to a copy of the
current (dense) config, reads that memory model's forward FLOPs per token from the protocol's
accounting (:meth:`pmem.models.Decoder.cost`), and sets the dense model's SwiGLU ``d_ff`` (every
layer) to the width whose FLOPs per token are closest; ``match_flops(flops=N)`` matches a number.
FLOPs are linear in ``d_ff``, so two evaluations give the exact width."""

from __future__ import annotations

import copy

import fiddle as fdl
from flax import nnx

import configs
from configs import fiddler
from pmem.layers.mlp import SwiGLU
from pmem.models import Decoder
from pmem.core.registry import unknown


def cost(cfg: fdl.Config):
  """The :class:`pmem.core.accounting.Cost` per token of the config's model (no allocation)."""
  model = nnx.eval_shape(lambda: Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0)))
  return model.cost(cfg.train.seq_len)


def flops_per_token(cfg: fdl.Config) -> int:
  return cost(cfg).flops


def _dense_mixer(cfg: fdl.Config) -> fdl.Partial:
  m = cfg.model
  mixer = m.channel_mixer
  if m.overrides or m.shared or not (isinstance(mixer, fdl.Buildable) and fdl.get_callable(mixer) is SwiGLU):
    raise ValueError("match_flops rescales a dense baseline: a config whose layers are all SwiGLU FFNs with no "
                     "overrides or shared modules; apply it before any memory fiddler")
  return mixer


def match_dense(cfg: fdl.Config, flops: int) -> int:
  """Sets the dense model's SwiGLU d_ff so its forward FLOPs per token are closest to ``flops``;
  returns the new d_ff."""
  mixer = _dense_mixer(cfg)
  at = lambda d_ff: (setattr(mixer, "d_ff", d_ff), flops_per_token(cfg))[1]  # noqa: E731
  f1, f2 = at(1), at(2)
  d_ff = max(1, round(1 + (flops - f1) / (f2 - f1)))
  mixer.d_ff = d_ff
  return d_ff


@fiddler("match_flops", "rescale the dense FFN width to a memory model's forward FLOPs/token: "
                        "match_flops(like='stem', kwargs={...}) or match_flops(flops=N)")
def match_flops(cfg: fdl.Config, like: str | None = None, kwargs: dict | None = None, flops: int | None = None) -> None:
  if (like is None) == (flops is None):
    raise ValueError("match_flops takes exactly one of like='<fiddler name>' or flops=<int>")
  if like is not None:
    if like not in configs.FIDDLERS:
      raise ValueError(f"match_flops: {unknown('fiddler', like, configs.FIDDLERS)}")
    _dense_mixer(cfg)
    other = copy.deepcopy(cfg)
    configs.FIDDLERS[like](other, **(kwargs or {}))
    flops = flops_per_token(other)
  match_dense(cfg, int(flops))

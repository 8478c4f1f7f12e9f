"""Decoder-only LM assembled from a per-layer spec.

Each layer is ``x += pre_i(norm_i(x))...; x += seq(norm(x)); x += aug_i(norm_i(x))...;
x += channel(norm(x))`` where the sequence mixer, the channel mixer and any extra residual
branches (``pre`` before the sequence mixer, e.g. Engram; ``augment`` after it) are factories
(Fiddle partials or registry names), each built with the model facts it takes
(:func:`pmem.core.mixer.build`). A memory module replaces or augments the FFN of chosen layers through
:class:`LayerOverride`; this file never changes when a new module is added. With ``scan_layers``, repeated runs of layers
are stacked and scanned: runs of identical layers, and runs of a repeated period of layers (a hybrid
pattern such as ``GGGA`` over 8 layers scans 2 periods of 4 blocks, :func:`stages`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from pmem.core import accounting, auxiliary, mixer
from pmem.core.variables import name_of
from pmem.core.registry import CHANNEL_MIXERS, SEQUENCE_MIXERS, unknown
from pmem.core.rules import constrain
from pmem.layers.adapters import AdapterConfig
from pmem.layers.embed import Embed, check_ids
from pmem.layers.init import fan_in_normal
from pmem.layers.norms import RMSNorm
from pmem.memory import diagnostics
from pmem.core.mixer import TokenContext
from kernels.common import widen

Factory = Callable[..., nnx.Module] | str


Layers = tuple[int, ...] | Callable[[int], Sequence[int]]


@dataclasses.dataclass(frozen=True)
class LayerOverride:
  """Replace the channel/sequence mixer of ``layers`` or add residual branches to them: ``pre``
  before the sequence mixer (at the start of the block), ``augment`` after it. ``layers`` is a
  tuple of indices or a schedule ``n_layers -> indices`` (a placement that follows
  ``model.n_layers``, e.g. STEM's ``all_but_first``)."""
  layers: Layers
  channel_mixer: Factory | None = None
  sequence_mixer: Factory | None = None
  augment: tuple[Factory, ...] = ()
  pre: tuple[Factory, ...] = ()


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab: int
  d_model: int
  n_layers: int
  sequence_mixer: Factory
  channel_mixer: Factory
  overrides: tuple[LayerOverride, ...] = ()
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  scan_layers: bool = True
  # repetitions of a scanned stage per loop iteration (lax.scan's unroll; >= the stage's length: no loop, the
  # parameters stay stacked). XLA:CPU at the bench size: fully unrolled 1.05x faster; compile time grows with it
  scan_unroll: int = 1
  remat: str = "none"
  dtype: str = "float32"
  kernel_impl: str = "xla"  # residual add + RMSNorm, attention: kernels.IMPLEMENTATIONS ("xla", "pallas", "auto", ...)
  # modules computed once per forward from the token ids and handed to every layer as
  # ``ctx.features[name]`` (e.g. MoVE's value bank shared across attention layers)
  shared: tuple[tuple[str, Factory], ...] = ()
  # LoRA / DoRA on the projections it targets, in every layer whose mixers take ``adapter``
  # (pmem.layers.adapters; fiddler:lora / fiddler:dora)
  adapter: AdapterConfig | None = None


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _resolve(f: Factory, registry) -> Callable[..., nnx.Module]:
  return registry[f] if isinstance(f, str) else f


def _same(a, b) -> bool:
  """Factories compare by callable and bound arguments (functools.partial has no __eq__)."""
  key = lambda f: (f.func, f.args, f.keywords) if isinstance(f, functools.partial) else f
  return key(a) == key(b) if not (isinstance(a, tuple) and isinstance(b, tuple)) else (
      len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b)))


def override_layers(o: LayerOverride, n_layers: int) -> tuple[int, ...]:
  """The indices ``o`` applies to in a model of ``n_layers`` layers, checked."""
  layers = tuple(int(i) for i in (o.layers(n_layers) if callable(o.layers) else o.layers))
  bad = [i for i in layers if not 0 <= i < n_layers]
  if bad:
    raise ValueError(f"an override names layer {bad[0]} but model.n_layers={n_layers} (layers 0..{n_layers - 1})")
  return layers


def layer_specs(cfg: DecoderConfig) -> list[tuple[Factory, Factory, tuple[Factory, ...], tuple[Factory, ...]]]:
  """(sequence mixer, channel mixer, augment, pre) for each layer after applying overrides."""
  specs = [(cfg.sequence_mixer, cfg.channel_mixer, (), ()) for _ in range(cfg.n_layers)]
  for o in cfg.overrides:
    for i in override_layers(o, cfg.n_layers):
      s, c, a, p = specs[i]
      specs[i] = (o.sequence_mixer or s, o.channel_mixer or c, a + tuple(o.augment), p + tuple(o.pre))
  return specs


def _per_layer(spec) -> bool:
  """Whether a factory of ``spec`` takes the layer index (so its layers are built one by one)."""
  seq, ch, aug, pre = spec
  return any(mixer.takes(_resolve(f, r), "layer") for fs, r in (((seq,), SEQUENCE_MIXERS), ((ch, *aug, *pre),
                                                                CHANNEL_MIXERS)) for f in fs)


def stages(specs, periodic: bool = True) -> list[tuple[int, int, int]]:
  """``(start, period, reps)`` per stage, covering the layers in order: from each start the
  ``period`` (1 if not ``periodic``) whose ``reps`` repetitions of identical layer specs cover the
  most layers (the shortest such period on a tie). A factory taking its layer index is never
  stacked (its layer is a stage of its own)."""
  out, start, n = [], 0, len(specs)
  same = lambda i, j: not (_per_layer(specs[i]) or _per_layer(specs[j])) and all(  # noqa: E731
      _same(x, y) for x, y in zip(specs[i], specs[j]))
  while start < n:
    best = (1, 1)
    for p in range(1, (n - start) // 2 + 1 if periodic else 2):
      r = 1
      while start + (r + 1) * p <= n and all(same(start + j, start + r * p + j) for j in range(p)):
        r += 1
      if (r > 1 or p == 1) and p * r > best[0] * best[1]:
        best = (p, r)
    out.append((start, *best))
    start += best[0] * best[1]
  return out


def facts(cfg: DecoderConfig, layer: int | None = None) -> dict[str, Any]:
  """The model facts a factory may take (:data:`pmem.core.mixer.FACTS`, ``d_ff`` as a default);
  ``layer=None`` for the shared per-forward modules."""
  out = dict(vocab=cfg.vocab, d_model=cfg.d_model, n_layers=cfg.n_layers, dtype=cfg.dtype)
  if layer is not None:
    out.update(layer=layer, out_scale=(2 * cfg.n_layers) ** -0.5, adapter=cfg.adapter, kernel_impl=cfg.kernel_impl)
  base = _resolve(cfg.channel_mixer, CHANNEL_MIXERS)
  if isinstance(base, functools.partial) and "d_ff" in base.keywords:
    out["d_ff"] = base.keywords["d_ff"]
  return out


class Block(nnx.Module):

  def __init__(self, cfg: DecoderConfig, spec, layer: int, *, rngs: nnx.Rngs):
    seq, ch, aug, pre = spec
    norm = functools.partial(RMSNorm, cfg.d_model, cfg.norm_eps, implementation=cfg.kernel_impl)
    f = facts(cfg, layer)

    def make(factory, registry):
      return mixer.build(_resolve(factory, registry), f, rngs=rngs)

    self.norm_pre = nnx.List([norm() for _ in pre])
    self.pre = nnx.List([make(p, CHANNEL_MIXERS) for p in pre])
    self.norm_seq = norm()
    self.seq = make(seq, SEQUENCE_MIXERS)
    self.norm_aug = nnx.List([norm() for _ in aug])
    self.aug = nnx.List([make(a, CHANNEL_MIXERS) for a in aug])
    self.norm_ch = norm()
    self.ch = make(ch, CHANNEL_MIXERS)

  def mixers(self) -> dict[str, nnx.Module]:
    """The block's mixers in call order, by their key in the block's cache."""
    return {**{f"pre{i}": m for i, m in enumerate(self.pre)}, "seq": self.seq,
            **{f"aug{i}": m for i, m in enumerate(self.aug)}, "ch": self.ch}

  def init_state(self, batch: int, max_len: int, dtype: str) -> dict[str, mixer.State]:
    return {k: m.init_state(batch, max_len, dtype) for k, m in self.mixers().items() if mixer.stateful(m)}

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    """``x`` after the block; with a cache ``state`` (pmem.core.mixer), ``(x, new_state)``."""
    norms = [*self.norm_pre, self.norm_seq, *self.norm_aug, self.norm_ch]
    mixers = list(self.mixers().items())
    new = {} if state is not None else None
    h = norms[0](x)
    for i, (key, m) in enumerate(mixers):
      cx = ctx.folded(i)  # each mixer its own dropout key
      if state is not None and key in state:
        y, new[key] = m(h, cx, state[key])
      else:
        y = m(h, cx)
      chex.assert_equal_shape([x, y])  # every mixer maps [B, T, D] -> [B, T, D]
      if i + 1 < len(mixers):  # the residual add fused with the next branch's norm
        h, x = norms[i + 1].add_and_norm(y.astype(x.dtype), x)
      else:
        x = x + y.astype(x.dtype)
    x = constrain(x, ("batch", "length", "embed"))
    return x if state is None else (x, new)

  def cost(self, seq_len: int) -> accounting.Cost:
    parts = [*self.norm_pre, *self.pre, self.norm_seq, self.seq, self.norm_ch, self.ch, *self.norm_aug, *self.aug]
    return sum((p.cost(seq_len) for p in parts), accounting.Cost())


class Period(nnx.Module):
  """Consecutive different blocks that repeat over the stack (a hybrid pattern's period); one
  unit of a scanned :class:`Stage`."""

  def __init__(self, cfg: DecoderConfig, specs, start: int, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, s, start + j, rngs=rngs) for j, s in enumerate(specs)])

  def init_state(self, batch: int, max_len: int, dtype: str) -> list:
    return [b.init_state(batch, max_len, dtype) for b in self.blocks]

  def cost(self, seq_len: int) -> accounting.Cost:
    return sum((b.cost(seq_len) for b in self.blocks), accounting.Cost())


class Stage(nnx.Module):
  """``n`` repetitions of a unit: a :class:`Block`, or a :class:`Period` of ``period`` blocks
  (scanned stages only); stacked (leading axis) and scanned when ``scan`` is set, else a list."""

  def __init__(self, cfg: DecoderConfig, specs, start: int, n: int, *, rngs: nnx.Rngs):
    self.start, self.period, self.n = start, len(specs), n
    self.scan = cfg.scan_layers and n > 1
    if self.period > 1 and not self.scan:
      raise ValueError("a period of layers is a unit of a scanned stage only")
    if cfg.remat not in REMAT_POLICIES:
      raise unknown("remat policy", cfg.remat, REMAT_POLICIES)
    if cfg.scan_unroll < 1:
      raise ValueError(f"scan_unroll must be >= 1, got {cfg.scan_unroll}")
    self.policy = REMAT_POLICIES[cfg.remat]
    self.remat, self.scan_unroll = cfg.remat != "none", cfg.scan_unroll
    if self.scan:
      # stacked specs take no layer index (stages()), so ``start`` serves every repetition
      unit = (lambda r: Block(cfg, specs[0], start, rngs=r)) if self.period == 1 else (
          lambda r: Period(cfg, specs, start, rngs=r))
      self.blocks = nnx.vmap(unit, in_axes=0, out_axes=0)(rngs.split(n))
    else:
      self.blocks = nnx.List([Block(cfg, specs[0], start + i, rngs=rngs) for i in range(n)])

  def block_paths(self) -> list[tuple[tuple, int | None]]:
    """Per layer of the stage, in order: (path of its block's variables below the stage, index
    into their stacked leading axis or None)."""
    if not self.scan:
      return [(("blocks", i), None) for i in range(self.n)]
    if self.period == 1:
      return [(("blocks",), i) for i in range(self.n)]
    return [(("blocks", "blocks", j), r) for r in range(self.n) for j in range(self.period)]

  def init_state(self, batch: int, max_len: int, dtype: str):
    """The blocks' caches: one pytree stacked along the leading axis (scanned) or a list."""
    if not self.scan:
      return [b.init_state(batch, max_len, dtype) for b in self.blocks]
    one = self.blocks.init_state(batch, max_len, dtype)  # sizes are static: the same for every repetition
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.n, *a.shape)), one)

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, cache=None):
    """``x`` after the stage; with ``cache`` (:meth:`init_state`), ``(x, new_cache)``."""
    def apply(block, h, c, layer):  # ``layer``: the block's index in the model (its dropout key)
      cx = ctx.folded(layer)
      return block(h, cx) if c is None else block(h, cx, c)
    if self.remat:  # the auxiliary losses a block adds leave the checkpoint as an output (pmem.core.auxiliary)
      apply = auxiliary.through(functools.partial(jax.checkpoint, policy=self.policy), apply)

    def run(unit, h, c, layer):  # one repetition (a block, or each block of a period in turn)
      if not isinstance(unit, Period):
        return apply(unit, h, c, layer)
      out = []
      for j, block in enumerate(unit.blocks):
        r = apply(block, h, None if c is None else c[j], layer + j)
        h = r if c is None else r[0]
        out.append(None if c is None else r[1])
      return h if c is None else (h, out)

    if not self.scan:
      out = []
      for i, block in enumerate(self.blocks):
        if cache is None:
          x = run(block, x, None, self.start + i)
        else:
          x, c = run(block, x, cache[i], self.start + i)
          out.append(c)
      return x if cache is None else (x, out)
    graphdef, state = nnx.split(self.blocks)
    first = self.start + self.period * jnp.arange(self.n)  # each repetition's first layer
    layer = lambda i, tree: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    if diagnostics.active():  # a Python loop, so values the blocks record need not leave a scan
      out = []
      for i in range(self.n):
        r = run(nnx.merge(graphdef, layer(i, state)), x, None if cache is None else layer(i, cache), first[i])
        x = r if cache is None else r[0]
        out.append(None if cache is None else r[1])
      return x if cache is None else (x, jax.tree.map(lambda *a: jnp.stack(a), *out))

    def body(h, s):  # one repetition; its auxiliary losses leave the scan stacked per repetition
      r, losses = auxiliary.within(run)(nnx.merge(graphdef, s[0]), h, s[1], s[2])
      return (r, (None, losses)) if cache is None else (r[0], (r[1], losses))
    x, (new, losses) = jax.lax.scan(body, x, (state, cache, first), unroll=self.scan_unroll)
    auxiliary.add_all(losses, axis=0)  # summed over the layers
    return x if cache is None else (x, new)

  def cost(self, seq_len: int) -> accounting.Cost:
    unit = self.blocks if self.scan else self.blocks[0]  # costs depend on static sizes only
    return unit.cost(seq_len) * self.n


class Decoder(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab, cfg.d_model, rngs=rngs)
    specs = layer_specs(cfg)
    self.stages = nnx.List([Stage(cfg, specs[a:a + p], a, n, rngs=rngs)
                            for a, p, n in stages(specs, periodic=cfg.scan_layers)])
    self.shared = nnx.Dict({name: mixer.build(f, facts(cfg), rngs=rngs, what=f"model.shared[{name!r}]")
                            for name, f in cfg.shared})
    self.norm_out = RMSNorm(cfg.d_model, cfg.norm_eps)
    if cfg.adapter is not None:
      found = {k for _, m in nnx.iter_graph(self.stages) if isinstance(m, nnx.Module) for k in getattr(m, "adapters", ())}
      if missing := [t for t in cfg.adapter.targets if t not in found]:
        raise ValueError(f"model.adapter target {missing[0]!r} names no projection of a layer that takes adapters "
                         f"(adapted here: {sorted(found) or 'none'}; attention: wq wk wv wo, swiglu: w_gate w_up w_down)")
    if not cfg.tie_embeddings:
      self.head = nnx.Param(fan_in_normal(rngs.params(), (cfg.d_model, cfg.vocab), cfg.d_model),
                            axes=("embed", "vocab"))

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    """An empty decode cache for ``batch`` rows of up to ``max_len`` tokens (pmem.core.mixer):
    ``{"stages": [per-stage states], "shared": {name: state}}``, in the model's ``dtype``."""
    dt = self.cfg.dtype
    return {"stages": [s.init_state(batch, max_len, dt) for s in self.stages],
            "shared": {n: m.init_state(batch, max_len, dt) for n, m in self.shared.items() if mixer.stateful(m)}}

  def state_bytes(self, max_len: int) -> int:
    """Decode-state bytes of one sequence of up to ``max_len`` tokens (its row of :meth:`init_cache`:
    a KV cache grows with ``max_len``, a recurrent state does not)."""
    shapes = jax.eval_shape(lambda: self.init_cache(1, max_len))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))

  def __call__(self, ids: Int[Array, "B T"], ctx: TokenContext, cache: dict | None = None):
    """Float32 logits ``[B, T, V]``; with a ``cache`` (:meth:`init_cache`), ``(logits, new_cache)``
    for the ``T`` tokens after those the cache holds (prefill or decode, pmem.core.mixer). Token
    ids outside ``[0, vocab)`` are an error, also under ``jit`` (``pmem.layers.embed.check_ids``),
    except inside ``pmem.layers.embed.trusted_ids()`` (the trainer's steps, whose batches were
    checked on the host)."""
    h, new = self.hidden(ids, ctx, cache)
    b, t, d = h.shape
    logits = (h.reshape(b * t, d) @ self.unembed()).reshape(b, t, -1)
    chex.assert_shape(logits, (*ids.shape, self.cfg.vocab))
    logits = constrain(logits, ("batch", "length", "act_vocab"))
    return logits if cache is None else (logits, new)

  def unembed(self) -> Float[Array, "D V"]:
    """The output head ``W``: logits = hidden @ W (the embedding's transpose when tied)."""
    return widen(self.embed.table[...]).T if self.cfg.tie_embeddings else self.head[...]

  def hidden(self, ids: Int[Array, "B T"], ctx: TokenContext, cache: dict | None = None):
    """``(h, new_cache)``: the float32 output of the last norm ``[B, T, D]`` (the logits are ``h @``
    :meth:`unembed`), as :meth:`__call__` (``new_cache`` None without a cache)."""
    chex.assert_rank(ids, 2)
    chex.assert_type(ids, int)
    chex.assert_equal_shape([ids, ctx.positions, ctx.segment_ids])
    if ctx.ids is not ids:  # token-indexed tables read ctx.ids
      check_ids(ctx.ids, self.cfg.vocab)
    x = constrain(self.embed(ids), ("batch", "length", "embed"))
    new = None if cache is None else {"stages": [], "shared": {}}
    if self.cfg.shared:
      feats = {}
      for n, m in self.shared.items():
        if cache is not None and n in cache["shared"]:
          feats[n], new["shared"][n] = m(ids, ctx, cache["shared"][n])
        else:
          feats[n] = m(ids, ctx)
      ctx = dataclasses.replace(ctx, features={**ctx.features, **feats})
    for i, stage in enumerate(self.stages):
      if cache is None:
        x = stage(x, ctx)
      else:
        x, c = stage(x, ctx, cache["stages"][i])
        new["stages"].append(c)
    return widen(self.norm_out(x)), new

  def cost(self, seq_len: int) -> accounting.Cost:
    c = self.embed.cost(seq_len) + self.norm_out.cost(seq_len)
    c = c + sum((s.cost(seq_len) for s in self.stages), accounting.Cost())
    c = c + sum((m.cost(seq_len) for m in self.shared.values()), accounting.Cost())
    head = accounting.dense(self.cfg.d_model, self.cfg.vocab)
    if self.cfg.tie_embeddings:  # the table is already counted as stored params
      head = dataclasses.replace(head, params=0)
    return c + head


def block_paths(model: Decoder) -> list[tuple[tuple, int | None]]:
  """Per layer, in order: the path of its block's variables in ``model`` and the index into their
  stacked leading axis (None: not stacked)."""
  return [(("stages", i, *sub), j) for i, s in enumerate(model.stages) for sub, j in s.block_paths()]


def blocks(model: Decoder) -> list[Block]:
  """The blocks in layer order (scanned stages unstacked by :func:`unstack`)."""
  return [b for stage in unstack(model)[0].stages for b in stage.blocks]


def unstack(model: Decoder) -> tuple[Decoder, dict[str, tuple[str, int | None]]]:
  """``(model', sources)``: ``model`` with every scanned stage's stacked layers as separate blocks
  holding the same values (each layer's slice copied once), and for every variable of ``model'``
  its ``(name in model, layer index into its stacked value or None)``. The generator decodes with
  ``model'``: a decode step through a layer scan slices every layer's weights and cache per token
  (the demo's batch-8 decode 2x slower on XLA:CPU, docs/results.md). ``model`` if nothing is scanned."""
  if not any(s.scan for s in model.stages):
    return model, {name_of(p): (name_of(p), None) for p, _ in nnx.to_flat_state(nnx.state(model))}
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  where = block_paths(model)
  cfg = dataclasses.replace(model.cfg, scan_layers=False)
  out = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(out)

  def source(p: tuple) -> tuple[tuple, int | None]:
    if p[0] != "stages":
      return p, None
    prefix, j = where[out.stages[p[1]].start + p[3]]  # unstacked paths: ("stages", i, "blocks", k, ...)
    return (*prefix, *p[4:]), j

  leaves, sources = [], {}
  for p, v in nnx.to_flat_state(abstract):
    src, j = source(p)
    a = flat[src].get_value()
    leaves.append((p, v.replace(a if j is None else a[j])))
    sources[name_of(p)] = (name_of(src), j)
  return nnx.merge(graphdef, nnx.from_flat_state(leaves)), sources

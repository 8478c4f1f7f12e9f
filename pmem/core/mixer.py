"""The mixer protocol shared by every sequence and channel mixer, below ``pmem.layers`` and
``pmem.memory`` (both import it; neither imports the other's protocol).

A mixer is built by the decoder as ``factory(**facts, rngs=...)`` (:func:`build`) and called as
``mixer(x, ctx) -> y`` with ``x: f32[B, T, D]`` the normed hidden states and ``ctx`` the
token context below. It is a pure function of its variables and inputs. Large tables are
declared as :class:`pmem.core.variables.MemoryTable`. ``cost(seq_len)`` reports params,
active params, FLOPs and bytes read per token (:mod:`pmem.core.accounting`).

Ids a module can compute from the tokens alone (Engram's hashed n-grams) are computed on the
host, in the input pipeline: such a module defines ``host_features(tokenizer) -> fn`` where
``fn(batch) -> {field: int32 [B, T, ...]}`` reads the host batch (``inputs``, ``positions``,
``segment_ids``). The trainer applies every module's ``fn`` to each train and eval batch
(:func:`batch_features`); the new fields reach the forward as ``ctx.features[field]`` and may be
a ``MemoryTable``'s ``index=`` (so its rows can be staged from the host).

**Model facts.** The decoder owns the facts of the model (:data:`FACTS`: ``vocab``, ``d_model``,
``n_layers``, ``layer`` (the block's index), ``out_scale`` (the depth factor of output projections),
``dtype``, ``adapter`` (LoRA / DoRA, pmem.layers.adapters), ``kernel_impl``) and hands each factory the ones its signature names; a module's config names only what
is its own, so a later ``set:model.vocab=...`` reaches every table. A config that binds a fact
itself must agree with the model, else :func:`build` refuses it naming both values. ``d_ff`` (the
width of the model's default channel mixer) is a default: given to a factory that takes ``d_ff``
and leaves it unset (STEM's width follows the FFN it replaces). A factory that takes ``layer``
depends on its index, so the decoder builds each of its layers alone (never stacked in a scan).

**Decode state.** A mixer that remembers across calls (attention's KV cache, a recurrence's state,
Engram's conv tail) defines ``init_state(batch, max_len, dtype) -> State`` (a pytree of arrays,
:func:`stateful`) and has one call in two uses: ``mixer(x, ctx) -> y`` on whole documents from
their starts (training, evaluation; packed documents are kept apart by ``ctx.segment_ids``), and
``mixer(x, ctx, state) -> (y, new_state)`` on the next ``T >= 1`` tokens of each row after what
``state`` holds (prefill: a prompt; decode: one token). ``ctx.positions`` are the tokens' absolute
positions in their documents in both, so a prompt, then token after token, gives the logits of
the whole sequence at once (``tests/test_decode.py`` checks this for every registered config). A
stateless mixer defines nothing and is always called ``mixer(x, ctx)``. In a state call
``segment_ids == 0`` marks padding (left padding of shorter prompts): a mixer never lets a
padding token reach a real one. The decoder carries the per-layer states (stacked along the layer
axis in scanned stages) as one ``cache`` pytree (:meth:`pmem.models.decoder.Decoder.init_cache`).

**Host features in decode.** A module whose host features read previous tokens (Engram's n-grams)
says how many with ``host_history`` (an int attribute); the generator hands its ``fn`` the last
``host_history + 1`` tokens of each row with their positions and keeps the last column, so decode
features are the training-time ones, bit for bit (:func:`feature_history`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from pmem.core.accounting import Cost


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenContext:
  """What a mixer may know about the tokens besides their hidden states."""
  ids: Int[Array, "B T"]
  positions: Int[Array, "B T"]
  segment_ids: Int[Array, "B T"]  # 0 = padding; packed documents have distinct ids
  features: dict[str, Any] = dataclasses.field(default_factory=dict)  # host-side features
  # a training step's key for training-time noise (adapter dropout), which the decoder folds with the
  # layer's and the mixer's index (:meth:`folded`); None (evaluation, decoding): no noise
  rng: jax.Array | None = None

  def folded(self, n) -> "TokenContext":
    """This context with its key (if any) folded with ``n``."""
    return self if self.rng is None else dataclasses.replace(self, rng=jax.random.fold_in(self.rng, n))


class ChannelMixer(Protocol):

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext) -> Float[Array, "B T D"]:
    ...

  def cost(self, seq_len: int) -> Cost:
    ...


FACTS = ("vocab", "d_model", "n_layers", "layer", "out_scale", "dtype", "adapter", "kernel_impl")  # owned by the decoder
DEFAULTS = ("d_ff",)  # given where the factory leaves them unset


def _parts(factory: Callable) -> tuple[Callable, dict, Mapping[str, inspect.Parameter]]:
  """(callable, keywords the config bound, parameters of the callable)."""
  fn, bound = factory, {}
  while isinstance(fn, functools.partial):
    bound, fn = {**fn.keywords, **bound}, fn.func
  sig = inspect.signature(fn.__init__ if isinstance(fn, type) else fn)  # a Module class's own __init__
  return fn, bound, sig.parameters


def takes(factory: Callable, name: str) -> bool:
  """Whether ``factory`` has a keyword argument ``name``."""
  return name in _parts(factory)[2]


def build(factory: Callable, facts: Mapping[str, Any], *, rngs, what: str = ""):
  """``factory(**the facts it takes and leaves unset, rngs=rngs)``; a fact of :data:`FACTS` the
  config bound to another value is refused in one line naming both."""
  fn, bound, params = _parts(factory)
  name = what or getattr(fn, "__name__", repr(fn))
  for k, v in facts.items():
    if k in FACTS and k in bound and bound[k] != v:
      raise ValueError(f"{name}: its config sets {k}={bound[k]!r} but the model's {k} is {v!r}; "
                       f"drop {k} from the module's config (the decoder hands it over)")
  given = {k: v for k, v in facts.items() if k in params and k not in bound}
  return factory(**given, rngs=rngs)


State = Any  # a mixer's decode state: a pytree of arrays


def stateful(m) -> bool:
  """Whether ``m`` owns decode state (defines ``init_state``)."""
  return callable(getattr(m, "init_state", None))


HostFeatures = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def feature_history(model: nnx.Module) -> int:
  """How many previous tokens the host features of ``model``'s modules read (0: none)."""
  return max([int(getattr(m, "host_history", 0)) for _, m in nnx.iter_graph(model)
              if isinstance(m, nnx.Module) and callable(getattr(m, "host_features", None))], default=0)


def batch_features(model: nnx.Module, tokenizer) -> HostFeatures | None:
  """The host-side feature function of every module of ``model`` that has one, merged; None if none."""
  fns = [m.host_features(tokenizer) for _, m in nnx.iter_graph(model)
         if isinstance(m, nnx.Module) and callable(getattr(m, "host_features", None))]
  if not fns:
    return None

  def features(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for fn in fns:
      new = fn(batch)
      clash = (set(new) & set(out)) | (set(new) & set(batch))
      if clash:
        raise ValueError(f"host feature fields {sorted(clash)} are produced twice; give each module its own names")
      out.update(new)
    return out

  return features

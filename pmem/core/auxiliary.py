"""Auxiliary training losses that modules add during their forward (MoM's router balance loss, an MoE
layer's), one mechanism for all of them.

A module calls :func:`add` with a named scalar, already multiplied by its weight. The train step
(pmem.train.step) opens :func:`collect` around the forward, adds the sum of what was collected to the LM
loss and logs each name (summed over the layers that add it) as a metric. Without a collector
(evaluation, decoding) :func:`add` records nothing and :func:`active` is False, so a module skips
computing its loss and a forward costs nothing more.

A value added inside the body of a jax transform (a ``lax.scan`` over stacked layers, ``jax.checkpoint``)
would leak as a tracer if it reached an outer collector: the body runs under its own collector
(:func:`within`) and returns what it collected as an extra output, which the caller adds outside
(:func:`add_all`; a scan's stacked outputs summed over its steps). :func:`through` does this for a
transform of a function (``jax.checkpoint``). The decoder does it for its stages
(pmem.models.decoder.Stage); a module running its own transform around an :func:`add` does the same.
(Not ``aux.py``: ``AUX`` is a reserved file name on Windows.)"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

Losses = dict[str, jax.Array]  # name -> scalar loss, summed over the calls that added it

_SINK: contextvars.ContextVar[Losses | None] = contextvars.ContextVar("pmem_auxiliary", default=None)


def active() -> bool:
  """Whether a collector is open (a train step's forward)."""
  return _SINK.get() is not None


@contextlib.contextmanager
def collect() -> Iterator[Losses]:
  """Collects the losses added until exit: ``{name: sum of the values added under name}``."""
  token = _SINK.set({})
  try:
    yield _SINK.get()
  finally:
    _SINK.reset(token)


def add(name: str, value: jax.Array) -> None:
  """Adds the scalar ``value`` to the loss under ``name`` (a no-op without a collector)."""
  sink = _SINK.get()
  if sink is not None:
    sink[name] = sink[name] + value if name in sink else value


def add_all(losses: Losses, axis: int | None = None) -> None:
  """:func:`add` of each of ``losses`` (summed over ``axis`` first: a scan's stacked steps)."""
  for name, v in losses.items():
    add(name, v if axis is None else v.sum(axis))


def within(fn: Callable) -> Callable:
  """``fn`` returning ``(out, losses)``: the losses its body added, so they can leave a transform's body
  as an output (``{}`` without a collector: no output, nothing traced)."""
  def wrapped(*args):
    if not active():
      return fn(*args), {}
    with collect() as got:
      out = fn(*args)
    return out, dict(got)
  return wrapped


def through(transform: Callable[[Callable], Callable], fn: Callable) -> Callable:
  """``transform(fn)`` (e.g. ``jax.checkpoint``) with the losses ``fn``'s body adds carried out of the
  transform as an output and added outside."""
  inner = transform(within(fn))

  def outer(*args):
    out, losses = inner(*args)
    add_all(losses)
    return out
  return outer

"""Fiddle configs and fiddlers, registered by name.

A config is a function returning an ``fdl.Config`` of :class:`pmem.train.loop.Experiment`; a
fiddler is a function that edits such a config in place (an ablation). Each paper gets its
own module here; every module in this package (but ``_*``) is imported before a name is looked up
(``pmem.core.registry.Registry``), so its names register.
"""

from __future__ import annotations

from pmem.core.registry import CHANNEL_MIXERS, SEQUENCE_MIXERS, Registry

CONFIGS = Registry("config", ("configs",))
FIDDLERS = Registry("fiddler", ("configs",))


def config(name: str, doc: str):
  return CONFIGS.register(name, doc)


def fiddler(name: str, doc: str):
  return FIDDLERS.register(name, doc)


def load_all() -> None:
  """Imports what registers configs, fiddlers and mixers (the launchers call it; each registry also loads itself
  before its first lookup)."""
  for r in (CONFIGS, FIDDLERS, SEQUENCE_MIXERS, CHANNEL_MIXERS):
    r.load()

"""Orbax checkpoints of the whole train state with fault handling.

A checkpoint holds params, the rest of the model state, optimizer state and the step (item
``state``) and JSON metadata (item ``meta``: the data-iterator state and the config fingerprint).
Saves are atomic (Orbax writes a temporary directory and renames it when finalized), so a save
cut short is never restored. Restoring walks back from the newest step past unreadable ones
(with a warning) and refuses a checkpoint written by an incompatible config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("pmem")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0  # steps between saves; the last step is always saved; 0 = last step only
  keep: int = 3  # keep the newest N
  keep_period: int | None = None  # also keep every step divisible by this
  async_save: bool = True


class CheckpointError(ValueError):
  """A workdir's checkpoints cannot be resumed (another config wrote them, none is readable) or a
  save failed."""


def _canon(x) -> Any:
  """A JSON-able, address-free description of a config value."""
  if isinstance(x, functools.partial):
    return {"callable": f"{x.func.__module__}.{x.func.__qualname__}", "args": _canon(list(x.args)),
            "kwargs": {k: _canon(v) for k, v in sorted(x.keywords.items())}}
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: _canon(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, (list, tuple)):
    return [_canon(v) for v in x]
  if isinstance(x, dict):
    return {str(k): _canon(v) for k, v in sorted(x.items())}
  if callable(x):
    return f"{getattr(x, '__module__', '?')}.{getattr(x, '__qualname__', repr(x))}"
  return x


def fingerprint(**parts) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed (model, optimizer, data, seed, ...)."""
  return {k: _canon(v) for k, v in parts.items()}


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: checkpoint has {a!r}, this run has {b!r}")
  return out


class Checkpointer:

  def __init__(self, directory: str, cfg: CheckpointConfig, fingerprint: dict):
    if cfg.every < 0 or cfg.keep < 1:
      raise ValueError(f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got {cfg.every}, {cfg.keep}")
    self.cfg, self.fingerprint = cfg, fingerprint
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, keep_period=cfg.keep_period, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=cfg.async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

  def should_save(self, step: int, last: int) -> bool:
    return step == last or (self.cfg.every > 0 and step % self.cfg.every == 0)

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving ``step``; a failed write (disk full, permissions) raises :class:`CheckpointError`
    and leaves the committed checkpoints as they were (Orbax commits by renaming a finished
    temporary directory; leftovers are removed when the directory is next opened)."""
    meta = {**meta, "step": step, "fingerprint": self.fingerprint}
    with self._failure(f"saving step {step}"):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)

  @contextlib.contextmanager
  def _failure(self, what: str):
    try:
      yield
    except OSError as e:
      kept = self.manager.all_steps()
      raise CheckpointError(f"{what} to {self.directory} failed ({e}); the committed checkpoints "
                            f"{sorted(kept)} are kept") from e

  def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
    """(state, meta) of the newest readable compatible checkpoint, or None if there is none."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # unreadable metadata: fall back to the previous step
        log.warning("checkpoint %d in %s is unreadable (%s); trying an older one", step, self.directory, e)
        continue
      diffs = _diff(meta.get("fingerprint", {}), self.fingerprint)
      if diffs:
        raise CheckpointError(f"{self.directory} holds checkpoints of another config; refusing to "
                                     f"resume ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}); "
                                     "use a new --workdir")
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        jax.block_until_ready(state)
      except Exception as e:  # truncated / corrupted arrays
        older = f"; falling back to step {steps[i + 1]}" if i + 1 < len(steps) else ""
        log.warning("checkpoint %d in %s is corrupted (%s: %s)%s", step, self.directory, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "", older)
        continue
      return state, meta
    if steps:
      raise CheckpointError(f"no readable checkpoint among steps {sorted(steps)} in {self.directory}")
    return None

  def close(self) -> None:
    with self._failure("finishing an asynchronous save"):
      self.manager.wait_until_finished()
    self.manager.close()

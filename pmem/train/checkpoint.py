"""Orbax checkpoints of the whole train state with fault handling.

A checkpoint holds params, the rest of the model state, optimizer state and the step (item
``state``) and JSON metadata (item ``meta``: the data-iterator state and the config fingerprint).
Saves are atomic (Orbax writes a temporary directory and renames it when finalized), so a save
cut short is never restored. Restoring walks back from the newest step past unreadable ones, each
moved aside to ``<step>.corrupt-<time>`` (never deleted) with a warning so that training can write
that step again, and refuses a checkpoint written by an incompatible config. A directory that
cannot be written is refused when the run starts; a save that fails later (disk full) stops the
run at that save, or for an asynchronous one at the next step, with one line naming the path and
the committed checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import tempfile
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("pmem")


class _Untraced(logging.Filter):
  """Orbax's errors from its background save threads without their tracebacks (dozens of lines
  each): the :class:`CheckpointError` that stops the run names the cause in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" in record.pathname:
      record.exc_info = record.exc_text = None
    return True


logging.getLogger("absl").addFilter(_Untraced())


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

  def __init__(self, directory: str, cfg: CheckpointConfig):
    if cfg.every < 0 or cfg.keep < 1:
      raise ValueError(f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got {cfg.every}, {cfg.keep}")
    self.cfg, self.fingerprint, self.set_aside = cfg, None, []
    self.directory = os.path.abspath(directory)
    with self._failure("writing checkpoints", listed=False):  # before anything trains
      os.makedirs(self.directory, exist_ok=True)
      fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".write-test-")
      os.close(fd)
      os.remove(probe)
    # step directories are made in save() itself, so a failure raises there (made asynchronously,
    # Orbax waits 300 s for a signal that never comes)
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, keep_period=cfg.keep_period, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=cfg.async_save,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))
    self.failed = False

  def should_save(self, step: int, last: int) -> bool:
    return step == last or (self.cfg.every > 0 and step % self.cfg.every == 0)

  def save(self, step: int, state, meta: dict, wait: bool = False) -> None:
    """Starts saving ``step`` (``wait``: and finishes it); a failed write (disk full, permissions) raises
    :class:`CheckpointError` and leaves the committed checkpoints as they were (Orbax commits by
    renaming a finished temporary directory; leftovers are removed when the directory is next
    opened). A Ctrl-C meanwhile is delivered once the call returns (:func:`_uninterrupted`)."""
    meta = {**meta, "step": step, "fingerprint": self.fingerprint}
    with _uninterrupted(), self._failure(f"saving step {step}"):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
      if wait:
        self.manager.wait_until_finished()

  def check(self) -> None:
    """Raises :class:`CheckpointError` if an asynchronous save has failed (called every step)."""
    with self._failure("an asynchronous save"):
      self.manager.check_for_errors()

  def committed(self) -> list[int]:
    """Steps with a finished checkpoint on disk."""
    names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n))
                  and not any(".orbax-checkpoint-tmp" in m for m in os.listdir(os.path.join(self.directory, n))))

  @contextlib.contextmanager
  def _failure(self, what: str, listed: bool = True):
    try:
      yield
    except OSError as e:  # Orbax re-raises a background save's OSError as is (check_for_errors)
      self.failed = True
      kept = f"; the committed checkpoints {self.committed()} are kept" if listed else ""
      raise CheckpointError(f"{what} to {self.directory} failed ({e}){kept}") from e

  def _set_aside(self, step: int, why: str) -> None:
    """Renames an unreadable step to ``<step>.corrupt-<time>`` so the run can write the step again."""
    src = os.path.join(self.directory, str(step))
    dst = base = f"{src}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    for i in range(2, 1000):  # the same step set aside twice within a second
      if not os.path.exists(dst):
        break
      dst = f"{base}-{i}"
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"pmem set aside checkpoint {step}")
    log.warning("checkpoint %d in %s is %s; moved it to %s", step, self.directory, why, os.path.basename(dst))
    self.set_aside.append(step)
    self.manager.reload()

  def _meta(self, step: int, older: str) -> dict | None:
    """The step's metadata, or None after setting an unreadable step aside."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # unreadable metadata: fall back to the previous step
      self._set_aside(step, f"unreadable ({type(e).__name__}: {_first_line(e)}){older}")
      return None

  def latest_meta(self) -> dict | None:
    """The metadata of the newest step whose metadata reads (unreadable ones are set aside)."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      if (meta := self._meta(step, "")) is not None:
        return meta
    return None

  def restore(self, abstract_state, fingerprint: dict, step: int | None = None) -> tuple[Any, dict] | None:
    """(state, meta) of the newest readable checkpoint (or of ``step``), or None if there is none;
    ``fingerprint`` must match the checkpoint's and is saved with every later checkpoint."""
    self.fingerprint = fingerprint
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {self.directory} (steps: {sorted(steps)})")
      steps = [step]
    for i, step in enumerate(steps):
      older = f"; falling back to step {steps[i + 1]}" if i + 1 < len(steps) else ""
      if (meta := self._meta(step, older)) is None:
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
        if "tree structures do not match" in str(e):  # readable, but another run's state: not corruption
          raise CheckpointError(f"checkpoint {step} in {self.directory} holds a state of another structure than "
                                f"this run's ({_first_line(e)}); use a new --workdir") from e
        self._set_aside(step, f"corrupted ({type(e).__name__}: {_first_line(e)}){older}")
        continue
      return state, meta
    return None  # none, or every one set aside: the run starts from step 0

  def close(self) -> None:
    if self.failed:  # a failed save's threads may never finish: do not wait for them
      return
    with self._failure("finishing an asynchronous save"):
      self.manager.wait_until_finished()
    self.manager.close()


@contextlib.contextmanager
def _uninterrupted():
  """Holds a Ctrl-C (SIGINT) back until the block ends, then delivers it: Orbax's save (or its wait for
  the previous one) cut short in the main thread leaves its threads failing with tracebacks at exit,
  while a save started is finished by :meth:`Checkpointer.close`."""
  if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
    yield
    return
  held = []
  previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    if held:
      signal.raise_signal(signal.SIGINT)


def _first_line(e: BaseException) -> str:
  return str(e).splitlines()[0][:200] if str(e) else ""

"""Knowledge editing and injection through token-indexed memory rows (STEM §6, MoVE, Engram).

Two interventions, neither of which trains anything:

- **Context edit** (STEM's editing experiment): the input ids stay those of the *source* entity,
  but at its positions every token-indexed memory reads the rows of a *target* entity instead.
  :func:`retarget` builds the per-position memory ids and weights, passed to the forward as
  ``ctx.features[MEMORY_IDS]`` / ``[MEMORY_WEIGHTS]`` (``[B, T, J]``); token-indexed modules read
  through :func:`token_rows`, an embedding bag over those ids (the plain gather without them).
  Modes when the source and target spans differ in length (the reference editing code's):
  ``one_to_one`` (equal lengths), ``average`` (every source position reads the mean of the target's
  rows), ``copy`` (target ids cycled over the source span), ``pad`` (target ids, then ``pad_id``),
  ``auto`` (``one_to_one`` if the lengths match, else ``average``). Engram hashes the n-grams of
  the edited stream on the host, so it takes one id per position (every mode but ``average``).
- **Injection**: write rows of the tables directly (:func:`write_rows`; :func:`inject` copies the
  target tokens' rows onto the source tokens' rows in every token-indexed table). This edit is
  persistent and affects every context containing the source tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from pmem.core.variables import MemoryTable
from pmem.memory import lookup
from pmem.core.mixer import TokenContext

MEMORY_IDS, MEMORY_WEIGHTS = "memory_ids", "memory_weights"
MODES = ("one_to_one", "average", "copy", "pad", "auto")


def token_rows(table, ctx: TokenContext) -> Float[Array, "B T D"]:
  """Rows of a token-indexed table for each position: ``table[ctx.ids]``, or under a context edit
  ``Σ_j w[b, t, j] · table[ids[b, t, j]]``."""
  if MEMORY_IDS not in ctx.features:
    return lookup.gather(table, ctx.ids)
  return lookup.bag(table, ctx.features[MEMORY_IDS], ctx.features[MEMORY_WEIGHTS])


def retarget(ids: Int[np.ndarray, " T"], span: tuple[int, int], target: Int[np.ndarray, " J"], mode: str = "auto",
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Memory ids ``[T, J']`` and weights ``[T, J']`` reading ``target``'s rows at ``ids[span[0]:span[1]]``
  and each token's own row elsewhere (``mode``: module docstring)."""
  if mode not in MODES:
    raise ValueError(f"unknown edit mode {mode!r}; one of {MODES}")
  ids, target = np.asarray(ids, np.int32), np.asarray(target, np.int32)
  lo, hi = span
  n, j = hi - lo, len(target)
  if not (0 <= lo < hi <= len(ids)) or j == 0:
    raise ValueError(f"edit span {span} must be a non-empty range inside the {len(ids)} ids, with a non-empty target")
  if mode == "auto":
    mode = "one_to_one" if n == j else "average"
  width = j if mode == "average" else 1
  mem = np.repeat(ids[:, None], width, axis=1)
  w = np.zeros((len(ids), width), np.float32)
  w[:, 0] = 1.0
  if mode == "one_to_one":
    if n != j:
      raise ValueError(f"one_to_one needs equal lengths, got a source span of {n} and {j} target ids")
    mem[lo:hi, 0] = target
  elif mode == "average":
    mem[lo:hi] = target
    w[lo:hi] = 1.0 / j
  elif mode == "copy":
    mem[lo:hi, 0] = np.resize(target, n)
  else:  # pad
    mem[lo:hi, 0] = np.concatenate([target, np.full(max(n - j, 0), pad_id, np.int32)])[:n]
  return mem, w


def _token_tables(params: nnx.State, select: Callable[[str], bool]) -> list[tuple[tuple, nnx.Variable]]:
  """(path, variable) of the token-indexed tables (``index="inputs"``) whose path ``select`` accepts."""
  return [(p, v) for p, v in nnx.to_flat_state(params)
          if isinstance(v, MemoryTable) and v.get_metadata().get("index") == "inputs"
          and select("/".join(map(str, p)))]


def write_rows(params: nnx.State, path: tuple, ids: Int[np.ndarray, " N"], rows: Float[Array, "... N D"]) -> nnx.State:
  """``params`` with rows ``ids`` of the table at ``path`` (stacked layers: all of them) set to ``rows``."""
  flat = dict(nnx.to_flat_state(params))
  if path not in flat or not isinstance(flat[path], MemoryTable):
    raise KeyError(f"no MemoryTable at {path}")
  v = flat[path]
  t = v.get_value()
  ids = jnp.asarray(ids, jnp.int32)
  flat[path] = v.replace(t.at[..., ids, :].set(jnp.asarray(rows, t.dtype)))
  return nnx.from_flat_state(list(flat.items()))


def inject(params: nnx.State, source: Int[np.ndarray, " N"], target: Int[np.ndarray, " J"], mode: str = "auto",
           select: Callable[[str], bool] = lambda path: True) -> nnx.State:
  """Copies the target tokens' rows onto the source tokens' rows in every selected token-indexed
  table (``average``: each source row becomes the mean of the target rows)."""
  source = np.asarray(source, np.int32)
  mem, w = retarget(source, (0, len(source)), target, mode)
  for path, v in _token_tables(params, select):
    t = v.get_value()
    rows = jnp.einsum("nj,...njd->...nd", jnp.asarray(w), jnp.take(t, jnp.asarray(mem), axis=-2))
    params = write_rows(params, path, source, rows)
  return params


def edit_features(ids: Int[np.ndarray, "B T"], edits: list[tuple[tuple[int, int], np.ndarray] | None],
                  mode: str = "auto") -> dict[str, np.ndarray]:
  """Batch features for per-row context edits (``None``: row unedited), padded to a common ``J``."""
  per = [retarget(row, e[0], e[1], mode) if e is not None else (row[:, None], np.ones((len(row), 1), np.float32))
         for row, e in zip(np.asarray(ids, np.int32), edits, strict=True)]
  j = max(m.shape[1] for m, _ in per)
  pad = lambda a: np.pad(a, ((0, 0), (0, j - a.shape[1])))  # noqa: E731  (padding rows get weight 0)
  return {MEMORY_IDS: np.stack([pad(m) for m, _ in per]), MEMORY_WEIGHTS: np.stack([pad(w) for _, w in per])}


def single_ids(features: dict[str, np.ndarray]) -> np.ndarray:
  """The one memory id per position of a context edit (for modules that hash ids, e.g. Engram)."""
  w = features[MEMORY_WEIGHTS]
  if (np.count_nonzero(w, axis=-1) > 1).any():
    raise ValueError("this module reads one memory id per position; edit with mode one_to_one, copy or pad, "
                     "not average")
  return features[MEMORY_IDS][..., 0]


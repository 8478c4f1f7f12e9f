"""Native CPU kernels (``kernels.cc``) called through the XLA FFI: build on first use, register, call.

The library is compiled once per (source, flags, jaxlib headers, CPU) with the system C++ compiler
(``$CXX``, else ``c++``) into ``${PMEM_CACHE:-~/.cache/pmem}/native/<key>.so``; concurrent
processes write it atomically. :func:`load` raises :class:`kernels.common.Unavailable` (with the
compiler's message) when no compiler or header is found or the build fails, so
``implementation="auto"`` falls back to XLA and says why once; ``implementation="native"`` raises.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import numpy as np

from kernels.common import Unavailable

SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-pthread")
TARGETS = {"pmem_bag_fwd": "PmemBagFwd", "pmem_bag_wgrad": "PmemBagWgrad", "pmem_bag_grads": "PmemBagGrads",
           "pmem_bag_rows": "PmemBagRows",
           "pmem_topk_pairs": "PmemTopkPairs", "pmem_row_scatter": "PmemRowScatter",
           "pmem_row_adam": "PmemRowAdam", "pmem_attn_fwd": "PmemAttnFwd", "pmem_attn_bwd": "PmemAttnBwd"}


def _cpu_id() -> str:
  """The CPU's model and feature flags (``-march=native`` builds for them)."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  return "".join(next((ln for ln in lines if ln.startswith(f)), "") for f in ("model name", "flags"))


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("PMEM_CACHE", "~/.cache/pmem")).expanduser() / "native"


@functools.cache
def library() -> pathlib.Path:
  """Path of the compiled library, building it if needed; raises Unavailable if it cannot be built."""
  cxx = os.environ.get("CXX", "c++")
  if shutil.which(cxx) is None:
    raise Unavailable(f"native kernels need a C++ compiler ({cxx!r} not found; set $CXX)")
  include = pathlib.Path(jax.ffi.include_dir())
  if not (include / "xla/ffi/api/ffi.h").exists():
    raise Unavailable(f"native kernels need the XLA FFI headers, missing under {include}")
  key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, cxx, str(include), jax.lib.__version__,
                                  _cpu_id()]).encode()).hexdigest()[:16]
  out = _cache_dir() / f"pmem_native_{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    so = pathlib.Path(tmp) / out.name
    r = subprocess.run([cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(so)], capture_output=True, text=True)
    if r.returncode:
      raise Unavailable(f"building native kernels failed ({cxx}):\n{r.stderr[-2000:]}")
    os.replace(so, out)  # atomic: a concurrent build of the same key writes the same bytes
  return out


@functools.cache
def cdll() -> ctypes.CDLL:
  """The built library, loaded (its FFI targets and the plain C functions of :func:`host_row_adam`)."""
  return ctypes.CDLL(str(library()))


@functools.cache
def load() -> None:
  """Build (if needed), load and register every target with XLA:CPU."""
  lib = cdll()
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def available() -> str | None:
  """None if the native kernels can run here, else why not (warned once)."""
  try:
    library()
    load()
  except Unavailable as e:
    warnings.warn(f"native CPU kernels unavailable, using XLA: {e}", stacklevel=2)
    return str(e)
  return None


def call(target: str, out, *args: jax.Array, aliases: dict[int, int] | None = None, **attrs):
  """``target(*args) -> out`` (a ShapeDtypeStruct or a tuple of them); float32/int32 args, int64 or float32
  ``attrs``; ``aliases`` {arg: output}: outputs written in the args' buffers (in place when XLA can donate)."""
  load()
  return jax.ffi.ffi_call(target, out, vmap_method="sequential", input_output_aliases=aliases)(*args, **attrs)


def host_row_adam(table, mu, nu, count, ids, g, m: int, bc, k, decay: int) -> int | None:
  """``PmemHostRowAdam`` (``kernels.cc``, without the GIL): lazy Adam of the rows ``ids [..., n]`` (the first
  ``m`` slots) of NumPy ``table, mu, nu [..., V, D]`` and ``count [..., V]`` in place (leading dims: stacked
  layers), for gradient rows ``g [..., n, D]``; ``bc [C, 2]`` the bias corrections by step count, ``k`` the 9
  scalars. Returns the rows written, or None (nothing written) if a new count is not below ``C``."""
  *lead, v, d = table.shape
  n = ids.shape[-1]
  args = [(table, np.float32, table.shape, True), (mu, np.float32, table.shape, True),
          (nu, np.float32, table.shape, True), (count, np.int32, table.shape[:-1], True),
          (ids, np.int32, (*lead, n), False), (g, np.float32, (*lead, n, d), False),
          (bc, np.float32, (len(bc), 2), False), (k, np.float32, (9,), False)]
  for i, (x, dt, shape, out) in enumerate(args):
    if x.dtype != dt or x.shape != shape or not x.flags.c_contiguous or (out and not x.flags.writeable):
      raise ValueError(f"host_row_adam: argument {i} must be a C-contiguous{' writable' * out} {np.dtype(dt).name} "
                       f"array {shape}, got {x.dtype} {x.shape}")
  if not 0 <= m <= n or decay not in (0, 1, 2):
    raise ValueError(f"host_row_adam: m={m} of {n} slots, decay={decay}")
  f, i64 = cdll().PmemHostRowAdam, ctypes.c_int64
  f.restype = i64
  p = [ctypes.c_void_p(x.ctypes.data) for x, *_ in args]
  out = f(*p[:4], i64(int(np.prod(lead))), i64(v), i64(d), p[4], p[5], i64(n), i64(m), p[6], i64(len(bc)), p[7],
          i64(decay))
  return None if out == -2 else out

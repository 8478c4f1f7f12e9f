"""Implementation names, the per-platform fallback order, and how a Pallas kernel runs here.

``implementation=`` takes one of :data:`IMPLEMENTATIONS`:

- ``"xla"``: the reference, plain jnp/lax; runs everywhere.
- ``"pallas_tpu"``: Pallas Mosaic TPU kernel; compiled on TPU, interpreted (``interpret=True``) on CPU.
- ``"pallas_gpu"``: Pallas Mosaic GPU kernel (``plgpu.kernel``; attention: pmem's FlashAttention-2 in the generic
  ``pl.pallas_call``, lowered through Triton); compiled on GPU, interpreted on CPU.
- ``"triton"``: Triton kernel called through jax-triton; GPU only, needs ``pip install 'pmem[gpu]'``.
- ``"pallas"``: this platform's Pallas kernel (TPU: pallas_tpu, GPU: pallas_gpu, CPU: pallas_tpu interpreted).
- ``"native"``: a C++ kernel called through the XLA FFI (``kernels/native``); CPU only, built on first use.
- ``"auto"``: the first of :data:`AUTO` [platform] that the op has and that can run.

Only ``"auto"`` falls back; naming an implementation that cannot run raises :class:`Unavailable`.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "native", "pallas", "pallas_tpu", "pallas_gpu", "triton")
AUTO = {"tpu": ("pallas_tpu", "xla"), "gpu": ("triton", "pallas_gpu", "xla"), "cpu": ("native", "xla")}
PALLAS = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cpu": "pallas_tpu"}
RUNS_ON = {"xla": ("cpu", "gpu", "tpu"), "native": ("cpu",), "pallas_tpu": ("tpu", "cpu"), "pallas_gpu": ("gpu", "cpu"),
           "triton": ("gpu",)}


class Unavailable(RuntimeError):
  """The implementation cannot run here: wrong platform, a missing package, or an unsupported shape."""


def platform() -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"`` for the default backend."""
  p = jax.default_backend()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p


def check_name(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")


def interpret(name: str) -> Any:
  """The ``interpret=`` argument for a Pallas kernel of ``name``: off on its own platform, on for CPU."""
  if platform() != "cpu":
    return False
  if name == "pallas_tpu":
    return True
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.InterpretGPUParams()


def _load(package: str, name: str, check_args: tuple):
  plat = platform()
  if plat not in RUNS_ON[name]:
    raise Unavailable(f"{name} runs on {' or '.join(RUNS_ON[name])} (interpreted on cpu for Pallas); "
                      f"the default backend is {plat}")
  if name == "triton":
    try:
      importlib.import_module("jax_triton")
    except ImportError as e:
      raise Unavailable(f"triton needs jax-triton (pip install 'pmem[gpu]'): {e}") from e
  try:
    module = importlib.import_module(f"{package}.{name}")
  except ImportError as e:
    if e.name == f"{package}.{name}":
      raise Unavailable(f"{package} has no {name} implementation") from None
    if (e.name or "").split(".")[0] == package.split(".")[0]:
      raise  # a bug of ours, not a missing library
    raise Unavailable(f"{name} cannot import what it needs: {e}") from e
  module.check(*check_args)
  return module


def library(module: str, name: str):
  """``module`` (a library kernel, imported when first needed), or :class:`Unavailable` saying why ``name`` cannot
  run: this jax may lack it (``jax.experimental.pallas.ops`` kernels come and go between releases)."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise Unavailable(f"{name} needs {module}, which does not import here: {e}") from e


def select(package: str, implementation: str, *check_args) -> tuple[str, Any]:
  """(name, module) of the implementation to run; ``module.check(*check_args)`` vets the shapes."""
  check_name(implementation)
  plat = platform()
  names = AUTO[plat] if implementation == "auto" else (PALLAS[plat] if implementation == "pallas"
                                                      else implementation,)
  reasons = []
  for name in names:
    try:
      return name, _load(package, name, check_args)
    except Unavailable as e:
      if implementation != "auto":
        raise
      reasons.append(f"{name}: {e}")
  raise Unavailable("no implementation can run: " + "; ".join(reasons))


def check_ids(ids, num_rows: int) -> None:
  """Raises on concrete ids outside [0, num_rows). Traced ids are not checked (XLA gathers clamp
  silently): validate them at the data boundary and pick ``mode="fill"|"clip"`` for what slips by."""
  if isinstance(ids, jax.core.Tracer):
    return
  a = np.asarray(ids)
  if a.size and (a.min() < 0 or a.max() >= num_rows):
    raise ValueError(f"ids must lie in [0, {num_rows}); got min {a.min()}, max {a.max()}")


def triton_call(*args, kernel, out, grid, **meta):
  """``jax_triton.triton_call`` with the output types under the keyword this version takes
  (``out_type`` since jax-triton 0.4.1, ``out_shape`` before); outputs follow the inputs in the
  kernel's signature."""
  import inspect
  import jax_triton as jt
  key = "out_type" if "out_type" in inspect.signature(jt.triton_call).parameters else "out_shape"
  return jt.triton_call(*args, kernel=kernel, grid=grid, **{key: out}, **meta)


def accumulator(*dtypes) -> Any:
  """The dtype to accumulate and take statistics in: float32, or float64 when an input is (float64 references
  of the tests, under ``jax_enable_x64``)."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def widen(x):
  """``x`` in :func:`accumulator` of its dtype (bfloat16 / float32 -> float32, float64 stays)."""
  return x.astype(accumulator(x.dtype))

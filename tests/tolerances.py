"""Float tolerances for the tests, derived from the dtype, the magnitudes and the operation count.

Two float computations of the same value differ by rounding alone when they sum in another order
(XLA:CPU picks reduction and matmul orders by vector width, AVX2 or AVX-512, by blocking and by
thread count, and contracts multiply-adds into FMAs by expression shape), or when one of them is a
float64 reference. The standard bound (Higham, *Accuracy and Stability of Numerical Algorithms*,
2nd ed., §3.1 and §4.2): a sum of n terms, in any order,

    |fl(Σ x_i) − Σ x_i| ≤ (n − 1)·u·Σ|x_i| + O(u²),   u = eps / 2 (the unit roundoff),

and a dot product of length n the same with n for n − 1. Two orders of one sum therefore differ by
at most (n − 1)·eps·Σ|x_i|, and a float32 result lies within n·u·Σ|x_i| of its float64 reference.
:func:`tol` writes that bound as NumPy's ``|actual − expected| ≤ atol + rtol·|expected|``:

    rtol = k·eps·terms,   atol = k·eps·terms·scale,

``terms``: the roundings that can differ (the lengths of the reductions on the way, plus one or a
few per elementwise op or transcendental function); ``scale``: the magnitude of what is summed
(for O(1) inputs, the largest compared value); ``k``: 1 between two float orders, 1/2 against a
float64 reference (the one-order bound). The atol is what keeps a value that cancels to near zero
from failing on a reordering (a relative tolerance alone cannot); the rtol covers values far above
``scale``.

Where the operation count is not known (a whole model: prefill + decode against the full forward), the bound
is measured instead (:func:`assert_matches_reference`): the float32 computation's own distance to a float64
reference of the same parameters, ``e = max|f32 − f64|``, says how far rounding moves this model's result;
another float32 order of the same math lands within ``c·e`` of the reference, and two float64 orders within
``c·e·eps64/eps32`` of each other (the same amplification of a unit roundoff 2^29 times smaller).

Results the code promises bit for bit (the same operations in the same order: resume, host ==
device, a sum reproduced in its occurrence order) are compared with ``assert_array_equal``.
"""

import ml_dtypes
import numpy as np

EPS = {np.dtype(np.float64): 2.0 ** -52, np.dtype(np.float32): 2.0 ** -23, np.dtype(ml_dtypes.bfloat16): 2.0 ** -7,
       np.dtype(np.float16): 2.0 ** -10}  # machine epsilon: the spacing of floats at 1.0


def tol(dtype, scale: float = 1.0, terms: float = 1, k: float = 1.0) -> dict[str, float]:
  """``dict(rtol=k·eps·terms, atol=k·eps·terms·scale)`` for ``np.testing.assert_allclose``."""
  r = float(k * EPS[np.dtype(dtype)] * terms)
  return {"rtol": r, "atol": r * float(scale)}


def assert_close(actual, expected, dtype=np.float32, terms: float = 1, scale: float | None = None, k: float = 1.0,
                 **kw) -> None:
  """``assert_allclose`` within :func:`tol`; ``scale`` defaults to max |expected| (1 if all zero)."""
  expected = np.asarray(expected, np.float64)
  if scale is None:
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, **tol(dtype, scale, terms, k), **kw)


def assert_matches_reference(actual, baseline, ref, actual64=None, c: float = 4.0, what: str = "") -> None:
  """A float32 ``actual`` and ``baseline`` (two orders of one computation, e.g. prefill + decode and the full
  forward) against the float64 ``ref`` of ``baseline``: ``max|actual − ref| <= c·e + eps32·scale`` with
  ``e = max|baseline − ref|`` and ``scale = max|ref|``; and the float64 ``actual64`` (``actual``'s order in
  float64), if given, within ``c·e·eps64/eps32 + eps64·scale`` of ``ref`` (module docstring)."""
  ref = np.asarray(ref, np.float64)
  scale = float(np.abs(ref).max(initial=0.0)) or 1.0
  e = float(np.abs(np.asarray(baseline, np.float64) - ref).max())
  err = float(np.abs(np.asarray(actual, np.float64) - ref).max())
  e32, e64 = EPS[np.dtype(np.float32)], EPS[np.dtype(np.float64)]
  bound = c * e + e32 * scale
  assert err <= bound, f"{what}float32: max |actual - f64 ref| {err:.3g} > {c} x {e:.3g} (baseline's) + floor"
  if actual64 is not None:
    err64, bound64 = float(np.abs(np.asarray(actual64) - ref).max()), (c * e + e32 * scale) * e64 / e32
    assert err64 <= bound64, f"{what}float64: max |actual - ref| {err64:.3g} > {bound64:.3g}"

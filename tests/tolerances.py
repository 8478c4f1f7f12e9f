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

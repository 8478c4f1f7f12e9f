"""pmem/layers/recurrence.py against flash-linear-attention's naive recurrences (torch oracle, float64:
experiments/oracles/fla_recurrence.py): GLA (per key dim log decay), the delta rule (no decay) and the
gated delta rule (scalar log decay), for :func:`naive` and :func:`chunked` (chunks of 4 and 16, T not a
multiple of either), from a zero and a nonzero initial state. fla's references have no document resets."""

import jax.numpy as jnp
import numpy as np
import pytest

from pmem.layers import recurrence
from tests.conftest import ROOT, run_oracle

# f32 vs a float64 reference over T ≲ 40 steps of O(1) state updates and K-length dot products: the
# one-order bound n·u·Σ|x| (tests/tolerances.py) stays under 1e-5 abs + rel at these magnitudes
RTOL, ATOL = 1e-5, 1e-5
SHAPES = {"a": (2, 37, 3, 8, 5, True), "b": (1, 16, 2, 4, 4, False)}  # B, T, H, K, V, nonzero S0
KINDS = ("gla", "delta", "gated_delta")
CASES = [f"{kind}_{shape}" for kind in KINDS for shape in SHAPES]


def inputs(case: str, seed: int) -> dict[str, np.ndarray]:
  """float32 arrays: keys L2-normalized and beta in (0, 1) for the delta rules, log decays -0.3·|N(0, 1)|."""
  kind, shape = case.rsplit("_", 1)
  b, t, h, dk, dv, s0 = SHAPES[shape]
  rng = np.random.default_rng(seed)
  x = {"q": rng.normal(size=(b, t, h, dk)), "k": rng.normal(size=(b, t, h, dk)), "v": rng.normal(size=(b, t, h, dv))}
  if kind == "gla":
    x["a"] = -0.3 * np.abs(rng.normal(size=(b, t, h, dk)))
  else:
    x["k"] /= np.linalg.norm(x["k"], axis=-1, keepdims=True)
    x["beta"] = rng.uniform(0.05, 0.95, size=(b, t, h))
    if kind == "gated_delta":
      x["a"] = -0.3 * np.abs(rng.normal(size=(b, t, h)))
  if s0:
    x["S0"] = 0.5 * rng.normal(size=(b, h, dk, dv))
  return {n: y.astype(np.float32) for n, y in x.items()}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
  """Every case's inputs and fla's (o, S_final), from one run of the oracle."""
  d = tmp_path_factory.mktemp("fla")
  cases = {case: inputs(case, i) for i, case in enumerate(CASES)}
  np.savez(d / "in.npz", **{f"{c}/{n}": y for c, x in cases.items() for n, y in x.items()})
  run_oracle(str(ROOT / "experiments/oracles/fla_recurrence.py"), str(d / "in.npz"), str(d / "out.npz"))
  out = np.load(d / "out.npz")
  return {c: (x, out[f"{c}/o"], out[f"{c}/S"]) for c, x in cases.items()}


@pytest.mark.oracle
@pytest.mark.parametrize("form", ["naive", 4, 16])  # naive, or chunked with that chunk size
@pytest.mark.parametrize("case", CASES)
def test_matches_fla(oracle, case, form):
  x, o_ref, s_ref = oracle[case]
  j = {n: jnp.asarray(y) for n, y in x.items()}
  a = j.get("a", jnp.zeros(x["q"].shape[:3], jnp.float32))  # the delta rule: no decay
  args = (j["q"], j["k"], j["v"], a, j.get("beta"))
  o, s = recurrence.naive(*args, S0=j.get("S0")) if form == "naive" else \
      recurrence.chunked(*args, S0=j.get("S0"), chunk=form)
  o, s = np.asarray(o), np.asarray(s)
  print(f"{case} {form}: max |o - fla| = {np.abs(o - o_ref).max():.2e} (max |o| {np.abs(o_ref).max():.1f}), "
        f"max |S - fla| = {np.abs(s - s_ref).max():.2e} (max |S| {np.abs(s_ref).max():.1f})")
  np.testing.assert_allclose(o, o_ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(s, s_ref, rtol=RTOL, atol=ATOL)

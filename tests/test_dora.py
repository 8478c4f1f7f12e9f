"""kernels/dora: the factored norm against the dense ‖W + sAB‖ (float64 NumPy), its gradients and working
memory; the stable compose against the naive form at g ≈ 1, every implementation (xla, Pallas interpreted)
and its custom_vjp; the merges; the whole layer against PEFT's DoRA (torch oracle, float64:
experiments/oracles/peft_dora.py); the benchmark's quick mode."""

import functools
import json

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from kernels import Unavailable, common, dora_compose, dora_merge, dora_norm, lora_merge
from kernels.dora import pallas_gpu as dora_gpu
from kernels.dora import pallas_tpu as dora_tpu
from kernels.dora import xla as dora_xla
from tests.conftest import ROOT, run_oracle
from tests.tolerances import EPS, assert_close

F32, F64 = np.float32, np.float64
IMPLS = ("xla", "pallas_tpu", "pallas_gpu")
S = 0.5  # alpha / r: exact in every float type
# d_in, d_out, r, chunk: d_in not a multiple of the chunk (r = 1, 4, 64), a multiple, one chunk past d_in
NORM_CASES = [(300, 70, 1, 64), (257, 33, 4, 256), (130, 50, 64, 16), (256, 40, 4, 64), (100, 20, 4, 512)]


def factors(d_in, d_out, r, seed=0, dtype=F32):
  """W ~ N(0, 1), and A, B with s·AB of W's size, so that the cross term matters."""
  rng = np.random.default_rng(seed)
  w, a, b = rng.normal(size=(d_in, d_out)), rng.normal(size=(d_in, r)), rng.normal(size=(r, d_out)) / np.sqrt(r)
  return tuple(x.astype(dtype) for x in (w, a, b))


def dense_norm(w, a, b, s=S):
  w, a, b = (np.asarray(x, F64) for x in (w, a, b))
  return np.linalg.norm(w + s * a @ b, axis=0)


def norm_terms(w, a, b, s=S):
  """(the sum lengths behind the factored ‖·‖², the magnitude Σ|·| of what they sum): colsum W² (d_in),
  AᵀW and AᵀA (d_in), B ⊙ AᵀW and (AᵀA)B then B ⊙ (·) summed over r, and the last few adds / scalings."""
  w, a, b = (np.abs(np.asarray(x, F64)) for x in (w, a, b))
  mag = (w * w).sum(0) + 2 * s * (b * (a.T @ w)).sum(0) + s * s * (b * ((a.T @ a) @ b)).sum(0)
  return w.shape[0] + 2 * a.shape[1] + 4, float(mag.max())


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("d_in,d_out,r,chunk", NORM_CASES)
def test_factored_norm_equals_dense(d_in, d_out, r, chunk, dtype):
  """‖·‖² within the one-order bound of the sums (vs float64 NumPy; float64 with x64 enabled, where it
  is also within the issue's 1e-6 relative)."""
  w, a, b = factors(d_in, d_out, r, dtype=dtype)
  with jax.enable_x64(dtype == F64):
    n = np.asarray(jax.jit(functools.partial(dora_norm, s=S, chunk=chunk))(w, a, b))
  assert n.dtype == dtype and n.shape == (d_out,)
  ref = dense_norm(w, a, b)
  terms, mag = norm_terms(w, a, b)
  # float32: one order against the float64 truth; float64: two orders (NumPy's dense one rounds too)
  assert_close(n.astype(F64) ** 2, ref ** 2, dtype, terms=terms, scale=mag, k=0.5 if dtype == F32 else 1.0)
  if dtype == F64:
    assert np.abs(n - ref).max() / ref.max() <= 1e-6


def test_norm_clamps_cancelling_columns_at_zero():
  """W = −s·AB: the factored square cancels to about ±u·Σ|·| and must be clamped, not NaN."""
  _, a, b = factors(64, 8, 4)
  w = (-S * (a.astype(F64) @ b.astype(F64))).astype(F32)
  n = np.asarray(dora_norm(w, a, b, S, chunk=16))
  terms, mag = norm_terms(w, a, b)
  assert np.all(np.isfinite(n)) and np.all(n >= 0)
  assert np.all(n ** 2 <= EPS[np.dtype(F32)] / 2 * terms * mag + dense_norm(w, a, b) ** 2)


def test_norm_gradients():
  """float64: the custom_vjp by finite differences and equal to autodiff of the dense norm; a frozen W
  runs no dW pass (no [d_in, d_out] update in the backward's program)."""
  with jax.enable_x64(True):
    w, a, b = (jnp.asarray(x) for x in factors(70, 12, 4, dtype=F64))
    ct = jnp.asarray(np.random.default_rng(1).normal(size=12))
    f = lambda w, a, b: dora_norm(w, a, b, S, chunk=16)  # noqa: E731
    dense = lambda w, a, b: jnp.linalg.norm(w + S * a @ b, axis=0)  # noqa: E731
    check_grads(f, (w, a, b), order=1, modes=("rev",))
    ours, ref = jax.vjp(f, w, a, b)[1](ct), jax.vjp(dense, w, a, b)[1](ct)
    for x, y in zip(ours, ref):  # two orders: the forward's sums (norm_terms) twice, then sums over d_out
      assert_close(x, y, F64, terms=2 * norm_terms(w, a, b)[0] + 12)
    frozen = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(f(jax.lax.stop_gradient(w), a, b) * ct), (0, 1)))(a, b)
    full = jax.make_jaxpr(jax.grad(lambda w, a, b: jnp.sum(f(w, a, b) * ct), (0, 1, 2)))(w, a, b)
    assert w.shape not in _update_shapes(frozen.jaxpr) and a.shape in _update_shapes(frozen.jaxpr)
    assert w.shape in _update_shapes(full.jaxpr)


def _update_shapes(jaxpr) -> list[tuple]:
  """Shapes of every dynamic_update_slice's output in a jaxpr and its sub-jaxprs."""
  out = []
  for e in jaxpr.eqns:
    if e.primitive.name == "dynamic_update_slice":
      out.append(e.outvars[0].aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      out += _update_shapes(sub)
  return out


def test_norm_working_memory():
  """XLA's temporaries of the factored norm's forward and of its gradient w.r.t. (A, B): O(r·d_out + r²)
  in one pass (float32), plus about a chunk of W chunked (XLA copies each chunk's slice), far below the
  one copy of W that autodiff of the dense norm needs (W + sAB kept for the backward)."""
  d, r, chunk = 1024, 8, 128
  w, a, b = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((d, d), (d, r), (r, d)))
  loss = lambda norm: lambda w, a, b: jnp.sum(norm(w, a, b))  # noqa: E731
  temp = lambda f: jax.jit(f).lower(w, a, b).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
  dense = lambda w, a, b: jnp.linalg.norm(w + S * a @ b, axis=0)  # noqa: E731
  for c, budget in ((None, 2 * (r * d + r * r) * 4), (chunk, 2 * (chunk * d + r * d + r * r) * 4)):
    factored = functools.partial(dora_norm, s=S, chunk=c)
    assert temp(loss(factored)) <= budget and temp(jax.grad(loss(factored), (1, 2))) <= budget
  assert temp(jax.grad(loss(dense), (1, 2))) >= d * d * 4


def compose_data(shape, dtype, seed=0, g_spread=0.1):
  rng = np.random.default_rng(seed)
  base, lora, dout = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
  return base, lora, jnp.asarray(1 + g_spread * rng.normal(size=shape[-1:]), jnp.float32), dout


def compose_exact(base, lora, g, dout, s=S):
  """float64 (delta, d base, d lora, dg) and the magnitudes Σ|·| of each (for the tolerances)."""
  base, lora, g, dout = (np.asarray(x, F64) for x in (base, lora, g, dout))
  t1, t2, u = (g - 1) * base, g * (s * lora), base + s * lora
  rows = tuple(range(base.ndim - 1))
  vals = (t1 + t2, (g - 1) * dout, g * s * dout, (dout * u).sum(rows))
  mags = (np.abs(t1) + np.abs(t2), np.abs((g - 1) * dout), np.abs(g * s * dout),
          (np.abs(dout) * (np.abs(base) + s * np.abs(lora))).sum(rows))
  return vals, mags


def test_compose_is_stable_at_g_near_one():
  """g = 1 + 1e-4·noise, |base| ~ 100, s·lora ~ 1e-3 (float32). The stable form rounds a few times at the
  size of its own terms: its error is within Higham's bound u·(|(g−1)base| + 2|g s lora| + |y|) (less than
  one ulp of those terms' sum; 94% of the elements within one ulp of the exact y here). The naive
  g·(base + s·lora) − base rounds base + s·lora at |base| ~ 100: ~u·100, thousands of ulps of y."""
  rng = np.random.default_rng(0)
  base = (100 * rng.normal(size=(64, 256))).astype(F32)
  lora = (1e-3 / S * rng.normal(size=(64, 256))).astype(F32)
  g = (1 + 1e-4 * rng.normal(size=256)).astype(F32)
  b64, l64, g64 = (x.astype(F64) for x in (base, lora, g))
  t1, t2 = (g64 - 1) * b64, g64 * (S * l64)
  exact, u = t1 + t2, EPS[np.dtype(F32)] / 2
  bound = u * (np.abs(t1) + 2 * np.abs(t2) + np.abs(exact))
  stable = np.asarray(dora_compose(jnp.asarray(base), jnp.asarray(lora), jnp.asarray(g), S), F64)
  naive = np.asarray(jax.jit(lambda b, l, g: g * (b + S * l) - b)(base, lora, g), F64)
  ulp = np.spacing(np.abs(exact).astype(F32)).astype(F64)
  print(f"stable: max {np.max(np.abs(stable - exact) / ulp):.1f} ulp, median {np.median(np.abs(stable - exact) / ulp):.2f}; "
        f"naive: max {np.max(np.abs(naive - exact) / ulp):.0f} ulp, median {np.median(np.abs(naive - exact) / ulp):.0f}")
  assert np.all(np.abs(stable - exact) <= bound)
  assert np.median(np.abs(naive - exact) / ulp) > 1000 and np.median(np.abs(naive - exact) / bound) > 1000


def check_compose(impl, shape, dtype, **kw):
  """Forward and custom_vjp of ``impl`` against the float64 truth on the same inputs: float32 within the
  one-order bound (the delta rounds 4 times, d base / d lora twice, dg sums N rows), bfloat16 outputs
  within their final rounding (dg stays float32)."""
  base, lora, g, dout = compose_data(shape, dtype, **kw)
  f = functools.partial(dora_compose, s=S, implementation=impl)
  y, vjp = jax.vjp(f, base, lora, g)
  ours = (y, *vjp(dout))
  assert [x.dtype for x in ours] == [base.dtype, base.dtype, lora.dtype, g.dtype]
  vals, mags = compose_exact(base, lora, g, dout)
  n = int(np.prod(shape[:-1]))
  for x, v, m, terms, dt in zip(ours, vals, mags, (4, 2, 2, n + 3), (dtype, dtype, dtype, F32)):
    if np.dtype(dt) == np.dtype(F32):
      assert_close(x, v, F32, terms=terms, scale=float(m.max()), k=0.5)
    else:
      assert_close(x, v, ml_dtypes.bfloat16, terms=1, scale=float(m.max()), k=0.5)
  return ours


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_compose_implementations(impl, dtype):
  """39 rows (pallas_gpu's last block of 16 is partial) x 256 columns, leading axes (3, 13); every
  implementation against the float64 truth and against the XLA reference (two orders)."""
  ours = check_compose(impl, (3, 13, 256), dtype)
  if impl != "xla":
    ref = check_compose("xla", (3, 13, 256), dtype)
    for x, y, terms in zip(ours, ref, (4, 2, 2, 39 + 3)):
      assert_close(np.asarray(x, F64), np.asarray(y, F64), F32 if x.dtype == jnp.float32 else ml_dtypes.bfloat16,
                   terms=terms if x.dtype == jnp.float32 else 1)


def test_compose_gradients():
  """float64 custom_vjp by finite differences; float32 custom_vjp (every implementation) equal to
  autodiff of the plain stable formula (dg: two sums there, one here)."""
  with jax.enable_x64(True):
    base, lora, g, _ = (jnp.asarray(x, F64) for x in compose_data((5, 128), jnp.float32))
    check_grads(functools.partial(dora_compose, s=S, implementation="xla"), (base, lora, g), order=1, modes=("rev",))
  base, lora, g, dout = compose_data((7, 128), jnp.float32)
  plain = lambda b, l, g: (g - 1) * b + g * (S * l)  # noqa: E731
  ref = jax.vjp(plain, base, lora, g)[1](dout)
  for impl in IMPLS:
    ours = jax.vjp(functools.partial(dora_compose, s=S, implementation=impl), base, lora, g)[1](dout)
    for x, y, terms in zip(ours, ref, (2, 2, 2 * 7 + 3)):
      assert_close(x, y, terms=terms)


def test_tpu_compose_blocks_with_poisoned_padding():
  """40 rows in blocks of 16: the last block reads 8 rows past the end, which the TPU interpreter fills
  with NaN; they must not reach dg (nor any output)."""
  base, lora, g, dout = compose_data((40, 128), jnp.float32)
  params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
  try:
    ours = (dora_tpu.compose_forward(base, lora, g, S, rows=16, interpret=params),
            *dora_tpu.compose_backward(dout, base, lora, g, S, rows=16, interpret=params))
  finally:
    pltpu.reset_tpu_interpret_mode_state()
  ref = (dora_xla.compose_forward(base, lora, g, S), *dora_xla.compose_backward(dout, base, lora, g, S))
  for x, y, terms in zip(ours, ref, (4, 1, 1, 40 + 3)):
    assert_close(x, y, terms=terms)


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_compose_kernels_lower_for_their_hardware(impl, platform):
  """jax.export lowers the compose kernels for their platform on this host (as tests/test_kernels.py
  does for the others): each export is the kernel's own custom call with the reference's outputs."""
  mod = {"pallas_tpu": dora_tpu, "pallas_gpu": dora_gpu}[impl]
  call = {"tpu": "stablehlo.custom_call @tpu_custom_call", "cuda": "stablehlo.custom_call @mosaic_gpu"}[platform]
  sds = jax.ShapeDtypeStruct
  for dt in (jnp.float32, jnp.bfloat16):
    rows, vec = sds((1000, 1024), dt), sds((1024,), jnp.float32)
    for f, args, outs in [
        (lambda b, l, g: mod.compose_forward(b, l, g, S, interpret=False), (rows, rows, vec), [rows]),
        (lambda d, b, l, g: mod.compose_backward(d, b, l, g, S, interpret=False), (rows, rows, rows, vec),
         [rows, rows, vec])]:
      exported = jax.export.export(jax.jit(f), platforms=[platform])(*args)
      assert exported.platforms == (platform,) and call in exported.mlir_module()
      assert [(a.shape, a.dtype) for a in exported.out_avals] == [(o.shape, o.dtype) for o in outs]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU choices (auto -> xla)")
def test_implementation_names_and_fallback():
  base, lora, g, _ = compose_data((2, 100), jnp.float32)
  w, a, b = factors(16, 100, 2)
  assert common.select("kernels.dora", "auto", "compose", 128, jnp.float32)[0] == "xla"  # no native dora
  assert common.select("kernels.dora", "pallas", "compose", 128, jnp.float32)[0] == "pallas_tpu"
  assert common.select("kernels.dora", "auto", "norm", 128, jnp.float32)[0] == "xla"
  with pytest.raises(Unavailable, match="only the compose kernel"):
    dora_norm(w, a, b, S, implementation="pallas")
  with pytest.raises(Unavailable, match="triton runs on gpu"):
    dora_compose(base, lora, g, S, implementation="triton")
  with pytest.raises(Unavailable, match="D divisible by 128"):  # explicit: an error, never a silent fallback
    dora_compose(base, lora, g, S, implementation="pallas_gpu")
  with pytest.raises(ValueError, match="disagree"):
    dora_norm(w, a.T, b, S)
  with pytest.raises(ValueError, match="g must have shape"):
    dora_compose(base, lora, g[:5], S)


def test_merges():
  """lora_merge = W + sAB and dora_merge = (m / ‖W + sAB‖) ⊙ (W + sAB) (float32 vs float64: a dot of r,
  then a norm over d_in); x·dora_merge equals the layer x W + dora_compose (both: the sums over d_in)."""
  d_in, d_out, r = 96, 24, 4
  w, a, b = factors(d_in, d_out, r)
  m = (1 + np.random.default_rng(2).random(d_out)).astype(F32)
  v = w.astype(F64) + S * a.astype(F64) @ b.astype(F64)
  merged = dora_merge(w, a, b, m, S)
  assert lora_merge(w, a, b, S).dtype == merged.dtype == jnp.float32
  assert_close(lora_merge(w, a, b, S), v, terms=r + 2, k=0.5)
  assert_close(merged, v * (m / np.linalg.norm(v, axis=0)), terms=d_in + r + 4, k=0.5)
  assert dora_merge(w.astype(jnp.bfloat16), a, b, m, S).dtype == jnp.bfloat16
  x = jnp.asarray(np.random.default_rng(3).normal(size=(5, d_in)), jnp.float32)
  y = x @ merged
  assert_close(y, dora_layer(x, w, a, b, m, S), terms=2 * d_in + 3 * r + 8)


def dora_layer(x, w, a, b, m, s, chunk=None):
  """PEFT's DoRA linear layer (no bias, no dropout): the norm detached (DoRA §4.3)."""
  base, lora = x @ w, (x @ a) @ b
  return base + dora_compose(base, lora, m / jax.lax.stop_gradient(dora_norm(w, a, b, s, chunk=chunk)), s)


# N, d_in, d_out, r, chunk (s = 0.5): one pass; r = 1 with a chunk remainder (600 = 512 + 88); r = 16
PEFT_CASES = {"r4": (6, 48, 20, 4, None), "r1": (3, 600, 16, 1, 512), "r16": (4, 64, 40, 16, None)}


@pytest.fixture(scope="module")
def peft(tmp_path_factory):
  """Every case's inputs and PEFT's (y, dx, da, db, dm, merged), from one run of the oracle."""
  d = tmp_path_factory.mktemp("peft")
  cases = {}
  for i, (c, (n, d_in, d_out, r, _)) in enumerate(PEFT_CASES.items()):
    rng = np.random.default_rng(10 + i)
    w, a, b = factors(d_in, d_out, r, seed=i)
    cases[c] = {"x": rng.normal(size=(n, d_in)).astype(F32), "w": w, "a": a, "b": b,
                "m": (1 + rng.random(d_out)).astype(F32), "dout": rng.normal(size=(n, d_out)).astype(F32)}
  np.savez(d / "in.npz", **{f"{c}/{k}": v for c, x in cases.items() for k, v in {**x, "s": np.float64(S)}.items()})
  run_oracle(str(ROOT / "experiments/oracles/peft_dora.py"), str(d / "in.npz"), str(d / "out.npz"))
  out = np.load(d / "out.npz")
  return {c: (x, {k: out[f"{c}/{k}"] for k in ("y", "dx", "da", "db", "dm", "merged")}) for c, x in cases.items()}


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", PEFT_CASES)
def test_matches_peft(peft, case, dtype):
  """y, the gradients w.r.t. x, A, B and m (for the cotangent dout) and the merged weight of the
  DoRA layer equal PEFT's (float64). Tolerance: the one-order bound of every reduction on the way
  (x W, x A B over d_in and r, the norm's sums, dg over N, the cotangents' products over d_out)."""
  x, ref = peft[case]
  n, d_in, d_out, r, chunk = PEFT_CASES[case]
  with jax.enable_x64(dtype == F64):
    j = {k: jnp.asarray(v, dtype) for k, v in x.items()}
    layer = lambda x, a, b, m: dora_layer(x, j["w"], a, b, m, S, chunk)  # noqa: E731
    y, vjp = jax.vjp(layer, j["x"], j["a"], j["b"], j["m"])
    ours = dict(zip(("y", "dx", "da", "db", "dm"), (y, *vjp(j["dout"]))))
    ours["merged"] = dora_merge(j["w"], j["a"], j["b"], j["m"], S)
    ours = {k: np.asarray(v) for k, v in ours.items()}
  terms = 2 * d_in + 2 * d_out + 3 * r + n + 8
  for k, v in ours.items():
    print(f"{case} {np.dtype(dtype).name} {k}: max |ours - peft| / max |peft| = "
          f"{np.abs(v - ref[k]).max() / np.abs(ref[k]).max():.1e}")
    assert v.dtype == dtype
    assert_close(v, ref[k], dtype, terms=terms, k=0.5 if dtype == F32 else 1.0)


@pytest.mark.slow  # ~10-16 s on 2 shared cores: 14 compilations
def test_bench_quick(tmp_path):
  from experiments.bench import adapters  # imports the other benchmarks' pieces (pmem, configs): only here
  out = tmp_path / "adapters.json"
  adapters.main(["--quick", "--out", str(out)])
  res = json.loads(out.read_text())
  assert set(res["sections"]) == set(adapters.SECTIONS) and res["machine"]["jax"] == jax.__version__
  norm, compose = res["sections"]["dora_norm"], res["sections"]["compose"]
  assert {(r["method"], r["pass"]) for r in norm} == {(m, p) for m in ("factored", "dense") for p in ("forward", "grad")}
  assert {r["method"] for r in compose} == set(adapters.COMPOSE_METHODS)
  assert all(r["seconds"] > 0 and len(r["runs_s"]) == 2 for r in norm + compose)
  assert all((r["temp_bytes"] is None) == (r["method"] == "eager") for r in norm + compose)
  assert all(r["factored_vs_dense_max_rel"] < 1e-4 for r in norm)  # float32 sums of 256 terms
  tune = {r["method"]: r for r in res["sections"]["finetune"]}
  assert set(tune) == set(adapters.FINETUNE) and all(r["seconds"] > 0 for r in tune.values())
  assert tune["full"]["params_trainable"] == tune["full"]["params"]
  for k in ("lora", "dora"):  # the frozen backbone has no Adam moments: 2 x 4 bytes per trained parameter
    assert 0 < tune[k]["params_trainable"] < tune["full"]["params_trainable"] / 4
    assert tune[k]["optimizer_bytes"] < tune["full"]["optimizer_bytes"] / 4
  assert tune["dora"]["params_trainable"] > tune["lora"]["params_trainable"]  # + a magnitude per output

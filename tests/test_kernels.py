"""kernels/: every Pallas kernel (interpret mode on CPU) and native CPU kernel against the XLA
reference and plain jnp.

pallas_tpu runs under ``interpret=True`` (and once under the TPU-semantics interpreter, which checks
DMAs, semaphores and races); pallas_gpu under the Mosaic GPU interpreter. Compiled GPU kernels
(Mosaic GPU, Triton) are tested only on a GPU backend.
"""

import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from kernels import (Unavailable, bench, common, embedding_bag, embedding_bag_compact_vjp, embedding_bag_table_grad,
                     embedding_gather, embedding_gather_compact_vjp, fused_add_rmsnorm, gpu_check, native, product_topk)
from kernels.embedding import native as emb_native
from kernels.embedding import xla as emb_xla
from kernels.embedding import pallas_tpu as emb_tpu
from kernels.rmsnorm import pallas_tpu as norm_tpu
from kernels.rmsnorm import xla as norm_xla
from tests.tolerances import assert_close, tol

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")
EMB_IMPLS = (*IMPLS, "native")
DTYPES = (jnp.float32, jnp.bfloat16)
BACKEND = jax.default_backend()
NATIVE = None if BACKEND != "cpu" else native.available()  # None: the native kernels built and loaded
needs_native = pytest.mark.skipif(BACKEND != "cpu" or NATIVE is not None,
                                  reason=f"native CPU kernels: {NATIVE or 'CPU backend only'}")
cpu_only = pytest.mark.skipif(BACKEND != "cpu", reason="checks the CPU choices (auto -> xla, Pallas interpreted)")
gpu_only = pytest.mark.skipif(BACKEND != "gpu", reason="compiled Mosaic GPU / Triton kernels need a GPU backend "
                                                       "(on CPU pallas_gpu is covered in interpret mode)")
# V, D, ids shape, ids drawn from [0, hi): a single row; a larger table hit by many duplicates; mostly distinct
EMB_CASES = [(1, 128, (5,), 1), (300, 256, (2, 12), 8), (37, 128, (3, 5), 37)]


def emb_cases(impl, dtype):
  """Every case for xla; fewer for the interpreters, which take about a second to compile a kernel
  (and the Mosaic GPU one tens of ms per program; the gpu_check dry run covers it at bf16 too)."""
  if impl == "native" and (BACKEND != "cpu" or NATIVE is not None):
    pytest.skip(f"native CPU kernels: {NATIVE or 'CPU backend only'}")
  if impl == "native" and dtype != jnp.float32:
    with pytest.raises(Unavailable, match="float32 tables"):
      embedding_bag(jnp.zeros((4, 8), dtype), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), implementation=impl)
    return []
  if impl in ("xla", "native"):
    return EMB_CASES
  if impl == "pallas_tpu":
    return EMB_CASES[:2] if dtype == jnp.float32 else EMB_CASES[1:2]
  return EMB_CASES[1:2] if dtype == jnp.float32 else EMB_CASES[:1]


def data(seed, v, d, ids_shape, hi, dtype):
  rng = np.random.default_rng(seed)
  table = jnp.asarray(rng.normal(size=(v, d)), dtype)
  ids = jnp.asarray(rng.integers(0, hi, ids_shape), jnp.int32)
  g = jnp.asarray(rng.normal(size=(*ids_shape, d)), dtype)
  return rng, table, ids, g


def close(a, b, dtype, terms=1):
  """float32: elementwise within tests.tolerances.tol, ``terms`` the length of the sums behind each
  value (their order is the implementation's); bfloat16: max error within 2% of the largest
  reference value (≈ 2.5·eps: the result rounds to bfloat16, u = eps/2, and a bfloat16 sum of the
  few duplicate rows rounds once per addition)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if dtype == jnp.float32:
    assert_close(a, b, terms=terms)
  else:
    assert np.abs(a - b).max() <= 2e-2 * max(1.0, np.abs(b).max()), (np.abs(a - b).max(), np.abs(b).max())


def max_dups(ids):
  """The most reads of one id: the length of a row's gradient sum."""
  return int(np.bincount(np.asarray(ids).ravel()).max())


def scatter_add(v, ids, g):
  return jnp.zeros((v, g.shape[-1]), jnp.float32).at[ids].add(g.astype(jnp.float32))


def f32_dot(y, g):
  return (y.astype(jnp.float32) * g.astype(jnp.float32)).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("impl", EMB_IMPLS)
def test_gather_forward_and_gradients(impl, dtype):
  @jax.jit
  def run(table, ids, g):  # one compile per shape: forward, compact gradient, dense gradient
    gather = functools.partial(embedding_gather, implementation=impl)
    return (gather(table, ids), embedding_gather_compact_vjp(table, ids, g, implementation=impl),
            jax.grad(lambda t: f32_dot(gather(t, ids), g))(table))

  for seed, (v, d, shape, hi) in enumerate(emb_cases(impl, dtype)):
    _, table, ids, g = data(seed, v, d, shape, hi, dtype)
    out, cg, dense = run(table, ids, g)
    np.testing.assert_array_equal(out, table[ids])
    uniq = np.unique(np.asarray(ids))
    assert int(cg.count) == len(uniq)
    np.testing.assert_array_equal(cg.ids[:len(uniq)], uniq)
    assert (np.asarray(cg.ids[len(uniq):]) == v).all() and not np.asarray(cg.rows[len(uniq):], np.float32).any()
    if dtype == jnp.float32:  # deterministic order: bit-for-bit the dense scatter-add
      np.testing.assert_array_equal(cg.to_dense(v), scatter_add(v, ids, g))
      np.testing.assert_array_equal(dense, scatter_add(v, ids, g))
    else:
      close(cg.to_dense(v), scatter_add(v, ids, g), dtype)
      close(dense, scatter_add(v, ids, g), dtype)


def bag_ref(table, ids, w):
  return jnp.einsum("...kd,...k->...d", table[ids].astype(jnp.float32), w).astype(table.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("impl", EMB_IMPLS)
def test_bag_forward_and_gradients(impl, dtype):
  @jax.jit
  def run(table, ids, w, g):
    bag = functools.partial(embedding_bag, implementation=impl)
    fixed = jax.lax.stop_gradient(table)  # a table not differentiated: the weights' gradient alone
    return (bag(table, ids, w), jax.grad(lambda t, w: f32_dot(bag(t, ids, w), g), argnums=(0, 1))(table, w),
            embedding_bag_compact_vjp(table, ids, w, g, implementation=impl),
            jax.grad(lambda w: f32_dot(bag(fixed, ids, w), g))(w),
            embedding_bag_table_grad(ids, w, g, table.shape[0], implementation=impl))

  for seed, (v, d, shape, hi) in enumerate(emb_cases(impl, dtype)):
    rng, table, ids, _ = data(seed, v, d, shape, hi, dtype)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=(*shape[:-1], d)), dtype)
    out, (dt, dw), (cg, cw), dw_only, tg = run(table, ids, w, g)
    close(out, bag_ref(table, ids, w), dtype, terms=shape[-1])  # a bag sums its k rows
    rt, rw = jax.grad(lambda t, w: f32_dot(bag_ref(t, ids, w), g), argnums=(0, 1))(table.astype(jnp.float32), w)
    close(dt, rt, dtype, terms=max_dups(ids))  # bf16: against the float32 truth
    close(dw, rw, dtype, terms=d)  # a weight's gradient: a length-d dot product
    close(dw_only, dw, jnp.float32, terms=d)
    np.testing.assert_array_equal(cg.to_dense(v), dt)  # the dense gradient is the compact one, densified
    np.testing.assert_array_equal(cw, dw)
    # from ids, weights and cotangent alone: the same rows in min(N, V) slots
    assert tg.ids.shape == (min(ids.size, v),) and int(tg.count) == int(cg.count)
    np.testing.assert_array_equal(tg.ids[:int(tg.count)], cg.ids[:int(cg.count)])
    np.testing.assert_array_equal(tg.to_dense(v), dt)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_xla_bag_in_row_blocks_equals_one_block(monkeypatch, dtype):
  """Large bags run as a scan over blocks of rows (here 3 rows per block, 7 rows: one padded block):
  same output and weight gradient as one block, and bitwise the same dense table gradient."""
  rng, table, ids, _ = data(0, 50, 128, (7, 6), 50, dtype)
  ids = ids.at[0, 0].set(60)  # an out-of-range id reads nothing, in either form
  w = jnp.asarray(rng.normal(size=ids.shape), jnp.float32)
  g = jnp.asarray(rng.normal(size=(7, 128)), dtype)
  idx = jnp.where(ids < 50, ids, 50)

  def run():
    return (emb_xla.bag_reduce(table, idx, w), emb_xla.weight_grad(table, idx, g), emb_xla.dense_grad(idx, w, g, 50))

  whole = jax.jit(run)()
  monkeypatch.setattr(emb_xla, "BLOCK_ELEMENTS", 3 * 6 * 128)
  blocked = jax.jit(run)()
  close(blocked[0], whole[0], dtype, terms=6)  # bags of 6 rows, weight gradients of length-128 dots
  close(blocked[1], whole[1], jnp.float32, terms=128)
  np.testing.assert_array_equal(blocked[2], whole[2])
  close(whole[0], bag_ref(table, jnp.where(ids < 50, ids, 0), jnp.where(ids < 50, w, 0.0)), dtype, terms=6)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", pytest.param("native", marks=needs_native)])
def test_check_grads_embedding_bag(impl):
  rng, table, ids, _ = data(0, 11, 128, (3, 4), 11, jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  # central differences at jax's step 1e-4 in float32 carry ≈ eps/1e-4 ≈ 1e-3 relative rounding noise
  # (jax.test_util's float32 default is 2e-3): 1e-2 abs + rel
  check_grads(lambda t, w: embedding_bag(t, ids, w, implementation=impl), (table, w), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_gpu", pytest.param("native", marks=needs_native)])
def test_out_of_range_ids(impl):
  v = 6
  _, table, _, _ = data(0, v, 128, (1,), v, jnp.float32)
  table = table.at[0].set(jnp.nan).at[v - 1].set(jnp.nan)  # where clamped ids would land
  ids = jnp.asarray([1, -3, 2, v + 4, 2], jnp.int32)
  for f in (lambda i: embedding_gather(table, i, implementation=impl),
            lambda i: embedding_gather_compact_vjp(table, i, jnp.ones((5, 128)), implementation=impl),
            lambda i: embedding_bag(table, i[None], jnp.ones((1, 5)), implementation=impl)):
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\); got min -3, max 10"):
      f(ids)
  # traced ids are not checked: mode="fill" gives zero rows and no gradient, "clip" clamps
  fill = jax.jit(lambda i: embedding_gather(table, i, implementation=impl))(ids)
  np.testing.assert_array_equal(fill, jnp.where((ids[:, None] >= 0) & (ids[:, None] < v), table[ids], 0.0))
  clip = jax.jit(lambda i: embedding_gather(table, i, implementation=impl, mode="clip"))(ids)
  np.testing.assert_array_equal(clip, table[jnp.clip(ids, 0, v - 1)])
  g = jnp.ones((5, 128)).at[1].set(jnp.nan).at[3].set(jnp.nan)  # cotangents of dropped ids
  cg = jax.jit(lambda i, g: embedding_gather_compact_vjp(table, i, g, implementation=impl))(ids, g)
  assert int(cg.count) == 2 and np.isfinite(np.asarray(cg.rows)).all()
  np.testing.assert_array_equal(cg.to_dense(v), scatter_add(v, jnp.asarray([1, 2, 2]), jnp.ones((3, 128))))
  with pytest.raises(ValueError, match="mode must be one of"):
    embedding_gather(table, ids[:1], mode="wrap")


@needs_native
def test_native_bag_equals_xla_at_pkm_scale():
  """A PKM-sized bag (many rows per output, duplicates, out-of-range ids) in the native kernels: forward
  and weight gradient as XLA's within float32 rounding, the dense table gradient bit for bit (the
  same additions in the same order)."""
  rng, table, ids, _ = data(3, 1000, 96, (257, 40), 1000, jnp.float32)
  idx = ids.at[5, :7].set(1000).at[9, 3].set(1000)  # the ops' "no row" id
  w = jnp.asarray(rng.normal(size=idx.shape), jnp.float32)
  g = jnp.asarray(rng.normal(size=(257, 96)), jnp.float32)
  ref = jax.jit(lambda: (emb_xla.bag_reduce(table, idx, w), emb_xla.weight_grad(table, idx, g),
                         emb_xla.dense_grad(idx, w, g, 1000)))()
  out, wgrad, (dtable, dw) = jax.jit(lambda: (emb_native.bag_reduce(table, idx, w), emb_native.weight_grad(table, idx, g),
                                              emb_native.grads(table, idx, w, g, 1000)))()
  close(out, ref[0], jnp.float32, terms=40)  # bags of 40 rows; weight gradients: length-96 dots
  close(wgrad, ref[1], jnp.float32, terms=96)
  np.testing.assert_array_equal(dw, wgrad)  # the fused pass takes the same dot products
  assert not np.asarray(dw)[5, :7].any()
  np.testing.assert_array_equal(dtable, ref[2])
  rows, ref_rows = (jax.jit(lambda i, m=m: embedding_bag_table_grad(i, w, g, 1000, implementation=m))(idx)
                    for m in ("native", "xla"))
  for a, b in zip(rows, ref_rows):  # sorted ids, each id's w * g summed in the same order, V-padding, count
    np.testing.assert_array_equal(a, b)
  # a table that is not differentiated gets no dense gradient: only the weight-gradient kernel runs
  hlo = jax.jit(jax.grad(lambda w, i: jnp.sum(embedding_bag(jax.lax.stop_gradient(table), i, w,
                                                            implementation="native")))).lower(w, idx).as_text()
  assert "pmem_bag_wgrad" in hlo and "pmem_bag_grads" not in hlo


@cpu_only
def test_native_without_a_compiler_falls_back_under_auto_only(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", "no-such-compiler")
  monkeypatch.setenv("PMEM_CACHE", str(tmp_path))
  native.library.cache_clear()
  native.available.cache_clear()
  try:
    with pytest.warns(UserWarning, match="no-such-compiler"):
      assert common.select("kernels.embedding", "auto", 256, jnp.float32)[0] == "xla"
    with pytest.raises(Unavailable, match="no-such-compiler"):  # named: an error, never a silent fallback
      product_topk(jnp.zeros((2, 8)), jnp.zeros((2, 8)), 2, implementation="native")
  finally:
    native.library.cache_clear()
    native.available.cache_clear()


@pytest.mark.parametrize("impl", ["xla", pytest.param("native", marks=needs_native)])
def test_product_topk_equals_brute_force_and_breaks_ties_like_xla(impl):
  rng = np.random.default_rng(6)
  for n, k in ((64, 16), (8, 8), (32, 1)):  # k = n: every pair of ranks is a candidate in principle
    s = rng.normal(size=(2, 300, n)).astype(np.float32)
    scores, slots = jax.jit(lambda s: product_topk(s[0], s[1], k, implementation=impl))(jnp.asarray(s))
    full = (s[0, :, :, None].astype(np.float64) + s[1, :, None, :]).reshape(300, -1)
    want = np.argsort(-full, -1)[:, :k]
    # exact on any CPU: a score is one float32 addition (correctly rounded everywhere), and on this
    # data the float32 order of the top k is the float64 one
    np.testing.assert_array_equal(np.asarray(slots), want)
    # float32 s1 + s2 against float64: a single rounding of the exact sum (≤ u·|sum|)
    assert_close(np.asarray(scores), np.take_along_axis(full, want, -1))
  # small integers: many equal scores and equal sums; every implementation orders them as lax.top_k
  s = jnp.asarray(rng.integers(-3, 4, size=(2, 500, 32)), jnp.float32)
  got, ref = (jax.jit(lambda s, i=i: product_topk(s[0], s[1], 8, implementation=i))(s) for i in (impl, "xla"))
  np.testing.assert_array_equal(got[1], ref[1])
  np.testing.assert_array_equal(got[0], ref[0])
  g = jax.grad(lambda a, b: product_topk(a, b, 8, implementation=impl)[0].sum(), (0, 1))(s[0], s[1])
  assert float(g[0].sum()) == float(g[1].sum()) == 500 * 8  # scores are differentiable in both halves
  with pytest.raises(ValueError, match="same shape"):
    product_topk(s[0], s[1, :, :16], 8, implementation=impl)
  with pytest.raises(ValueError, match=r"k must lie in 1\.\.32, got 33"):
    product_topk(s[0], s[1], 33, implementation=impl)


def test_tpu_segment_reduce_in_tpu_semantics_interpreter():
  """DMA ring, semaphores and races checked by the TPU interpreter; scratch poisoned with NaN."""
  rng, table, _, _ = data(1, 30, 128, (1,), 30, jnp.float32)
  idx = jnp.asarray(rng.integers(0, 30, 37), jnp.int32).at[3].set(30)  # 30: no row
  seg = jnp.sort(jnp.asarray(rng.integers(0, 20, 37), jnp.int32))  # runs of varying length, some empty
  w = jnp.asarray(rng.normal(size=37), jnp.float32)
  ref = jax.ops.segment_sum(w[:, None] * jnp.take(table, idx, axis=0, mode="fill", fill_value=0), seg, 20)
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
  try:
    with pl.enable_poison_buffers():
      out = emb_tpu.segment_reduce(table, idx, seg, 20, w, rows=8, slots=4, interpret=params)
  finally:
    pltpu.reset_tpu_interpret_mode_state()
  assert_close(out, ref, terms=max_dups(seg))  # a segment's w·row summed in the kernel's order


def norm_ref(x, r, scale, eps=1e-6):
  """pmem.layers.norms.RMSNorm applied to x + r."""
  y = x + r
  y32 = y.astype(jnp.float32)
  return (scale * (y32 * jax.lax.rsqrt(jnp.mean(y32 * y32, axis=-1, keepdims=True) + eps))).astype(x.dtype), y


def norm_data(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x, r, gn, gy = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4))
  return x, r, jnp.asarray(1 + 0.1 * rng.normal(size=shape[-1:]), jnp.float32), (gn, gy)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_add_rmsnorm(impl, dtype):
  x, r, scale, cts = norm_data((3, 13, 256), dtype)  # 39 rows: pallas_gpu's last block is partial
  f = functools.partial(fused_add_rmsnorm, implementation=impl)
  (normed, y), (rn, ry) = f(x, r, scale), norm_ref(x, r, scale)
  assert normed.dtype == y.dtype == dtype
  np.testing.assert_array_equal(y, ry)
  if impl == "xla":  # the reference forward is pmem's RMSNorm, bit for bit
    np.testing.assert_array_equal(normed, rn)
  d, rows = x.shape[-1], x.size // x.shape[-1]
  close(normed, rn, dtype, terms=d)  # the mean of d squares, in the kernel's order
  up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # bf16: compare with the float32 truth
  grads, ref = jax.vjp(f, x, r, scale)[1](cts), jax.vjp(norm_ref, *up((x, r)), scale)[1](up(cts))
  for a, b in zip(grads, ref):  # dx: two means over d (rstd, mean(u·y)); dscale: a sum over the rows
    close(a, b, dtype, terms=2 * d + rows)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_check_grads_fused_add_rmsnorm(impl):
  x, r, scale, _ = norm_data((5, 128), jnp.float32)
  f = lambda x, r, s: fused_add_rmsnorm(x, r, s, implementation=impl)
  check_grads(f, (x, r, scale), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)  # as test_check_grads_embedding_bag


def test_tpu_rmsnorm_blocks_with_poisoned_padding():
  """40 rows in blocks of 16: the last block reads 8 rows past the end, which the TPU interpreter
  fills with NaN; they must not reach dscale (nor any output)."""
  x, r, scale, (g, gy) = norm_data((40, 128), jnp.float32)
  params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
  try:
    fwd = norm_tpu.forward(x, r, scale, 1e-6, rows=16, interpret=params)
    bwd = norm_tpu.backward(g, gy, fwd[1], scale, fwd[2], rows=16, interpret=params)
  finally:
    pltpu.reset_tpu_interpret_mode_state()
  ref = norm_xla.forward(x, r, scale, 1e-6)
  d, n = x.shape[-1], 2 * x.shape[-1] + x.shape[0]  # normed, rstd: a mean over d; dx, dscale as above
  for a, b, terms in zip(fwd + bwd, ref + norm_xla.backward(g, gy, *ref[1:2], scale, ref[2]), (d, 1, d, n, n)):
    assert_close(a, b, terms=terms)


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_kernels_lower_for_their_hardware(impl, platform):
  """jax.export lowers each kernel for its platform on this host (Mosaic TPU MLIR; Mosaic GPU layout
  inference): block-shape and layout mistakes fail here. Compiling needs the hardware. Each export
  is the kernel's own custom call (not an XLA fallback) with the outputs the reference gives."""
  emb, norm = (importlib.import_module(f"kernels.{op}.{impl}") for op in ("embedding", "rmsnorm"))
  call = {"tpu": "stablehlo.custom_call @tpu_custom_call", "cuda": "stablehlo.custom_call @mosaic_gpu"}[platform]
  sds = jax.ShapeDtypeStruct
  for dt in DTYPES:
    rows, vec, ids = sds((1000, 1024), dt), sds((1024,), jnp.float32), sds((2000,), jnp.int32)
    rstd = sds((1000,), jnp.float32)
    for f, args, outs in [
        (lambda s, i, g, w: emb.segment_reduce(s, i, g, 1000, w, interpret=False),
         (sds((4096, 512), dt), ids, ids, sds((2000,), jnp.float32)), [sds((1000, 512), dt)]),
        (lambda x, r, s: norm.forward(x, r, s, 1e-6, interpret=False), (rows, rows, vec), [rows, rows, rstd]),
        (lambda g, gy, y, s, rstd: norm.backward(g, gy, y, s, rstd, interpret=False),
         (rows, rows, rows, vec, rstd), [rows, vec])]:
      exported = jax.export.export(jax.jit(f), platforms=[platform])(*args)
      assert exported.platforms == (platform,) and call in exported.mlir_module()
      assert [(a.shape, a.dtype) for a in exported.out_avals] == [(o.shape, o.dtype) for o in outs]


@cpu_only
def test_implementation_names_and_fallback():
  assert common.select("kernels.rmsnorm", "auto", 256, jnp.float32)[0] == "xla"  # no native rmsnorm
  assert common.select("kernels.embedding", "auto", 256, jnp.float32)[0] == ("native" if NATIVE is None else "xla")
  assert common.select("kernels.embedding", "auto", 256, jnp.bfloat16)[0] == "xla"  # native takes float32
  assert common.select("kernels.embedding", "pallas", 256, jnp.float32)[0] == "pallas_tpu"
  with pytest.raises(ValueError, match="unknown implementation 'palas'"):
    fused_add_rmsnorm(*norm_data((2, 128), jnp.float32)[:3], implementation="palas")
  with pytest.raises(Unavailable, match="triton runs on gpu"):
    embedding_gather(jnp.zeros((4, 128)), jnp.zeros((2,), jnp.int32), implementation="triton")
  with pytest.raises(Unavailable, match="D divisible by 128"):  # explicit: an error, never a silent fallback
    embedding_gather(jnp.zeros((4, 100)), jnp.zeros((2,), jnp.int32), implementation="pallas_gpu")
  np.testing.assert_array_equal(embedding_gather(jnp.ones((4, 100)), jnp.zeros((2,), jnp.int32)), jnp.ones((2, 100)))


def test_decoder_with_pallas_norms_matches_xla():
  import dataclasses

  from pmem.layers.attention import Attention
  from pmem.layers.mlp import SwiGLU
  from pmem.layers.norms import RMSNorm
  from pmem.core.mixer import TokenContext
  from pmem.models import Decoder, DecoderConfig

  norm = RMSNorm(64, implementation="pallas")
  x, r, _, _ = norm_data((2, 5, 64), jnp.float32)
  h, y = norm.add_and_norm(x, r)
  assert_close(h, norm(x + r), terms=64)  # the mean of 64 squares in the kernel's order

  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
  ctx = TokenContext(ids, jnp.broadcast_to(jnp.arange(8), ids.shape), jnp.ones_like(ids))
  cfg = DecoderConfig(vocab=64, d_model=32, n_layers=2, channel_mixer=functools.partial(SwiGLU, d_ff=48),
                      sequence_mixer=functools.partial(Attention, n_heads=4, n_kv_heads=2))  # as in test_model.py

  graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  abstract = nnx.eval_shape(lambda: Decoder(dataclasses.replace(cfg, kernel_impl="pallas"), rngs=nnx.Rngs(0)))

  def logits_and_grads(g):  # same parameters, norms run by XLA or by the (interpreted) Pallas kernel
    loss = lambda p: (lambda y: ((y ** 2).mean(), y))(nnx.merge(g, p)(ids, ctx))
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads
  (lx, gx), (lp, gp) = logits_and_grads(graphdef), logits_and_grads(nnx.graphdef(abstract))
  # the programs differ in the 5 norms (2 layers x 2, the last): a mean of d_model = 32 squares
  # each, whose differences pass through O(1)-gain layers: terms = 5·32 at each tree's largest value
  scale = lambda t: max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(t))  # noqa: E731
  chex.assert_trees_all_close(lp, lx, **tol(jnp.float32, scale(lx), terms=5 * 32))
  chex.assert_trees_all_close(gp, gx, **tol(jnp.float32, scale(gx), terms=5 * 32))
  with pytest.raises(ValueError, match="unknown implementation"):
    RMSNorm(8, implementation="fast")


def test_gpu_check_dry_run(tmp_path):
  import json
  assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "check.json")]) == 0
  records = json.loads((tmp_path / "check.json").read_text())
  ops = {r["op"] for r in records}
  assert len(ops) == 7 and {r["implementation"] for r in records} == {"pallas_gpu", "triton"}
  assert all(r["ok"] for r in records if r["implementation"] == "pallas_gpu")
  assert all(r["ok"] is not False for r in records)  # triton: skipped with the reason here


@gpu_only
@pytest.mark.parametrize("impl", ["pallas_gpu", "triton"])
def test_compiled_gpu_kernels_match_xla(impl):
  if impl == "triton":
    pytest.importorskip("jax_triton", reason="triton needs jax-triton (pip install 'pmem[gpu]')")
  sizes = dict(v=1000, d=256, n=4096, s=512, k=8, rows=1000, dn=1024)
  for dtype in ("float32", "bfloat16"):
    for case in bench.cases(sizes, dtype):
      ref = jax.jit(case.make("xla"))(*case.args)
      rec = gpu_check.check(case, impl, ref, 1.0, 5)
      assert rec["ok"] and rec["deterministic"], rec

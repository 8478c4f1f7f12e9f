"""kernels.attention: native and xla against a float64 NumPy transcription of masked softmax attention
(output and the three gradients), against each other, check_grads on the native custom_vjp, padding rows,
xla == jax.nn.dot_product_attention, the layer's kernel_impl; the Pallas TPU library kernel and pmem's Pallas GPU
kernel (interpreted on CPU) against the same transcription where their shapes allow, each lowered for its hardware;
a library kernel this jax lacks makes its implementation Unavailable (its tests skip with the reason)."""

import json
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from kernels import Unavailable, common, native
from kernels.attention import attention, segment_causal_mask
from pmem.core.mixer import TokenContext
from pmem.layers.attention import Attention
from tests.tolerances import assert_close

NATIVE = None if jax.default_backend() != "cpu" else native.available()
needs_native = pytest.mark.skipif(jax.default_backend() != "cpu" or NATIVE is not None,
                                  reason=f"native CPU kernels: {NATIVE or 'CPU backend only'}")
IMPLS = ["xla", pytest.param("native", marks=needs_native)]


def packed(b: int, t: int, docs: int, pad: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, positions) [B, T]: ``docs`` documents of random lengths then ``pad`` padding tokens."""
  seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t - pad), docs - 1, replace=False)) if docs > 1 else []
    for d, (s, e) in enumerate(zip([0, *cuts], [*cuts, t - pad])):
      seg[r, s:e], pos[r, s:e] = d + 1, np.arange(e - s)
  return seg, pos


def reference(q, k, v, seg, pos, window, do):
  """float64 (o, dq, dk, dv) and each one's magnitude (the sum of its terms' absolute values, the Higham
  bound's scale), plus the largest |q·k| / sqrt(H) term sum A (a score's rounding error is H·u·A)."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  b, t, n, h = q.shape
  rep = lambda x: np.repeat(x, n // x.shape[2], axis=2)  # noqa: E731  kv head of each query head
  kn, vn, c = rep(k), rep(v), h ** -0.5
  seen = np.asarray(segment_causal_mask(seg, pos, window))  # [B, 1, T, S]
  pad = (seg == 0)[:, None, :, None]
  s = np.where(seen, np.einsum("btnh,bsnh->bnts", q, kn) * c, -np.inf)
  e = np.exp(s - np.where(pad, 0.0, s.max(-1, keepdims=True)))  # a padding row: all -inf, e = 0
  p = np.where(pad, 1.0 / t, e / np.where(pad, 1.0, e.sum(-1, keepdims=True)))  # padding: uniform over all keys
  o = np.einsum("bnts,bsnh->btnh", p, vn)
  dp = np.einsum("btnh,bsnh->bnts", do, vn)
  ds = np.where(seen, p * (dp - (p * dp).sum(-1, keepdims=True)), 0.0)  # the softmax Jacobian, no score grad on padding
  group = lambda x: x.reshape(b, t, k.shape[2], n // k.shape[2], h).sum(3)  # noqa: E731
  dq = np.einsum("bnts,bsnh->btnh", ds, kn) * c
  dk = group(np.einsum("bnts,btnh->bsnh", ds, q)) * c
  dv = group(np.einsum("bnts,btnh->bsnh", p, do))
  a = lambda x: np.abs(x)  # noqa: E731
  dpa = np.einsum("btnh,bsnh->bnts", a(do), a(vn))
  dsa = np.where(seen, p * (dpa + (p * dpa).sum(-1, keepdims=True)), 0.0)
  mags = (np.einsum("bnts,bsnh->btnh", p, a(vn)), np.einsum("bnts,bsnh->btnh", dsa, a(kn)) * c,
          group(np.einsum("bnts,btnh->bsnh", dsa, a(q))) * c, group(np.einsum("bnts,btnh->bsnh", p, a(do))))
  score = float(np.where(seen, np.einsum("btnh,bsnh->bnts", a(q), a(kn)) * c, 0.0).max())
  return (o, dq, dk, dv), mags, score


def runnable(impl: str) -> None:
  """Skips the test, with the reason, where ``impl`` cannot run here (another platform, a library kernel this jax
  lacks); what it refuses by shape is tested by the test itself."""
  try:
    common.select("kernels.attention", impl, jnp.float32, (1, 128, 2, 8), None)
  except Unavailable as e:
    pytest.skip(str(e))


def run(impl, q, k, v, seg, pos, window, do):
  o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seg, pos, window, implementation=impl), q, k, v)
  return (o, *vjp(do))


def terms(t: int, h: int, g: int, score: float) -> tuple[float, ...]:
  """Roundings (per unit of magnitude) of o, dq, dk, dv: a probability is off by its score's and the row
  max's error (2·H·A) plus exp, log and the division (4) and the normalizer's T terms; o sums T products
  (and one rescaling per 64-key tile), dv G·T; dS adds dP's H and D's T terms, dq then sums T, dk G·T."""
  p = 2 * h * score + 4 + t
  ds = p + h + t
  return p + t + t / 64, ds + t, ds + g * t, p + g * t


CASES = {  # (B, T, N, K, H, docs, pad, window)
    "mha_T37_pad": (2, 37, 2, 2, 16, 3, 5, None),
    "gqa2_T130_H20_window": (1, 130, 4, 2, 20, 2, 7, 7),
    "gqa4_T70_pad": (2, 70, 8, 2, 32, 4, 9, None),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_against_float64(impl, case):
  b, t, n, kv, h, docs, pad, window = CASES[case]
  rng = np.random.default_rng(sum(map(ord, case)))
  q, do = (rng.standard_normal((b, t, n, h), np.float32) for _ in range(2))
  k, v = (rng.standard_normal((b, t, kv, h), np.float32) for _ in range(2))
  seg, pos = packed(b, t, docs, pad, rng)
  want, mags, score = reference(q, k, v, seg, pos, window, do)
  got = run(impl, q, k, v, seg, pos, window, do)
  for name, x, y, m, r in zip(("o", "dq", "dk", "dv"), got, want, mags, terms(t, h, n // kv, score)):
    assert_close(x, y, terms=r, scale=float(m.max()), k=0.5, err_msg=name)


PALLAS = ["pallas_tpu", "pallas_gpu"]
PALLAS_CASES = {  # (B, T, N, K, H, docs, pad): T a multiple of 128, no window
    "gqa2_T128_pad": (2, 128, 4, 2, 32, 3, 9),
    "mha_T256_H64": (1, 256, 2, 2, 64, 2, 0),
}
GPU_CASES = {"gqa3_T64_H20_pad": (1, 64, 6, 2, 20, 3, 5)}  # pallas_gpu: one 64-row block, H zero-padded to 32


@pytest.mark.parametrize("impl, case", [(i, c) for i in PALLAS for c in PALLAS_CASES] +
                         [("pallas_gpu", c) for c in GPU_CASES])
def test_pallas_against_float64(impl, case):
  """The flash kernels (interpreted here) under the op's GQA and padding rules: o, dq, dk, dv within the float64
  bound of the native kernels (the same tiled online softmax)."""
  runnable(impl)
  b, t, n, kv, h, docs, pad = (PALLAS_CASES | GPU_CASES)[case]
  rng = np.random.default_rng(sum(map(ord, case)))
  q, do = (rng.standard_normal((b, t, n, h), np.float32) for _ in range(2))
  k, v = (rng.standard_normal((b, t, kv, h), np.float32) for _ in range(2))
  seg, pos = packed(b, t, docs, pad, rng)
  want, mags, score = reference(q, k, v, seg, pos, None, do)
  got = run(impl, q, k, v, seg, pos, None, do)
  for name, x, y, m, r in zip(("o", "dq", "dk", "dv"), got, want, mags, terms(t, h, n // kv, score)):
    assert_close(x, y, terms=r, scale=float(m.max()), k=0.5, err_msg=name)


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_refuses(impl):
  """What the kernels cannot express is refused by name (auto then runs another implementation)."""
  runnable(impl)
  q = jnp.zeros((1, 128, 2, 8), jnp.float32)
  seg = pos = jnp.ones((1, 128), jnp.int32)
  with pytest.raises(Unavailable, match="window"):
    attention(q, q, q, seg, pos, 16, implementation=impl)
  with pytest.raises(Unavailable, match="divisible by"):
    attention(q[:, :100], q[:, :100], q[:, :100], seg[:, :100], pos[:, :100], implementation=impl)


def test_pallas_tpu_lowers_for_tpu():
  """jax.export lowers the uninterpreted TPU flash kernel, forward and backward, float32 and bfloat16, to its
  Mosaic custom calls with the op's output shapes (compiling needs a TPU)."""
  runnable("pallas_tpu")
  from kernels.attention import pallas_tpu
  sds = jax.ShapeDtypeStruct
  for dt in (jnp.float32, jnp.bfloat16):
    q, k, seg = sds((2, 256, 4, 64), dt), sds((2, 256, 2, 64), dt), sds((2, 256), jnp.int32)
    f = lambda q, k, v, seg: pallas_tpu.attention(q, k, v, seg, seg, None, interpret=False)  # noqa: E731
    g = jax.grad(lambda q, k, v, seg: f(q, k, v, seg).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    for fn, outs in ((f, [q]), (g, [q, k, k])):
      exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(q, k, k, seg)
      assert "stablehlo.custom_call @tpu_custom_call" in exported.mlir_module()
      assert [(a.shape, a.dtype) for a in exported.out_avals] == [(o.shape, o.dtype) for o in outs]


def test_pallas_gpu_lowers_for_gpu():
  """jax.export lowers the uninterpreted GPU kernels, forward and backward (three pallas_calls), float32 and bfloat16,
  an H that is padded and a group of 3, through Pallas's Triton lowering to Triton IR in XLA's Triton custom call
  with the op's output shapes, for an abstract H100 (the lowering asks for a GPU's compute capability; compiling
  the IR needs a GPU)."""
  from kernels.attention import pallas_gpu
  sds = jax.ShapeDtypeStruct
  dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
  triton = "__gpu$xla.gpu.triton"
  for dt, n, h in ((jnp.float32, 4, 64), (jnp.bfloat16, 6, 20)):
    q, k, lse = sds((2, 128, n, h), dt), sds((2, 128, 2, h), dt), sds((2, 128, n), jnp.float32)
    seg = sds((2, 128), jnp.int32)
    fwd = lambda q, k, v, seg: pallas_gpu.forward(q, k, v, seg, seg, None, interpret=False)  # noqa: E731
    bwd = lambda q, k, v, seg, o, lse, do: pallas_gpu.backward(q, k, v, seg, seg, o, lse, do, None,  # noqa: E731
                                                               interpret=False)
    for fn, args, outs, calls in ((fwd, (q, k, k, seg), [q, lse], 1), (bwd, (q, k, k, seg, q, lse, q), [q, k, k], 2)):
      with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)), \
           warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jax's notice that the Triton backend is deprecated
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                     disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(*args)
      assert exported.mlir_module().count(f"stablehlo.custom_call @{triton}") == calls
      assert [(a.shape, a.dtype) for a in exported.out_avals] == [(o.shape, o.dtype) for o in outs]


def test_missing_library_kernel_is_unavailable(monkeypatch, tmp_path):
  """A library kernel that does not import (removed from this jax) makes its implementation Unavailable with the
  reason, whether imported by ``check`` or at the implementation module's import; a missing implementation module
  says so."""
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.ops.tpu.flash_attention", None)
  with pytest.raises(Unavailable, match="pallas_tpu needs jax.experimental.pallas.ops.tpu.flash_attention"):
    common.select("kernels.attention", "pallas_tpu", jnp.float32, (1, 128, 2, 8), None)
  (tmp_path / "fake_op").mkdir()
  (tmp_path / "fake_op" / "__init__.py").write_text("")
  (tmp_path / "fake_op" / "xla.py").write_text("import pmem_no_such_library  # noqa: F401\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(Unavailable, match="xla cannot import what it needs: No module named 'pmem_no_such_library'"):
    common.select("fake_op", "xla")
  (tmp_path / "empty_op").mkdir()
  (tmp_path / "empty_op" / "__init__.py").write_text("")
  with pytest.raises(Unavailable, match="empty_op has no xla implementation"):
    common.select("empty_op", "xla")


@needs_native
@pytest.mark.parametrize("window", [None, 5])
def test_native_equals_xla(window):
  """Both within float32 rounding of each other, including segment ids that recur after another document
  (the mask is per element, not per run) and a row that is all padding."""
  rng = np.random.default_rng(1)
  b, t, n, kv, h = 3, 77, 4, 2, 24
  q, do = (rng.standard_normal((b, t, n, h), np.float32) for _ in range(2))
  k, v = (rng.standard_normal((b, t, kv, h), np.float32) for _ in range(2))
  seg = np.repeat(np.array([[1, 2, 1, 3, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32), [20, 20, 20, 10, 7], 1)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  _, mags, score = reference(q, k, v, seg, pos, window, do)
  for name, x, y, m, r in zip(("o", "dq", "dk", "dv"), run("native", q, k, v, seg, pos, window, do),
                              run("xla", q, k, v, seg, pos, window, do), mags, terms(t, h, n // kv, score)):
    assert_close(x, y, terms=r, scale=float(m.max()), err_msg=name)


@pytest.mark.parametrize("impl", IMPLS + PALLAS)
def test_padding_rows(impl):
  """A padding query averages every v (dot_product_attention's masked softmax) and passes no gradient to q
  or k; padding keys get dv from it alone."""
  runnable(impl)
  rng = np.random.default_rng(2)
  t, p = 128, 40  # T a multiple of 128 for the library kernels; the last p tokens are padding
  q = rng.standard_normal((1, t, 2, 8), np.float32)
  k, v = (rng.standard_normal((1, t, 1, 8), np.float32) for _ in range(2))
  seg, pos = np.array([[1] * (t - p) + [0] * p], np.int32), np.arange(t, dtype=np.int32)[None]
  do = np.zeros_like(q)
  do[:, t - p:] = 1.0  # only the padding rows' outputs reach the loss
  o, dq, dk, dv = run(impl, q, k, v, seg, pos, None, do)
  assert_close(o[0, t - p:], np.broadcast_to(v[0].astype(np.float64).mean(0), (p, 2, 8)), terms=t)
  np.testing.assert_array_equal(dq, 0.0)
  np.testing.assert_array_equal(dk, 0.0)
  assert_close(dv, np.full(v.shape, p * 2 / t), terms=2 * p)  # p rows x 2 heads, each dO / T


@needs_native
def test_check_grads():
  """The native custom_vjp against finite differences."""
  rng = np.random.default_rng(3)
  q = rng.standard_normal((1, 9, 2, 4), np.float32)
  k, v = (rng.standard_normal((1, 9, 1, 4), np.float32) for _ in range(2))
  seg, pos = packed(1, 9, 2, 2, rng)
  check_grads(lambda q, k, v: attention(q, k, v, seg, pos, 3, implementation="native"), (q, k, v), order=1,
              modes=["rev"])


def test_xla_is_dot_product_attention():
  """The xla implementation is what pmem's Attention ran before the op, forward and gradients bit for bit."""
  rng = np.random.default_rng(4)
  q, do = (rng.standard_normal((2, 40, 4, 16), np.float32) for _ in range(2))
  k, v = (rng.standard_normal((2, 40, 2, 16), np.float32) for _ in range(2))
  seg, pos = packed(2, 40, 2, 3, rng)
  dpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=segment_causal_mask(seg, pos, 9))  # noqa: E731
  o, vjp = jax.vjp(dpa, q, k, v)
  for x, y in zip(run("xla", q, k, v, seg, pos, 9, do), (o, *vjp(do))):
    np.testing.assert_array_equal(x, y)


def test_select():
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  k = jnp.zeros((1, 4, 1, 8), jnp.bfloat16)
  seg = pos = jnp.ones((1, 4), jnp.int32)
  assert attention(q, k, k, seg, pos).dtype == jnp.bfloat16  # auto: native takes float32 only, xla runs
  with pytest.raises(Unavailable, match="float32"):
    attention(q, k, k, seg, pos, implementation="native")
  k3 = jnp.zeros((1, 4, 3, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="N % K"):
    attention(q, k3, k3, seg, pos)


@needs_native
def test_layer_kernel_impl():
  """Attention with kernel_impl="auto" runs the native op forward and backward (CPU) and gives the output of
  "xla" within the op's rounding carried through the output projection; a name the op lacks keeps xla."""
  rng = np.random.default_rng(5)
  b, t, d, n, kv = 2, 24, 32, 4, 2
  h = d // n
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  seg, pos = packed(b, t, 2, 3, rng)
  ctx = TokenContext(jnp.zeros((b, t), jnp.int32), jnp.asarray(pos), jnp.asarray(seg))
  make = lambda impl: Attention(d, n, kv, window=6, kernel_impl=impl, rngs=nnx.Rngs(0))  # noqa: E731
  assert make("triton").kernel_impl == "xla"
  xla_layer, layer = make("xla"), make("auto")
  loss = lambda m: (m(x, ctx) ** 2).sum()  # noqa: E731
  assert "pmem_attn_bwd" in str(jax.make_jaxpr(nnx.grad(loss))(layer))
  # a score's terms sum to at most |q| |k| / sqrt(H) (RoPE keeps the norms); o's error, in units of max |v|,
  # passes through wo's n·h-term sums
  proj = lambda w: np.asarray(x).reshape(b * t, d) @ np.asarray(w[...]).reshape(d, -1)  # noqa: E731
  norm = lambda w: np.linalg.norm(proj(w).reshape(b * t, -1, h), axis=-1).max()  # noqa: E731
  score, vmax = float(norm(layer.wq) * norm(layer.wk)) / np.sqrt(h), float(np.abs(proj(layer.wv)).max())
  wsum = float(np.abs(np.asarray(layer.wo[...])).sum((0, 1)).max())
  assert_close(layer(x, ctx), xla_layer(x, ctx), terms=terms(t, h, n // kv, score)[0] + n * h, scale=vmax * wsum)


def test_layer_pallas_where_it_runs():
  """kernel_impl="pallas": the layer runs the (interpreted) flash kernel where it takes the layer, T = 128 and no
  window, and gives xla's output within the op's bound carried through wo; a windowed layer, or T = 24, keeps xla."""
  runnable("pallas")
  rng = np.random.default_rng(6)
  b, t, d, n, kv = 1, 128, 32, 4, 2
  h = d // n
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  seg, pos = packed(b, t, 2, 5, rng)
  ctx = lambda t: TokenContext(jnp.zeros((b, t), jnp.int32), jnp.asarray(pos[:, :t]), jnp.asarray(seg[:, :t]))  # noqa: E731
  make = lambda impl, window=None: Attention(d, n, kv, window=window, kernel_impl=impl, rngs=nnx.Rngs(0))  # noqa: E731
  layer, ref = make("pallas"), make("xla")
  assert "pallas_call" in str(jax.make_jaxpr(lambda x: layer(x, ctx(t)))(x))
  for lay, tt in ((make("pallas", 16), t), (layer, 24)):
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: lay(x, ctx(tt)))(x[:, :tt]))
  proj = lambda w: np.asarray(x).reshape(b * t, d) @ np.asarray(w[...]).reshape(d, -1)  # noqa: E731
  norm = lambda w: np.linalg.norm(proj(w).reshape(b * t, -1, h), axis=-1).max()  # noqa: E731
  score, vmax = float(norm(layer.wq) * norm(layer.wk)) / np.sqrt(h), float(np.abs(proj(layer.wv)).max())
  wsum = float(np.abs(np.asarray(layer.wo[...])).sum((0, 1)).max())
  assert_close(layer(x, ctx(t)), ref(x, ctx(t)), terms=terms(t, h, n // kv, score)[0] + n * h, scale=vmax * wsum)


@needs_native
def test_native_under_a_mesh():
  """Sharded over the batch on 2 devices inside ``jit``, forward and gradients equal the unsharded op's bit for
  bit (GSPMD does not partition the FFI call: each work item is computed alone, so the result is the same)."""
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (XLA_FLAGS --xla_force_host_platform_device_count)")
  rng = np.random.default_rng(7)
  q, do = (rng.standard_normal((4, 33, 4, 8), np.float32) for _ in range(2))
  k, v = (rng.standard_normal((4, 33, 2, 8), np.float32) for _ in range(2))
  seg, pos = packed(4, 33, 2, 4, rng)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))  # noqa: E731
  f = jax.jit(lambda *a: run("native", *a[:5], None, a[5]))
  for x, y in zip(f(*map(shard, (q, k, v, seg, pos, do))), f(q, k, v, seg, pos, do)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@needs_native
def test_bench_size():
  """The bench's attention shape (B = 16 cut to 2, T = 256, N = 4, K = 2, H = 64) with packed documents
  and a window: native against float64."""
  rng = np.random.default_rng(6)
  b, t, n, kv, h = 2, 256, 4, 2, 64
  q, do = (rng.standard_normal((b, t, n, h), np.float32) for _ in range(2))
  k, v = (rng.standard_normal((b, t, kv, h), np.float32) for _ in range(2))
  seg, pos = packed(b, t, 3, 11, rng)
  want, mags, score = reference(q, k, v, seg, pos, 100, do)
  for name, x, y, m, r in zip(("o", "dq", "dk", "dv"), run("native", q, k, v, seg, pos, 100, do), want, mags,
                              terms(t, h, n // kv, score)):
    assert_close(x, y, terms=r, scale=float(m.max()), k=0.5, err_msg=name)


@needs_native
def test_bench_runs(tmp_path):
  """experiments.bench.attention at a toy size writes a median per variant."""
  out = tmp_path / "attention.json"
  subprocess.run([sys.executable, "-m", "experiments.bench.attention", "--out", str(out), "--reps", "1", "--batch", "1",
                  "--seq", "70", "--head_dim", "16"], check=True, cwd=pathlib.Path(__file__).parents[1], capture_output=True, timeout=300)
  got = {r["variant"]: r["median_ms"] for r in json.loads(out.read_text())["records"]}
  assert set(got) == {"xla/fwd", "xla/fwd+bwd", "native/fwd", "native/fwd+bwd"} and min(got.values()) > 0

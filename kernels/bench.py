"""Times every op under every implementation that runs on this platform, plus a naive jnp composition.

    python -m kernels.bench --out FILE.json [--quick]

Prints a table and writes a JSON list of records ``{op, implementation, shape, dtype, time_s,
bytes_per_s, frac_of_peak}``: ``time_s`` is the median of ``--reps`` (>= 5) jitted calls after a
warm-up; ``bytes_per_s`` counts the bytes the op must move (rows read and written, ids, ...);
``frac_of_peak`` divides by the bandwidth of a large ``x + 1`` copy measured in the same run (the
``memcopy`` record). Pallas kernels run interpreted on CPU, which says nothing about their speed:
they are listed with ``time_s: null``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from kernels import (common, embedding_bag, embedding_bag_compact_vjp, embedding_gather, embedding_gather_compact_vjp,
                     fused_add_rmsnorm)

IMPLS = ("xla", "native", "pallas_tpu", "pallas_gpu", "triton")
SIZES = {  # name -> (gather V, D, N; bag S, k; norm rows, D)
    "quick": dict(v=1 << 16, d=256, n=1 << 14, s=1 << 12, k=8, rows=1 << 13, dn=1024),
    "full": dict(v=1 << 18, d=512, n=1 << 16, s=1 << 14, k=8, rows=1 << 14, dn=2048),
    "gpu": dict(v=1 << 20, d=1024, n=1 << 16, s=1 << 14, k=8, rows=1 << 14, dn=4096),
    "tiny": dict(v=16, d=128, n=6, s=2, k=3, rows=20, dn=128),
}


@dataclasses.dataclass
class Case:
  op: str
  shape: dict
  dtype: str
  args: tuple
  nbytes: int
  make: Callable[[str], Callable]  # implementation name or "naive" -> fn(*args)


def _rmsnorm_naive(x, r, scale, eps=1e-6):
  y = x + r
  y32 = y.astype(jnp.float32)
  return (scale * (y32 * jax.lax.rsqrt(jnp.mean(y32 * y32, -1, keepdims=True) + eps))).astype(x.dtype), y


def _vjp(f, argnums, *args):
  """The VJP of ``f`` w.r.t. ``args[argnums]`` at cotangent ``args[-1]`` (the forward is DCE'd)."""
  *primals, ct = args
  fixed = lambda *a: f(*[a[argnums.index(i)] if i in argnums else p for i, p in enumerate(primals)])
  return jax.vjp(fixed, *[primals[i] for i in argnums])[1](ct)


def cases(sizes: dict, dtype: str, seed: int = 0) -> list[Case]:
  v, d, n, s, k, rows, dn = (sizes[x] for x in ("v", "d", "n", "s", "k", "rows", "dn"))
  dt, it = jnp.dtype(dtype), jnp.dtype(dtype).itemsize
  keys = jax.random.split(jax.random.key(seed), 8)
  normal = lambda i, shape: jax.random.normal(keys[i], shape, dt)
  skewed = lambda i, shape: jnp.floor(v * jax.random.uniform(keys[i], shape) ** 3).astype(jnp.int32)  # hot rows
  table, ids, g = normal(0, (v, d)), skewed(1, (n,)), normal(2, (n, d))
  bag_ids, w, gb = skewed(3, (s, k)), jax.random.normal(keys[4], (s, k), jnp.float32), normal(5, (s, d))
  x, r, gn, gy = normal(6, (rows, dn)), normal(7, (rows, dn)), normal(2, (rows, dn)), normal(3, (rows, dn))
  scale = 1 + 0.1 * jax.random.normal(keys[5], (dn,), jnp.float32)

  def make(op, naive):
    """implementation name -> fn: ``naive`` for "naive", else ``op`` with that implementation."""
    return lambda name: naive if name == "naive" else functools.partial(op, implementation=name)

  def vjp(f, argnums):
    return functools.partial(_vjp, f, argnums)

  def naive_bag(t, i, w):
    return jnp.einsum("skd,sk->sd", t[i].astype(jnp.float32), w).astype(t.dtype)

  def naive_compact(t, i, g):
    u, inv = jnp.unique(i, size=i.size, fill_value=t.shape[0], return_inverse=True)
    return u, jax.ops.segment_sum(g, inv.reshape(-1), i.size)

  gather, bag = make(embedding_gather, lambda t, i: t[i]), make(embedding_bag, naive_bag)
  norm = make(fused_add_rmsnorm, _rmsnorm_naive)
  gshape, bshape, nshape = dict(V=v, D=d, N=n), dict(V=v, D=d, S=s, k=k), dict(rows=rows, D=dn)
  return [
      Case("embedding_gather", gshape, dtype, (table, ids), 2 * n * d * it + 4 * n, gather),
      Case("embedding_gather_vjp_dense", gshape, dtype, (table, ids, g), n * d * it + v * d * it + 4 * n,
           lambda name: (lambda t, i, g: jnp.zeros_like(t).at[i].add(g)) if name == "naive" else
           vjp(gather(name), (0,))),
      Case("embedding_gather_vjp_compact", gshape, dtype, (table, ids, g), 2 * n * d * it + 12 * n,
           make(embedding_gather_compact_vjp, naive_compact)),
      Case("embedding_bag", bshape, dtype, (table, bag_ids, w), (s * k + s) * d * it + 8 * s * k, bag),
      Case("embedding_bag_vjp", bshape, dtype, (table, bag_ids, w, gb), (2 * s * k + s) * d * it + 16 * s * k,
           lambda name: vjp(naive_bag, (0, 2)) if name == "naive" else make(embedding_bag_compact_vjp, None)(name)),
      Case("fused_add_rmsnorm", nshape, dtype, (x, r, scale), 4 * rows * dn * it + 4 * rows, norm),
      Case("fused_add_rmsnorm_vjp", nshape, dtype, (x, r, scale, (gn, gy)), 4 * rows * dn * it + 4 * rows,
           lambda name: vjp(norm(name), (0, 1, 2))),
  ]


def timeit(f, *args, reps: int = 5) -> float:
  """Median seconds of ``reps`` calls of ``jax.jit(f)`` after one warm-up call."""
  f = jax.jit(f)
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def copy_bandwidth(nbytes: int, reps: int) -> dict:
  """Bandwidth of ``x + 1`` over ``nbytes`` (read + write), donated so that no call allocates."""
  f = jax.jit(lambda x: x + 1, donate_argnums=0)
  x = jax.block_until_ready(f(jnp.ones((nbytes // 4,), jnp.float32)))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    x = jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t)
  t = statistics.median(times)
  return dict(op="memcopy", implementation="xla", shape=dict(bytes=nbytes), dtype="float32", time_s=t,
              bytes_per_s=2 * nbytes / t, frac_of_peak=1.0)


def available(case: Case, name: str) -> str | None:
  """None if ``name`` can run ``case`` here, else why not."""
  pkg = "kernels.rmsnorm" if case.op.startswith("fused") else "kernels.embedding"
  d = case.shape["D"]
  try:
    common.select(pkg, name, d, case.dtype)
  except common.Unavailable as e:
    return str(e)
  return None


def run(sizes: dict, dtypes, reps: int, copy_bytes: int) -> list[dict]:
  peak = copy_bandwidth(copy_bytes, reps)
  records, interpreted = [peak], common.platform() == "cpu"
  for dtype in dtypes:
    for case in cases(sizes, dtype):
      for name in ("naive", *IMPLS):
        why = None if name == "naive" else available(case, name)
        if why is not None:
          continue
        rec = dict(op=case.op, implementation=name, shape=case.shape, dtype=dtype)
        if interpreted and name.startswith("pallas"):
          records.append({**rec, "time_s": None, "bytes_per_s": None, "frac_of_peak": None,
                          "note": "interpret mode on CPU: not timed"})
          continue
        try:
          t = timeit(case.make(name), *case.args, reps=reps)
        except Exception as e:  # a kernel that fails to compile here is reported, not fatal
          records.append({**rec, "time_s": None, "bytes_per_s": None, "frac_of_peak": None,
                          "error": f"{type(e).__name__}: {e}"[:500]})
          continue
        bw = case.nbytes / t
        records.append({**rec, "time_s": t, "bytes_per_s": bw, "frac_of_peak": bw / peak["bytes_per_s"]})
  return records


def table(records: list[dict]) -> str:
  lines = [f"{'op':30s} {'impl':11s} {'dtype':9s} {'shape':34s} {'time ms':>9s} {'GB/s':>8s} {'of peak':>8s}"]
  for r in records:
    shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
    if r["time_s"] is None:
      lines.append(f"{r['op']:30s} {r['implementation']:11s} {r['dtype']:9s} {shape:34s} "
                   f"{r.get('note') or r.get('error', '')}")
    else:
      lines.append(f"{r['op']:30s} {r['implementation']:11s} {r['dtype']:9s} {shape:34s} {1e3 * r['time_s']:9.3f} "
                   f"{r['bytes_per_s'] / 1e9:8.2f} {r['frac_of_peak']:8.1%}")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="JSON file to write")
  p.add_argument("--quick", action="store_true", help="small sizes (about a minute on CPU)")
  p.add_argument("--reps", type=int, default=5)
  a = p.parse_args(argv)
  plat = common.platform()
  size = "quick" if a.quick else ("full" if plat == "cpu" else "gpu")
  copy_bytes = (1 << 28) if a.quick or plat == "cpu" else (1 << 30)
  records = run(SIZES[size], ("float32", "bfloat16"), max(a.reps, 5), copy_bytes)
  print(f"platform {plat} ({jax.devices()[0].device_kind}), jax {jax.__version__}, sizes {size}")
  if plat == "cpu":
    print("Pallas kernels run in interpret mode on CPU and are not timed.")
  print(table(records))
  with open(a.out, "w") as f:
    json.dump(records, f, indent=1)
  return records


if __name__ == "__main__":
  main()

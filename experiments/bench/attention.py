"""The attention core's forward and forward + backward: kernels.attention's implementations (``xla``:
``jax.nn.dot_product_attention`` differentiated by autodiff, what pmem's Attention ran before the op).

Causal over one document per row (the bench config's batches), float32, jitted. After warm-up the
variants alternate, one call each, so machine noise hits all alike; medians are reported.

  python -m experiments.bench.attention --out runs/attention.json [--reps 9] [--batch 16 --seq 256 ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention import attention


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv_heads", type=int, default=2)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--window", type=int, default=None)
  a = ap.parse_args()
  b, t, n, kv, h = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
  keys = jax.random.split(jax.random.key(0), 4)
  q, do = (jax.random.normal(kk, (b, t, n, h), jnp.float32) for kk in keys[:2])
  k, v = (jax.random.normal(kk, (b, t, kv, h), jnp.float32) for kk in keys[2:])
  seg = jnp.ones((b, t), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  variants = {name: lambda q, k, v, name=name: attention(q, k, v, seg, pos, a.window, implementation=name)
              for name in ("xla", "native")}
  fns = {}
  for name, f in variants.items():
    fns[f"{name}/fwd"] = jax.jit(f)
    fns[f"{name}/fwd+bwd"] = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.vdot(f(q, k, v), do), argnums=(0, 1, 2)))

  def call(f) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f(q, k, v))
    return time.perf_counter() - t0

  for f in fns.values():
    call(f), call(f)  # compile, warm up
  times = {key: [] for key in fns}
  for _ in range(a.reps):
    for key, f in fns.items():
      times[key].append(call(f))
  records = [{"variant": key, "median_ms": 1e3 * float(np.median(v)), "ms": [1e3 * x for x in v]}
             for key, v in times.items()]
  for r in records:
    print(f"{r['variant']:<22} {r['median_ms']:>9.2f} ms")
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"records": records, "config": vars(a) | {"jax": jax.__version__}}, indent=2))


if __name__ == "__main__":
  main()

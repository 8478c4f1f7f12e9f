"""Train-step throughput of one PKM layer: pmem (:class:`pmem.memory.pkm.PKM`) vs lucidrains ``PKM``
(``product-key-memory`` 0.3.0, torch CPU, in the oracle venv).

Both run the same layer (d=256, 4 heads, top-32, dim_head 128 = pmem's d_k 256, LayerNorm queries,
softmax weights, sum bag) on fixed random inputs at B=16, T=256: forward, MSE loss against a fixed
random target, backward, and an Adam step of every parameter (lr 1e-3, betas 0.9/0.999, no
weight decay, no clipping). pmem updates the value table either ``dense`` (optax on a table-sized
gradient, as torch) or ``row_sparse`` (``pmem.train.sparse``: touched rows only, lazy Adam; on CPU
the fused native row update). Per size (2^16, 2^18, 2^20 slots) a fresh subprocess alternates
lucidrains, pmem dense and pmem row-sparse, one step each after warm-up, each step after a pause of
``PAUSE_S`` (torch's OpenMP workers spin for a while after a step, which slowed whichever step came
next), and reports medians; a size whose tables, gradients and Adam moments would not fit in the
available memory is skipped. pmem runs its default kernels (``implementation="auto"``: on CPU the
native C++ bag, product top-k and row Adam). Both frameworks run under pmem's malloc tunables
(``pmem.core.runtime``) plus ``glibc.malloc.hugetlb=1`` (transparent huge pages) unless ``--no-thp``.

  python -m experiments.bench.pkm --out FILE.json [--quick] [--steps 5] [--max-log2 20]

``--quick``: 2^16 only (about a minute). The JSON holds one record per (slots, impl) with
``tokens_per_s``, ``median_step_s``, ``step_s`` and, for pmem, ``over_lucidrains`` (the tokens/s
ratio) and for row-sparse ``over_dense``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench.common import ROOT, TorchWorker, available_bytes
from pmem.core import runtime
from pmem.core.mixer import TokenContext
from pmem.memory.pkm import PKM
from pmem.train import optim, sparse

D, B, T, HEADS, TOPK, DIM_HEAD, LR = 256, 16, 256, 4, 32, 128, 1e-3
UPDATES = ("dense", "row_sparse")
IMPLS = ("lucidrains", *(f"pmem_{u}" for u in UPDATES))
PAUSE_S = 0.5


def _inputs() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  return rng.normal(size=(B, T, D)).astype(np.float32), rng.normal(size=(B, T, D)).astype(np.float32)


def pmem_stepper(n_keys: int, update: str):
  """A jitted, donated train step of one PKM layer; returns ``step() -> seconds``."""
  tables = optim.TableOptimConfig(update=update, optimizer="adam", b2=0.999, clip_norm=None)
  tx = optim.Optimizer(optim.OptimConfig(lr=LR, warmup_steps=0, min_lr_ratio=1.0, b2=0.999, weight_decay=0.0,
                                         clip_norm=None, tables=tables), 1000)
  make = lambda: PKM(D, n_keys=n_keys, heads=HEADS, k=TOPK, d_k=2 * DIM_HEAD, rngs=nnx.Rngs(0))
  graphdef, _, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  x, target = map(jnp.asarray, _inputs())
  zeros = jnp.zeros((B, T), jnp.int32)
  ctx = TokenContext(zeros, zeros, zeros + 1)

  def loss(params):
    y = nnx.merge(graphdef, params, rest)(x, ctx)
    return jnp.mean((y - target) ** 2), {}

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state):
    (value, _), grads = sparse.value_and_grad(loss, state["params"], tx.row_sparse)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": tx.apply_updates(state["params"], updates), "opt": opt}, value

  @jax.jit
  def init():
    params = nnx.split(make(), nnx.Param, ...)[1]
    return {"params": params, "opt": tx.init(params)}

  box = [init()]

  def run() -> float:
    t0 = time.perf_counter()
    box[0], value = step(box[0])
    jax.block_until_ready(value)
    return time.perf_counter() - t0

  return run



def measure(log2: int, steps: int, warmup: int, python: str) -> list[dict]:
  """One size: lucidrains and pmem with each value update alternating, one step each (its own process)."""
  n_keys = 1 << (log2 // 2)
  cfg = {"dim": D, "heads": HEADS, "num_keys": n_keys, "topk": TOPK, "dim_head": DIM_HEAD}
  worker = TorchWorker(python, "pkm.py", json.dumps(cfg), str(B), str(T))
  steppers = {"lucidrains": worker.step, **{f"pmem_{u}": pmem_stepper(n_keys, u) for u in UPDATES}}
  times = {k: [] for k in steppers}
  try:
    for i in range(warmup + steps):
      for k, f in steppers.items():
        time.sleep(PAUSE_S)  # the other framework's threads go idle (torch's OpenMP workers spin after a step)
        s = f()
        if i >= warmup:
          times[k].append(s)
  finally:
    worker.close()
  med = {k: float(np.median(v)) for k, v in times.items()}

  def ratios(k: str) -> dict:
    r = {} if k == "lucidrains" else {"over_lucidrains": med["lucidrains"] / med[k]}
    return r | ({"over_dense": med["pmem_dense"] / med[k]} if k == "pmem_row_sparse" else {})

  return [{"slots": 1 << log2, "impl": k, "median_step_s": med[k], "tokens_per_s": B * T / med[k], **ratios(k),
           "step_s": v} for k, v in times.items()]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out")
  ap.add_argument("--quick", action="store_true", help="2^16 slots only (about a minute)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation (>= 5)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--max-log2", type=int, default=20, help="largest table, log2 of the slots (even)")
  ap.add_argument("--no-thp", action="store_true", help="without glibc.malloc.hugetlb=1")
  ap.add_argument("--oracle_python",
                  default=os.environ.get("PMEM_ORACLE_PYTHON", str(ROOT / ".venv-oracle/bin/python")))
  ap.add_argument("--one", type=int, metavar="LOG2", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.one:
    print(json.dumps(measure(a.one, a.steps, a.warmup, a.oracle_python)))
    return
  if not a.out:
    ap.error("--out is required")
  env = runtime.tuned_env()
  if not a.no_thp:
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1")))
  records, rows = [], []
  for log2 in range(16, (16 if a.quick else a.max_log2) + 1, 2):
    need = 12 * (1 << log2) * D * 4 + (2 << 30)  # tables, gradients and Adam moments of the three
    if need > available_bytes():
      print(f"skip 2^{log2}: needs ~{need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available",
            file=sys.stderr)
      continue
    r = subprocess.run([sys.executable, "-m", "experiments.bench.pkm", "--one", str(log2), "--steps", str(a.steps),
                        "--warmup", str(a.warmup), "--oracle_python", a.oracle_python],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
      print(f"2^{log2} failed ({r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
      continue
    res = {rec["impl"]: {**rec, "thp": not a.no_thp} for rec in json.loads(r.stdout.strip().splitlines()[-1])}
    records += res.values()
    rows.append((log2, res))
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"jax": jax.__version__, "B": B, "T": T, "d": D, "heads": HEADS, "topk": TOPK, "dim_head": DIM_HEAD}
    out.write_text(json.dumps({"records": records, "config": vars(a) | setup}, indent=1))
  print(f"{'slots':>6} {'lucidrains s':>13} {'dense s':>8} {'row-sparse s':>13} {'dense/lucid':>12} "
        f"{'row-sparse/lucid':>17} {'row-sparse/dense':>17}   (tokens/s ratios)")
  for log2, res in rows:
    lu, de, rs = (res[k] for k in IMPLS)
    print(f"  2^{log2:<3} {lu['median_step_s']:>13.3f} {de['median_step_s']:>8.3f} {rs['median_step_s']:>13.3f} "
          f"{de['over_lucidrains']:>12.2f} {rs['over_lucidrains']:>17.2f} {rs['over_dense']:>17.2f}")


if __name__ == "__main__":
  main()

"""Correctness, determinism and bandwidth of every GPU implementation against XLA, in one run.

    python -m kernels.gpu_check [--out FILE.json] [--dry-run]      (kernels/gpu_check.sh wraps it)

For each op of :func:`kernels.bench.cases` at realistic sizes (1M x 1024 bf16 table, 64k skewed
ids, bag of 16k x 8, fused norm on 16k x 4096 bf16) and each of xla, pallas_gpu and triton: the
max error against xla (relative to the reference's max |value|), whether two runs agree bit for
bit, the median time, bytes/s and its fraction of a measured copy's bandwidth. Writes a JSON list
to ``--out`` (default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``runs/gpu_check.json``) and
exits 1 if a check fails.
``--dry-run`` runs tiny sizes on any backend (pallas_gpu interpreted on CPU): errors only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kernels import bench, common

IMPLS = ("xla", "pallas_gpu", "triton")
TOL = {"bfloat16": 1e-2, "float32": 1e-4}


def max_err(out, ref) -> float:
  """Largest leaf error: exact for integer leaves (inf if unequal), else max |a-b| / max(1, max |ref|)."""
  errs = []
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    if jnp.issubdtype(b.dtype, jnp.integer):
      errs.append(0.0 if np.array_equal(a, b) else float("inf"))
    else:
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      errs.append(float(np.max(np.abs(a - b), initial=0.0) / max(1.0, np.max(np.abs(b), initial=0.0))))
  return max(errs)


def same_bits(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check(case: bench.Case, name: str, ref, peak: float | None, reps: int) -> dict:
  """Error against ``ref``; unless ``peak`` is None (dry run): determinism, time and bandwidth."""
  rec = dict(op=case.op, implementation=name, shape=case.shape, dtype=case.dtype)
  why = bench.available(case, name)
  if why is not None:
    return {**rec, "ok": None, "skipped": why}
  try:
    f = jax.jit(case.make(name))
    out = jax.block_until_ready(f(*case.args))
    err = max_err(out, ref)
    rec.update(ok=bool(err <= TOL[case.dtype]), max_err=err)
    if peak:
      t = bench.timeit(case.make(name), *case.args, reps=reps)
      rec.update(deterministic=same_bits(out, f(*case.args)), time_s=t, bytes_per_s=case.nbytes / t,
                 frac_of_peak=case.nbytes / t / peak)
  except Exception as e:  # report and go on: one broken kernel must not hide the others
    rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
  return rec


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", help="JSON file (default $OUT/gpu_check.json, else runs/gpu_check.json)")
  p.add_argument("--dry-run", action="store_true", help="tiny sizes, any backend; errors only")
  p.add_argument("--reps", type=int, default=5)
  a = p.parse_args(argv)
  plat = common.platform()
  if plat != "gpu" and not a.dry_run:
    print(f"gpu_check needs a GPU (default backend: {plat}); --dry-run runs tiny sizes here", file=sys.stderr)
    return 2
  out = a.out or os.path.join(os.environ.get("OUT", "runs"), "gpu_check.json")
  records, peak = [], None
  if not a.dry_run:
    records.append(bench.copy_bandwidth(1 << 30, a.reps))
    peak = records[0]["bytes_per_s"]
  print(f"platform {plat} ({jax.devices()[0].device_kind}), jax {jax.__version__}", flush=True)
  for case in bench.cases(bench.SIZES["tiny" if a.dry_run else "gpu"], "bfloat16"):
    ref = jax.block_until_ready(jax.jit(case.make("xla"))(*case.args))
    for name in IMPLS[a.dry_run:]:  # the dry run leaves out xla against itself
      rec = check(case, name, ref, peak, a.reps)
      records.append(rec)
      status = "skip" if rec["ok"] is None else ("ok" if rec["ok"] else "FAIL")
      detail = rec.get("skipped") or rec.get("error") or f"err {rec['max_err']:.2e}" + (
          f" deterministic {rec['deterministic']} {1e3 * rec['time_s']:.3f} ms {rec['frac_of_peak']:.1%} of copy"
          if "time_s" in rec else "")
      print(f"{status:4s} {case.op:30s} {name:10s} {detail}", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(records, f, indent=1)
  print(f"wrote {out}")
  return int(any(r.get("ok") is False for r in records))


if __name__ == "__main__":
  sys.exit(main())

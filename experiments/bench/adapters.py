"""Adapter benchmarks (issue S3): the DoRA pieces of ``kernels/dora``, section by section.

**dora_norm.** ``‖W + s·A B‖`` per output column at ``--d`` = d_in = d_out and each ``--ranks`` r, float32
and bfloat16 weights: ``factored`` (:func:`kernels.dora_norm`, A B never formed; ``--chunk`` rows of d_in
per pass, by default one pass for float32 and 512-row chunks for bfloat16) against ``dense``
(``jnp.linalg.norm(W + s·A @ B, axis=0)`` in float32, which forms the [d_in, d_out] matrix), each as
the forward alone and as the gradient w.r.t. (A, B) with W frozen (``jax.grad`` of ``Σ norm``, the
LoRA case). Memory: ``temp_bytes``, XLA's ``memory_analysis()`` of the jitted function (the temporaries
beyond the arguments and outputs: W + sAB where it is formed, the chunk buffers otherwise).

**compose.** The DoRA output delta ``(g − 1)·base + g·(s·lora)`` and its gradient (forward + backward,
``jax.vjp`` with a random cotangent) at each ``--compose_shapes`` N,D, float32 and bfloat16:
``custom_vjp`` (:func:`kernels.dora_compose`, ``implementation="auto"``), ``autodiff_jit`` (jitted
autodiff of the same formula in plain jnp), ``naive_jit`` (jitted autodiff of the naive
``g·(base + s·lora) − base``) and ``eager`` (the plain formula's autodiff un-jitted, op by op).

**finetune.** A train step of ``--model`` (``demo``) at ``--seq_len`` x ``--tokens``: full fine-tuning vs
LoRA and DoRA (``fiddler:lora`` / ``fiddler:dora``) of rank ``--finetune_rank`` on every projection with
the backbone frozen (``train.trainable``: no weight gradients, no optimizer state for it): step time,
trainable parameters, optimizer-state bytes and XLA temporaries.

Times are medians of ``--repeats`` calls after a warm-up, the methods of one size alternating call by
call; each record also keeps its runs. Adding a section: a function ``(args) -> list of records`` in
``SECTIONS`` (with its sizes as arguments, and small ones under ``--quick``).

  python -m experiments.bench.adapters --out FILE.json [--quick] [--sections dora_norm compose finetune] [--repeats 5]

The JSON holds ``machine``, ``config`` (the arguments) and ``sections`` {name: records}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.decode import machine
from experiments.bench import mixers
from experiments.bench.mixers import alternate
from kernels import common, dora_compose, dora_norm
from pmem.core.runtime import reexec_with_tuned_malloc

S = 0.5  # alpha / r
COMPOSE_METHODS = ("custom_vjp", "autodiff_jit", "naive_jit", "eager")


def _seconds(f, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t0


def _timed(fns: dict, args: tuple, repeats: int, eager: tuple = ()) -> tuple[dict, dict]:
  """({key: runs in seconds}, {key: XLA temp bytes, None for ``eager`` keys}) of each ``fns[key](*args)``,
  compiled ahead of time unless eager, alternating (a warm-up round first)."""
  run = {k: f if k in eager else jax.jit(f).lower(*args).compile() for k, f in fns.items()}
  temp = {k: None if k in eager else int(f.memory_analysis().temp_size_in_bytes) for k, f in run.items()}
  return alternate({k: functools.partial(_seconds, f, *args) for k, f in run.items()}, repeats), temp


def _dense_norm(w, x, y):
  """‖W + s·A B‖ with A B formed, in float32."""
  f32 = jnp.float32
  return jnp.linalg.norm(w.astype(f32) + S * x.astype(f32) @ y.astype(f32), axis=0)


def norm_section(a) -> list[dict]:
  norms = {"factored": functools.partial(dora_norm, s=S, chunk=a.chunk), "dense": _dense_norm}
  fns = {(m, "forward"): f for m, f in norms.items()}
  fns |= {(m, "grad"): jax.grad(lambda w, x, y, f=f: jnp.sum(f(w, x, y)), (1, 2)) for m, f in norms.items()}
  records = []
  for r in a.ranks:
    for dtype in (jnp.float32, jnp.bfloat16):
      rng = np.random.default_rng(r)
      w = jnp.asarray(rng.normal(size=(a.d, a.d)) / np.sqrt(a.d), dtype)
      x = jnp.asarray(rng.normal(size=(a.d, r)) / np.sqrt(a.d), dtype)
      y = jnp.asarray(rng.normal(size=(r, a.d)) / np.sqrt(r), dtype)
      ref = np.asarray(_dense_norm(w, x, y), np.float64)
      rel = float(np.abs(np.asarray(norms["factored"](w, x, y)) - ref).max() / ref.max())
      runs, temp = _timed(fns, (w, x, y), a.repeats)
      for m, p in fns:
        records.append({"method": m, "pass": p, "d_in": a.d, "d_out": a.d, "r": r, "dtype": jnp.dtype(dtype).name,
                        "chunk": a.chunk, "temp_bytes": temp[m, p], "seconds": float(np.median(runs[m, p])),
                        "factored_vs_dense_max_rel": rel, "runs_s": runs[m, p]})
  return records


def _in_f32(formula):
  """``formula(base, lora, g)`` in float32, base's dtype out (as the op computes)."""
  return lambda base, lora, g: formula(base.astype(jnp.float32), lora.astype(jnp.float32), g).astype(base.dtype)


STABLE = _in_f32(lambda b, l, g: (g - 1) * b + g * (S * l))
NAIVE = _in_f32(lambda b, l, g: g * (b + S * l) - b)


def _fwd_bwd(f):
  def run(base, lora, g, dout):
    y, vjp = jax.vjp(f, base, lora, g)
    return y, *vjp(dout)
  return run


def compose_section(a) -> list[dict]:
  fns = {"custom_vjp": _fwd_bwd(functools.partial(dora_compose, s=S)), "autodiff_jit": _fwd_bwd(STABLE),
         "naive_jit": _fwd_bwd(NAIVE), "eager": _fwd_bwd(STABLE)}
  records = []
  for n, d in a.compose_shapes:
    for dtype in (jnp.float32, jnp.bfloat16):
      rng = np.random.default_rng(n + d)
      base, lora, dout = (jnp.asarray(rng.normal(size=(n, d)), dtype) for _ in range(3))
      g = jnp.asarray(1 + 1e-3 * rng.normal(size=d), jnp.float32)
      runs, temp = _timed(fns, (base, lora, g, dout), a.repeats, eager=("eager",))
      impl = common.select("kernels.dora", "auto", "compose", d, dtype)[0]
      for m in COMPOSE_METHODS:
        records.append({"method": m, "implementation": impl if m == "custom_vjp" else None, "N": n, "D": d,
                        "dtype": jnp.dtype(dtype).name, "temp_bytes": temp[m], "seconds": float(np.median(runs[m])),
                        "runs_s": runs[m]})
  return records


FINETUNE = {"full": (), "lora": ("fiddler:lora(rank={r}, targets={targets})",),
            "dora": ("fiddler:dora(rank={r}, targets={targets})",)}
EVERY = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def finetune_section(a) -> list[dict]:
  """A train step of ``--model`` fine-tuned in full vs LoRA / DoRA at rank ``--finetune_rank`` on every
  projection with the backbone frozen (``train.trainable``): seconds, optimizer-state and XLA temp bytes."""
  fill = dict(r=a.finetune_rank, targets=EVERY)
  built = {k: mixers.train_step(a.model, a.seq_len, a.tokens, [c.format(**fill) for c in cmds])
           for k, cmds in FINETUNE.items()}
  runs = alternate({k: step for k, (step, _) in built.items()}, a.repeats)
  return [{"method": k, "model": a.model, "rank": None if k == "full" else a.finetune_rank, "T": a.seq_len,
           "tokens": a.tokens, "seconds": float(np.median(runs[k])), **facts, "runs_s": runs[k]}
          for k, (_, facts) in built.items()]


SECTIONS = {"dora_norm": norm_section, "compose": compose_section, "finetune": finetune_section}


def report(sections: dict) -> None:
  if "dora_norm" in sections:
    print("\nDoRA column norm ‖W + sAB‖ (float32 accumulation): ms (XLA temp MiB)\n"
          "| d_in = d_out | r | dtype | factored fwd | dense fwd | factored grad (A, B) | dense grad (A, B) | max rel |\n"
          "|---|---|---|---|---|---|---|---|")
    by = {}
    for r in sections["dora_norm"]:
      by.setdefault((r["d_in"], r["r"], r["dtype"]), {})[r["method"], r["pass"]] = r
    for (d, rank, dt), x in by.items():
      cells = [f"{1e3 * x[m, p]['seconds']:.1f} ({x[m, p]['temp_bytes'] / 2**20:.1f})"
               for p in ("forward", "grad") for m in ("factored", "dense")]
      print(f"| {d} | {rank} | {dt} | {' | '.join(cells)} | {x['factored', 'forward']['factored_vs_dense_max_rel']:.1e} |")
  if "compose" in sections:
    print("\nDoRA compose forward + backward: ms (XLA temp MiB)\n| N, D | dtype | " + " | ".join(COMPOSE_METHODS)
          + " |\n|---|---|" + "---|" * len(COMPOSE_METHODS))
    by = {}
    for r in sections["compose"]:
      by.setdefault((r["N"], r["D"], r["dtype"]), {})[r["method"]] = r
    for (n, d, dt), x in by.items():
      cells = [f"{1e3 * x[m]['seconds']:.1f}" + ("" if x[m]["temp_bytes"] is None else
                                                   f" ({x[m]['temp_bytes'] / 2**20:.1f})") for m in COMPOSE_METHODS]
      print(f"| {n}, {d} | {dt} | {' | '.join(cells)} |")


  if "finetune" in sections:
    print("\nFine-tuning step (every projection adapted; backbone frozen for LoRA / DoRA)\n"
          "| method | rank | step ms | vs full | trainable params | optimizer MiB | XLA temp MiB |\n"
          "|---|---|---|---|---|---|---|")
    full = next(r["seconds"] for r in sections["finetune"] if r["method"] == "full")
    for r in sections["finetune"]:
      print(f"| {r['method']} | {r['rank'] or '–'} | {1e3 * r['seconds']:.1f} | {r['seconds'] / full:.2f} | "
            f"{r['params_trainable']:,} | {r['optimizer_bytes'] / 2**20:.2f} | {r['temp_bytes'] / 2**20:.1f} |")


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (seconds; tests)")
  ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--d", type=int, default=4096, help="dora_norm: d_in = d_out")
  ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 512], help="dora_norm: r")
  ap.add_argument("--chunk", type=int, default=None, help="dora_norm: rows of d_in per chunk (default: one pass "
                                                          "for float32, kernels.dora.ops.CHUNK rows for bfloat16)")
  ap.add_argument("--compose_shapes", type=lambda s: tuple(map(int, s.split(","))), nargs="+",
                  default=[(2048, 4096), (8192, 4096)], help="compose: N,D ...")
  ap.add_argument("--model", default="demo", help="finetune: the config fine-tuned")
  ap.add_argument("--finetune_rank", type=int, default=16, help="finetune: LoRA / DoRA rank")
  ap.add_argument("--seq_len", type=int, default=256, help="finetune: tokens per row")
  ap.add_argument("--tokens", type=int, default=4096, help="finetune: tokens per batch")
  a = ap.parse_args(argv)
  if a.quick:
    a.repeats, a.d, a.ranks, a.chunk, a.compose_shapes = 2, 256, [8], 64, [(64, 256)]  # 4 chunks of d_in
    a.model, a.finetune_rank, a.seq_len, a.tokens = "tiny", 4, 32, 128
  facts = machine(len(os.sched_getaffinity(0)))
  sections = {name: SECTIONS[name](a) for name in a.sections}
  print(f"{facts['cpu']}, {facts['cpus']} CPUs, jax {facts['jax']} on {facts['platform']}, "
        f"load average {facts['load_average']}")
  report(sections)
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"machine": facts, "config": vars(a), "sections": sections}, indent=1))


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()

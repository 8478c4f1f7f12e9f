"""Train-step throughput of pmem's dense decoder vs HF transformers LlamaForCausalLM (torch CPU).

Both run the same configuration (fwd + bwd + AdamW, fp32, random ids). ``pmem`` runs the default
scanned layer stack and ``pmem_noscan`` unrolled layers; each ``--kernel_impl NAME`` adds rows
``pmem_NAME`` and ``pmem_noscan_NAME``, both stacks with ``model.kernel_impl=NAME`` (``auto`` on CPU: the
native attention kernel, kernels.attention), each ``--scan_unroll N`` rows ``pmem_unrollN`` (and ``pmem_unrollN_NAME``
per kernel_impl) with ``model.scan_unroll=N`` (the scanned stack, N layers per loop iteration), each
``--loss_chunk N`` a row ``pmem_chunkN`` with ``train.loss_chunk=N``
(0: the loss of the whole logits, not the fused head + cross-entropy). After warm-up the
implementations alternate, one step each (A B C A B C ...), so machine noise hits all alike;
medians are reported.

  python -m experiments.bench.throughput --out runs/throughput.json [--steps 7] [--kernel_impl auto] [--scan_unroll 4]
      [--loss_chunk 0] [--vocab 8192 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time

import fiddle as fdl
import jax
import numpy as np
from flax import nnx

from configs.base import experiment
from experiments.bench.common import ROOT, TorchWorker
from kernels import IMPLEMENTATIONS
from pmem.core.runtime import reexec_with_tuned_malloc
from pmem.models.decoder import Decoder
from pmem.models.hf import hf_config
from pmem.train.loop import Trainer


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=7, help="timed steps per implementation (>= 5)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--n_layers", type=int, default=4)
  ap.add_argument("--n_heads", type=int, default=4)
  ap.add_argument("--n_kv_heads", type=int, default=2)
  ap.add_argument("--d_ff", type=int, default=688)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--kernel_impl", action="append", default=[], choices=IMPLEMENTATIONS,
                  help="also time pmem with model.kernel_impl=NAME (rows pmem_NAME, pmem_noscan_NAME; repeatable)")
  ap.add_argument("--scan_unroll", action="append", default=[], type=int,
                  help="also time pmem with model.scan_unroll=N (rows pmem_unrollN[_NAME]; repeatable)")
  ap.add_argument("--loss_chunk", action="append", default=[], type=int,
                  help="also time pmem with train.loss_chunk=N (row pmem_chunkN; repeatable)")
  ap.add_argument("--oracle_python", default=os.environ.get("PMEM_ORACLE_PYTHON", str(ROOT / ".venv-oracle/bin/python")))
  a = ap.parse_args()
  b, t = a.batch_size, a.seq_len

  cfg = experiment(vocab=a.vocab, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
                   n_kv_heads=a.n_kv_heads, d_ff=a.d_ff, seq_len=t, batch_size=b, steps=1000)
  exp = fdl.build(cfg)
  ids = np.random.default_rng(0).integers(0, a.vocab, (b, t + 1)).astype(np.int32)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((b, t), np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "loss_mask": np.ones((b, t), np.float32)}

  def pmem_stepper(model_cfg, **train):
    trainer = Trainer(dataclasses.replace(exp, model=model_cfg, train=dataclasses.replace(exp.train, **train)))
    dev_batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}
    def step() -> float:
      t0 = time.perf_counter()
      trainer.train_state, m = trainer.step_fn(trainer.train_state, dev_batch)
      jax.block_until_ready(m)
      return time.perf_counter() - t0
    return step

  model = nnx.eval_shape(lambda: Decoder(exp.model, rngs=nnx.Rngs(0)))
  steppers = {"pmem": pmem_stepper(exp.model),
              "pmem_noscan": pmem_stepper(dataclasses.replace(exp.model, scan_layers=False)),
              **{f"pmem{u}_{k}": pmem_stepper(dataclasses.replace(exp.model, kernel_impl=k, scan_layers=not u))
                 for k in a.kernel_impl for u in ("", "_noscan")},
              **{f"pmem_unroll{n}{'_' + k if k else ''}": pmem_stepper(dataclasses.replace(exp.model, scan_unroll=n,
                                                                                           kernel_impl=k or exp.model.kernel_impl))
                 for n in a.scan_unroll for k in ("", *a.kernel_impl)},
              **{f"pmem_chunk{n}": pmem_stepper(exp.model, loss_chunk=n) for n in a.loss_chunk}}
  worker = TorchWorker(a.oracle_python, "hf_llama.py", json.dumps(hf_config(model)), str(b), str(t))
  steppers["hf_torch"] = worker.step
  times = {k: [] for k in steppers}
  try:
    for _ in range(a.warmup):
      for f in steppers.values():
        f()
    for _ in range(a.steps):
      for k, f in steppers.items():
        times[k].append(f())
  finally:
    worker.close()

  tok = b * t
  records = [{"impl": k, "tokens_per_s": tok / float(np.median(v)), "median_step_s": float(np.median(v)),
              "step_s": v} for k, v in times.items()]
  tps = {r["impl"]: r["tokens_per_s"] for r in records}
  print(f"{'impl':<18} {'median step s':>14} {'tokens/s':>10}")
  for r in records:
    print(f"{r['impl']:<18} {r['median_step_s']:>14.3f} {r['tokens_per_s']:>10.0f}")
  ratios = {k: tps[k] / tps["hf_torch"] for k in tps if k.startswith("pmem")}
  print("; ".join(f"{k} / hf_torch = {r:.2f}" for k, r in ratios.items()),
        f" (jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device)")
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"records": records, "ratios": ratios, "config": vars(a) | {"jax": jax.__version__}},
                            indent=2))


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()

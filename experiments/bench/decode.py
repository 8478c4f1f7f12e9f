"""Decode throughput: pmem's Generator vs HF transformers ``generate``, and decode cost vs table rows.

**Dense vs HF.** The ``demo`` model (4 layers, d=256, GQA 4/2 heads, d_ff 688, vocab 8192; random
init from ``nnx.Rngs(0)``) decodes greedily from random prompts of ``--prompt_len`` tokens, at each
``--batch`` size, ``--new_tokens`` tokens per row, with :class:`pmem.decode.Generator` and with HF
``LlamaForCausalLM.generate`` (torch CPU, SDPA, ``use_cache=True``, the same weights through
``pmem.models.hf``, no EOS token: ``experiments/oracles/hf_generate.py``, a worker in the
oracle venv). Decode tokens/s excludes the prefill and compilation: ``B·(N − 1)`` tokens over the
seconds from the first new token to the last, in both: pmem's ``Generation.tokens_per_s``; for
HF, ``generate(max_new_tokens=min_new_tokens=N)`` with a stopping criterion that stamps the time
of each new token and never stops (so HF's own per-step Python counts, as pmem's host loop does).
The two never run at once: each round runs, per batch size, pmem then HF (and a pause after torch);
round 0 is a warm-up, medians over ``--repeats`` rounds are reported. The greedy tokens are
compared row by row: the number of leading tokens that agree (float32 sums in other orders can
flip a near tie late; after one flip the rows diverge).

**Table rows.** An Engram model (the ``tiny`` backbone: 4 layers, d=64, bytes; Engram at layer 1,
orders 2-3 × 4 heads: 8 head tables, each row ``d_mem / 8 = 8`` floats) whose head tables hold
``rows / 8`` rows each (the next primes), so the packed table has ~2^16 or ~2^22 rows (2^22 × 8 ×
4 B = 128 MiB). It decodes at batch 1 with its table on the device and on the host
(:func:`pmem.decode.to_host`: the rows of each token are gathered from NumPy and staged per step);
rounds alternate over the four models so machine noise hits them alike. Reported: seconds per token
at 2^22 over 2^16 rows per placement (target <= 1.5) and host over device tokens/s; host and device
decode must give the same tokens. The ``tiny`` backbone keeps the table's share of a step large.

Torch gets as many intra-op threads as XLA:CPU uses here (the CPUs this process may run on); both
run under pmem's malloc tunables (``pmem.core.runtime``).

  python -m experiments.bench.decode --out FILE.json [--quick] [--new_tokens 128] [--repeats 5]

The JSON holds ``machine``, ``dense`` (one record per impl and batch: ``tokens_per_s``, ``step_ms``,
``runs_tokens_per_s``), ``ratio`` (pmem / HF tokens/s per batch), ``agreement`` (per batch: leading
equal tokens of each row), ``tables`` (one record per rows and placement), ``table_ratio`` (per
placement: seconds per token at the largest over the smallest rows), ``host_over_device`` (per rows)
and ``host_matches_device``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import fiddle as fdl
import jax
import numpy as np
from flax import nnx

from configs import cli
from experiments.bench.common import ROOT, TorchWorker
from pmem.core.runtime import reexec_with_tuned_malloc
from pmem.data.tokenizer import ByteTokenizer
from pmem.decode import Generator, to_host
from pmem.models.decoder import Decoder
from pmem.models.hf import export, hf_config

ENGRAM_HEADS = 4
ENGRAM_TABLES = 2 * ENGRAM_HEADS  # orders 2 and 3
PAUSE_S = 0.2  # after each torch call: its OpenMP workers spin a while and would slow what runs next


def model_of(commands: list[str]) -> Decoder:
  return Decoder(fdl.build(cli.build_config(commands).model), rngs=nnx.Rngs(0))


def timed(gen: Generator, prompts: np.ndarray, new_tokens: int) -> tuple[float, np.ndarray]:
  """(decode tokens/s, tokens [B, new_tokens]) of one greedy generation."""
  g = gen.generate(prompts.tolist(), new_tokens)
  return g.tokens_per_s, np.stack(g.tokens)


def leading_equal(a: np.ndarray, b: np.ndarray) -> int:
  same = a == b
  return len(a) if same.all() else int(np.argmin(same))


class HFGenerate(TorchWorker):
  """``hf_generate.py``'s worker: :meth:`generate` runs HF ``generate`` on its batch-``b`` prompts."""

  def __init__(self, python: str, inp: str):
    super().__init__(python, "hf_generate.py", inp)

  def generate(self, b: int, n: int) -> tuple[float, np.ndarray]:
    """(decode seconds: first new token to last, new tokens [b, n])."""
    self.p.stdin.write(f"{b} {n}\n")
    self.p.stdin.flush()
    t, _, *toks = self.p.stdout.readline().split()
    time.sleep(PAUSE_S)
    return float(t), np.array(toks, np.int32).reshape(b, n)


def dense(a, threads: int) -> tuple[list[dict], dict, dict]:
  """(records, pmem / HF ratio per batch, agreement per batch) of the dense model."""
  model = model_of([f"config:{a.config}"])
  prompts = np.random.default_rng(0).integers(0, model.cfg.vocab, (max(a.batch), a.prompt_len)).astype(np.int32)
  gen = Generator(model, max_len=a.prompt_len + a.new_tokens)
  hf_cfg, sd = hf_config(model), export(model)
  runs, toks = {(impl, b): [] for b in a.batch for impl in ("pmem", "hf_torch")}, {}
  with tempfile.TemporaryDirectory() as tmp:
    inp = os.path.join(tmp, "in.npz")
    np.savez(inp, config=json.dumps(hf_cfg), threads=threads, **{f"prompts_{b}": prompts[:b] for b in a.batch},
             **{"w:" + k: v for k, v in sd.items()})
    hf = HFGenerate(a.oracle_python, inp)
  try:
    for r in range(1 + a.repeats):  # round 0: warm-up (and pmem's compilation)
      for b in a.batch:
        tps, ours = timed(gen, prompts[:b], a.new_tokens)
        seconds, theirs = hf.generate(b, a.new_tokens)
        toks[b] = ours, theirs
        if r:
          runs["pmem", b].append(tps)
          runs["hf_torch", b].append(b * (a.new_tokens - 1) / seconds)
  finally:
    hf.close()
  records, ratio, agreement = [], {}, {}
  for (impl, b), x in runs.items():
    tps = float(np.median(x))
    records.append({"impl": impl, "batch": b, "tokens_per_s": tps, "step_ms": 1e3 * b / tps,
                    "runs_tokens_per_s": [float(v) for v in x]})
  for b in a.batch:
    ratio[b] = float(np.median(runs["pmem", b]) / np.median(runs["hf_torch", b]))
    lead = [leading_equal(x, y) for x, y in zip(*toks[b])]
    agreement[b] = {"leading_equal": lead, "min": min(lead), "new_tokens": a.new_tokens}
  return records, ratio, agreement


def tables(a) -> tuple[list[dict], bool]:
  """(records, whether host and device decode gave the same tokens) of the Engram model."""
  tok = ByteTokenizer()
  prompt = np.random.default_rng(1).integers(0, tok.vocab_size, (1, a.prompt_len)).astype(np.int32)
  gens = {}
  for log2 in a.table_log2:
    size = (1 << log2) // ENGRAM_TABLES
    model = model_of(["config:tiny", f"fiddler:engram(layers=(1,), heads={ENGRAM_HEADS}, table_size={size})"])
    graphdef, params = nnx.split(model)
    params, host = to_host(params)
    rows = sum(t.shape[-2] for t in host.values())
    gens[rows, "device"] = Generator(model, tok, max_len=a.prompt_len + a.new_tokens)
    gens[rows, "host"] = Generator(nnx.merge(graphdef, params), tok, max_len=a.prompt_len + a.new_tokens,
                                   host_tables=host)
  runs, toks = {k: [] for k in gens}, {}
  for k, g in gens.items():
    toks[k] = timed(g, prompt, a.new_tokens)[1]  # compiles
  for _ in range(a.repeats):
    for k, g in gens.items():
      runs[k].append(timed(g, prompt, a.new_tokens)[0])
  records = []
  for (rows, placement), r in runs.items():
    tps = float(np.median(r))
    records.append({"rows": rows, "placement": placement, "batch": 1, "tokens_per_s": tps, "token_ms": 1e3 / tps,
                    "runs_tokens_per_s": [float(x) for x in r]})
  same = all(np.array_equal(toks[rows, "device"], toks[rows, "host"]) for rows, _ in gens)
  return records, same


def machine(threads: int) -> dict:
  with open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
  with open("/proc/loadavg") as f:
    load = [float(x) for x in f.read().split()[:3]]
  return {"cpu": cpu, "cpus": os.cpu_count(), "xla_threads": threads, "torch_threads": threads,
          "jax": jax.__version__, "platform": jax.devices()[0].platform, "load_average": load}


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true", help="the tiny dense model, 8 new tokens, 2^10 / 2^12 rows "
                                                       "(under a minute; tests)")
  ap.add_argument("--config", default="demo", help="the dense model's config")
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--table_log2", type=int, nargs="+", default=[16, 22], help="Engram table rows (log2), all heads")
  ap.add_argument("--oracle_python",
                  default=os.environ.get("PMEM_ORACLE_PYTHON", str(ROOT / ".venv-oracle/bin/python")))
  a = ap.parse_args(argv)
  if a.quick:
    a.config, a.prompt_len, a.new_tokens, a.repeats, a.table_log2 = "tiny", 8, 8, 2, [10, 12]
  threads = len(os.sched_getaffinity(0))  # XLA:CPU's intra-op pool: one thread per usable CPU
  facts = machine(threads)
  records, ratio, agreement = dense(a, threads)
  rows, same = tables(a)
  small, large = min(r["rows"] for r in rows), max(r["rows"] for r in rows)
  ms = {(r["rows"], r["placement"]): r["token_ms"] for r in rows}
  table_ratio = {p: ms[large, p] / ms[small, p] for p in ("device", "host")}
  host_over_device = {n: ms[n, "device"] / ms[n, "host"] for n in (small, large)}

  print(f"{facts['cpu']}, {facts['cpus']} CPUs, XLA and torch threads {threads}, jax {facts['jax']}, "
        f"load average {facts['load_average']}")
  print(f"\n{a.config}: greedy decode, prompt {a.prompt_len}, {a.new_tokens} new tokens, median of {a.repeats}")
  print("| impl | batch | decode tokens/s | ms/step | pmem / hf | leading equal tokens (min over rows) |")
  print("|---|---|---|---|---|---|")
  for r in records:
    b = r["batch"]
    extra = f"{ratio[b]:.2f} | {agreement[b]['min']}/{a.new_tokens}" if r["impl"] == "pmem" else " | "
    print(f"| {r['impl']} | {b} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.2f} | {extra} |")
  print(f"\nEngram decode (batch 1) vs table rows; host tokens == device tokens: {same}")
  print("| rows | placement | tokens/s | ms/token | host / device tokens/s |\n|---|---|---|---|---|")
  for r in rows:
    extra = f"{host_over_device[r['rows']]:.2f}" if r["placement"] == "host" else ""
    print(f"| {r['rows']:,} | {r['placement']} | {r['tokens_per_s']:,.0f} | {r['token_ms']:.3f} | {extra} |")
  print(f"ms/token at {large:,} / at {small:,} rows: device {table_ratio['device']:.2f}, "
        f"host {table_ratio['host']:.2f} (target <= 1.5)")

  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"machine": facts, "dense": records, "ratio": ratio, "agreement": agreement,
                             "tables": rows, "table_ratio": table_ratio, "host_over_device": host_over_device,
                             "host_matches_device": same, "config": vars(a)}, indent=1))


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()

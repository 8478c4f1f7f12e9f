"""Sequence-mixer speed (issue S1): train steps vs sequence length, chunked Gated DeltaNet vs fla, decode at
a long context.

**Train steps vs T.** Each config of ``--mixers`` (``tiny``: full attention, the baseline; the tiny
mixers of ``configs/sequence.py``) at each ``--lengths`` T with ``--tokens`` tokens per batch
(``set:train.seq_len=T``, ``set:train.batch_size=tokens / T``) runs the trainer's step
(``pmem.train.step.make_train_step``: forward, backward, AdamW; jitted, state donated, compiled ahead of
time, one device) on random byte ids. Memory is XLA's ``memory_analysis()`` of that compiled step:
``temp_bytes`` (the step's temporaries: activations kept for the backward and workspace, which XLA:CPU
allocates as one block per call; the peak beyond the state and batch) and ``argument_bytes`` (state +
batch). Per T the configs alternate, one step each, after one warm-up round; medians over
``--repeats`` rounds. Reported: µs per token, each config over attention per T, the crossover (the
smallest T of the grid from which on a config is cheaper per token than attention; None: never) and
``flat``: t(largest T) / t(smallest T) per token (a recurrence's cost per token does not grow with T).

**Chunked Gated DeltaNet vs fla.** :func:`pmem.layers.recurrence.chunked` with ``β`` and a scalar log
decay per head (the GDN mixer's call; chunk ``--chunk``, gradients rematerialized, jitted) against fla
0.6.0's chunkwise PyTorch reference ``naive_chunk_gated_delta_rule`` (torch CPU, float32, autograd;
``experiments/oracles/fla_recurrence.py bench``, a worker in the oracle venv) at each ``--fla_shapes``
B,H,T,K,V: forward and backward of ``Σ o·do + Σ S·dS`` (random cotangents) w.r.t. q, k, v, the log decay
and β. Inputs: q, k L2-normalised per head, v normal, log decay −0.3·|N(0, 1)|, β ~ U(0.05, 0.95). Both
first compute o, the final state and the five gradients on the timed inputs; each one's max |pmem − fla|
over max |fla| must be <= ``SAME`` or nothing is timed. Then pmem and fla alternate per shape; medians.

**Titans LMM vs titans-pytorch.** One memory layer, ``--titans`` B,T,D,H,chunk,depth (the issue's 8, 512, 256, 4,
16, 2; MLP expansion 2): pmem's ``NeuralMemory`` (``titans``; no short conv, no clipping, float32, jitted and
compiled ahead of time) against lucidrains' ``titans-pytorch`` 0.5.5 ``NeuralMemory`` configured to the same
memory semantics (``experiments/oracles/titans_pytorch.py bench``: ``batch_size`` = the chunk, ``chunk_size`` 1;
the mapping the tests check to float64 rounding; torch CPU float32, autograd), each a forward and backward of
``Σ y·dy`` (random cotangent) w.r.t. every parameter. Tokens/s: medians, the two alternating. Peak memory beyond
the inputs: pmem's compiled step's ``temp_bytes + output_bytes`` (XLA's ``memory_analysis``), torch's most bytes
held at once during a step (its profiler's allocation events in time order).

**Decode at a long context.** ``--decode`` configs (``gdn_tiny``, ``tiny``, ``mom_tiny``, ``titans_mac_tiny``;
batch 1, random bytes): :class:`pmem.decode.Generator` prefills each ``--context`` length (512, 4096), then decodes
``--new_tokens`` greedily; tokens/s as in ``experiments/bench/decode.py`` (decode loop only), the prefill's seconds
and the decode state's bytes per sequence alongside; per context the configs alternate after a warm-up generation
each. ``decode_flat``: per config, tokens/s and state bytes at the longest context over the shortest (a recurrent
state: ~1 and exactly 1; attention's KV cache grows).

XLA and torch get the CPUs this process may run on (``taskset`` pins both); pmem's malloc tunables apply.

  python -m experiments.bench.mixers --out FILE.json [--quick] [--repeats 3] [--only train fla titans decode]

The JSON holds ``machine``, ``train`` (one record per config and T), ``over_attention`` (per config and
T), ``crossover`` and ``flat`` (per config), ``fla`` (per shape: pmem and fla seconds, their ratio, the
agreement), ``titans`` (tokens/s and peak bytes of both, their ratios), ``decode`` (per config and context),
``decode_ratio`` (gdn_tiny / tiny tokens/s at the longest context) and ``decode_flat``; a section left out of ``--only`` is absent.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import tempfile
import time

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import cli
from experiments.bench.common import ROOT, TorchWorker
from experiments.bench.decode import PAUSE_S, machine, model_of
from pmem.core.runtime import reexec_with_tuned_malloc
from pmem.core.mixer import TokenContext
from pmem.decode import Generator
from pmem.layers import recurrence
from pmem.memory.titans import NeuralMemory
from pmem.models.decoder import Decoder
from pmem.train import optim
from pmem.train.step import make_train_step

BASE = "tiny"  # full attention
MIXERS = (BASE, "linear_attn_tiny", "gla_tiny", "mamba2_tiny", "deltanet_tiny", "gdn_tiny", "swa_tiny",
          "hybrid_tiny")
DECODE = ("gdn_tiny", BASE, "mom_tiny", "titans_mac_tiny")  # --decode's default (--quick: the first two)
GRADS = ("q", "k", "v", "a", "beta")
SAME = 1e-3  # float32 chunked forms in other orders agree to ~1e-5 of the largest value
SECTIONS = ("train", "fla", "titans", "decode")


def alternate(fns: dict, repeats: int) -> dict:
  """Each of ``fns`` once per round in turn: a warm-up round, then ``repeats`` rounds → {key: results}."""
  runs = {k: [] for k in fns}
  for r in range(1 + repeats):
    for k, f in fns.items():
      x = f()
      if r:
        runs[k].append(x)
  return runs


def train_step(name: str, t: int, tokens: int, commands: list[str]):
  """(one timed step → seconds, XLA's memory facts) of config ``name`` (then ``commands``) at length ``t``."""
  b = tokens // t
  exp = fdl.build(cli.build_config([f"config:{name}", *commands, f"set:train.seq_len={t}",
                                    f"set:train.batch_size={b}"]))
  graphdef, params, rest = nnx.split(Decoder(exp.model, rngs=nnx.Rngs(exp.seed)), nnx.Param, ...)
  tx, lr = optim.build(exp.train.optim, exp.train.steps)
  trained = optim.trainable(params, exp.train.trainable)[0]  # train.trainable: the rest frozen
  state = {"params": params, "rest": rest, "opt": tx.init(trained), "step": jnp.zeros((), jnp.int32)}
  ids = np.random.default_rng(0).integers(0, exp.model.vocab, (b, t + 1)).astype(np.int32)
  batch = jax.device_put({"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((b, t), np.int32),
                          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                          "loss_mask": np.ones((b, t), np.float32)})
  fn = jax.jit(make_train_step(graphdef, tx, lr, exp.train.z_loss, exp.train.trainable, loss_chunk=exp.train.loss_chunk),
               donate_argnums=0).lower(state, batch).compile()
  mem = fn.memory_analysis()

  def step() -> float:
    nonlocal state
    t0 = time.perf_counter()
    state, m = fn(state, batch)
    jax.block_until_ready(m)
    return time.perf_counter() - t0
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  return step, {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
                "optimizer_bytes": sum(x.nbytes for x in jax.tree.leaves(state["opt"])),
                "params": size(params), "params_trainable": size(trained)}


def train(a) -> list[dict]:
  records = []
  for t in a.lengths:
    built = {n: train_step(n, t, a.tokens, a.set) for n in a.mixers}
    runs = alternate({n: s for n, (s, _) in built.items()}, a.repeats)
    for n, (_, mem) in built.items():
      s = float(np.median(runs[n]))
      records.append({"config": n, "T": t, "batch": a.tokens // t, "step_s": s, "token_us": 1e6 * s / a.tokens,
                      **mem, "runs_step_s": runs[n]})
  return records


def versus_attention(records: list[dict], lengths: list[int]) -> tuple[dict, dict, dict]:
  """(over_attention {config: {T: ratio}}, crossover {config: T or None}, flat {config: ratio})."""
  us = {(r["config"], r["T"]): r["token_us"] for r in records}
  names = list(dict.fromkeys(r["config"] for r in records))
  over = {n: {t: us[n, t] / us[BASE, t] for t in lengths} for n in names if n != BASE}
  crossover = {n: next((t for i, t in enumerate(lengths) if all(r < 1 for r in list(o.values())[i:])), None)
               for n, o in over.items()}
  flat = {n: us[n, lengths[-1]] / us[n, lengths[0]] for n in names}
  return over, crossover, flat


def gdn_inputs(b: int, h: int, t: int, k: int, v: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  x = {"q": unit(rng.normal(size=(b, t, h, k))), "k": unit(rng.normal(size=(b, t, h, k))),
       "v": rng.normal(size=(b, t, h, v)), "a": -0.3 * np.abs(rng.normal(size=(b, t, h))),
       "beta": rng.uniform(0.05, 0.95, size=(b, t, h)), "do": rng.normal(size=(b, t, h, v)),
       "dS": rng.normal(size=(b, h, k, v))}
  return {n: y.astype(np.float32) for n, y in x.items()}


@functools.partial(jax.jit, static_argnames="chunk")
def pmem_fwd_bwd(x: dict, chunk: int):
  """(o, S, gradients of Σ o·do + Σ S·dS w.r.t. GRADS) of :func:`recurrence.chunked`."""
  def loss(p):
    o, S = recurrence.chunked(p["q"], p["k"], p["v"], p["a"], p["beta"], chunk=chunk)
    return jnp.sum(o * x["do"]) + jnp.sum(S * x["dS"]), (o, S)
  (_, (o, S)), g = jax.value_and_grad(loss, has_aux=True)({n: x[n] for n in GRADS})
  return o, S, g


def _seconds(f) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(f())
  return time.perf_counter() - t0


class FlaChunk(TorchWorker):
  """``fla_recurrence.py``'s bench worker: :meth:`run` times one forward + backward of a shape."""

  def __init__(self, python: str, inp: str, out: str):
    super().__init__(python, "fla_recurrence.py", inp, out)

  def run(self, shape: str) -> float:
    self.p.stdin.write(f"{shape}\n")
    self.p.stdin.flush()
    s = float(self.p.stdout.readline())
    time.sleep(PAUSE_S)
    return s


def versus_fla(a, threads: int) -> list[dict]:
  shapes = {"B{}_H{}_T{}_K{}_V{}".format(*s): s for s in a.fla_shapes}
  xs = {n: gdn_inputs(*s, seed=i) for i, (n, s) in enumerate(shapes.items())}
  with tempfile.TemporaryDirectory() as tmp:
    inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(inp, chunk=a.chunk, threads=threads, **{f"{n}/{k}": y for n, x in xs.items() for k, y in x.items()})
    worker = FlaChunk(a.oracle_python, inp, out)
    ref = dict(np.load(out))
  try:
    fns, agreement = {}, {}
    for n, x in xs.items():
      x = jax.device_put(x)
      o, S, g = pmem_fwd_bwd(x, a.chunk)
      ours = {"o": o, "S": S} | {f"d{k}": v for k, v in g.items()}
      agreement[n] = {k: float(np.abs(np.asarray(y) - ref[f"{n}/{k}"]).max() / np.abs(ref[f"{n}/{k}"]).max())
                      for k, y in ours.items()}
      if max(agreement[n].values()) > SAME:
        raise AssertionError(f"pmem and fla disagree at {n}: {agreement[n]} (max |diff| / max |fla|)")
      fns[n, "pmem"] = functools.partial(_seconds, functools.partial(pmem_fwd_bwd, x, a.chunk))
      fns[n, "fla"] = functools.partial(worker.run, n)
    runs = alternate(fns, a.repeats)
  finally:
    worker.close()
  records = []
  for n, s in shapes.items():
    p, f = (float(np.median(runs[n, impl])) for impl in ("pmem", "fla"))
    records.append({"shape": dict(zip("BHTKV", s)), "chunk": a.chunk, "pmem_s": p, "fla_s": f, "fla_over_pmem": f / p,
                    "max_rel_diff": agreement[n], "runs_pmem_s": runs[n, "pmem"], "runs_fla_s": runs[n, "fla"]})
  return records


def titans_lmm_step(x: np.ndarray, dy: np.ndarray, h: int, chunk: int, depth: int):
  """(one timed step → seconds, peak bytes) of pmem's LMM layer: forward + backward of ``Σ y·dy`` w.r.t. its
  parameters, compiled ahead of time; peak: the compiled step's temporaries and outputs."""
  b, t, d = x.shape
  m = NeuralMemory(d, h, depth=depth, chunk=chunk, conv=0, max_grad_norm=None, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  ctx = TokenContext(jnp.zeros((b, t), jnp.int32), jnp.asarray(pos), jnp.ones((b, t), jnp.int32))
  grad = jax.grad(lambda p, x, dy: jnp.sum(nnx.merge(graphdef, p, rest)(x, ctx) * dy))
  x, dy = jax.device_put((x, dy))
  fn = jax.jit(grad).lower(params, x, dy).compile()
  mem = fn.memory_analysis()
  return functools.partial(_seconds, functools.partial(fn, params, x, dy)), \
      int(mem.temp_size_in_bytes + mem.output_size_in_bytes)


def versus_titans(a, threads: int) -> dict:
  b, t, d, h, chunk, depth = a.titans
  rng = np.random.default_rng(3)
  x, dy = (rng.standard_normal((b, t, d)).astype(np.float32) for _ in range(2))
  pmem_step, pmem_peak = titans_lmm_step(x, dy, h, chunk, depth)
  with tempfile.TemporaryDirectory() as tmp:
    inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(inp, x=x, dy=dy, heads=h, chunk=chunk, depth=depth, expand=2.0, threads=threads)
    worker = TorchWorker(a.oracle_python, "titans_pytorch.py", inp, out)
    torch_peak = int(np.load(out)["peak_bytes"])
  try:
    runs = alternate({"pmem": pmem_step, "titans_pytorch": lambda: (worker.step(), time.sleep(PAUSE_S))[0]},
                     a.repeats)
  finally:
    worker.close()
  tps = {k: b * t / float(np.median(r)) for k, r in runs.items()}
  return {"shape": dict(zip(("B", "T", "D", "H", "chunk", "depth"), a.titans)), "expand": 2,
          "tokens_per_s": tps, "peak_bytes": {"pmem": pmem_peak, "titans_pytorch": torch_peak},
          "speedup": tps["pmem"] / tps["titans_pytorch"], "peak_ratio": pmem_peak / torch_peak,
          "runs_s": runs}


def decode(a) -> list[dict]:
  """One record per ``--decode`` config and ``--context`` length (per context the configs alternate)."""
  models = {n: model_of([f"config:{n}", *a.set]) for n in a.decode}
  out = []
  for c in a.context:
    prompt = np.random.default_rng(2).integers(0, 256, (1, c)).tolist()
    gens = {n: Generator(m, max_len=c + a.new_tokens) for n, m in models.items()}
    runs = alternate({n: functools.partial(g.generate, prompt, a.new_tokens) for n, g in gens.items()}, a.repeats)
    out += [{"config": n, "context": c, "new_tokens": a.new_tokens,
             "tokens_per_s": float(np.median([g.tokens_per_s for g in r])),
             "prefill_s": float(np.median([g.prefill_s for g in r])),
             "state_bytes": models[n].state_bytes(c + a.new_tokens),
             "runs_tokens_per_s": [g.tokens_per_s for g in r]} for n, r in runs.items()]
  return out


def decode_flat(records: list[dict]) -> dict:
  """Per config: decode tokens/s and state bytes at the longest context over the shortest (flat: ~1 and 1)."""
  by = {}
  for r in records:
    by.setdefault(r["config"], []).append(r)
  return {n: {"tokens_per_s": rs[-1]["tokens_per_s"] / rs[0]["tokens_per_s"],
              "state_bytes": rs[-1]["state_bytes"] / rs[0]["state_bytes"]}
          for n, rs in ((n, sorted(rs, key=lambda r: r["context"])) for n, rs in by.items())}


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true", help="1-layer tiny and linear_attn_tiny at T 64 / 128, one small "
                                                       "fla shape, decode at a 64-token context (tests)")
  ap.add_argument("--mixers", nargs="+", default=list(MIXERS), help=f"configs; {BASE} (attention) is the baseline")
  ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
  ap.add_argument("--tokens", type=int, default=4096, help="tokens per train batch (batch = tokens / T)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--fla_shapes", type=lambda s: tuple(map(int, s.split(","))), nargs="+",
                  default=[(4, 4, 1024, 64, 64), (1, 8, 4096, 128, 128)], help="B,H,T,K,V ...")
  ap.add_argument("--chunk", type=int, default=64)
  ap.add_argument("--set", nargs="+", default=[], help="config commands after each model's config:NAME "
                                                       "(train and decode), e.g. set:model.n_layers=2")
  ap.add_argument("--titans", type=lambda s: tuple(map(int, s.split(","))), default=(8, 512, 256, 4, 16, 2),
                  help="B,T,D,H,chunk,depth of the Titans LMM vs titans-pytorch step")
  ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="the sections to run")
  ap.add_argument("--decode", nargs="+", default=list(DECODE), help=f"decode: configs (with {DECODE[0]} and {BASE})")
  ap.add_argument("--context", type=int, nargs="+", default=[512, 4096], help="decode: prompt tokens")
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--oracle_python",
                  default=os.environ.get("PMEM_ORACLE_PYTHON", str(ROOT / ".venv-oracle/bin/python")))
  a = ap.parse_args(argv)
  if a.quick:
    a.mixers, a.lengths, a.tokens, a.repeats = [BASE, "linear_attn_tiny"], [64, 128], 256, 2
    a.fla_shapes, a.context, a.new_tokens, a.set = [(1, 2, 128, 16, 16)], [32, 64], 8, ["set:model.n_layers=1"]
    a.decode = list(DECODE[:2])
    a.titans = (1, 32, 32, 2, 8, 2)
  if BASE not in a.mixers or any(a.tokens % t for t in a.lengths):
    raise SystemExit(f"--mixers must include {BASE} and every --lengths T must divide --tokens")
  if not {DECODE[0], BASE} <= set(a.decode):
    raise SystemExit(f"--decode must include {DECODE[0]} and {BASE}")
  a.lengths = sorted(a.lengths)
  threads = len(os.sched_getaffinity(0))  # XLA:CPU's intra-op pool: one thread per usable CPU
  facts = machine(threads)
  res = {"machine": facts}
  print(f"{facts['cpu']}, {facts['cpus']} CPUs, XLA and torch threads {threads}, jax {facts['jax']}, "
        f"load average {facts['load_average']}")
  if "train" in a.only:
    records = train(a)
    over, crossover, flat = versus_attention(records, a.lengths)
    res |= {"train": records, "over_attention": over, "crossover": crossover, "flat": flat}
    lo, hi = a.lengths[0], a.lengths[-1]
    us = {(r["config"], r["T"]): r for r in records}
    head = " | ".join(f"T={t}" for t in a.lengths)
    print(f"\ntrain step (fwd + bwd + AdamW), {a.tokens} tokens per batch: µs per token (over attention), "
          f"median of {a.repeats}")
    print(f"| config | {head} | t{hi} / t{lo} | cheaper than attention from T |\n|---|" +
          "---|" * (len(a.lengths) + 2))
    for n in a.mixers:
      cells = [f"{us[n, t]['token_us']:.1f}" + ("" if n == BASE else f" ({over[n][t]:.2f})") for t in a.lengths]
      print(f"| {n} | {' | '.join(cells)} | {flat[n]:.2f} | {'' if n == BASE else crossover[n] or 'none'} |")
    print(f"\nXLA temp MiB of the compiled step\n| config | {head} |\n|---|" + "---|" * len(a.lengths))
    for n in a.mixers:
      mib = [f"{us[n, t]['temp_bytes'] / 2**20:.0f}" for t in a.lengths]
      print(f"| {n} | {' | '.join(mib)} |")
  if "fla" in a.only:
    res["fla"] = fla = versus_fla(a, threads)
    print(f"\nchunked Gated DeltaNet fwd + bwd (chunk {a.chunk}), pmem vs fla naive_chunk_gated_delta_rule "
          "(torch float32)\n| B, H, T, K, V | pmem ms | fla ms | fla / pmem | max rel diff |\n|---|---|---|---|---|")
    for r in fla:
      print(f"| {', '.join(map(str, r['shape'].values()))} | {1e3 * r['pmem_s']:.1f} | {1e3 * r['fla_s']:.1f} | "
            f"{r['fla_over_pmem']:.2f} | {max(r['max_rel_diff'].values()):.1e} |")
  if "titans" in a.only:
    res["titans"] = r = versus_titans(a, threads)
    print("\nTitans LMM layer fwd + bwd ({}), pmem vs titans-pytorch (torch float32)\n"
          "| | tokens/s | peak MiB |\n|---|---|---|".format(", ".join(f"{k}={v}" for k, v in r["shape"].items())))
    for k in ("pmem", "titans_pytorch"):
      print(f"| {k} | {r['tokens_per_s'][k]:,.0f} | {r['peak_bytes'][k] / 2**20:,.1f} |")
    print(f"pmem / titans-pytorch: tokens/s {r['speedup']:.2f}x, peak memory {r['peak_ratio']:.2f}x")
  if "decode" in a.only:
    res["decode"] = dec = decode(a)
    long = max(a.context)
    tps = {r["config"]: r["tokens_per_s"] for r in dec if r["context"] == long}
    res["decode_ratio"], res["decode_flat"] = tps["gdn_tiny"] / tps[BASE], decode_flat(dec)
    print(f"\ndecode, batch 1, {a.new_tokens} new tokens\n"
          "| config | context | decode tokens/s | prefill s | state bytes |\n|---|---|---|---|---|")
    for r in dec:
      print(f"| {r['config']} | {r['context']} | {r['tokens_per_s']:,.0f} | {r['prefill_s']:.2f} | {r['state_bytes']:,} |")
    print(f"gdn_tiny / tiny decode tokens/s at {long}: {res['decode_ratio']:.2f}; at {long} over {min(a.context)} "
          "tokens (tokens/s, state bytes): " + ", ".join(f"{n} {f['tokens_per_s']:.2f} / {f['state_bytes']:.2f}"
                                                       for n, f in res["decode_flat"].items()))

  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(res | {"config": vars(a)}, indent=1))

if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()

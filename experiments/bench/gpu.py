"""The prepared GPU run: every kernel against XLA, train-step MFU with and without memory modules, decode tokens/s.

    bash experiments/bench/gpu.sh [--dry-run] [--sections kernels,decode,train] [--models dense,stem,engram,pkm]
                                  [--remat dots_no_batch,dots] [--out FILE] [--budget-s 420]

Sections run in the order given (by default the cheapest first, so that a ``--budget-s`` cut drops train
rows), each wrapped so that one that breaks leaves the others to run:

- ``kernels``: :func:`kernels.gpu_check.main` as it is (each op x pallas_gpu / triton against XLA: max
  error, bit equality of two runs, median time and fraction of a measured copy's bandwidth); one row per
  record, its ``ok`` True / False / None read as passed / failed / skipped (the copy: a measurement, passed).
- ``train``: :class:`pmem.train.loop.Trainer`'s jitted, donated train step (AdamW; tables row-sparse where
  ``train.optim.tables.update=auto`` picks it) on one synthetic batch held on the device, for the dense
  decoder (vocab 32768, d 1024, 24 layers, 16 heads, SwiGLU d_ff 2816: 375.4M parameters as built) and for
  it with ``fiddler:stem``, ``fiddler:engram`` and ``fiddler:pkm(n_keys=256)``; bf16 compute
  (``model.dtype``; parameters and optimizer state float32), batch 16 x 2048 tokens. The dense model runs
  under each ``--remat`` policy, the memory models under the fastest. After :data:`WARMUP` steps (the first
  compiles: ``compile_s``) the median of 10 steps, each to ``block_until_ready``: ``tokens_per_s = B·T /
  median``; ``mfu = train_flops_per_token x tokens_per_s / peak`` with ``train_flops_per_token`` 3 x the
  forward FLOPs of the repo's accounting (:mod:`pmem.core.accounting`, summary.json's
  ``train_flops_per_token``: 2 per multiply-accumulate, causal attention at T/2 keys, lookups 0): model
  FLOPs, remat's recomputation uncounted. ``peak``: :data:`PEAK_BF16` by device_kind (else MFU null, why).
- ``decode``: greedy :class:`pmem.decode.Generator` on the dense model, batch 16, 128-token random
  prompts, 256 new tokens: decode tokens/s (``Generation.tokens_per_s``: prefill and compilation
  excluded) and prefill tokens/s, medians of 3 after a warm-up.

Batches hold random ids below the data's vocabulary (the byte tokenizer's 256: Engram hashes ids through
the tokenizer); a step's FLOPs do not depend on the ids. The data config has no corpus, only a passkey task
that is never read: nothing is loaded and no tokenizer trained.

Every row has a ``status``: ``passed``; ``skipped`` with a ``reason`` (unavailable here, out of device
memory, not started by ``--budget-s``); ``failed`` with an ``error`` (an exception, or a failed check: a
finite loss, every new token decoded). The JSON (``--out``, default ``$OUT/gpu.json`` when ``$OUT`` is set,
else ``runs/gpu.json``) is rewritten after every row, so a run cut short keeps what it measured: device_kind,
jax, the peak, and per section ``status``, ``wall_s`` and ``rows``. Exits 1 if a row failed.
``--dry-run``: every path at tiny sizes on any backend (d 64, 2 layers, vocab 256, 4 x 64 tokens, 2 timed
steps, 8 new tokens; gpu_check's own dry run), MFU null.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import fiddle as fdl
import jax
import numpy as np
from flax import nnx

import configs
from configs import cli
from kernels import common, gpu_check
from pmem.core import accounting
from pmem.decode import Generator
from pmem.models.decoder import REMAT_POLICIES, Decoder
from pmem.train.loop import Trainer, count_params

PEAK_BF16 = {  # jax device_kind -> dense bf16 FLOP/s without sparsity (vendor datasheets)
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
}
SIZES = {  # by --dry-run
    False: dict(vocab=32768, d_model=1024, n_layers=24, n_heads=16, d_ff=2816, seq_len=2048, batch=16, steps=10,
                decode_batch=16, prompt=128, new_tokens=256, reps=3),
    True: dict(vocab=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, seq_len=64, batch=4, steps=2,
               decode_batch=2, prompt=8, new_tokens=8, reps=1),
}
WARMUP = 2  # train steps before the clock; the first compiles
MEMORY = {"stem": "fiddler:stem", "engram": "fiddler:engram", "pkm": "fiddler:pkm(n_keys=256)"}
MODELS = ("dense", *MEMORY)
SHOW = ("tokens_per_s", "mfu", "max_err", "frac_of_peak")  # printed per row when present


class Skip(Exception):
  """A row that cannot run here; the message says why."""


def outcome(e: Exception) -> dict:
  """The status of a row that raised ``e``: skipped (:class:`Skip`, out of device memory) or failed."""
  text = f"{type(e).__name__}: {e}"
  if isinstance(e, Skip):
    return {"status": "skipped", "reason": str(e)}
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    return {"status": "skipped", "reason": f"out of memory: {text[:1000]}"}
  return {"status": "failed", "error": text[:2000], "traceback": "".join(traceback.format_exception(e))[-4000:]}


class Report:
  """The JSON as it fills, rewritten after every row."""

  def __init__(self, path: str, budget_s: float | None, head: dict):
    self.path, self.budget, self.t0, self.data = path, budget_s, time.perf_counter(), head

  def save(self) -> None:
    self.data["wall_s"] = time.perf_counter() - self.t0
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, "w") as f:
      json.dump(self.data, f, indent=1)

  def add(self, section: str, row: dict) -> dict:
    self.data[section]["rows"].append(row)
    self.save()
    detail = row.get("reason") or row.get("error") or " ".join(
        f"{k} {row[k]:.4g}" for k in SHOW if row.get(k) is not None)
    print(f"{row['status']:7s} {section:7s} {row['name']:36s} {detail}", flush=True)
    return row

  def row(self, section: str, name: str, fn: Callable[[], dict], **meta) -> dict:
    """``fn() -> measurements`` (with an ``error`` where a check failed) as a row of ``section``."""
    if self.budget and time.perf_counter() - self.t0 > self.budget:
      out = {"status": "skipped", "reason": f"not started within --budget-s {self.budget:g}"}
    else:
      try:
        m = fn()
        out = {"status": "failed" if "error" in m else "passed", **m}
      except Exception as e:  # one broken row must not hide the others
        out = outcome(e)
    return self.add(section, {"name": name, **meta, **out})

  def section(self, name: str, fn: Callable[["Report"], None]) -> None:
    s = self.data[name] = {"status": None, "wall_s": None, "rows": []}
    t = time.perf_counter()
    try:
      fn(self)
    except Exception as e:  # broke outside a row: one row for the section
      self.add(name, {"name": name, **outcome(e)})
    found = {r["status"] for r in s["rows"]}
    s["status"] = next((k for k in ("failed", "passed") if k in found), "skipped")
    s["wall_s"] = time.perf_counter() - t
    self.save()


def peak_flops(dry_run: bool) -> tuple[float | None, str | None]:
  """(peak bf16 FLOP/s of device 0, None) or (None, why there is none)."""
  d = jax.devices()[0]
  if dry_run:
    return None, f"dry run: no peak for {d.platform}"
  if d.device_kind not in PEAK_BF16:
    return None, f"no peak bf16 FLOP/s for device_kind {d.device_kind!r} in PEAK_BF16"
  return PEAK_BF16[d.device_kind], None


def commands(s: dict, *extra: str) -> list[str]:
  """Config commands of the decoder at sizes ``s`` (module docstring), then ``extra``."""
  return ["config:passkey_small", "set:data.tokenizer.kind=byte", "set:data.prefetch=0",
          f"set:model.vocab={s['vocab']}", f"set:model.d_model={s['d_model']}", f"set:model.n_layers={s['n_layers']}",
          f"set:model.sequence_mixer.n_heads={s['n_heads']}", f"set:model.sequence_mixer.n_kv_heads={s['n_heads']}",
          f"set:model.channel_mixer.d_ff={s['d_ff']}", "set:model.dtype=bfloat16",
          f"set:train.seq_len={s['seq_len']}", f"set:train.batch_size={s['batch']}", *extra]


def synthetic(b: int, t: int, vocab: int) -> dict[str, np.ndarray]:
  """``b`` whole documents of ``t`` random ids in ``[0, vocab)``, every target in the loss."""
  ids = np.random.default_rng(0).integers(0, vocab, (b, t + 1), dtype=np.int32)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((b, t), np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": np.ones((b, t), np.float32)}


def train_step(s: dict, peak: tuple[float | None, str | None], cmds: list[str]) -> dict:
  """Median train-step time and MFU of the model ``cmds`` configure (module docstring)."""
  configs.load_all()
  if absent := [c for c in cmds if c.startswith("fiddler:") and c[8:].split("(")[0] not in configs.FIDDLERS]:
    raise Skip(f"{absent[0]} is not registered in this checkout")
  gc.collect()  # the previous row's trainer may sit in reference cycles: free its device buffers first
  trainer = Trainer(fdl.build(cli.build_config(cmds)))
  b, t = s["batch"], s["seq_len"]
  batch = trainer.to_device(trainer.featurize(synthetic(b, t, trainer.data.vocab)), trainer.rows)
  times = []
  with jax.set_mesh(trainer.mesh):
    for _ in range(WARMUP + s["steps"]):
      t0 = time.perf_counter()
      trainer.train_state, m = trainer.step_fn(trainer.train_state, batch)
      jax.block_until_ready((trainer.train_state, m))
      times.append(time.perf_counter() - t0)
  step_s, flops, loss = statistics.median(times[WARMUP:]), accounting.train_flops(trainer.cost), float(m["loss"])
  tps = b * t / step_s
  out = {"commands": cmds, "params": trainer.params_total, "active_params_per_token": trainer.cost.active_params,
         "flops_per_token": trainer.cost.flops, "train_flops_per_token": flops, "batch": b, "seq_len": t,
         "compile_s": times[0], "step_s": times[WARMUP:], "median_step_s": step_s, "tokens_per_s": tps,
         "mfu": None if peak[0] is None else flops * tps / peak[0], "loss": loss}
  if peak[0] is None:
    out["mfu_reason"] = peak[1]
  if not math.isfinite(loss):
    out["error"] = f"loss {loss} after {len(times)} steps"
  return out


def decode(s: dict) -> dict:
  """Greedy decode and prefill tokens/s of the dense model (module docstring)."""
  cmds = commands(s)
  model = Decoder(fdl.build(cli.build_config(cmds).model), rngs=nnx.Rngs(0))
  b, p, n = s["decode_batch"], s["prompt"], s["new_tokens"]
  prompts = np.random.default_rng(1).integers(0, s["vocab"], (b, p)).tolist()
  gen = Generator(model, max_len=p + n)
  first = gen.generate(prompts, n)  # warm-up (compiled before its clock starts)
  runs = [gen.generate(prompts, n) for _ in range(s["reps"])]
  out = {"commands": cmds, "params": count_params(nnx.state(model, nnx.Param)), "batch": b, "prompt_len": p,
         "new_tokens": n, "tokens_per_s": statistics.median(g.tokens_per_s for g in runs),
         "runs_tokens_per_s": [g.tokens_per_s for g in runs],
         "prefill_tokens_per_s": b * p / statistics.median(g.prefill_s for g in runs),
         "same_tokens_each_run": all(np.array_equal(x, y) for g in runs for x, y in zip(g.tokens, first.tokens))}
  if short := sorted({len(x) for g in (first, *runs) for x in g.tokens} - {n}):
    out["error"] = f"rows of {short} new tokens, not {n}"
  return out


def check_kernels(rep: Report, a: argparse.Namespace) -> None:
  """kernels.gpu_check's records as rows."""
  plat = common.platform()
  if plat != "gpu" and not a.dry_run:
    raise Skip(f"gpu_check needs a GPU (default backend: {plat}); --dry-run runs its tiny sizes")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "gpu_check.json")
    gpu_check.main(["--out", path] + ["--dry-run"] * a.dry_run)  # its exit code is any(ok is False)
    with open(path) as f:
      records = json.load(f)
  for r in records:
    ok, why = r.pop("ok", True), r.pop("skipped", None)  # the copy bandwidth record has no check
    row = {"name": f"{r['op']}/{r['implementation']}", "status": {True: "passed", False: "failed", None: "skipped"}[ok],
           **r}
    if why:
      row["reason"] = why
    if ok is False:
      row.setdefault("error", f"max_err {r['max_err']:.3g} over the tolerance {gpu_check.TOL[r['dtype']]:g}")
    rep.add("kernels", row)


def time_train(rep: Report, a: argparse.Namespace) -> None:
  """The dense model under each ``--remat`` policy, then each memory model under the fastest (the first
  policy when no dense row was timed)."""
  s = SIZES[a.dry_run]

  def row(name: str, remat: str, *extra: str) -> dict:
    cmds = commands(s, f"fiddler:remat(policy={remat!r})", *extra)
    return rep.row("train", f"{name} remat={remat}", lambda: train_step(s, a.peak, cmds), model=name, remat=remat)

  dense = [row("dense", p) for p in a.remat] if "dense" in a.models else []
  timed = [r for r in dense if r["status"] == "passed"]
  best = max(timed, key=lambda r: r["tokens_per_s"])["remat"] if timed else a.remat[0]
  rep.data["train"]["remat"] = best
  for name in a.models:
    if name != "dense":
      row(name, best, MEMORY[name])


def time_decode(rep: Report, a: argparse.Namespace) -> None:
  rep.row("decode", "dense", lambda: decode(SIZES[a.dry_run]), model="dense")


SECTIONS = {"kernels": check_kernels, "decode": time_decode, "train": time_train}  # default order: cheapest first


def names(choices) -> Callable[[str], list[str]]:
  """An argparse type: a comma-separated list of ``choices``."""
  def parse(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out or any(x not in choices for x in out):
      raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
    return out
  return parse


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", help="JSON file (default $OUT/gpu.json, else runs/gpu.json)")
  p.add_argument("--dry-run", action="store_true", help="tiny sizes on any backend; MFU null")
  p.add_argument("--sections", type=names(SECTIONS), default=list(SECTIONS), help="run these, in this order")
  p.add_argument("--models", type=names(MODELS), default=list(MODELS), help="train rows")
  p.add_argument("--remat", type=names(REMAT_POLICIES), default=["dots_no_batch", "dots"],
                 help="the dense model's policies; the memory models take the fastest")
  p.add_argument("--budget-s", type=float, default=420, help="rows not started by then are skipped (0: no limit)")
  a = p.parse_args(argv)
  out = a.out or os.path.join(os.environ.get("OUT", "runs"), "gpu.json")
  a.peak = peak_flops(a.dry_run)
  d = jax.devices()[0]
  head = {"device_kind": d.device_kind, "platform": d.platform, "devices": jax.device_count(), "jax": jax.__version__,
          "dry_run": a.dry_run, "argv": sys.argv[1:] if argv is None else argv, "peak_bf16_flops": a.peak[0],
          "peak_reason": a.peak[1],
          **{n: {"status": "skipped", "reason": "not in --sections", "rows": []} for n in SECTIONS}}
  print(f"platform {d.platform} ({d.device_kind}), jax {jax.__version__}, peak {a.peak[0] or a.peak[1]}", flush=True)
  rep = Report(out, a.budget_s, head)
  for name in a.sections:
    rep.section(name, lambda r: SECTIONS[name](r, a))
  failed = [n for n in a.sections if rep.data[n]["status"] == "failed"]
  rep.data["ok"] = not failed
  rep.save()
  print(f"wrote {out}; " + (f"FAILED: {', '.join(failed)}" if failed else "no row failed"), flush=True)
  return int(bool(failed))


if __name__ == "__main__":
  sys.exit(main())

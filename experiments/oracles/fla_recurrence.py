"""flash-linear-attention (fla 0.6.0) naive recurrences as a float64 oracle for ``pmem/layers/recurrence.py``;
runs under the Python 3.11 oracle venv (torch CPU).

  fla_recurrence.py IN.npz OUT.npz   IN: per case ``CASE/q, CASE/k [B, T, H, K]``, ``CASE/v [B, T, H, V]``,
                                     optional ``CASE/a`` (log decay), ``CASE/beta [B, T, H]``, ``CASE/S0
                                     [B, H, K, V]``; OUT: ``CASE/o [B, T, H, V]``, ``CASE/S [B, H, K, V]``.
  fla_recurrence.py bench IN.npz OUT.npz   fla's chunkwise gated delta rule (``naive_chunk_gated_delta_rule``,
                                     float32, torch autograd) forward + backward for ``experiments/bench/mixers.py``.
                                     IN: per shape ``SHAPE/{q, k, v, a, beta}`` (float32, as above) plus the cotangents
                                     ``SHAPE/do``, ``SHAPE/dS``, and ``chunk``, ``threads`` (torch intra-op
                                     threads); OUT (written before ``ready``): ``SHAPE/{o, S}`` and the gradients
                                     ``SHAPE/d{q, k, v, a, beta}`` of ``Σ o·do + Σ S·dS``. After ``ready`` each
                                     stdin line ``SHAPE`` runs one forward + backward and prints its seconds;
                                     ``quit`` exits.

The case's arrays pick the recurrence: no beta: GLA (``naive_recurrent_gla``, ``a [B, T, H, K]``); beta
without a: the delta rule (``delta_rule_recurrence``, no decay); beta and a: the gated delta rule
(``naive_recurrent_gated_delta_rule``, ``a [B, T, H]``). fla scales q by K^-0.5 (GLA and the delta rule
fix it: q is multiplied by sqrt(K) first; the gated delta rule takes ``scale=1``) and casts to float32
inside; :class:`Float64` turns every float32 there into float64. ``import fla.ops`` needs triton, so the
naive files load by path.
"""

import importlib.util
import pathlib
import sys
import time

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

FLA = pathlib.Path(importlib.util.find_spec("fla").submodule_search_locations[0]) / "ops"  # finds, does not import


def load(rel: str, name: str):
  spec = importlib.util.spec_from_file_location(f"fla_naive_{rel.split('/')[0]}", FLA / rel)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return getattr(mod, name)


gla = load("gla/naive.py", "naive_recurrent_gla")
delta = load("delta_rule/naive.py", "delta_rule_recurrence")
gated_delta = load("gated_delta_rule/naive.py", "naive_recurrent_gated_delta_rule")
chunk_gated_delta = load("gated_delta_rule/naive.py", "naive_chunk_gated_delta_rule")


class Float64(TorchFunctionMode):
  """float32 → float64 in every torch call (``.float()``, ``.to(torch.float32)``, ``dtype=torch.float``)."""

  def __torch_function__(self, func, types, args=(), kwargs=None):
    if func is torch.Tensor.float:
      return args[0].double()
    swap = lambda x: torch.float64 if x is torch.float32 else x
    return func(*map(swap, args), **{n: swap(x) for n, x in (kwargs or {}).items()})


def run(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
  q, k, v = x["q"], x["k"], x["v"]
  s0, sqrt_k = x.get("S0"), q.shape[-1] ** 0.5
  if "beta" not in x:  # GLA: [B, T, H, K], scale K^-0.5 fixed
    return gla(q * sqrt_k, k, v, x["a"], initial_state=s0, output_final_state=True)
  if "a" not in x:  # the delta rule: [B, H, T, K], scale K^-0.5 fixed
    tr = lambda y: y.transpose(1, 2)
    o, s = delta(tr(q * sqrt_k), tr(k), tr(v), tr(x["beta"]), initial_state=s0, output_final_state=True)
    return tr(o), s
  return gated_delta(q, k, v, x["beta"], x["a"], scale=1.0, initial_state=s0, output_final_state=True)


def main(inp: str, out: str) -> None:
  data = np.load(inp)
  cases: dict[str, dict] = {}
  for key in data.files:
    case, name = key.split("/")
    cases.setdefault(case, {})[name] = torch.from_numpy(data[key].astype(np.float64))
  res = {}
  torch.set_default_dtype(torch.float64)
  with torch.no_grad(), Float64():
    for case, x in cases.items():
      o, s = run(x)
      assert o.dtype == s.dtype == torch.float64, (case, o.dtype, s.dtype)
      res[f"{case}/o"], res[f"{case}/S"] = o.numpy(), s.numpy()
  np.savez(out, **res)


GRADS = ("q", "k", "v", "a", "beta")


def chunk_fwd_bwd(x: dict, chunk: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
  """``(o, S, gradients of Σ o·do + Σ S·dS w.r.t. GRADS)`` of fla's chunkwise form (q unscaled)."""
  leaves = [x[n].detach().requires_grad_() for n in GRADS]
  q, k, v, a, beta = leaves
  o, s = chunk_gated_delta(q, k, v, a, beta, chunk_size=chunk, scale=1.0, output_final_state=True)
  grads = torch.autograd.grad((o * x["do"]).sum() + (s * x["dS"]).sum(), leaves)
  return o, s, grads


def bench(inp: str, out: str) -> None:
  data = np.load(inp)
  torch.set_num_threads(int(data["threads"]))
  chunk, shapes = int(data["chunk"]), {}
  for key in data.files:
    if "/" in key:
      shape, name = key.split("/")
      shapes.setdefault(shape, {})[name] = torch.from_numpy(data[key])
  res = {}
  for shape, x in shapes.items():
    o, s, grads = chunk_fwd_bwd(x, chunk)
    res |= {f"{shape}/o": o.detach().numpy(), f"{shape}/S": s.detach().numpy()}
    res |= {f"{shape}/d{n}": g.numpy() for n, g in zip(GRADS, grads)}
  np.savez(out, **res)
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    t0 = time.perf_counter()
    chunk_fwd_bwd(shapes[line.strip()], chunk)
    print(f"{time.perf_counter() - t0:.6f}", flush=True)


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "bench":
    bench(sys.argv[2], sys.argv[3])
  elif len(sys.argv) == 3:
    main(sys.argv[1], sys.argv[2])
  else:
    raise SystemExit(__doc__)

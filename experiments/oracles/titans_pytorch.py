"""lucidrains' ``titans-pytorch`` 0.5.5 ``NeuralMemory`` as a float64 oracle for ``pmem/memory/titans.py``'s memory
(the reads ``y_t = M_{W_t}(q_t)`` per head, before pmem's output norm and gate); runs under the oracle venv (torch CPU).

  titans_pytorch.py IN.npz OUT.npz          IN: per case ``CASE/{x [B, T, D], wq, wk, wv [D, H·K], w_gates [D, 3H]
                                            (columns θ, η, α, each per head), b_gates [3H], W0_<i> [H, d_in, d_out],
                                            chunk, momentum, max_lr}`` (pmem's parameters; ``D = H·K``); OUT:
                                            ``CASE/y [B, T, H, K]``, and ``CASE/y_default``: the same weights
                                            in titans-pytorch's default chunking (``chunk_size = c``,
                                            ``batch_size=None``), which the test shows differs
  titans_pytorch.py bench IN.npz OUT.npz    IN: ``x [B, T, D], dy [B, T, D]`` (float32), ``heads, chunk, depth,
                                            expand, threads``; OUT (written before ``ready``): ``peak_bytes`` (the
                                            most bytes torch held during one step beyond its inputs: the profiler's
                                            allocation and free events, summed in time order); then each ``step`` line on
                                            stdin runs one forward + backward of ``Σ y·dy`` w.r.t. every parameter
                                            and prints its seconds; ``quit`` exits

How pmem's semantics (module docstring of pmem/memory/titans.py) are configured in titans-pytorch:
- pmem's memory chunk ``c`` (gradients at the weights of the chunk's start, per-token momentum, forgetting and
  read) is titans-pytorch's ``batch_size = c`` (its TTT mini-batch: the weights are set to the last update every
  ``c`` tokens) with ``chunk_size = 1`` (its chunk is the granularity of the gates, pooled by a chunk mean, of the
  momentum / decay scans and of the reads, which use the weights of the previous chunk: per token here). Its
  default (``batch_size=None``) takes every gradient at the initial weights;
- ``θ_t, η_t, α_t``: its ``to_adaptive_step`` (× ``max_lr``), ``to_momentum``, ``to_decay_factor`` (a sigmoid of a
  linear map of the token, pmem's ``w_gates`` / ``b_gates`` columns); ``momentum=False``: no momentum scan;
- the loss ``‖M(k) − v‖²``: ``store_memory_loss_fn`` a sum over features (its default is the mean);
- q, k L2-normalised (``x / sqrt(Σx² + 1e-6)``): its ``qk_rmsnorm`` (``RMSNorm(x)·(γ + 1)``) with ``γ + 1 = K^-½``
  and the RMSNorm's eps ``1e-6 / K``; no pre-RMSNorm of the input, no post-RMSNorm, no residual LayerNorm around
  the memory (pmem's ``residual_norm`` keeps its gain and bias out of the memory; titans-pytorch's ``γ`` is a memory
  weight, trained by the inner loop), no gradient clipping (its ``max_grad_norm`` is a tanh soft clamp per weight
  matrix, pmem's a hard clip over the head's weights);
- the memory: its ``MemoryMLP`` with the tanh GELU (``jax.nn.gelu``'s default; its own is erf), ``W0`` per head
  (``per_head_learned_parameters``);
- heads > 1: the read's gate ``σ(x W_r)`` with ``W_r = 0`` (½) and ``combine_heads = 2·I``, so the output is the
  heads' reads side by side.
"""

import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # this file's name is the package's
from titans_pytorch import MemoryMLP, NeuralMemory  # noqa: E402


class TanhMLP(MemoryMLP):
  """``MemoryMLP`` with ``jax.nn.gelu``'s tanh GELU between the layers."""

  def forward(self, x):
    for i, w in enumerate(self.weights):
      x = (F.gelu(x, approximate="tanh") if i else x) @ w
    return x


def build(d: int, heads: int, depth: int, expand: float, chunk: int, momentum: bool, max_lr: float,
          default: bool = False) -> NeuralMemory:
  """titans-pytorch's ``NeuralMemory`` with pmem's semantics (module docstring; ``default``: its own chunking,
  ``chunk_size = chunk`` without a ``batch_size``); weights at its init."""
  k = d // heads
  m = NeuralMemory(d, chunk_size=chunk if default else 1, batch_size=None if default else chunk, dim_head=k,
                   heads=heads, model=TanhMLP(k, depth, expand),
                   store_memory_loss_fn=lambda y, v: (y - v).pow(2).sum(-1), default_step_transform_max_lr=max_lr,
                   momentum=momentum, pre_rmsnorm=False, qk_rmsnorm=True, max_grad_norm=None,
                   mem_model_norm_add_residual=False)
  with torch.no_grad():
    for norm in (m.q_norm, m.k_norm):
      norm.gamma.fill_(k ** -0.5 - 1.0)
      norm.rmsnorm.eps = 1e-6 / k
  return m


def load(m: NeuralMemory, w: dict, heads: int) -> None:
  """pmem's parameters into ``m`` (``Linear.weight`` is ``[out, in]``)."""
  T = lambda a: torch.from_numpy(np.ascontiguousarray(a.T))  # noqa: E731
  h = heads
  with torch.no_grad():
    for lin, name in ((m.to_queries, "wq"), (m.to_keys, "wk"), (m.to_values, "wv")):
      lin.weight.copy_(T(w[name]))
    gates = (m.to_adaptive_step[0], m.to_momentum[0] if m.to_momentum is not None else None, m.to_decay_factor[0])
    for i, lin in enumerate(gates):
      if lin is not None:
        lin.weight.copy_(T(w["w_gates"][:, i * h:(i + 1) * h]))
        lin.bias.copy_(torch.from_numpy(w["b_gates"][i * h:(i + 1) * h]))
    for i in range(len(m.memory_model_parameters)):  # its init is one weight expanded over the heads: replaced
      m.memory_model_parameters[i] = torch.nn.Parameter(torch.from_numpy(w[f"W0_{i}"]).clone())
    if h > 1:
      m.retrieve_gate[0].weight.zero_()
      m.combine_heads.weight.copy_(2.0 * torch.eye(m.combine_heads.weight.shape[0]))


def main(inp: str, out: str) -> None:
  data = np.load(inp)
  cases = {}
  for key in data.files:
    case, name = key.split("/")
    cases.setdefault(case, {})[name] = data[key]
  res = {}
  torch.set_default_dtype(torch.float64)
  for case, w in cases.items():
    b, t, d = w["x"].shape
    heads, depth = w["b_gates"].shape[0] // 3, sum(n.startswith("W0_") for n in w)
    expand = w["W0_0"].shape[-1] / w["W0_0"].shape[-2] if depth > 1 else 1.0
    for default, name in ((False, "y"), (True, "y_default")):
      m = build(d, heads, depth, expand, int(w["chunk"]), bool(w["momentum"]), float(w["max_lr"]), default).double()
      load(m, w, heads)
      with torch.no_grad():
        y, _ = m(torch.from_numpy(w["x"]))
      res[f"{case}/{name}"] = y.numpy().reshape(b, t, heads, d // heads)
  np.savez(out, **res)


def bench(inp: str, out: str) -> None:
  data = np.load(inp)
  torch.set_num_threads(int(data["threads"]))
  torch.manual_seed(0)
  x, dy = (torch.from_numpy(data[n]) for n in ("x", "dy"))
  m = build(x.shape[-1], int(data["heads"]), int(data["depth"]), float(data["expand"]), int(data["chunk"]), True, 1.0)
  params = [p for p in m.parameters() if p.requires_grad]

  def step():
    y, _ = m(x)
    return torch.autograd.grad((y * dy).sum(), params, allow_unused=True)  # the template MLP's own weights are unused

  step()  # warm-up
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
  trace = out + ".trace.json"
  prof.export_chrome_trace(trace)
  with open(trace) as f:
    events = json.load(f)["traceEvents"]
  os.remove(trace)
  live = peak = 0
  for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
    live += e["args"]["Bytes"]
    peak = max(peak, live)
  np.savez(out, peak_bytes=peak)
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    t0 = time.perf_counter()
    step()
    print(f"{time.perf_counter() - t0:.6f}", flush=True)


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "bench":
    bench(sys.argv[2], sys.argv[3])
  elif len(sys.argv) == 3:
    main(sys.argv[1], sys.argv[2])
  else:
    raise SystemExit(__doc__)

"""fla 0.6.0's naive Titans (``fla/ops/titans/naive.py``: a linear memory ``M [D, D]`` per head inside
``x + LN(x M)·w + b``) as a float64 oracle for ``pmem/memory/titans.py``; runs under the oracle venv (torch CPU).

  fla_titans.py IN.npz OUT.npz   IN: ``q, k, v [B, T, H, D]``, ``theta, eta, alpha [B, T, H]``, ``w, b [H, D]``,
                                 ``M0 [B, H, D, D]``, ``chunk``; OUT: ``{loop, chunk}/{o [B, T, H, D], M [B, H, D, D],
                                 o_unrepaired}`` from ``titans_linear`` (the token loop) and ``chunk_titans_linear``
                                 (its chunked dual form).

The file has two defects, which this oracle repairs in the source text before running it (each replacement must
match, else it stops):
- the LayerNorm backward reads ``D * grad - grad.sum(-1, keepdim=True) / (rstd * D)``: the parenthesis is missing
  (``(D * grad - grad.sum(...)) / (rstd * D)``), so the update is not the gradient of the loss it writes;
- the read is ``o + LN(o)·w + b`` with ``o = q M``, while the memory it trains is ``k + LN(k M)·w + b``: the read's
  residual is made ``q``, the trained memory's.
``o_unrepaired``: the unrepaired file's outputs, which the test shows differ. The file loads by path (``import
fla.ops`` needs triton); :class:`Float64` turns its float32 casts into float64.
"""

import sys

import numpy as np
import torch

from fla_recurrence import FLA, Float64, load as load_fla

LN_BACKWARD = ("v_new = D * grad - grad.sum(-1, keepdim=True) / (rstd * D)",
               "v_new = (D * grad - grad.sum(-1, keepdim=True)) / (rstd * D)")
READ = "output_t = output_t + (output_t - mean) / rstd * w + b"


def load(repaired: bool) -> dict:
  """The namespace of ``titans/naive.py`` (its ``log_impl`` import served by path), repaired or not."""
  src = (FLA / "titans/naive.py").read_text()
  imp = "from fla.ops.titans.log_impl import combine_params_log\n"
  assert imp in src, "fla titans/naive.py is not the 0.6.0 text"
  src = src.replace(imp, "")
  if repaired:
    assert src.count(LN_BACKWARD[0]) == 2 and src.count(READ) == 2, "fla titans/naive.py is not the 0.6.0 text"
    src = src.replace(*LN_BACKWARD)
    loop, chunk = src.split("def chunk_titans_linear(", 1)
    src = loop.replace(READ, READ.replace("output_t +", "q_t +", 1)) + "def chunk_titans_linear(" + \
        chunk.replace(READ, READ.replace("output_t +", "q_i +", 1), 1)
  ns = {"__name__": f"fla_titans_naive_{repaired}", "combine_params_log": load_fla("titans/log_impl.py",
                                                                                  "combine_params_log")}
  exec(compile(src, str(FLA / "titans/naive.py"), "exec"), ns)
  return ns


def main(inp: str, out: str) -> None:
  x = {n: torch.from_numpy(np.asarray(a, np.float64)) for n, a in np.load(inp).items()}
  c = int(x.pop("chunk"))
  gate = lambda n: x[n][..., None]  # noqa: E731  [B, T, H, 1]
  res = {}
  torch.set_default_dtype(torch.float64)
  with torch.no_grad(), Float64():
    for repaired in (True, False):
      ns = load(repaired)
      for form, chunked in (("loop", False), ("chunk", True)):
        o, M = ns["chunk_titans_linear_ref"](x["q"], x["k"], x["v"], x["w"], x["b"], gate("theta"), gate("alpha"),
                                           gate("eta"), 1e-6, c, x["M0"].clone(), True, use_chunk=chunked)
        if repaired:
          res[f"{form}/o"], res[f"{form}/M"] = o.numpy(), M.numpy()
        else:
          res[f"{form}/o_unrepaired"] = o.numpy()
  np.savez(out, **res)


if __name__ == "__main__":
  main(*sys.argv[1:3])

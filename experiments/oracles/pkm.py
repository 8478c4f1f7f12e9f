"""lucidrains ``product-key-memory`` (0.3.0) PKM oracle; runs under the Python 3.11 oracle venv (torch CPU).

  pkm.py forward IN.npz OUT.npz   IN: config (JSON: dim, heads, num_keys, topk, dim_head) and the
                                  weights under lucidrains' names (to_queries, norm_weight, norm_bias,
                                  keys, values), x [B, T, dim]; OUT: y [B, T, dim] (LayerNorm queries,
                                  softmax gate, EmbeddingBag sum: the defaults)
  pkm.py bench CONFIG_JSON B T    then one line per command on stdin: ``step`` runs one forward +
                                  backward + Adam step of all parameters and prints its seconds;
                                  ``quit`` exits.
"""

import json
import sys
import time

import numpy as np
import torch
from product_key_memory import PKM


def build(cfg: dict) -> PKM:
  return PKM(cfg["dim"], heads=cfg["heads"], num_keys=cfg["num_keys"], topk=cfg["topk"], dim_head=cfg["dim_head"])


def forward(inp: str, out: str) -> None:
  data = np.load(inp)
  m = build(json.loads(str(data["config"]))).eval()
  t = lambda name: torch.from_numpy(np.ascontiguousarray(data[name]))
  with torch.no_grad():
    m.to_queries.weight.copy_(t("to_queries"))
    m.norm.weight.copy_(t("norm_weight"))
    m.norm.bias.copy_(t("norm_bias"))
    m.keys.copy_(t("keys"))
    m.values.weight.copy_(t("values"))
    y = m(t("x"))
  np.savez(out, y=y.numpy())


def bench(cfg_json: str, b: int, t: int) -> None:
  torch.manual_seed(0)
  cfg = json.loads(cfg_json)
  m = build(cfg).train()
  opt = torch.optim.Adam(m.parameters(), lr=1e-3)
  x = torch.randn(b, t, cfg["dim"])
  target = torch.randn(b, t, cfg["dim"])
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    t0 = time.perf_counter()
    loss = ((m(x) - target) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(f"{time.perf_counter() - t0:.6f} {loss.item():.6f}", flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "forward":
    forward(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == "bench":
    bench(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  else:
    raise SystemExit(__doc__)

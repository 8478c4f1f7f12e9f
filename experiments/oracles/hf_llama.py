"""HF transformers LlamaForCausalLM oracle; runs under the Python 3.11 oracle venv (torch CPU).

  hf_llama.py logits IN.npz OUT.npz   IN: config (JSON string), input_ids, weights under HF keys
  hf_llama.py bench CONFIG_JSON B T   then one line per command on stdin: ``step`` runs one
                                      fwd+bwd+AdamW step and prints its seconds; ``quit`` exits.
"""

import json
import sys
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build(cfg: dict, attn: str) -> LlamaForCausalLM:
  cfg = dict(cfg)
  theta = cfg.pop("rope_theta")
  config = LlamaConfig(**cfg, attn_implementation=attn)
  if getattr(config, "rope_parameters", None) is not None:  # transformers >= 5
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
  else:
    config.rope_theta = theta
  return LlamaForCausalLM(config)


def load(data, cfg: dict, attn: str) -> LlamaForCausalLM:
  """The model of ``cfg`` with the ``w:``-prefixed weights of an .npz, every weight matched (a tied
  model's lm_head is its embedding)."""
  model = build(cfg, attn).eval()
  sd = {k[2:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("w:")}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  tied = ["lm_head.weight"] if cfg.get("tie_word_embeddings") else []
  missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq") and m not in tied]
  if missing or unexpected:
    raise SystemExit(f"weight mismatch: missing {missing}, unexpected {unexpected}")
  return model


def logits(inp: str, out: str) -> None:
  data = np.load(inp)
  model = load(data, json.loads(str(data["config"])), "eager")
  with torch.no_grad():
    y = model(torch.from_numpy(data["input_ids"]).long()).logits
  np.savez(out, logits=y.float().numpy())


def bench(cfg_json: str, b: int, t: int) -> None:
  torch.manual_seed(0)
  cfg = json.loads(cfg_json)
  model = build(cfg, "sdpa").train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  ids = torch.randint(0, cfg["vocab_size"], (b, t))
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    t0 = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(f"{time.perf_counter() - t0:.6f} {loss.item():.4f}", flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "logits":
    logits(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == "bench":
    bench(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  else:
    raise SystemExit(__doc__)

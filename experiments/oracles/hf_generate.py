"""HF transformers LlamaForCausalLM greedy ``generate`` on request; runs under the oracle venv (torch CPU).

  hf_generate.py bench IN.npz   IN: config (JSON string), weights under ``w:`` + HF keys,
                                ``prompts_<B>`` (int [B, P], one per batch size), threads (torch
                                intra-op threads). After ``ready``, each stdin line ``B N`` runs
                                ``generate`` on prompts_<B> with max_new_tokens = min_new_tokens = N
                                and prints its decode seconds, its total seconds, then the B·N new
                                tokens (row-major); ``quit`` exits.

Decode seconds: from the first new token to the last (the ``N − 1`` steps after the prefill's),
stamped by a stopping criterion that ``generate`` calls after each new token and that never stops.
The model has no EOS token (``eos_token_id=None``), so generation never stops early and no logits
processor masks a token. SDPA attention, the default dynamic KV cache (``use_cache=True``), greedy.
"""

import json
import sys
import time

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_llama import load


class Stamps(StoppingCriteria):
  """The time of each new token; never stops."""

  def __init__(self):
    self.t: list[float] = []

  def __call__(self, input_ids, scores, **kwargs):
    self.t.append(time.perf_counter())
    return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def bench(inp: str) -> None:
  data = np.load(inp)
  torch.set_num_threads(int(data["threads"]))
  cfg = json.loads(str(data["config"])) | {"eos_token_id": None, "bos_token_id": None, "pad_token_id": None}
  model = load(data, cfg, "sdpa")
  prompts = {int(k.split("_")[1]): torch.from_numpy(data[k]).long() for k in data.files if k.startswith("prompts_")}
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    b, n = map(int, line.split())
    ids, stamps = prompts[b], Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
      y = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                         max_new_tokens=n, min_new_tokens=n, stopping_criteria=StoppingCriteriaList([stamps]))
    total = time.perf_counter() - t0
    print(f"{stamps.t[-1] - stamps.t[0]:.6f} {total:.6f}", *y[:, ids.shape[1]:].flatten().tolist(), flush=True)


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] != "bench":
    raise SystemExit(__doc__)
  bench(sys.argv[2])

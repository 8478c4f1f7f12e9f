"""Small random Hugging Face checkpoints and their outputs; runs under the oracle venv (torch CPU).

  hf_models.py make DIR IN.npz OUT.npz     writes DIR/<name>/ for each model of MODELS with
                                           ``save_pretrained`` (config.json, model.safetensors, or
                                           shards and their index) and a tokenizer.json
  hf_models.py run DIR... IN.npz OUT.npz   the outputs of checkpoint directories (``from_pretrained``)

IN: ``input_ids`` (int [B, T]), ``prompt`` (int [1, P]), ``new`` (tokens to generate). OUT, per model
(``make``: its name; ``run``: the directory's index): ``logits_<key>`` (float32 [B, T, V], computed in
float32 whatever the stored dtype) and ``generated_<key>`` (int [1, new]: greedy ``generate``, no
EOS). Weights are redrawn at unit scale (norm scales around 1, biases nonzero) so logits are O(1)
and greedy choices are not near-ties; outputs are computed on the saved directories.
"""

import json
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 300
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # generation never stops early
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-5, **NO_SPECIAL)
# name -> (model class, config, stored dtype, save_pretrained max_shard_size)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SMALL, num_hidden_layers=3, head_dim=32, tie_word_embeddings=False),
              torch.float32, None),
    "llama_tied_bf16": (LlamaForCausalLM, LlamaConfig(**SMALL, num_hidden_layers=2, tie_word_embeddings=True),
                        torch.bfloat16, None),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SMALL, num_hidden_layers=3, tie_word_embeddings=False,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              torch.float32, "150KB"),
}
TEXT = ["To be, or not to be, that is the question.", "In the beginning God created the heaven and the earth.",
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife.", "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune."]


def tokenizer() -> Tokenizer:
  """A byte-level BPE of at most VOCAB tokens (one special) trained on TEXT."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
  return tok


def redraw(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      r = torch.randn(p.shape, generator=g)
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.3 * r)
      elif name.endswith("bias"):
        p.copy_(0.5 * r)
      else:  # [out, in] projections and [V, d] embeddings at 1 / sqrt(in) (tied logits O(1) too)
        p.copy_(r / p.shape[1] ** 0.5)


def outputs(directory: str, data, key: str) -> dict:
  """The logits and greedy continuation of a checkpoint directory loaded in float32."""
  model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(data["input_ids"]).long()).logits
    prompt, n = torch.from_numpy(data["prompt"]).long(), int(data["new"])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n)
  return {f"logits_{key}": logits.float().numpy(), f"generated_{key}": out[:, prompt.shape[1]:].numpy()}


def make(root: str, inp: str, out: str) -> None:
  data, result, tok = np.load(inp), {}, tokenizer()
  for i, (name, (cls, config, dtype, shard)) in enumerate(MODELS.items()):
    torch.manual_seed(i)
    model = cls(config)
    redraw(model, i)
    path = os.path.join(root, name)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tok.save(os.path.join(path, "tokenizer.json"))
    result |= outputs(path, data, name)
  np.savez(out, names=json.dumps(list(MODELS)), **result)


def run(dirs: list[str], inp: str, out: str) -> None:
  data = np.load(inp)
  np.savez(out, **{k: v for i, d in enumerate(dirs) for k, v in outputs(d, data, str(i)).items()})


if __name__ == "__main__":
  if len(sys.argv) == 5 and sys.argv[1] == "make":
    make(*sys.argv[2:])
  elif len(sys.argv) >= 5 and sys.argv[1] == "run":
    run(sys.argv[2:-2], *sys.argv[-2:])
  else:
    raise SystemExit(__doc__)

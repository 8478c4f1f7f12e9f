"""Continue a prompt with a trained model: ``python -m experiments.generate --workdir W --prompt "..."
[--max-new-tokens N --temperature T --top-k K --top-p P --seed S --step N --max-len L --json]``.

Loads the newest readable checkpoint of ``W`` (or ``--step``; an imported model not trained yet:
its weights, step 0) with ``pmem.load``, prints the
continuation and the decode throughput; ``--json`` prints ``{"text", "token_ids", "logprobs",
"tokens_per_s"}`` instead. Greedy unless ``--temperature`` > 0. Bad arguments (no checkpoint, an
empty prompt, one longer than the model's context, bad sampling values) end with a one-line error
before anything is computed."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pmem.core.runtime import reexec_with_tuned_malloc


def parse(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="a training workdir (holds config.json and checkpoints/)")
  ap.add_argument("--prompt", required=True, help="the text to continue")
  ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
  ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else softmax(logits / temperature)")
  ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
  ap.add_argument("--top-p", type=float, default=1.0, help="sample within the smallest set of probability >= top_p")
  ap.add_argument("--seed", type=int, default=0, help="seed of the draws")
  ap.add_argument("--step", type=int, default=None, help="the checkpoint to load (default: the newest readable)")
  ap.add_argument("--max-len", type=int, default=None, help="prompt + new tokens at most (default: train.seq_len)")
  ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  a = parse(argv)
  if not os.path.exists(os.path.join(a.workdir, "config.json")):
    sys.exit(f"error: {a.workdir} has no config.json; is it a training workdir?")
  from absl import logging
  logging.set_verbosity(logging.ERROR)

  import pmem
  from pmem.decode import Sampling
  from pmem.train.checkpoint import CheckpointError
  try:
    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    loaded = pmem.load(a.workdir, a.step)
    if loaded.tokenizer is None:
      raise ValueError(f"{a.workdir} trained on token ids only (no tokenizer); it cannot read a text prompt")
    gen = loaded.generator(a.max_len)
    ids = [int(i) for i in loaded.tokenizer.encode_batch([a.prompt])[0]]
    if not ids:
      raise ValueError("the prompt has no tokens")
    gen.check([ids], a.max_new_tokens)
  except (ValueError, FileNotFoundError, CheckpointError) as e:
    sys.exit(f"error: {e.args[0] if e.args else e}")
  out = gen.generate([ids], a.max_new_tokens, sampling)
  result = {"text": gen.text(out.tokens[0]), "token_ids": out.tokens[0].tolist(),
            "logprobs": [float(x) for x in out.logprobs[0]], "tokens_per_s": out.tokens_per_s}
  if a.json:
    print(json.dumps(result))
  else:
    print(a.prompt + result["text"])
    print(f"pmem: {len(out.tokens[0])} tokens, decode {out.tokens_per_s:.1f} tokens/s "
          f"(step {loaded.step} of {a.workdir})", file=sys.stderr)
  return result


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()

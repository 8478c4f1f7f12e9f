"""Hugging Face checkpoints <-> pmem workdirs:
``python -m experiments.convert --from-hf DIR --workdir W`` and
``python -m experiments.convert --to-hf DIR --workdir W [--step N]``.

**Import.** ``DIR`` is a Llama / Qwen2 checkpoint (``config.json`` and ``model.safetensors``, or
shards with ``model.safetensors.index.json``; ``tokenizer.json`` optional; what maps and what is
refused: :mod:`pmem.models.hf`). ``W`` becomes a run at step 0 that needs nothing outside itself:

- ``W/hf/``: a copy of DIR's config.json, weight files and those of ``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json`` it has;
- ``W/config.json``, ``W/config.txt``: the run's Fiddle config, ``configs.base.experiment`` with the
  model's shape, ``train.init_from = W/hf`` (its tensors are step 0's parameters) and the tokenizer
  ``data.tokenizer.kind = "hf"``, ``path = W/hf/tokenizer.json`` (without one, ``data.corpus = None``:
  token-level data only); fine-tuning defaults ``train.optim.lr = 1e-4``, ``train.seq_len = 256``,
  the English corpus, everything else as ``experiment``'s. Paths are absolute.

Then ``pmem.load(W)`` and ``experiments.generate --workdir W`` give the imported model (step 0);
``experiments.train --workdir W [--config set:data.... ]`` fine-tunes it (the workdir's config.json is
the base when no ``config:NAME`` is given) and resumes like any run: the fingerprint holds the
weights' content hash and the tokenizer's, not their paths. ``--config config:W --workdir W2``
fine-tunes into another workdir.

**Export.** The model of ``W``'s checkpoint of step ``N`` (default the newest; step 0 or none yet:
the imported weights) -> ``DIR/config.json`` + ``DIR/model.safetensors``, with the run's tokenizer as
``tokenizer.json`` (an imported one, or a BPE trained here; the byte tokenizer has none) and the
source's other files listed above. ``--dtype``: ``float32`` (the default: pmem trains in float32, so
nothing trained is rounded), ``bfloat16``, or ``source`` (each tensor in the dtype of the imported
checkpoint, as ``W/hf/`` holds it: bit-exact for an import not fine-tuned; float32 for a model
trained here); an export that rounds trained weights (a fine-tuned bfloat16 import as ``source``)
warns in one line. ``DIR`` must not exist or be empty. Only dense attention + SwiGLU models export.

Bad input (a missing directory, an unsupported config, tensors that do not fit it, an unreadable
weight file, an HF checkpoint given as ``W`` to ``--to-hf``, a non-empty target) ends with one line
``error: ...`` before anything is written."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

HF_DIR = "hf"  # the imported checkpoint's copy inside the workdir
TOKENIZER = "tokenizer.json"
EXTRA = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def parse(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  way = ap.add_mutually_exclusive_group(required=True)
  way.add_argument("--from-hf", metavar="DIR", help="import a Hugging Face checkpoint directory into --workdir")
  way.add_argument("--to-hf", metavar="DIR", help="export --workdir's model as a Hugging Face checkpoint directory")
  ap.add_argument("--workdir", required=True, help="the pmem workdir (new for --from-hf)")
  ap.add_argument("--step", type=int, default=None, help="--to-hf: the checkpoint to export (default: the newest)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16", "source"), default=None,
                  help="--to-hf: the tensors' dtype (default float32, as trained; source: the imported checkpoint's)")
  a = ap.parse_args(argv)
  for name in ("step", "dtype"):
    if getattr(a, name) is not None and a.from_hf:
      ap.error(f"--{name} applies to --to-hf only")
  return a


def _empty_or_absent(path: str, what: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"{what} {path} exists and is not empty; choose a new one")


def run_config(fields: dict, init_from: str, tokenizer: str | None):
  """The Fiddle config of an imported model (module docstring)."""
  from configs import cli
  from configs.base import experiment
  f = fields
  cfg = experiment(vocab=f["vocab"], d_model=f["d_model"], n_layers=f["n_layers"], n_heads=f["n_heads"],
                   n_kv_heads=f["n_kv_heads"], d_ff=f["d_ff"], seq_len=256, lr=1e-4)
  attn = cfg.model.sequence_mixer
  attn.head_dim, attn.rope_theta = f["head_dim"], f["rope_theta"]
  if f["qkv_bias"]:
    attn.qkv_bias = True
  cfg.model.tie_embeddings, cfg.model.norm_eps = f["tie_embeddings"], f["norm_eps"]
  cfg.train.init_from = init_from
  if tokenizer:
    cfg.data.tokenizer.kind, cfg.data.tokenizer.path = "hf", tokenizer
  else:
    cfg.data.corpus = None
  cli.validate(cfg)
  return cfg


def import_hf(src: str, workdir: str) -> None:
  import fiddle as fdl
  from flax import nnx
  from experiments.train import write_config
  from pmem.data import tokenizer as tok_lib
  from pmem.models import Decoder, hf

  fields = hf.fields(hf.read_config(src))
  _empty_or_absent(workdir, "workdir")
  target = os.path.join(os.path.abspath(workdir), HF_DIR)
  has_tok = os.path.exists(os.path.join(src, TOKENIZER))
  cfg = run_config(fields, target, os.path.join(target, TOKENIZER) if has_tok else None)
  hf.check(src, nnx.eval_shape(lambda: Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0))))
  if has_tok and (n := tok_lib.load_json(os.path.join(src, TOKENIZER)).vocab_size) > fields["vocab"]:
    raise ValueError(f"{src}/{TOKENIZER} has {n} tokens, more than the model's vocab_size={fields['vocab']}")
  files = [os.path.join(src, hf.CONFIG), *hf.weight_files(src)]
  files += [os.path.join(src, n) for n in (hf.INDEX, *EXTRA) if os.path.exists(os.path.join(src, n))]
  os.makedirs(target)
  for path in files:
    shutil.copyfile(path, os.path.join(target, os.path.basename(path)))
  write_config(cfg, workdir)


def export_hf(workdir: str, out: str, step: int | None, dtype: str) -> None:
  import jax.numpy as jnp
  import numpy as np
  import pmem
  from pmem.data.tokenizer import BPETokenizer
  from pmem.models import hf

  _empty_or_absent(out, "--to-hf directory")
  loaded = pmem.load(workdir, step)
  src = loaded.config.train.init_from
  trained = hf.export(loaded.model)  # float32, as trained
  if dtype == "source":  # the imported checkpoint's dtypes; float32 for a model trained here
    source = {name: dt for name, (_, dt) in hf.specs(src).items()} if src else {}
    dtypes = {name: source.get(name, np.dtype(np.float32)) for name in trained}
  else:
    dtypes = dict.fromkeys(trained, jnp.dtype(dtype))
  tensors = {name: t.astype(dtypes[name]) for name, t in trained.items()}
  if rounded := [name for name, t in trained.items() if not np.array_equal(tensors[name].astype(t.dtype), t)]:
    print(f"pmem: warning: --dtype {dtype} rounds {len(rounded)} of {len(tensors)} trained tensors of step "
          f"{loaded.step} (e.g. {rounded[0]}); --dtype float32 keeps them exactly", file=sys.stderr)
  config = hf.hf_config(loaded.model, hf.read_config(src) if src else None, dtypes["model.embed_tokens.weight"].name)
  hf.save(out, config, tensors)
  tok = loaded.config.data.tokenizer
  if tok.kind == "hf":
    shutil.copyfile(tok.path, os.path.join(out, TOKENIZER))
  elif isinstance(loaded.tokenizer, BPETokenizer):
    loaded.tokenizer.tok.save(os.path.join(out, TOKENIZER))
  for name in EXTRA[1:]:
    if src and os.path.exists(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
  print(f"pmem: wrote step {loaded.step} of {workdir} to {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
  a = parse(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  from pmem.train.checkpoint import CheckpointError
  try:
    if a.from_hf:
      import_hf(a.from_hf, a.workdir)
    else:
      if not os.path.exists(os.path.join(a.workdir, "config.json")):
        raise FileNotFoundError(f"{a.workdir} has no config.json; is it a pmem workdir?")
      export_hf(a.workdir, a.to_hf, a.step, a.dtype or "float32")
  except (ValueError, FileNotFoundError, CheckpointError) as e:  # cli.ConfigError is a ValueError
    sys.exit(f"error: {e.args[0] if e.args else e}")


if __name__ == "__main__":
  main()

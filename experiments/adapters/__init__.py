"""Fine-tuning a pretrained model: full vs LoRA vs DoRA at ranks 4-64 (Hu et al. 2021; Liu et al. 2024,
Scaling DoRA) at CPU scale: ``python -m experiments.adapters --out runs/adapters --publish docs/results/adapters``.

Stages, each skipped when its output exists under ``OUT``:

1. ``pretrain/``: ``config:demo`` (the dense BPE-8192 LM, 4 layers d=256, 200 steps of 16 x 256 tokens of
   the English corpus) trained here: there is no pretrained model on these machines.
2. ``hf/``: its final checkpoint exported as a Hugging Face checkpoint (``experiments.convert --to-hf``),
   and ``base/``: that directory imported back (``--from-hf``), the fine-tunes' step 0
   (``train.init_from``) with its ``tokenizer.json``.
3. The grid ``<variant>/seed<k>/``: from ``base``, ``fiddler:bios_finetune`` (bioS biographies of 20
   people; the corpus held out, so its valid bpb measures forgetting), 150 steps of 16 x 128 tokens, no
   weight decay; full fine-tuning at lr 5e-4, LoRA / DoRA at ranks 4, 16, 64 on every projection
   (``wq wk wv wo w_gate w_up w_down``, alpha = 2 x rank, backbone frozen) at lr 3e-3, and at rank 16 also
   at lr 1e-2 (``*_r16_lr1e-2``: whether the adapters' rate limits them); two seeds (data order, adapter
   init). The learning rates were set once, not tuned per method.
4. ``pretrained``: the imported model evaluated before fine-tuning by the same evaluator (one record).

``results.json`` holds a record per run (the pretrained one first), ``results.md`` the table (mean ± std
over seeds), ``--publish DIR`` copies both (``notebooks/adapters.ipynb`` reads them). ``--quick`` runs
every stage at toy size (tests)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

from experiments import grid

EVERY = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
RANKS = (4, 16, 64)
LR, ADAPTER_LR, HIGH_LR = "5e-4", "3e-3", "1e-2"  # full; adapters; the adapters' rate check (as in the commands)


def _adapter(kind: str, r: int, lr: str) -> tuple[str, ...]:
  return f"fiddler:{kind}(rank={r}, targets={EVERY})", f"set:train.optim.lr={lr}"


VARIANTS = {"full": (f"set:train.optim.lr={LR}",),
            **{f"{k}_r{r}": _adapter(k, r, ADAPTER_LR) for k in ("lora", "dora") for r in RANKS},
            **{f"{k}_r16_lr{HIGH_LR}": _adapter(k, 16, HIGH_LR) for k in ("lora", "dora")}}
PRETRAIN = ("config:demo",)
FINETUNE = ("fiddler:bios_finetune(n_people=20)", "set:train.steps=150", "set:train.batch_size=16",
            "set:train.seq_len=128", "set:train.optim.weight_decay=0.0", "set:train.log_every=25",
            "set:eval.every=0", "set:eval.valid_batches=16", "set:checkpoint.every=0")
QUICK_PRETRAIN = ("config:tiny", "set:data.corpus='shakespeare'", "set:data.tokenizer.kind='bpe'",
                  "set:data.tokenizer.vocab_size=300", "set:model.vocab=300", "set:train.steps=2",
                  "set:train.batch_size=2", "set:train.seq_len=32", "set:eval.valid_batches=1",
                  "set:train.progress=False")
QUICK_FINETUNE = ("fiddler:bios_finetune(n_people=4)", "set:train.steps=2", "set:train.batch_size=2",
                  "set:train.seq_len=64", "set:train.optim.weight_decay=0.0", "set:train.log_every=1",
                  "set:eval.every=0", "set:eval.valid_batches=1", "set:checkpoint.every=0", "set:train.progress=False")
COLUMNS = (
    ("valid bpb (forgetting)", "eval.valid/bpb", ".4f"),
    ("bios seen acc", "eval.bios/acc/seen", ".3f"),
    ("bios heldout acc", "eval.bios/acc/heldout", ".3f"),
    ("trainable params", "params_trainable", ",.0f"),
    ("optimizer bytes", "optimizer_bytes", ",.0f"),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("wall s", "wall_s", ".0f"),
)


def make_grid(out: str, quick: bool = False) -> grid.Grid:
  base = f"config:{os.path.join(out, 'base')}"
  return grid.Grid("adapters", VARIANTS, base=(base, *FINETUNE), quick=(base, *QUICK_FINETUNE), columns=COLUMNS)


def prepare(out: str, quick: bool = False, log=print) -> None:
  """Stages 1-2: the pretrained model, its HF export and the imported base (each once)."""
  from configs import cli
  from experiments import convert
  cmds = list(QUICK_PRETRAIN if quick else PRETRAIN)
  wd = os.path.join(out, "pretrain")
  meta = os.path.join(wd, "grid.json")
  if os.path.exists(meta):
    with open(meta) as f:
      if json.load(f)["commands"] != cmds:
        raise cli.ConfigError(f"{wd} was pretrained with other commands (see its grid.json); use a new --out")
  else:
    log(f"adapters: pretraining {wd}: {' '.join(cmds)}")
    grid.run_one(cli.build_config(cmds), cmds, wd)
  hf, base = os.path.join(out, "hf"), os.path.join(out, "base")
  if not os.path.exists(os.path.join(hf, "config.json")):
    shutil.rmtree(hf, ignore_errors=True)  # an export cut short
    convert.export_hf(wd, hf, None)
  if not os.path.exists(os.path.join(base, "config.json")):
    shutil.rmtree(base, ignore_errors=True)
    convert.import_hf(hf, base)


def pretrained(g: grid.Grid, out: str, overrides: Sequence[str] = (), quick: bool = False) -> dict:
  """Stage 4: the imported model's evaluation before fine-tuning, under the ``full`` variant's commands
  (cached in ``OUT/pretrained.json`` with them; other commands evaluate again)."""
  path, cmds = os.path.join(out, "pretrained.json"), grid.commands(g, "full", 0, overrides, quick)
  if os.path.exists(path):
    with open(path) as f:
      rec = json.load(f)
    if rec.get("commands") == cmds:
      return rec
  import fiddle as fdl
  from configs import cli
  from pmem.train.loop import Trainer
  t = Trainer(fdl.build(cli.build_config(cmds)))  # step 0: the imported weights
  rec = {"variant": "pretrained", "seed": 0, "commands": cmds, "steps": 0, "params_total": t.params_total,
         "params_trainable": 0, "eval": t.evaluate(), "usage": {}}
  with open(path, "w") as f:
    json.dump(rec, f, indent=2)
  return rec


def _stage(args, overrides: Sequence[str]) -> tuple[grid.Grid, list[dict]]:
  """Stages 1, 2 and 4 before the grid (:func:`experiments.grid.main`'s ``stage``)."""
  prepare(args.out, args.quick)
  g = make_grid(args.out, args.quick)
  return g, [pretrained(g, args.out, overrides, args.quick)]


def main(argv: Sequence[str] | None = None) -> list[dict] | None:
  return grid.main(make_grid("OUT"), argv, "runs/adapters", stage=_stage)


def load(out: str) -> list[dict]:
  return grid.load(out)


def figure(records: Sequence[dict]):
  """Bios accuracy (seen templates) and valid bpb (forgetting) against trainable parameters (log scale):
  a line per adapter kind over ranks, full fine-tuning a point, the pretrained model a dashed line
  (a pyplot-free Figure). Error bars: std over seeds."""
  import numpy as np
  from matplotlib.figure import Figure
  from matplotlib.ticker import NullFormatter
  fig = Figure(figsize=(11, 4.2))
  ax = fig.subplots(1, 2)
  fields = (("eval.bios/acc/seen", "bios accuracy, seen templates (higher is better)"),
            ("eval.valid/bpb", "corpus valid bits per byte (lower: less forgetting)"))
  groups = {"full": ["full"], **{k: [f"{k}_r{r}" for r in RANKS] for k in ("lora", "dora")},
            **{f"{k} at lr {HIGH_LR}": [f"{k}_r16_lr{HIGH_LR}"] for k in ("lora", "dora")}}
  for a, (path, label) in zip(ax, fields):
    for name, vs in groups.items():
      vs = [v for v in vs if len(grid.values(records, v, path))]
      if not vs:
        continue
      x = [grid.values(records, v, "params_trainable").mean() for v in vs]
      y = [grid.values(records, v, path) for v in vs]
      a.errorbar(x, [v.mean() for v in y], yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in y], marker="o",
                 capsize=3, label=name)
      for xi, yi, v in zip(x, y, vs):
        a.annotate(v.split("_")[1] if "_" in v else v, (xi, yi.mean()), fontsize=7, xytext=(3, 3),
                   textcoords="offset points")
    base = grid.values(records, "pretrained", path)
    if len(base):
      a.axhline(float(np.mean(base)), ls="--", c="gray", label="pretrained (before fine-tuning)")
    a.set_xscale("log")
    a.xaxis.set_minor_formatter(NullFormatter())
    a.set_xlabel("trainable parameters")
    a.set_ylabel(label)
    a.legend(fontsize=8)
  fig.tight_layout()
  return fig


def verdicts(records: Sequence[dict]) -> list[str]:
  """The claims, judged over seeds by :func:`experiments.grid.claim` (better only beyond 2 s.e.):
  (a) DoRA learns more than LoRA at the same rank (DoRA, Liu et al. 2024, §5); (b) LoRA learns less than
  full fine-tuning and (c) forgets less (Biderman et al. 2024, "LoRA Learns Less and Forgets Less");
  whether rank 16 learns more at the higher rate (``*_r16_lr1e-2``); then the optimizer state each method
  keeps, relative to full fine-tuning."""
  acc, bpb = "eval.bios/acc/seen", "eval.valid/bpb"
  records = [r for r in records if r["variant"] != "pretrained"]  # fine-tunes only (steps in the verdicts)
  out = [grid.claim(records, f"(a) DoRA learns more than LoRA at rank {r}", [(f"dora_r{r}", f"lora_r{r}", acc, True)])
         for r in RANKS]
  out += [grid.claim(records, f"(b) full fine-tuning learns more than LoRA at rank {r}",
                     [("full", f"lora_r{r}", acc, True)]) for r in RANKS]
  out += [grid.claim(records, f"(c) LoRA at rank {r} forgets less than full fine-tuning",
                     [(f"lora_r{r}", "full", bpb, False)]) for r in RANKS]
  for k in ("lora", "dora"):  # did the adapters' learning rate hold them back?
    try:
      out.append(f"rate check: {grid.say(grid.compare(records, f'{k}_r16_lr{HIGH_LR}', f'{k}_r16', acc, True))}")
    except ValueError as e:
      out.append(f"rate check for {k}: cannot be judged from these results ({e})")
  full = grid.values(records, "full", "optimizer_bytes")
  for v in VARIANTS:
    x = grid.values(records, v, "optimizer_bytes")
    if len(x) and len(full) and v != "full":
      out.append(f"{v}: optimizer state {x.mean():,.0f} bytes = {x.mean() / full.mean():.4f} x full fine-tuning's")
  return out

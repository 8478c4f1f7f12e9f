"""Ablation grids: named variants x seeds, each trained in-process by the Trainer, then tabulated.

A variant is a list of ``--config`` commands (as ``experiments.train`` takes them) applied after
the grid's base commands and the user's overrides; ``set:seed=<k>`` comes last. Outputs under
``OUT``: ``<variant>/seed<k>/`` (the run's workdir; a run whose ``summary.json`` exists is skipped,
one cut short resumes from its checkpoint), ``results.json`` (one record per finished run),
``results.md`` (mean ± std over seeds per variant) and ``plot.png`` (``Grid.plot``); ``--publish DIR``
copies the two results files to ``DIR`` (``docs/results/<paper>``, read by the notebooks). Every config is
built, and every finished run's commands checked against it, before the first run trains, so a bad
command or a stale ``OUT`` fails at once."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np

# CPU scale, shared by every paper's grid: corpus + bios (BPE-2048 fitted to both), a 4-layer d=64
# model (4 layers so STEM's half / third schedules differ), one evaluation after the last step
BASE = ("config:bios_small", "set:data.corpus='english'", "set:data.bios.n_people=50", "set:model.n_layers=4",
        "set:model.d_model=64", "set:model.channel_mixer.d_ff=256", "set:train.steps=200", "set:train.log_every=50",
        "set:eval.every=0")
# --quick (tests): byte-level, d=32, 3 steps of 4x128 tokens, one valid batch, 20 people
QUICK = ("config:bios_small", "set:data.corpus='english'", "set:data.tokenizer.kind='byte'", "set:model.vocab=256",
         "set:data.bios.n_people=20", "set:model.n_layers=4", "set:model.d_model=32", "set:train.steps=3",
         "set:train.batch_size=4", "set:train.seq_len=128", "set:train.log_every=1", "set:eval.every=0",
         "set:eval.valid_batches=1", "set:train.progress=False")

# (column, record path, format); a record is {variant, seed, ..., summary fields, eval: {...}}
COLUMNS = (
    ("valid loss", "eval.valid/loss", ".4f"),
    ("valid bpb", "eval.valid/bpb", ".4f"),
    ("bios seen acc", "eval.bios/acc/seen", ".3f"),
    ("bios heldout acc", "eval.bios/acc/heldout", ".3f"),
    ("knowledge bits", "eval.bios/knowledge_bits", ".0f"),
    ("bits/param", "eval.bios/bits_per_param", ".2e"),
    ("bits/active param", "eval.bios/bits_per_active_param", ".2e"),
    ("params", "params_total", ",.0f"),
    ("active params", "params_active_per_token", ",.0f"),
    ("FLOPs/token", "flops_per_token", ",.0f"),
    ("tokens/s", "tokens_per_s", ",.0f"),
)


@dataclasses.dataclass(frozen=True)
class Grid:
  """A paper's grid: base commands (model, data, steps), the variants, and the ``--quick`` base."""
  name: str
  variants: dict[str, tuple[str, ...]]
  base: tuple[str, ...] = BASE
  quick: tuple[str, ...] = QUICK  # replaces ``base`` under --quick (tests)
  seeds: int = 2
  # dense variant -> variants it is matched to: its SwiGLU width is set (fiddler:match_flops) so its
  # forward FLOPs/token equal the largest of theirs, so no memory model gets more compute than it
  match: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  plot: str = "plot.png"  # file name of the plot under OUT
  columns: tuple = COLUMNS  # results.md's columns: (heading, record path, format)


# ------------------------------------------------------------------------------------- running


def commands(grid: Grid, variant: str, seed: int, overrides: Sequence[str] = (), quick: bool = False) -> list[str]:
  return [*(grid.quick if quick else grid.base), *overrides, *grid.variants[variant], f"set:seed={seed}"]


def build_all(grid: Grid, seeds: int, overrides: Sequence[str] = (), quick: bool = False) -> dict:
  """{(variant, seed): (commands, fdl.Config)} in grid order, matched dense variants given their
  ``fiddler:match_flops(flops=N)``; a bad command raises ConfigError naming the variant."""
  from configs import cli, match
  for d, ts in grid.match.items():
    wrong = [t for t in (d, *ts) if t not in grid.variants] + [t for t in ts if t in grid.match]
    if wrong or not ts:
      raise cli.ConfigError(f"grid {grid.name!r}: match {d!r} -> {ts}: {wrong or 'no target'} "
                            "is not an unmatched variant")
  built = {}

  def one(v, s, extra=()):
    cmds = [*commands(grid, v, s, overrides, quick), *extra]
    try:
      built[v, s] = cmds, cli.build_config(cmds)
    except (cli.ConfigError, ValueError, KeyError, TypeError) as e:
      raise cli.ConfigError(f"variant {v!r}: {e.args[0] if e.args else e}") from e

  for s in range(seeds):
    for v in grid.variants:
      if v not in grid.match:
        one(v, s)
    for v, targets in grid.match.items():
      flops = max(match.flops_per_token(built[t, s][1]) for t in targets)
      one(v, s, (f"fiddler:match_flops(flops={flops})",))
  return {(v, s): built[v, s] for v in grid.variants for s in range(seeds)}


def run_one(cfg, cmds: list[str], workdir: str) -> None:
  """Trains one config into ``workdir`` and writes ``grid.json`` (commands, wall seconds) beside it."""
  import fiddle as fdl
  import jax
  from experiments.train import write_config
  from pmem.train.loop import Trainer
  t0 = time.perf_counter()
  trainer = Trainer(fdl.build(cfg), workdir, overwrite=True)  # a run cut short before its first checkpoint restarts
  write_config(cfg, workdir)
  trainer.run()
  with open(os.path.join(workdir, "grid.json"), "w") as f:
    json.dump({"commands": cmds, "wall_s": time.perf_counter() - t0}, f, indent=2)
  del trainer
  jax.clear_caches()  # many runs in one process: drop their compiled steps


def run(grid: Grid, out: str, seeds: int | None = None, overrides: Sequence[str] = (), quick: bool = False,
        only: Sequence[str] | None = None, log=print, head: Sequence[dict] = ()) -> list[dict]:
  """Runs every (variant, seed) not yet done (of the variants ``only``, default all), then writes
  results.json / results.md / the plot over every finished run of the grid, after the records
  ``head`` (e.g. a reference model's evaluation)."""
  from configs.cli import ConfigError
  seeds = grid.seeds if seeds is None else seeds
  built = build_all(grid, seeds, overrides, quick)
  done = {k for k in built if os.path.exists(os.path.join(out, k[0], f"seed{k[1]}", "summary.json"))}
  for v, s in done:
    meta = os.path.join(out, v, f"seed{s}", "grid.json")
    if os.path.exists(meta) and _json(meta)["commands"] != built[v, s][0]:
      raise ConfigError(f"{out}/{v}/seed{s} was run with other commands (see its grid.json); use a new --out")
  todo = [k for k in built if only is None or k[0] in only]
  t0 = time.perf_counter()
  for i, (v, s) in enumerate(todo):
    if (v, s) in done:
      log(f"grid: [{i + 1}/{len(todo)}] {v}/seed{s}: done, skipped")
      continue
    cmds, cfg = built[v, s]
    log(f"grid: [{i + 1}/{len(todo)}] {v}/seed{s}: " + " ".join(cmds))
    run_one(cfg, cmds, os.path.join(out, v, f"seed{s}"))
    done.add((v, s))
  records = [*head, *collect(out, [k for k in built if k in done])]  # every finished run, in grid order
  write(records, out, grid.name, grid.plot, grid.columns)
  log(f"grid: {len(todo)} runs in {time.perf_counter() - t0:.0f} s; wrote {out}/results.json, results.md, {grid.plot}")
  return records


def _json(path: str):
  with open(path) as f:
    return json.load(f)


def collect(out: str, runs: Sequence[tuple[str, int]]) -> list[dict]:
  """One record per finished run: the variant, seed, commands, wall seconds and the run's summary."""
  records = []
  for v, s in runs:
    wd = os.path.join(out, v, f"seed{s}")
    summary = _json(os.path.join(wd, "summary.json"))
    extra = {"commands": None, "wall_s": None}
    if os.path.exists(os.path.join(wd, "grid.json")):
      extra.update(_json(os.path.join(wd, "grid.json")))
    records.append({"variant": v, "seed": s, **extra, **summary, "usage": usage(summary.get("eval", {}))})
  return records


def usage(ev: dict) -> dict[str, float]:
  """Row usage of each memory, averaged over its layers: ``"<name> touched"`` (fraction of rows hit
  on the held-out text) and ``"<name> kl_uniform"`` (nats), from ``usage/<name>/<layer>/<stat>``."""
  acc: dict[str, list[float]] = {}
  for k, x in ev.items():
    parts = k.split("/")
    if len(parts) == 4 and parts[0] == "usage" and parts[3] in ("touched", "kl_uniform"):
      acc.setdefault(f"{parts[1]} {parts[3]}", []).append(x)
  return {k: float(np.mean(xs)) for k, xs in sorted(acc.items())}


# ----------------------------------------------------------------------------------- reporting


def get(record: dict, path: str):
  """A field by ``eval.<key>``, ``usage.<key>`` or top-level name; None if absent."""
  head, _, key = path.partition(".")
  if head in ("eval", "usage") and key:
    return record.get(head, {}).get(key)
  return record.get(path)


def values(records: Sequence[dict], variant: str, path: str) -> np.ndarray:
  """The finite values of one field over a variant's seeds."""
  xs = [get(r, path) for r in records if r["variant"] == variant]
  return np.array([x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)], float)


def variants(records: Sequence[dict]) -> list[str]:
  return list(dict.fromkeys(r["variant"] for r in records))


def _cell(x: np.ndarray, fmt: str) -> str:
  if not len(x):
    return "–"
  if len(x) == 1:
    return format(x[0], fmt)
  return f"{format(x.mean(), fmt)} ± {format(x.std(ddof=1), fmt)}"


def table(records: Sequence[dict], columns: Sequence[tuple] = COLUMNS) -> str:
  """Markdown: one row per variant, mean ± std over seeds (std with ddof=1) of every column."""
  keys = sorted({k for r in records for k in r.get("usage", {})})
  cols = [*columns, *((k, "usage." + k, ".3f") for k in keys)]
  lines = ["| variant | seeds | " + " | ".join(c for c, _, _ in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
  for v in variants(records):
    n = sum(r["variant"] == v for r in records)
    lines.append(f"| {v} | {n} | " + " | ".join(_cell(values(records, v, p), f) for _, p, f in cols) + " |")
  return "\n".join(lines)


def compare(records: Sequence[dict], a: str, b: str, path: str, higher: bool = False) -> dict:
  """Is variant ``a`` better than ``b`` on one field? ``gain`` = improvement of a over b (mean),
  ``se`` its standard error over seeds (None with one seed), ``verdict`` 'better' / 'worse' when
  the gain is beyond two standard errors, else 'tie'; with one seed of either there is no error bar
  and no verdict ('one seed')."""
  x, y = values(records, a, path), values(records, b, path)
  if not len(x) or not len(y):
    raise ValueError(f"no {path} values for {a!r} or {b!r} (variants: {variants(records)})")
  gain = (x.mean() - y.mean()) * (1 if higher else -1)
  se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y)) if min(len(x), len(y)) > 1 else None
  verdict = "one seed" if se is None else "better" if gain > 2 * se else "worse" if gain < -2 * se else "tie"
  return {"a": a, "b": b, "field": path, "a_mean": x.mean(), "b_mean": y.mean(), "gain": gain, "se": se,
          "verdict": verdict}


def say(c: dict) -> str:
  """One plain sentence for a :func:`compare` result."""
  err = f" ± {2 * c['se']:.3g} (2 s.e.)" if c["se"] is not None else " (one seed: no error bar, no verdict)"
  return (f"{c['a']} vs {c['b']} on {c['field']}: {c['a_mean']:.4g} vs {c['b_mean']:.4g}, "
          f"gain {c['gain']:+.3g}{err} -> {c['verdict']}")


def claim(records: Sequence[dict], text: str, checks: Sequence[tuple]) -> str:
  """Whether a paper's claim held: every check ``(a, b, field, higher)`` must be 'better' (see
  :func:`compare`). Returns the checks and a one-line conclusion naming the seeds and steps."""
  try:
    cs = [compare(records, a, b, path, higher) for a, b, path, higher in checks]
  except ValueError as e:
    return f"{text}: cannot be judged from these results ({e})"
  if any(c["se"] is None for c in cs):
    return "\n".join([*map(say, cs), f"=> {text}: cannot be judged from one seed per variant (no error bar)."])
  held = all(c["verdict"] == "better" for c in cs)
  seeds = max(sum(r["variant"] == v for r in records) for v in variants(records))
  steps = sorted({r.get("steps") for r in records} - {None})
  lines = [say(c) for c in cs]
  lines.append(f"=> {text}: {'HELD' if held else 'DID NOT HOLD'} at this scale "
               f"({seeds} seed(s) per variant, {'/'.join(map(str, steps))} steps).")
  return "\n".join(lines)


def figure(records: Sequence[dict], title: str = ""):
  """Four panels per variant: valid bpb, bios accuracy (seen / held-out), knowledge bits per active
  parameter, and valid bpb against forward FLOPs per token (a pyplot-free Figure: any backend)."""
  from matplotlib.figure import Figure
  vs = variants(records)
  x = np.arange(len(vs))

  def stat(v, p):
    a = values(records, v, p)
    return (a.mean() if len(a) else np.nan), (a.std(ddof=1) if len(a) > 1 else 0.0)

  def bars(a, fields, ylabel):
    w = 0.8 / len(fields)
    for j, (p, label) in enumerate(fields):
      m, s = zip(*(stat(v, p) for v in vs))
      a.bar(x + (j - (len(fields) - 1) / 2) * w, m, w, yerr=s, label=label, capsize=2)
    a.set_xticks(x, vs, rotation=40, ha="right", fontsize=8)
    a.set_ylabel(ylabel)
    if len(fields) > 1:
      a.legend(fontsize=8)

  fig = Figure(figsize=(11, 8.5))
  ax = fig.subplots(2, 2).ravel()
  bars(ax[0], [("eval.valid/bpb", "")], "valid bits per byte (lower is better)")
  lo = np.nanmin([stat(v, "eval.valid/bpb")[0] for v in vs] + [np.inf])
  if np.isfinite(lo):
    ax[0].set_ylim(bottom=0.95 * lo)
  bars(ax[1], [("eval.bios/acc/seen", "seen templates"), ("eval.bios/acc/heldout", "held-out templates")],
       "bios accuracy")
  bars(ax[2], [("eval.bios/bits_per_active_param", "")], "knowledge bits / active parameter")
  for v in vs:
    f, (b, e) = stat(v, "flops_per_token")[0], stat(v, "eval.valid/bpb")
    ax[3].errorbar(f, b, yerr=e, fmt="o", capsize=2)
    ax[3].annotate(v, (f, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax[3].set_xlabel("forward FLOPs / token")
  ax[3].set_ylabel("valid bits per byte")
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def write(records: Sequence[dict], out: str, title: str, plot_name: str = "plot.png",
          columns: Sequence[tuple] = COLUMNS) -> None:
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(list(records), f, indent=2)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"# {title}\n\n{table(records, columns)}\n")
  figure(records, title).savefig(os.path.join(out, plot_name), dpi=110)


def load(out: str) -> list[dict]:
  """The records of a grid's ``results.json`` (what the notebooks read)."""
  path = os.path.join(out, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {path}; run the grid's launcher first (e.g. python -m experiments.stem --out {out})")
  return _json(path)


# ----------------------------------------------------------------------------------------- CLI


def parser(grid: Grid, default_out: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m experiments.{grid.name}", description=__doc__.split("\n")[0])
  p.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
  p.add_argument("--seeds", type=int, default=None, help=f"seeds per variant (default {grid.seeds})")
  p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the grid's)")
  p.add_argument("--quick", action="store_true", help="tiny model, few steps (tests)")
  p.add_argument("--only", default=None, help="comma-separated variants to run (default: all)")
  p.add_argument("--config", action="append", default=[],
                 help="set:PATH=VALUE / fiddler:NAME applied to every variant, before its own commands")
  p.add_argument("--list", action="store_true", help="print the variants and their commands and exit")
  p.add_argument("--publish", default=None,
                 help="also copy results.json / results.md to this directory (e.g. docs/results/<paper>, what "
                      "the committed notebooks read)")
  return p


def compile_cache() -> None:
  """Persistent XLA compilation cache under ``${PMEM_CACHE:-~/.cache/pmem}/jax``: a grid's seeds and
  reruns compile identical train / score steps, which are then read back instead of recompiled."""
  import jax
  from pmem.data.corpus import cache_dir
  jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))


def main(grid: Grid, argv: Sequence[str] | None = None, default_out: str | None = None,
         stage=None) -> list[dict] | None:
  """The grid's CLI. ``stage(args, overrides) -> (grid, head records)``, if given, runs before the grid
  (e.g. a model the grid starts from) and returns the grid to run and the records listed first."""
  args = parser(grid, default_out or f"runs/{grid.name}").parse_args(argv)
  from configs.cli import ConfigError
  if args.list:
    for v, cmds in grid.variants.items():
      matched = f" + match_flops(to {', '.join(grid.match[v])})" if v in grid.match else ""
      print(f"{v}: {' '.join(cmds) or '(base)'}{matched}")
    return None
  only = None
  if args.only:
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in only if n not in grid.variants]
    if bad:
      sys.exit(f"error: unknown variant {bad[0]!r}; variants: {', '.join(grid.variants)}")
  for name in ("seeds", "steps"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      sys.exit(f"error: --{name} must be >= 1, got {getattr(args, name)}")
  compile_cache()
  over = list(args.config) + ([f"set:train.steps={args.steps}"] if args.steps is not None else [])
  try:
    grid, head = stage(args, over) if stage else (grid, [])
    records = run(grid, args.out, args.seeds, over, args.quick, only, head=head)
  except (ConfigError, ValueError) as e:
    sys.exit(f"error: {e.args[0] if e.args else e}")
  if args.publish:
    os.makedirs(args.publish, exist_ok=True)
    for name in ("results.json", "results.md"):
      shutil.copyfile(os.path.join(args.out, name), os.path.join(args.publish, name))
  print(table(records, grid.columns))
  return records

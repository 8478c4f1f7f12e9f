"""Associative recall across sequence mixers (Zoology, Arora et al. 2023, arXiv 2312.04927) at CPU
scale: ``python -m experiments.recall --out runs/recall --publish docs/results/recall``.

Swept: the sequence mixer of a 4-layer model with tiny's attention shape (4 heads, 2 KV heads, d_ff 2 x
d_model, head tied to the embedding as in Zoology) — attention (``tiny``), sliding window 16
(``swa_tiny``), linear attention, GLA, Mamba2, DeltaNet, Gated DeltaNet (``<name>_tiny``) and the GGGA
hybrid (``hybrid_tiny``) — on MQAR (vocabulary 64, 1500 steps of 32 sequences drawn from 20,000) over
the sub-grid ``SETTINGS`` of (d_model, key-value pairs, length): kv x length {(2, 8), (2, 16), (4, 16)} at
d_model 64 (4 pairs need 16 tokens) and d_model 32 at the hardest (4, 16). MQAR here fits inside the
window (16 >= T), where the sliding window is attention exactly, so MQAR runs it only when asked (``--only
swa``; ``MQAR_MIXERS``); the sliding window is tested by passkey retrieval (BPE-512, 8 filler sentences at depths 0 / 0.5 / 1, 1000
steps of 8 x 112 tokens; attention and the window by default, ``PASSKEY_MIXERS``), whose needle sits
20-59 tokens before the answer, beyond the window. **Length generalization**: every run is also evaluated at 2x and 4x
the length it trained on (MQAR test sequences of 2T and 4T tokens with the same pairs, the queries spread over them;
passkey haystacks of 16 and 32 filler sentences, ~2x / 4x its 112 tokens), beyond the window 16 at all of them
(columns ``acc_2x``, ``acc_4x``). The test-time memories (Titans LMM / MAG / MAL, MoM: ``S2_MIXERS``) run when
named in ``--only``. Two seeds each; every run is one ``experiments.grid``
run (``OUT/mqar/<variant>/seed<k>``, ``OUT/passkey/<mixer>/seed<k>``). Writes ``OUT/results.json`` /
``results.csv`` (a row per run: task, mixer, config, d_model, kv, T, seed, accuracy, decode-state bytes
per sequence at T and at 4096 tokens, steps, wall seconds), ``results.md`` (mean ± std over seeds) and
``plot.png`` (accuracy vs decode-state bytes); ``--publish DIR`` copies the three text files
(``notebooks/recall.ipynb`` draws the plot). ``--only`` takes mixer names (both tasks), ``--tasks``
``mqar`` / ``passkey``."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np

from experiments import grid

MIXERS = {  # name -> (the tiny config with that sequence mixer, the commands giving it on another base)
    "attention": ("tiny", ()),
    "swa": ("swa_tiny", ("fiddler:swa",)),
    "linear_attn": ("linear_attn_tiny", ("fiddler:mixer(name='linear_attn')",)),
    "gla": ("gla_tiny", ("fiddler:mixer(name='gla')",)),
    "mamba2": ("mamba2_tiny", ("fiddler:mixer(name='mamba2')",)),
    "deltanet": ("deltanet_tiny", ("fiddler:mixer(name='deltanet')",)),
    "gdn": ("gdn_tiny", ("fiddler:mixer(name='gdn')",)),
    "hybrid": ("hybrid_tiny", ("fiddler:hybrid",)),
    "titans": ("titans_lmm_tiny", ("fiddler:mixer(name='titans')",)),
    "titans_mag": ("titans_mag_tiny", ("fiddler:mixer(name='titans_mag')",)),
    "titans_mal": ("titans_mal_tiny", ("fiddler:hybrid(pattern='GW', G='titans', window=16)",)),
    "mom": ("mom_tiny", ("fiddler:mixer(name='mom')",)),
}
S2_MIXERS = ("titans", "titans_mag", "titans_mal", "mom")  # run when named in --only
GROW = (2, 4)  # evaluated at these multiples of the trained length too
SHAPE = ("set:model.n_layers=4", "set:model.sequence_mixer.n_heads=4", "set:model.sequence_mixer.n_kv_heads=2",
         "fiddler:tied")
SETTINGS = ((64, 2, 8), (64, 2, 16), (64, 4, 16), (32, 4, 16))  # (d_model, kv pairs, T); kv 4 needs T >= 16
MQAR = ("config:mqar_small", *SHAPE, "set:model.vocab=64", "set:data.mqar.vocab_size=64", "set:data.mqar.n_train=20000",
        "set:eval.mqar_examples=256", "set:train.batch_size=32", "set:train.optim.lr=3e-3", "set:train.steps=1500",
        "set:train.log_every=100")
PASSKEY_T, FAR = 112, "passkey/acc/length/8/depth/0.0"  # prompts + answers ~104 BPE tokens; FAR: 59 tokens back
PASSKEY = ("config:passkey_small", *SHAPE, "set:model.d_model=64", "set:model.channel_mixer.d_ff=128",
           "set:data.passkey.lengths=(8,)", f"set:data.passkey.eval_lengths={tuple(8 * g for g in GROW)}",
           "set:data.passkey.depths=(0.0, 0.5, 1.0)", "set:data.passkey.n_eval=32",
           f"set:train.seq_len={PASSKEY_T}", "set:train.batch_size=8", "set:train.optim.lr=3e-3",
           "set:train.steps=1000", "set:train.log_every=100")
# --quick (tests): one small MQAR setting and a passkey run of 3 steps each
QUICK_SETTINGS = ((32, 2, 16),)
QUICK = ("set:train.steps=3", "set:train.batch_size=4", "set:train.progress=False")
QUICK_TASK = {"mqar": ("set:eval.mqar_examples=8", "set:data.mqar.n_train=16"),
              "passkey": ("set:data.passkey.n_eval=1", "set:data.passkey.n_train=16", "set:train.seq_len=256")}
PASSKEY_MIXERS = ("attention", "swa")  # passkey learns only after ~1000 steps: the default runs these two
MQAR_MIXERS = tuple(m for m in MIXERS if m != "swa" and m not in S2_MIXERS)  # at T <= 16 the window 16 changes nothing
LONG = 4096  # the context at which decode state is also reported (attention's KV cache grows with it)


def setting(d: int, kv: int, t: int) -> tuple[str, ...]:
  return (f"set:model.d_model={d}", f"set:model.channel_mixer.d_ff={2 * d}", f"set:data.mqar.num_kv_pairs={kv}",
          f"set:data.mqar.seq_len={t}", f"set:data.mqar.eval_lengths={tuple(g * t for g in GROW)}",
          f"set:train.seq_len={t}")


def grids(quick: bool = False) -> dict[str, tuple[grid.Grid, dict[str, dict]]]:
  """{task: (its Grid, {variant: row fields})}: MQAR variants ``<mixer>-d<d>-kv<kv>-T<T>``, passkey ``<mixer>``."""
  mq = {f"{m}-d{d}-kv{kv}-T{t}": ((*cmds, *setting(d, kv, t)), {"mixer": m, "d_model": d, "kv": kv, "T": t})
        for d, kv, t in (QUICK_SETTINGS if quick else SETTINGS) for m, (_, cmds) in MIXERS.items()}
  pk = {m: (cmds, {"mixer": m, "d_model": 64, "kv": None, "T": PASSKEY_T}) for m, (_, cmds) in MIXERS.items()}
  out = {}
  for task, base, vs in (("mqar", MQAR, mq), ("passkey", PASSKEY, pk)):
    out[task] = (grid.Grid(f"recall/{task}", {v: c for v, (c, _) in vs.items()}, base=base,
                            quick=(*base, *QUICK, *QUICK_TASK[task])),
                 {v: f for v, (_, f) in vs.items()})
  return out


def long_state_bytes(cmds: Sequence[str], length: int = LONG) -> int:
  """Decode-state bytes per sequence of the config ``cmds`` at ``length`` tokens (an abstract model)."""
  import fiddle as fdl
  from flax import nnx
  from configs import cli
  from pmem.models import Decoder
  cfg = fdl.build(cli.build_config(list(cmds)).model)
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))).state_bytes(length)


def rows(task: str, records: Sequence[dict], fields: dict[str, dict]) -> list[dict]:
  """One flat row per finished run (what results.json / .csv hold)."""
  out, long = [], {}
  for r in records:
    f, ev = fields[r["variant"]], r.get("eval", {})
    key = (f["mixer"], f["d_model"], task)
    if key not in long:
      long[key] = long_state_bytes(r["commands"])
    out.append({"task": task, **f, "config": MIXERS[f["mixer"]][0], "seed": r["seed"],
                "acc": ev.get("mqar/acc" if task == "mqar" else "passkey/acc"),
                "acc_far": ev.get(FAR) if task == "passkey" else None,
                **{f"acc_{g}x": ev.get(f"mqar/acc/length/{g * f['T']}" if task == "mqar" else f"passkey/acc/length/{8 * g}")
                   for g in GROW},
                "state_bytes": r["decode_state_bytes_per_sequence"], f"state_bytes_{LONG}": long[key],
                "steps": r["steps"], "wall_s": r["wall_s"], "params": r["params_total"],
                "tokens_per_s": r["tokens_per_s"], "variant": r["variant"], "commands": r["commands"]})
  return out


# ----------------------------------------------------------------------------------- reporting


def acc(rs: Sequence[dict], mixer: str, task: str = "mqar", field: str = "acc", **where) -> np.ndarray:
  """The values of ``field`` over the seeds of one mixer (and setting: ``d_model=``, ``kv=``, ``T=``)."""
  return np.array([r[field] for r in rs if r["task"] == task and r["mixer"] == mixer
                   and all(r[k] == v for k, v in where.items()) and r.get(field) is not None], float)


def cell(x: np.ndarray, fmt: str = ".3f") -> str:
  if not len(x):
    return "–"
  return format(x.mean(), fmt) if len(x) == 1 else f"{format(x.mean(), fmt)} ± {format(x.std(ddof=1), fmt)}"


def settings(rs: Sequence[dict]) -> list[tuple[int, int, int]]:
  return list(dict.fromkeys((r["d_model"], r["kv"], r["T"]) for r in rs if r["task"] == "mqar"))


def mixers(rs: Sequence[dict]) -> list[str]:
  have = {r["mixer"] for r in rs}
  return [m for m in MIXERS if m in have]


def table(rs: Sequence[dict]) -> str:
  """Markdown: MQAR accuracy per mixer and setting, passkey accuracy, decode-state bytes (mean ± std over seeds)."""
  ss, ms = settings(rs), mixers(rs)
  seeds = max([len(acc(rs, m, **dict(zip(("d_model", "kv", "T"), s)))) for m in ms for s in ss] or [0])
  head = ["mixer", "config", *(f"d{d} kv{kv} T{t}" for d, kv, t in ss)]
  lines = [f"MQAR accuracy (answer tokens, {seeds} seeds, mean ± std):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in ms:
    lines.append(f"| {m} | {MIXERS[m][0]} | " + " | ".join(
        cell(acc(rs, m, d_model=d, kv=kv, T=t)) for d, kv, t in ss) + " |")
  pk = [m for m in ms if len(acc(rs, m, "passkey"))]
  if pk:
    lines += ["", f"Passkey (BPE-512, T={PASSKEY_T}; needle 20-59 tokens back, far: depth 0, 59 tokens back):", "",
              "| mixer | acc (all cells) | acc far needle |", "|---|---|---|"]
    lines += [f"| {m} | {cell(acc(rs, m, 'passkey'))} | {cell(acc(rs, m, 'passkey', 'acc_far'))} |" for m in pk]
  lines += grown(rs, ss, ms)
  ts = sorted({(r["d_model"], r["T"]) for r in rs})
  wide = max(d for d, _ in ts)
  lines += ["", "Decode-state bytes per sequence:", "",
            "| mixer | " + " | ".join(f"d{d} T={t}" for d, t in ts) + f" | d{wide} T={LONG} |",
            "|---|" + "---|" * (len(ts) + 1)]
  for m in ms:
    by = {(r["d_model"], r["T"]): r["state_bytes"] for r in rs if r["mixer"] == m}
    big = next((r[f"state_bytes_{LONG}"] for r in rs if r["mixer"] == m and r["d_model"] == wide), None)
    lines.append(f"| {m} | " + " | ".join(f"{by[k]:,}" if k in by else "–" for k in ts)
                 + f" | {'–' if big is None else f'{big:,}'} |")
  return "\n".join(lines)


def grown(rs: Sequence[dict], ss, ms) -> list[str]:
  """Markdown lines: accuracy at 1x / 2x / 4x the trained length, per mixer (MQAR per setting, passkey)."""
  cols = [*(("mqar", dict(zip(("d_model", "kv", "T"), s)), f"MQAR d{s[0]} kv{s[1]} T{s[2]}") for s in ss),
          *((("passkey", {}, f"passkey T={PASSKEY_T}"),) if any(r["task"] == "passkey" for r in rs) else ())]
  have = [m for m in ms if any(r["mixer"] == m and r.get(f"acc_{GROW[-1]}x") is not None for r in rs)]
  if not have:
    return []
  f = lambda task, m, w: " / ".join(cell(acc(rs, m, task, k, **w), ".2f") for k in ("acc", *(f"acc_{g}x" for g in GROW)))  # noqa: E731
  head = ["mixer", *(c for _, _, c in cols)]
  return (["", f"Length generalization: accuracy at 1x / {' / '.join(f'{g}x' for g in GROW)} the trained length "
                "(the window: 16 tokens):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
          + [f"| {m} | " + " | ".join(f(t, m, w) for t, w, _ in cols) + " |" for m in have])


def figure(rs: Sequence[dict]):
  """Accuracy vs decode-state KiB per sequence: one panel per MQAR setting and one for passkey's far
  needle; a point per mixer (mean over seeds, bars: std). A pyplot-free Figure."""
  from matplotlib.figure import Figure
  panels = [("mqar", "acc", dict(zip(("d_model", "kv", "T"), s)), "MQAR d{d_model} kv{kv} T{T}") for s in settings(rs)]
  if any(r["task"] == "passkey" for r in rs):
    panels.append(("passkey", "acc_far", {}, f"passkey, far needle (T={PASSKEY_T})"))
  cols = min(3, len(panels))
  fig = Figure(figsize=(4.2 * cols, 3.4 * math.ceil(len(panels) / cols)))
  axes = np.atleast_1d(fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False)).ravel()
  for a, (task, field, where, title) in zip(axes, panels):
    for i, m in enumerate(mixers(rs)):
      y = acc(rs, m, task, field, **where)
      b = acc(rs, m, task, "state_bytes", **where)
      if len(y):
        a.errorbar(b.mean() / 1024, y.mean(), yerr=y.std(ddof=1) if len(y) > 1 else 0, fmt="osv^<>Dp"[i],
                   ms=9 if i == 0 else 5, capsize=2, color=f"C{i}", label=m)  # attention big: swa may cover it
    a.set_ylim(-0.03, 1.03)
    a.set_title(title.format(**where), fontsize=9)
    a.set_xlabel("decode state per sequence (KiB)")
    a.set_ylabel("accuracy")
  for a in axes[len(panels):]:
    a.axis("off")
  (axes[-1] if len(axes) > len(panels) else axes[0]).legend(*axes[0].get_legend_handles_labels(), fontsize=8,
                                                            loc="center" if len(axes) > len(panels) else "best")
  fig.tight_layout()
  return fig


def write(rs: Sequence[dict], out: str) -> None:
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(list(rs), f, indent=1)
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    cols = [k for k in rs[0] if k != "commands"]
    w = csv.DictWriter(f, cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rs)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"# recall\n\n{table(rs)}\n")
  figure(rs).savefig(os.path.join(out, "plot.png"), dpi=110)


def load(out: str) -> list[dict]:
  path = os.path.join(out, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {path}; run python -m experiments.recall --out {out} first")
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------ verdicts


def _diff(xs: Sequence[tuple[float, np.ndarray]]) -> tuple[float, float | None]:
  """Mean and standard error of ``sum(w * mean(x))`` over independent groups of seeds."""
  if any(len(x) < 2 for _, x in xs):
    return float(sum(w * x.mean() for w, x in xs)) if all(len(x) for _, x in xs) else math.nan, None
  return (float(sum(w * x.mean() for w, x in xs)),
          math.sqrt(sum(w * w * x.var(ddof=1) / len(x) for w, x in xs)))


def _label(gain: float, se: float | None) -> str:
  if se is None or math.isnan(gain):
    return "inconclusive (fewer than 2 seeds)"
  return "holds" if gain > 2 * se else "does not hold" if gain < -2 * se else "inconclusive (spread overlaps)"


def _per_seed_mean(rs: Sequence[dict], m: str, ss) -> np.ndarray:
  """A mixer's accuracy averaged over the settings ``ss``, per seed."""
  by = [acc(rs, m, d_model=d, kv=kv, T=t) for d, kv, t in ss]
  n = min((len(x) for x in by), default=0)
  return np.mean([x[:n] for x in by], axis=0) if n else np.array([])


SOLVED = 0.9  # "solves": answer-token accuracy at least this


def verdicts(rs: Sequence[dict]) -> list[str]:
  """The three published orderings, each 'holds' / 'does not hold' / 'inconclusive (spread overlaps)': a
  difference counts only beyond two standard errors over seeds (as ``experiments.grid.compare``). (a) and
  (c) are judged at the widest model's kv x length settings, (b) over every MQAR setting."""
  wide = max((d for d, _, _ in settings(rs)), default=None)
  ss = [s for s in settings(rs) if s[0] == wide]
  err = lambda se: f"± {2 * se:.3f}" if se is not None else "(no error bar)"
  # (a) attention solves MQAR: accuracy - SOLVED beyond 2 s.e. at every setting
  per = []
  for d, kv, t in ss:
    g, se = _diff([(1.0, acc(rs, "attention", d_model=d, kv=kv, T=t))])
    per.append((f"d{d} kv{kv} T{t}: {g:.3f} {err(se)}", _label(g - SOLVED, se)))
  labels = {lab for _, lab in per}
  a = ("holds" if labels == {"holds"} else "does not hold" if "does not hold" in labels
       else next((lab for _, lab in per if lab != "holds"), "inconclusive (no MQAR results)"))
  lines = [f"(a) attention solves MQAR (accuracy >= {SOLVED}) at every d{wide} setting: {a} — "
           + "; ".join(f"{text} -> {lab}" for text, lab in per)]
  # (b) gated delta beats linear attention: accuracy averaged over every MQAR setting, per seed
  every = settings(rs)
  g, se = _diff([(1.0, _per_seed_mean(rs, "gdn", every)), (-1.0, _per_seed_mean(rs, "linear_attn", every))])
  lines.append(f"(b) gdn beats linear attention (MQAR accuracy, mean over {len(every)} settings): {_label(g, se)} — "
               f"gdn - linear_attn {g:+.3f} {err(se)} (2 s.e.)")
  # (c) the hybrid (GGGA) closes most (over half) of the gap from gdn, its recurrent layers, to attention:
  # hybrid - (gdn + attention) / 2 beyond 2 s.e., with less decode state than attention at the longest T
  h, gd, at = (_per_seed_mean(rs, m, ss) for m in ("hybrid", "gdn", "attention"))
  g, se = _diff([(1.0, h), (-0.5, gd), (-0.5, at)])
  gap, gse = _diff([(1.0, at), (-1.0, gd)])
  label, gap_label = _label(g, se), _label(gap, gse)
  if gap_label == "does not hold":  # attention below gdn beyond the spread: the claim's premise fails
    label = "not applicable (gdn recalls better than attention here: no gap to close)"
  elif label == "holds" and gap_label != "holds":
    label = "inconclusive (spread overlaps)"  # no gap beyond the spread: nothing to close
  t = max((t for _, _, t in ss), default=None)
  state = {m: [(r["state_bytes"], r[f"state_bytes_{LONG}"]) for r in rs
               if r["task"] == "mqar" and r["mixer"] == m and r["d_model"] == wide and r["T"] == t][:1]
           for m in ("hybrid", "attention")}
  frac = "decode state: –"
  if all(state.values()):
    (hb, hl), (ab, al) = state["hybrid"][0], state["attention"][0]
    frac = (f"decode state at T={t}: {hb:,} vs {ab:,} B ({hb / ab:.2f}x), at T={LONG}: {hl:,} vs {al:,} B "
            f"({hl / al:.2f}x)")
    if label == "holds" and hb >= ab:
      label = f"does not hold (the accuracy does, but not at a fraction of attention's state at T={t})"
  closed = (h.mean() - gd.mean()) / gap if len(h) and len(gd) and gap and not math.isnan(gap) else math.nan
  lines.append(f"(c) the hybrid closes most of the gdn -> attention gap at a fraction of attention's decode state: "
               f"{label} — gap attention - gdn {gap:+.3f} {err(gse)}, the hybrid closes {closed:.0%} of it "
               f"(hybrid - midpoint {g:+.3f} {err(se)}); {frac}")
  return lines


# ----------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> list[dict] | None:
  gs = grids()
  p = grid.parser(gs["mqar"][0], "runs/recall")
  p.prog, p.description = "python -m experiments.recall", __doc__.split("\n")[0]
  p.add_argument("--tasks", default="mqar,passkey", help="comma-separated tasks (default mqar,passkey)")
  args = p.parse_args(argv)
  gs = grids(args.quick)
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
  bad = [t for t in tasks if t not in gs] + [m for m in only or () if m not in MIXERS]
  if bad:
    sys.exit(f"error: unknown task or mixer {bad[0]!r}; tasks: {', '.join(gs)}; mixers (--only): {', '.join(MIXERS)}")
  if args.list:
    for t in tasks:
      for v, cmds in gs[t][0].variants.items():
        print(f"{t} {v}: {' '.join(cmds) or '(base)'}")
    return None
  for name in ("seeds", "steps"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      sys.exit(f"error: --{name} must be >= 1, got {getattr(args, name)}")
  from configs.cli import ConfigError
  grid.compile_cache()
  over = list(args.config) + ([f"set:train.steps={args.steps}"] if args.steps is not None else [])
  out, default = [], {"mqar": MQAR_MIXERS, "passkey": PASSKEY_MIXERS}
  try:
    for t in tasks:
      g, fields = gs[t]
      records = grid.run(g, os.path.join(args.out, t), args.seeds, over, args.quick,
                         [v for v in g.variants if fields[v]["mixer"] in (only or default[t])])
      out += rows(t, records, fields)
  except ConfigError as e:
    sys.exit(f"error: {e.args[0] if e.args else e}")
  write(out, args.out)
  if args.publish:
    os.makedirs(args.publish, exist_ok=True)
    for name in ("results.json", "results.csv", "results.md"):
      shutil.copyfile(os.path.join(args.out, name), os.path.join(args.publish, name))
  print(table(out))
  print("\n".join(verdicts(out)))
  return out
